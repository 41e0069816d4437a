"""Progress lines on stderr and human-readable sizes, shared by the CLI and the pipelines."""
from __future__ import annotations

import os
import sys


def oneline(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__


def human(nbytes: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if nbytes < 1024 or unit == "GiB":
            return f"{nbytes:.1f} {unit}" if unit != "B" else f"{int(nbytes)} B"
        nbytes /= 1024


def main_process() -> bool:
    """False in the processes torchrun starts besides the first (RANK > 0): they work but do not print."""
    return os.environ.get("RANK", "0") == "0"


# ---------------------------------------------------------------- pipelines (also used by the demo)
def log(msg: str):
    if main_process():
        print(msg, file=sys.stderr, flush=True)
