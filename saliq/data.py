"""Calibration samples and evaluation windows, from a local text file or a hub data set.

Calibration: `n` windows of `seqlen` tokens at seeded random offsets (as GPTQ / OmniQuant / ApiQ draw them).
Evaluation: consecutive non-overlapping windows of `seqlen` tokens (the standard perplexity protocol).
"""
from __future__ import annotations

import os
import random
import re

import torch

HUB_DATASETS = ("wikitext2", "c4")


class DataError(ValueError):
    """A text source could not be read or is too short; the message says what to pass instead."""


def read_text(source: str, split: str = "train") -> str:
    """The text of `source`: a local file path, or `wikitext2` / `c4` from the Hugging Face hub.

    `split` only matters for hub data sets: `train` for calibration, `test` / `validation` for evaluation.
    """
    if os.path.isfile(source):
        return read_text_file(source)
    if source in HUB_DATASETS:
        return _read_hub_text(source, split)
    raise DataError(
        f"text source {source!r} is neither a file nor one of {HUB_DATASETS}; "
        "pass the path of a local UTF-8 text file (e.g. lcet10.txt from `saliq demo`'s cache)"
    )


# C0 / C1 control characters other than the whitespace ones (\t \n \v \f \r): what binary data decodes to.
_CONTROL = re.compile("[\x00-\x08\x0e-\x1f\x7f-\x9f]")
MAX_CONTROL_SHARE = 0.01  # more than 1% control characters: binary, not text


def read_text_file(path: str | os.PathLike) -> str:
    """The text of a local file, strictly UTF-8 (a UTF-8 byte-order mark is dropped).

    Refused with a DataError naming the file: NUL bytes (binary, or UTF-16/32), a UTF-16/32 byte-order mark,
    bytes that are not UTF-8 (Latin-1, Windows-1252...), more than 1% control characters, an empty file."""
    path = str(path)
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as e:
        raise DataError(f"text file {path!r} cannot be read: {e.strerror or e}") from e
    want = "pass a UTF-8 text file"
    if raw.startswith((b"\xff\xfe", b"\xfe\xff")):
        raise DataError(f"text file {path!r} is UTF-16/32 (byte-order mark {raw[:2].hex()}), not UTF-8; convert it "
                        f"(iconv -f utf-16 -t utf-8) or {want}")
    nul = raw.find(b"\x00")
    if nul >= 0:
        raise DataError(f"text file {path!r} is binary (NUL byte at offset {nul}; binary data or UTF-16/32 text), "
                        f"not UTF-8 text; {want}")
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise DataError(f"text file {path!r} is not valid UTF-8 (byte 0x{raw[e.start]:02x} at offset {e.start}; "
                        f"Latin-1 or Windows-1252 text? convert it with iconv -f latin1 -t utf-8); {want}") from e
    if not text:
        raise DataError(f"text file {path!r} is empty; {want}")
    bad = len(_CONTROL.findall(text))
    if bad > MAX_CONTROL_SHARE * len(text):
        raise DataError(f"text file {path!r} looks binary: {bad} of its {len(text)} characters "
                        f"({100 * bad / len(text):.1f}%) are control characters (at most "
                        f"{100 * MAX_CONTROL_SHARE:g}% allowed); {want}")
    return text


def _read_hub_text(name: str, split: str) -> str:
    try:
        import datasets  # lazy: optional dependency
    except ImportError as e:
        raise DataError(
            f"--calib/--text {name!r} needs the `datasets` package (pip install datasets) and a reachable "
            "Hugging Face hub; without them pass a local text file instead"
        ) from e
    try:
        if name == "wikitext2":
            ds = datasets.load_dataset("wikitext", "wikitext-2-raw-v1", split=split)
            return "\n\n".join(ds["text"])
        # c4: one validation / train shard is enough for calibration and evaluation.
        shard = "en/c4-train.00000-of-01024.json.gz" if split == "train" else "en/c4-validation.00000-of-00008.json.gz"
        ds = datasets.load_dataset("allenai/c4", data_files={split: shard}, split=split)
        return "\n\n".join(ds["text"][:20000])
    except Exception as e:  # network, auth, offline mode: all mean "use a local file"
        raise DataError(
            f"could not load {name!r} ({split}) from the Hugging Face hub: {type(e).__name__}: {e}. "
            "The hub may be unreachable (offline?); pass a local text file instead"
        ) from e


def tokenize(tokenizer, text: str) -> torch.Tensor:
    """All token ids of `text` as a 1-D int64 tensor (no special tokens, so windows are plain text)."""
    ids = tokenizer(text, add_special_tokens=False, return_tensors="pt").input_ids[0]
    return ids.to(torch.long)


def calibration_samples(ids: torch.Tensor, nsamples: int, seqlen: int, seed: int = 42) -> torch.Tensor:
    """`nsamples` windows of `seqlen` tokens at random offsets drawn with `seed`: int64 [nsamples, seqlen]."""
    if nsamples < 1:
        raise DataError(f"nsamples={nsamples} must be at least 1")
    if seqlen < 2:
        raise DataError(f"seqlen={seqlen} must be at least 2")
    if ids.numel() <= seqlen:
        raise DataError(
            f"the calibration text has {ids.numel()} tokens, fewer than seqlen+1={seqlen + 1}; "
            "use a longer text or a smaller --seqlen"
        )
    rng = random.Random(seed)
    starts = [rng.randint(0, ids.numel() - seqlen - 1) for _ in range(nsamples)]
    return torch.stack([ids[s : s + seqlen] for s in starts])


def evaluation_windows(ids: torch.Tensor, seqlen: int, max_tokens: int | None = None) -> torch.Tensor:
    """Consecutive non-overlapping windows of `seqlen` tokens, int64 [n, seqlen]; a short tail is dropped.

    `max_tokens` caps the tokens used (rounded down to whole windows), for quick evaluations.
    """
    if seqlen < 2:
        raise DataError(f"seqlen={seqlen} must be at least 2")
    total = ids.numel() if max_tokens is None else min(ids.numel(), int(max_tokens))
    n = total // seqlen
    if n == 0:
        raise DataError(
            f"the evaluation text has {total} usable tokens, fewer than one window of seqlen={seqlen}; "
            "use a longer text or a smaller --seqlen"
        )
    return ids[: n * seqlen].reshape(n, seqlen)


def load_calibration(tokenizer, source: str, nsamples: int, seqlen: int, seed: int = 42) -> torch.Tensor:
    return calibration_samples(tokenize(tokenizer, read_text(source, "train")), nsamples, seqlen, seed)


def load_evaluation(tokenizer, source: str, seqlen: int, max_tokens: int | None = None) -> torch.Tensor:
    return evaluation_windows(tokenize(tokenizer, read_text(source, "test")), seqlen, max_tokens)
