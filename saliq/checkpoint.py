"""Checkpoint files: the atomic writer, the file manifest, and the one verification that `saliq.load` and
`saliq info` share. docs/FORMAT.md ("Checkpoint files") is the normative description.

A checkpoint is a directory:
    config.json                       the model config plus `quantization_config` (quant_method "saliq")
    model-0000i-of-0000n.safetensors  tensors
    model.safetensors.index.json      weight_map: tensor name -> shard file
    tokenizer files, generation_config.json, calibration_log.jsonl ...
    saliq-manifest.json               size and sha256 of every file above

Nothing here knows about models: hf.py turns a model into tensors and a config and back.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import re
import secrets
import shutil
import stat
import struct
import tempfile
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from .spec import QuantSpec

QUANT_METHOD = "saliq"
CONFIG_NAME = "config.json"
INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"  # one file of tensors without an index, as transformers writes small models
MANIFEST_NAME = "saliq-manifest.json"
MANIFEST_VERSION = 1
# Checkpoint format (docs/FORMAT.md): 1 = packed format v1 tensors as in memory; 2 = the same packing, tensors in
# their smallest exact storage form (saliq/storage.py), per-module widths and reserved weights. Both load.
CHECKPOINT_FORMAT = 2
READABLE_FORMATS = (1, 2)
ZERO_STORAGE = ("uint4", "int8", "int16")   # how a module's zero points may be stored (saliq/storage.py)
RESERVED_STORAGE = ("float16", "bfloat16")  # and its reserved weights
GENERATION_CONFIG_NAME = "generation_config.json"
TOKENIZER_NAMES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "vocab.json", "vocab.txt", "merges.txt", "tokenizer.model", "chat_template.jinja",
                   "chat_template.json")
SHARD_RE = re.compile(r"model-\d{5}-of-\d{5}\.safetensors")
_SMALL_FILE = 64 * 1024**2        # files up to this size are kept in memory after verification (never shards)
_MAX_JSON = 256 * 1024**2         # a config, index or manifest larger than this is not one
_SHA_RE = re.compile(r"[0-9a-f]{64}")


class CheckpointError(ValueError):
    """A checkpoint is missing, corrupt, or does not match its config; never load it silently."""


# ---------------------------------------------------------------- names inside the checkpoint
def member_path(d: Path, name, what: str = "file") -> Path:
    """`d / name` for a file name read from the checkpoint (index, manifest); refuses names that could leave `d`:
    absolute paths, `..`, backslashes, and symbolic links that resolve outside it."""
    check_name(d, name, what)
    p = d / name
    root = os.path.realpath(d)
    real = os.path.realpath(p)
    if not any(real != r and os.path.commonpath([r, real]) == r for r in (root, *_hub_blobs(d))):
        raise CheckpointError(f"{d}: {what} {name!r} is a symbolic link to {real}, outside the checkpoint; "
                              "refusing to read it")
    return p


def _hub_blobs(d: Path) -> tuple[str, ...]:
    """The blob store of a Hugging Face cache snapshot (`<repo>/snapshots/<revision>`, whose files are links into
    `<repo>/blobs`): the one place outside the directory that its links may lead to."""
    d = Path(os.path.abspath(d))
    blobs = d.parent.parent / "blobs"
    if d.parent.name == "snapshots" and d.parent.parent.name.startswith("models--") and blobs.is_dir():
        return (os.path.realpath(blobs),)
    return ()


def check_name(d, name, what: str = "file"):
    """A checkpoint file name: relative, `/`-separated, no `.` or `..` component, no backslash."""
    if not isinstance(name, str) or not name:
        raise CheckpointError(f"{d}: {what} {name!r} is not a file name")
    if name.startswith("/") or "\\" in name or "\x00" in name or re.match(r"[A-Za-z]:", name):
        raise CheckpointError(f"{d}: {what} {name!r} is not a relative path inside the checkpoint; refusing to read it")
    if any(part in ("", ".", "..") for part in name.split("/")):
        raise CheckpointError(f"{d}: {what} {name!r} leaves the checkpoint directory; refusing to read it")


def _stat_regular(p: Path, what: str) -> os.stat_result:
    try:
        st = os.stat(p)
    except FileNotFoundError:
        raise CheckpointError(f"{p}: {what} is missing; the checkpoint is incomplete") from None
    except OSError as e:
        raise CheckpointError(f"{p}: {what} cannot be read ({e.strerror or e})") from None
    if not stat.S_ISREG(st.st_mode):
        raise CheckpointError(f"{p}: {what} is not a regular file")
    return st


def _read_member(p: Path, what: str, keep: bool, limit: int | None = None) -> tuple[int, str, bytes | None]:
    """(size, sha256, bytes if keep) of one file, read once."""
    st = _stat_regular(p, what)
    if limit is not None and st.st_size > limit:
        raise CheckpointError(f"{p}: {what} is {st.st_size} bytes, too large to be one; the checkpoint is damaged")
    h, chunks, n = hashlib.sha256(), [], 0
    try:
        with open(p, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 22), b""):
                h.update(chunk)
                n += len(chunk)
                if keep:
                    chunks.append(chunk)
    except OSError as e:
        raise CheckpointError(f"{p}: {what} cannot be read ({e.strerror or e})") from None
    return n, h.hexdigest(), b"".join(chunks) if keep else None


def _sha256(path: Path) -> str:
    return _read_member(Path(path), "file", keep=False)[1]


def _no_duplicates(pairs):
    out = {}
    for k, v in pairs:
        if k in out:
            raise ValueError(f"duplicate key {k!r}")
        out[k] = v
    return out


def _parse_json(raw: bytes, path: Path, what: str):
    try:
        return json.loads(raw.decode("utf-8"), object_pairs_hook=_no_duplicates)
    except (ValueError, RecursionError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise CheckpointError(f"{path}: {what} is not valid JSON ({e}); the checkpoint is corrupt") from None


def one_line(e: BaseException, limit: int = 200) -> str:
    """`Type: first line of the message`, cut to `limit` characters, for a one-line CheckpointError."""
    msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
    msg = f"{type(e).__name__}: {msg}" if msg else type(e).__name__
    return msg if len(msg) <= limit else msg[: limit - 3] + "..."


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


# ---------------------------------------------------------------- config
def check_quant_config(config, path: Path) -> dict:
    """The `quantization_config` of a parsed config.json, every field the loader uses type-checked."""
    d = path.parent
    qc = config.get("quantization_config") if isinstance(config, dict) else None
    if not isinstance(qc, dict) or qc.get("quant_method") != QUANT_METHOD:
        raise CheckpointError(f"{d} is not a saliq checkpoint (quantization_config.quant_method != 'saliq')")
    if qc.get("format_version") not in READABLE_FORMATS or not _is_int(qc.get("format_version")):
        raise CheckpointError(
            f"{d} uses checkpoint format version {qc.get('format_version')!r}; this saliq reads versions "
            f"{', '.join(map(str, READABLE_FORMATS))}. Re-quantize the model or install the saliq version that wrote it"
        )
    try:
        QuantSpec(bits=qc["bits"], group_size=qc["group_size"], symmetric=qc["symmetric"])
    except KeyError as e:
        raise CheckpointError(f"{path}: quantization_config has no {e.args[0]!r}") from None
    except ValueError as e:
        raise CheckpointError(f"{path}: quantization_config: {e}") from None
    bad = None
    if not isinstance(qc.get("method"), str):
        bad = f"method={qc.get('method')!r} (a string)"
    elif not _is_int(qc.get("lora_rank")) or qc["lora_rank"] < 0:
        bad = f"lora_rank={qc.get('lora_rank')!r} (an integer >= 0)"
    elif not _is_number(qc.get("lora_alpha")):
        bad = f"lora_alpha={qc.get('lora_alpha')!r} (a finite number)"
    elif not isinstance(qc.get("modules"), dict) or not qc["modules"]:
        bad = "modules (a non-empty mapping of module name -> settings)"
    if bad is None:
        for name, m in qc["modules"].items():
            if not isinstance(m, dict):
                bad = f"modules[{name!r}] (a mapping)"
            elif not _is_int(m.get("lora_rank")) or m["lora_rank"] < 0:
                bad = f"modules[{name!r}].lora_rank={m.get('lora_rank')!r} (an integer >= 0)"
            elif not _is_number(m.get("lora_alpha")):
                bad = f"modules[{name!r}].lora_alpha={m.get('lora_alpha')!r} (a finite number)"
            elif not isinstance(m.get("bias"), bool):
                bad = f"modules[{name!r}].bias={m.get('bias')!r} (true or false)"
            else:
                bad = _check_module_storage(name, m)
            if bad:
                break
    if bad:
        raise CheckpointError(f"{path}: quantization_config has a bad {bad}")
    return qc


def _check_module_storage(name: str, m: dict):
    """The format-2 entries of a module (each optional: absent means the format-1 default), or what is wrong."""
    from .spec import ALLOWED_BITS

    if "bits" in m and (not _is_int(m["bits"]) or m["bits"] not in ALLOWED_BITS):
        return f"modules[{name!r}].bits={m['bits']!r} (one of {ALLOWED_BITS})"
    if m.get("zeros_dtype", "int16") not in ZERO_STORAGE:
        return f"modules[{name!r}].zeros_dtype={m['zeros_dtype']!r} (one of {tuple(ZERO_STORAGE)})"
    if "reserved" in m and (not _is_int(m["reserved"]) or m["reserved"] < 0):
        return f"modules[{name!r}].reserved={m['reserved']!r} (an integer >= 0)"
    if m.get("reserved_dtype", "float16") not in RESERVED_STORAGE:
        return f"modules[{name!r}].reserved_dtype={m['reserved_dtype']!r} (one of {tuple(RESERVED_STORAGE)})"
    return None


def module_storage(m: dict) -> dict:
    """The loader's view of a checked module entry: bits (None: the config's), reserved count and storage dtypes."""
    import torch

    return {"bits": m.get("bits"), "reserved": int(m.get("reserved", 0)),
            "zeros_storage": m.get("zeros_dtype", "int16"),
            "reserved_dtype": getattr(torch, m.get("reserved_dtype", "float16"))}


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


# ---------------------------------------------------------------- manifest
def _read_manifest(d: Path) -> dict[str, tuple[int, str]] | None:
    """{file name: (size, sha256)} from the manifest (its own size under MANIFEST_NAME); None when there is none."""
    p = member_path(d, MANIFEST_NAME, "manifest")
    if not os.path.lexists(p):
        return None
    raw = _read_member(p, "manifest", keep=True, limit=_MAX_JSON)[2]
    m = _parse_json(raw, p, "the manifest")
    if not isinstance(m, dict) or m.get("saliq_manifest") != MANIFEST_VERSION or not _is_int(m["saliq_manifest"]):
        raise CheckpointError(f"{p}: not a saliq manifest of version {MANIFEST_VERSION} "
                              f"(saliq_manifest={m.get('saliq_manifest') if isinstance(m, dict) else m!r})")
    files = m.get("files")
    if not isinstance(files, dict) or not files:
        raise CheckpointError(f"{p}: has no 'files' (file name -> size and sha256)")
    out = {}
    for name, entry in files.items():
        member_path(d, name, "manifest entry")
        if name == MANIFEST_NAME:
            raise CheckpointError(f"{p}: lists itself")
        if (not isinstance(entry, dict) or not _is_int(entry.get("bytes")) or entry["bytes"] < 0
                or not isinstance(entry.get("sha256"), str) or not _SHA_RE.fullmatch(entry["sha256"])):
            raise CheckpointError(f"{p}: entry {name!r} needs 'bytes' (an integer) and 'sha256' (64 hex digits)")
        out[name] = (entry["bytes"], entry["sha256"])
    out[MANIFEST_NAME] = (len(raw), "")
    return out


def build_manifest(d: str | os.PathLike, names: list[str] | None = None) -> dict:
    """Write `d`/saliq-manifest.json covering `names` (default: every regular file under `d`); returns it."""
    d = Path(d)
    if names is None:
        names = sorted(str(p.relative_to(d).as_posix()) for p in d.rglob("*")
                       if p.is_file() and not p.is_symlink() and p.name != MANIFEST_NAME)
    first = [n for n in (CONFIG_NAME, INDEX_NAME) if n in names]
    files = {}
    for name in first + [n for n in names if n not in first]:
        size, sha, _ = _read_member(member_path(d, name), name, keep=False)
        files[name] = {"bytes": size, "sha256": sha}
    manifest = {"saliq_manifest": MANIFEST_VERSION, "files": files}
    write_json(d / MANIFEST_NAME, manifest)
    return manifest


# ---------------------------------------------------------------- verification
@dataclass
class Checkpoint:
    """A verified checkpoint: every file the loader reads has the size and sha256 its manifest records."""

    dir: Path
    config: dict
    quant_config: dict
    weight_map: dict[str, str]
    shards: list[str]
    files: dict[str, int]                 # verified file -> size (manifest order)
    extra: list[str]                      # entries of the directory the manifest does not list (ignored)
    legacy: bool = False                  # written before manifests: shards verified, other files not
    weights_file: str = INDEX_NAME        # the file that names the shards: the index, or one model.safetensors
    manifest_bytes: int = 0               # size of saliq-manifest.json (0 for a legacy checkpoint)
    _data: dict[str, bytes] = field(default_factory=dict, repr=False)

    @property
    def total_bytes(self) -> int:
        """Size of the checkpoint's own files (the manifest included), not of extra files."""
        return sum(self.files.values()) + self.manifest_bytes

    def path(self, name: str) -> Path:
        return self.dir / name

    def data(self, name: str) -> bytes | None:
        """The verified bytes of a small file (config, index, tokenizer files ...), None if not kept."""
        return self._data.get(name)

    def load_tensors(self) -> dict:
        """Every tensor of every shard; each shard must hold exactly the tensors the weight_map gives it."""
        from safetensors.torch import load_file

        state: dict = {}
        for shard in self.shards:
            p = self.path(shard)
            try:
                tensors = load_file(str(p))
            except Exception as e:  # safetensors raises its own error types, and others for odd headers
                raise CheckpointError(f"{p}: not a readable safetensors file ({one_line(e)})") from None
            want = {k for k, v in self.weight_map.items() if v == shard}
            if set(tensors) != want:
                odd = sorted(set(tensors) ^ want)[:3]
                raise CheckpointError(f"{p}: holds other tensors than the index's weight_map gives it (e.g. {odd})")
            state.update(tensors)
        return state

    def tensor_headers(self):
        """(name, dtype, shape) of every tensor, read from the shards' safetensors headers only."""
        return [(key, dtype, shape) for shard in self.shards for key, (dtype, shape) in _shard_header(self.path(shard))
                .items()]

    def check_tensors(self, expected: dict, optional=frozenset()):
        """Compare the shards' headers (nothing else is read) with the tensors a model expects: every shard holds
        exactly the tensors the weight_map gives it, no tensor is missing (except `optional` ones, e.g. tied
        weights), none is unexpected, and each has the expected shape and dtype (float dtypes may differ: they are
        cast on load). expected: {name: (shape, torch dtype)}. Raises CheckpointError."""
        found = {}
        for shard in self.shards:
            header = _shard_header(self.path(shard))
            want = {k for k, v in self.weight_map.items() if v == shard}
            if set(header) != want:
                odd = sorted(set(header) ^ want)[:3]
                raise CheckpointError(f"{self.path(shard)}: holds other tensors than the index's weight_map gives it "
                                      f"(e.g. {odd})")
            found.update(header)
        missing = [k for k in expected if k not in found and k not in optional]
        unexpected = [k for k in found if k not in expected]
        if missing or unexpected:
            raise CheckpointError(f"{self.dir}: tensors do not match the config: missing {missing[:5]}, "
                                  f"unexpected {unexpected[:5]}")
        for k, (dtype, shape) in found.items():
            want_shape, want_dtype = expected[k]
            if tuple(shape) != tuple(want_shape):
                raise CheckpointError(f"{self.dir}: tensor {k} has shape {tuple(shape)}, the config implies "
                                      f"{tuple(want_shape)}")
            is_float = dtype in _FLOAT_CODES
            if _DTYPE_CODES.get(want_dtype) != dtype and not (is_float and want_dtype.is_floating_point):
                raise CheckpointError(f"{self.dir}: tensor {k} has dtype {dtype}, the config implies {want_dtype}")

    def load_tokenizer(self):
        """The tokenizer, built only from verified files (copied aside, so that stray files are never read);
        None when the checkpoint has no tokenizer files."""
        from transformers import AutoTokenizer

        if self.legacy:
            if not any(os.path.isfile(self.dir / n) for n in ("tokenizer.json", "tokenizer_config.json")):
                return None
            src, tmp = str(self.dir), None
        else:
            if not any(n in self.files for n in ("tokenizer.json", "tokenizer_config.json")):
                return None
            tmp = tempfile.TemporaryDirectory(prefix="saliq-tokenizer-")
            src = tmp.name
            for name in self.files:
                if name in self.shards or name in (INDEX_NAME, SINGLE_NAME):
                    continue
                raw = self._data.get(name)
                if raw is None:  # a large file the tokenizer does not need
                    continue
                dst = Path(src) / name
                dst.parent.mkdir(parents=True, exist_ok=True)
                dst.write_bytes(raw)
        try:
            tok = AutoTokenizer.from_pretrained(src)
        except Exception as e:  # tokenizers raise many types for a bad file
            raise CheckpointError(f"{self.dir}: the tokenizer files cannot be loaded ({one_line(e)})") from None
        finally:
            if tmp is not None:
                tmp.cleanup()
        try:
            tok.name_or_path = str(self.dir)
        except AttributeError:
            pass
        return tok


def verify(ckpt_dir: str | os.PathLike, hashes: bool = True, need=None) -> Checkpoint:
    """Check a checkpoint directory: manifest, config, index, and the size and sha256 of every file the manifest
    lists (hashes=False: sizes only). Raises CheckpointError naming the file and what is wrong.

    need: check only config.json, the index, the shards and these listed files (what a model loader reads; the
    tokenizer files are then neither read nor required). The weights may be one `model.safetensors` instead of an
    index and shards."""
    d = Path(ckpt_dir)
    if not d.is_dir():
        raise CheckpointError(f"{d} is not a directory: not a saliq checkpoint")
    manifest = _read_manifest(d)
    if manifest is None:
        return _verify_legacy(d, hashes)
    manifest_bytes = manifest.pop(MANIFEST_NAME)[0]
    man_path = d / MANIFEST_NAME
    if CONFIG_NAME not in manifest:
        raise CheckpointError(f"{man_path}: has no checksum for {CONFIG_NAME}; the manifest is damaged")
    weights = INDEX_NAME if INDEX_NAME in manifest or SINGLE_NAME not in manifest else SINGLE_NAME
    if weights not in manifest:
        raise CheckpointError(f"{man_path}: has no checksum for {INDEX_NAME} (or {SINGLE_NAME}); the manifest is "
                              "damaged")
    data = {}

    def check(name, keep):
        size, want = manifest[name]
        p = member_path(d, name, "file")
        st = _stat_regular(p, "file listed in the manifest")
        if st.st_size != size:
            raise CheckpointError(f"{p}: {st.st_size} bytes, the manifest says {size}: the file is truncated or "
                                  "was changed; re-download or re-quantize")
        if not hashes:
            return
        n, got, raw = _read_member(p, "file listed in the manifest", keep)
        if n != size or got != want:
            raise CheckpointError(f"{p}: its sha256 does not match the manifest: the file is corrupt or was changed; "
                                  "re-download or re-quantize")
        if keep:
            data[name] = raw

    check(CONFIG_NAME, True)
    config = _json_of(d, CONFIG_NAME, data, "config.json")
    qc = check_quant_config(config, d / CONFIG_NAME)
    if weights == INDEX_NAME:
        check(INDEX_NAME, True)
        weight_map, shards = _check_index(d, _json_of(d, INDEX_NAME, data, "the index"))
    else:  # the header is read only after the file's checksum matched
        check(SINGLE_NAME, False)
        weight_map, shards = {k: SINGLE_NAME for k in _shard_header(member_path(d, SINGLE_NAME))}, [SINGLE_NAME]
    for shard in shards:
        if shard not in manifest:
            raise CheckpointError(f"{d / INDEX_NAME}: shard {shard!r} has no checksum in {MANIFEST_NAME}; "
                                  "the checkpoint is damaged")
    wanted = None if need is None else {CONFIG_NAME, weights, *shards, *need}
    for name, (size, _) in manifest.items():
        if name not in (CONFIG_NAME, weights) and (wanted is None or name in wanted):
            check(name, keep=name not in shards and size <= _SMALL_FILE)
    return Checkpoint(dir=d, config=config, quant_config=qc, weight_map=weight_map, shards=shards,
                      files={n: s for n, (s, _) in manifest.items()}, extra=_extra_entries(d, manifest),
                      manifest_bytes=manifest_bytes, weights_file=weights, _data=data)


_DTYPE_CODES = {}  # torch dtype -> safetensors dtype code, filled on first use (torch is imported lazily)
_FLOAT_CODES = ("F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2")


def _fill_dtype_codes():
    import torch

    _DTYPE_CODES.update({torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
                         torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8",
                         torch.uint8: "U8", torch.bool: "BOOL"})


def _shard_header(p: Path) -> dict:
    """{tensor name: (safetensors dtype code, shape)} from a safetensors file's header."""
    if not _DTYPE_CODES:
        _fill_dtype_codes()
    try:
        with open(p, "rb") as f:
            head = f.read(8)
            n = struct.unpack("<Q", head)[0] if len(head) == 8 else -1
            if n < 0 or n > min(_MAX_JSON, os.fstat(f.fileno()).st_size - 8):
                raise CheckpointError(f"{p}: not a safetensors file (bad header length)")
            header = _parse_json(f.read(n), p, "the safetensors header")
    except OSError as e:
        raise CheckpointError(f"{p}: shard cannot be read ({e.strerror or e})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{p}: not a safetensors file (bad header)")
    out = {}
    for key, t in header.items():
        if key == "__metadata__":
            continue
        if (not isinstance(t, dict) or not isinstance(t.get("dtype"), str)
                or not isinstance(t.get("shape"), list) or not all(_is_int(s) and s >= 0 for s in t["shape"])):
            raise CheckpointError(f"{p}: tensor {key!r} has a bad safetensors header entry")
        out[key] = (t["dtype"], list(t["shape"]))
    return out


def _json_of(d: Path, name: str, data: dict, what: str):
    raw = data.get(name)
    if raw is None:  # sizes-only verification
        raw = _read_member(member_path(d, name), what, keep=True, limit=_MAX_JSON)[2]
    return _parse_json(raw, d / name, what)


def _check_index(d: Path, index) -> tuple[dict, list[str]]:
    p = d / INDEX_NAME
    wm = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(wm, dict) or not wm:
        raise CheckpointError(f"{p}: has no weight_map (tensor name -> shard file); the index is damaged")
    if not isinstance(index.get("metadata", {}), dict):
        raise CheckpointError(f"{p}: its metadata is not a mapping; the index is damaged")
    for k, v in wm.items():
        if not isinstance(v, str):
            raise CheckpointError(f"{p}: weight_map[{k!r}] = {v!r} is not a file name")
    shards = sorted(set(wm.values()))
    for s in shards:
        member_path(d, s, "weight_map shard")
    return wm, shards


def _extra_entries(d: Path, listed) -> list[str]:
    known = {n.split("/")[0] for n in listed} | {MANIFEST_NAME}
    try:
        entries = sorted(os.scandir(d), key=lambda e: e.name)
    except OSError:
        return []
    return [e.name + ("/" if e.is_dir(follow_symlinks=False) else "") for e in entries if e.name not in known]


def _verify_legacy(d: Path, hashes: bool) -> Checkpoint:
    """A checkpoint written before manifests (sha256 of each shard in the index's metadata): its shards are
    verified, its config.json and tokenizer files cannot be."""
    cfg_path = member_path(d, CONFIG_NAME, "config")
    if not os.path.lexists(cfg_path):
        raise CheckpointError(f"{str(d)!r} has no config.json: not a saliq checkpoint")
    cfg_size, _, raw = _read_member(cfg_path, "config.json", keep=True, limit=_MAX_JSON)
    config = _parse_json(raw, cfg_path, "config.json")
    qc = check_quant_config(config, cfg_path)
    idx_path = member_path(d, INDEX_NAME, "index")
    if not os.path.lexists(idx_path):
        raise CheckpointError(f"{d} has no {INDEX_NAME}: incomplete checkpoint")
    idx_size, _, raw = _read_member(idx_path, "the index", keep=True, limit=_MAX_JSON)
    index = _parse_json(raw, idx_path, "the index")
    if qc.get("manifest") or (isinstance(index, dict) and isinstance(index.get("metadata"), dict)
                              and index["metadata"].get("manifest")):
        raise CheckpointError(f"{d / MANIFEST_NAME}: is missing; without it the checkpoint cannot be verified. "
                              "Re-download or re-quantize")
    weight_map, shards = _check_index(d, index)
    checksums = index.get("metadata", {}).get("sha256")
    files = {CONFIG_NAME: cfg_size, INDEX_NAME: idx_size}
    for shard in shards:
        want = checksums.get(shard) if isinstance(checksums, dict) else None
        if not isinstance(want, str):
            raise CheckpointError(f"{idx_path}: shard {shard!r} has no sha256 in the index metadata; "
                                  "the checkpoint cannot be verified. Re-quantize")
        p = member_path(d, shard, "weight_map shard")
        if hashes:
            n, got, _ = _read_member(p, "shard", keep=False)
            if got != want:
                raise CheckpointError(f"{p}: its sha256 does not match the index: the file is truncated or corrupt; "
                                      "re-download or re-quantize")
        else:
            n = _stat_regular(p, "shard").st_size
        files[shard] = n
    warnings.warn(f"{d} was written by an older saliq without {MANIFEST_NAME}: its shards are verified, its "
                  "config.json and tokenizer files cannot be. Save it again to add a manifest", stacklevel=3)
    return Checkpoint(dir=d, config=config, quant_config=qc, weight_map=weight_map, shards=shards, files=files,
                      extra=_extra_entries(d, list(files) + [n for n in TOKENIZER_NAMES if (d / n).exists()]),
                      legacy=True)


def read_quant_config(ckpt_dir: str | os.PathLike) -> dict:
    """The checked `quantization_config` of a saliq checkpoint (config.json verified against the manifest; the
    shards are not read: use verify() for the whole checkpoint)."""
    d = Path(ckpt_dir)
    cfg_path = member_path(d, CONFIG_NAME, "config")
    if not os.path.lexists(cfg_path):
        raise CheckpointError(f"{str(d)!r} has no config.json: not a saliq checkpoint")
    _, got, raw = _read_member(cfg_path, "config.json", keep=True, limit=_MAX_JSON)
    manifest = _read_manifest(d)
    if manifest is not None:
        if CONFIG_NAME not in manifest:
            raise CheckpointError(f"{d / MANIFEST_NAME}: has no checksum for {CONFIG_NAME}; the manifest is damaged")
        if (len(raw), got) != manifest[CONFIG_NAME]:
            raise CheckpointError(f"{cfg_path}: its sha256 does not match the manifest: the file is corrupt or was "
                                  "changed; re-download or re-quantize")
    return check_quant_config(_parse_json(raw, cfg_path, "config.json"), cfg_path)


def is_saliq_checkpoint(path: str | os.PathLike) -> bool:
    """Whether `path` holds a config.json saying quant_method "saliq" (nothing else is checked)."""
    cfg = Path(path) / CONFIG_NAME
    if not cfg.is_file():
        return False
    try:
        qc = json.loads(cfg.read_text()).get("quantization_config") or {}
    except (ValueError, AttributeError, OSError):
        return False
    return isinstance(qc, dict) and qc.get("quant_method") == QUANT_METHOD


def looks_like_saliq_checkpoint(path: str | os.PathLike) -> bool:
    """Whether `path` is meant to be a saliq checkpoint, even a damaged one: its config says so, or it has a
    manifest, or its index carries saliq's metadata. Such a directory must go through verify(), never be read as
    a plain transformers model (which would silently drop the quantized tensors)."""
    p = Path(path)
    if is_saliq_checkpoint(p) or os.path.lexists(p / MANIFEST_NAME):
        return True
    try:
        meta = json.loads((p / INDEX_NAME).read_text()).get("metadata")
    except (ValueError, AttributeError, OSError):
        return False
    return isinstance(meta, dict) and ("manifest" in meta or "sha256" in meta)


def describe(ckpt_dir) -> dict:
    """Quantization config and a size breakdown of a checkpoint, after the verification `saliq.load` does (every
    file against the manifest): CheckpointError names a damaged file. bits_per_weight counts everything a
    quantized layer stores (codes, scales, zeros, reserved weights with their indices, LoRA, bias) per quantized
    weight; bits_by_part splits it; packed_bits_per_weight is codes, scales and zeros alone.

    bytes: the checkpoint's own files (the manifest's); extra_files: entries of the directory it does not list
    (ignored by the loader, not counted)."""
    ck = verify(ckpt_dir)
    qc = ck.quant_config
    parts = dict.fromkeys(("codes", "scales", "zeros", "reserved", "lora", "bias", "other"), 0)
    leaf_part = {"qweight": "codes", "qweight_hi": "codes", "scales": "scales", "zeros": "zeros",
                 "sparse_rowptr": "reserved", "sparse_cols": "reserved", "sparse_values": "reserved",
                 "lora_A": "lora", "lora_B": "lora", "bias": "bias"}
    weights = 0
    for key, dtype, shape in ck.tensor_headers():
        n = 1
        for d in shape:
            n *= d
        nbytes = n * _DTYPE_BYTES.get(dtype, 4)
        module, _, leaf = key.rpartition(".")
        entry = qc["modules"].get(module)
        part = leaf_part.get(leaf) if entry is not None else None
        parts[part or "other"] += nbytes
        if part == "codes" and leaf == "qweight" and len(shape) == 2:
            bits = entry.get("bits", qc["bits"])
            weights += shape[0] * (32 // (2 if bits == 3 else bits)) * shape[1]
    quantized = sum(v for k, v in parts.items() if k != "other")
    packed = parts["codes"] + parts["scales"] + parts["zeros"]
    per_weight = {f"{k}_bits": 8 * v / max(weights, 1) for k, v in parts.items() if k != "other"}
    widths = {}
    for m in qc["modules"].values():
        b = m.get("bits", qc["bits"])
        widths[b] = widths.get(b, 0) + 1
    return {"dir": str(ckpt_dir), "quantization_config": {k: v for k, v in qc.items() if k != "modules"},
            "quantized_layers": len(qc["modules"]), "quantized_weights": weights, "layers_by_bits": widths,
            "bytes": ck.total_bytes, "packed_bytes": packed, "reserved_bytes": parts["reserved"],
            "lora_bytes": parts["lora"], "other_bytes": parts["other"] + parts["bias"],
            "packed_bits_per_weight": 8 * packed / max(weights, 1),
            "bits_per_weight": 8 * quantized / max(weights, 1), "bits_by_part": per_weight,
            "files": len(ck.files) + (0 if ck.legacy else 1), "extra_files": ck.extra,
            "verified": "legacy: shards only (no manifest)" if ck.legacy else "all files (manifest)"}


_DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}


def checkpoint_size(ckpt_dir: str | os.PathLike) -> int:
    """Bytes of the checkpoint's own files (sizes checked against the manifest, contents not hashed)."""
    return verify(ckpt_dir, hashes=False).total_bytes


# ---------------------------------------------------------------- writing
def write_json(path: Path, obj):
    Path(path).write_text(json.dumps(obj, indent=2, sort_keys=False, default=str))


def _write_shard(path: Path, tensors: dict, metadata: dict):
    """One safetensors file (a separate function so that tests can make it fail)."""
    from safetensors.torch import save_file

    save_file(tensors, str(path), metadata=metadata)


def write_shards(d: Path, tensors: dict, max_shard_bytes: int, metadata: dict) -> dict:
    """Shards `model-0000i-of-0000n.safetensors` and the index into `d`; returns the index."""
    shards = split_shards(tensors, max_shard_bytes)
    names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    weight_map = {}
    for fname, shard in zip(names, shards):
        _write_shard(d / fname, {k: v.detach().contiguous().cpu() for k, v in shard.items()}, metadata)
        weight_map.update({k: fname for k in shard})
    total = sum((d / f).stat().st_size for f in names)
    index = {"metadata": {"total_size": total, "manifest": MANIFEST_NAME}, "weight_map": weight_map}
    write_json(d / INDEX_NAME, index)
    return index


def split_shards(tensors: dict, max_bytes: int) -> list[dict]:
    shards, cur, size = [], {}, 0
    for k, v in tensors.items():
        nbytes = v.numel() * v.element_size()
        if cur and size + nbytes > max_bytes:
            shards.append(cur)
            cur, size = {}, 0
        cur[k] = v
        size += nbytes
    shards.append(cur)
    return shards


def write_atomically(out: str | os.PathLike, write: Callable[[Path], None]) -> dict:
    """Build a checkpoint with `write(tmp)` in a new sibling directory `<out>.tmp-<random>`, add its manifest,
    fsync, then put it in place of `out`; a failure at any point leaves `out` as it was and no temporary
    directory behind. Returns the manifest.

    `out` may be absent, a saliq checkpoint (replaced), or a directory without a config.json (e.g. holding only
    a calibration work directory). Entries of an existing `out` that are not checkpoint files (`.calib/`,
    `calibration_log.jsonl`, a README ...) and that the new checkpoint does not write are moved into the new one.
    A directory with some other config.json (a transformers model ...) is refused, never replaced."""
    out = Path(os.path.abspath(out))
    if out.is_symlink():
        out = Path(os.path.realpath(out))
    if out.exists() and not out.is_dir():
        raise ValueError(f"{out} exists and is not a directory; cannot save a checkpoint there")
    if out.is_dir() and (out / CONFIG_NAME).exists() and not is_saliq_checkpoint(out):
        raise ValueError(f"{out} holds a config.json that is not a saliq checkpoint's (or cannot be read); refusing "
                         "to replace it (choose another directory or remove it)")
    cwd = os.path.realpath(os.getcwd())
    if os.path.commonpath([cwd, os.path.realpath(out)]) == os.path.realpath(out):
        raise ValueError(f"{out} is (or contains) the current directory; a checkpoint cannot replace it. Save to "
                         "another directory")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = _mkdir_unique(out.parent, f"{out.name}.tmp-")
    try:
        write(tmp)
        manifest = build_manifest(tmp)
        _fsync_tree(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if not out.exists():
        try:
            os.rename(tmp, out)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        _fsync_dir(out.parent)
        return manifest
    carry = _entries_to_carry(out, set(os.listdir(tmp)))
    old = _unique_name(out.parent, f"{out.name}.old-")
    try:
        os.rename(out, old)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    try:
        os.rename(tmp, out)
    except BaseException:
        os.rename(old, out)
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _fsync_dir(out.parent)
    left = []
    for name in carry:
        try:
            os.rename(old / name, out / name)
        except OSError:
            left.append(name)
    if left:
        warnings.warn(f"saved {out}, but could not move {left} over from the directory it replaced; they are in "
                      f"{old}", stacklevel=2)
    else:
        shutil.rmtree(old, ignore_errors=True)
    return manifest


def _entries_to_carry(out: Path, new_names: set[str]) -> list[str]:
    """Entries of the existing `out` that are not checkpoint files and that the new checkpoint does not hold."""
    ours = {CONFIG_NAME, INDEX_NAME, MANIFEST_NAME, GENERATION_CONFIG_NAME, *TOKENIZER_NAMES}
    if is_saliq_checkpoint(out):
        try:
            ours |= {n.split("/")[0] for n in (_read_manifest(out) or {})}
        except CheckpointError:
            pass
    else:
        ours = {MANIFEST_NAME}
    carry = []
    for name in sorted(os.listdir(out)):
        if name in new_names or name in ours or SHARD_RE.fullmatch(name):
            continue
        if name.endswith(".tmp") and (SHARD_RE.fullmatch(name[:-4]) or name[:-4] in (CONFIG_NAME, INDEX_NAME)):
            continue  # left behind by an interrupted save of an older saliq
        carry.append(name)
    return carry


def _unique_name(parent: Path, prefix: str) -> Path:
    while True:
        p = parent / f"{prefix}{secrets.token_hex(4)}"
        if not os.path.lexists(p):
            return p


def _mkdir_unique(parent: Path, prefix: str) -> Path:
    while True:
        p = _unique_name(parent, prefix)
        try:
            os.mkdir(p)  # honours the umask, unlike tempfile.mkdtemp's 0700
            return p
        except FileExistsError:
            continue


def _fsync_dir(d: Path):
    try:
        fd = os.open(d, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _fsync_tree(root: Path):
    for dirpath, _dirs, files in os.walk(root):
        for f in files:
            fd = os.open(os.path.join(dirpath, f), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _fsync_dir(Path(dirpath))
