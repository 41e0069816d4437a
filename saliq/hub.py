"""Model ids as well as paths: a checkpoint named `org/name` is fetched into (or, offline, found in) the Hugging Face
cache, whose snapshot directories hold links into the repository's blob store (checkpoint.member_path allows
exactly those links)."""
from __future__ import annotations

import os
import re
from pathlib import Path

from .checkpoint import MANIFEST_NAME, CheckpointError

_REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


def is_repo_id(name) -> bool:
    return isinstance(name, str) and bool(_REPO_ID.fullmatch(name)) and ".." not in name and "--" not in name


def resolve(path_or_id, revision: str | None = None) -> Path:
    """A local directory as it is; a model id `org/name` (optionally at `revision`) as its snapshot in the
    Hugging Face cache, downloaded when the hub is reachable (HF_HUB_OFFLINE=1: the cache only)."""
    p = Path(path_or_id)
    if p.exists() or not is_repo_id(str(path_or_id)):
        return p
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError

    try:
        return Path(snapshot_download(str(path_or_id), revision=revision))
    except (LocalEntryNotFoundError, RepositoryNotFoundError, HfHubHTTPError, OSError) as e:
        raise CheckpointError(f"{path_or_id!r} is neither a local directory nor a model id that could be fetched "
                              f"({type(e).__name__}: {' '.join(str(e).split())[:200]})") from None


def snapshot_repo(d: Path) -> tuple[str, str] | None:
    """(repo id, revision) when `d` is a snapshot directory of the Hugging Face cache, else None."""
    d = Path(os.path.abspath(d))
    repo = d.parent.parent.name
    if d.parent.name != "snapshots" or not repo.startswith("models--"):
        return None
    return repo[len("models--"):].replace("--", "/"), d.name


def complete_snapshot(d: Path):
    """transformers downloads only the files it reads; the manifest (which verifies them) is fetched too, from the
    same revision (from the cache when offline). Nothing happens outside a cache snapshot."""
    found = snapshot_repo(d)
    if found is None or (Path(d) / MANIFEST_NAME).exists():
        return
    from huggingface_hub import hf_hub_download

    try:
        hf_hub_download(found[0], MANIFEST_NAME, revision=found[1],
                        cache_dir=str(Path(os.path.abspath(d)).parent.parent.parent))
    except Exception:  # not there, or not reachable: verify() reports the missing manifest
        pass
