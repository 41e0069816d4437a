"""Block-wise calibration (docs/ARCHITECTURE.md 1.3): ApiQ-bw with saliency-aware regularisation.

Each decoder block in turn: its linears become FakeQuantLinear (frozen W, LWC logits, LoRA), trained with
AdamW on
    L = lambda_loss * [MSE(F_fp(X_fp), F_q(X_q)) + MSE(F_fp(X_q), F_q(X_q))] + lambda_reg * m_i * sum_l P_l,
    P_l = sum S_l (Weff_l - W_l)^2,
then packed into QuantLinear layers, and the activations move on: X_fp <- F_fp(X_fp), X_q <- F_q(X_q).

Stages (lambda_loss, lambda_reg): opt = (1, 0), wpt = (0, lambda), mixed = (1, lambda); a schedule is a list
such as [("wpt", 2), ("opt", 2)]. After every block the state (finished blocks, activations, log, RNG) is
checkpointed atomically into `work_dir`; the same call with the same settings resumes where it stopped
(the bookkeeping, fingerprints and work dir, is saliq/resume.py).
"""
from __future__ import annotations

import json
import math
import resource
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from . import bit_allocation, distributed, hf, ops, outliers
from . import saliency as saliency_mod
from .clip_search import search_clipping
from .sw_loss import sliced_wasserstein
from .resume import (MANIFEST, PROGRESS, ResumeMismatchError, WorkDir, check_or_write_manifest,  # noqa: F401
                     describe_difference, fingerprint_of, model_fingerprint, read_manifest,
                     read_safetensors_fingerprint, run_components, saliency_fingerprint, samples_fingerprint,
                     tensors_digest, write_manifest)
from .nn import FakeQuantLinear, QuantLinear
from .spec import QuantSpec

METHODS = ("rtn", "apiq", "saliq")
STAGES = {"opt": (1.0, 0.0), "wpt": (0.0, 1.0), "mixed": (1.0, 1.0)}  # (lambda_loss, uses lambda_reg)
LOSS_NORMS = ("none", "channel", "outlier")
CLIP_INITS = ("fixed", "search")
SCALE_DTYPES = {"float16": torch.float16, "float32": None}  # None: the fp32 scale as computed


class NonFiniteLossError(RuntimeError):
    """A loss became NaN/inf; finished blocks stay checkpointed in the work dir."""


@dataclass
class CalibConfig:
    """Every setting of a calibration run (all of them are part of the resume fingerprint)."""

    method: str = "saliq"
    bits: int = 2
    group_size: int = 64
    symmetric: bool = False
    schedule: list = field(default_factory=list)  # [(stage, epochs)]; empty: the method's default
    epochs: int = 2  # used by the default schedules
    lora_rank: int = 64
    lora_alpha: float = 16.0
    init_logit: float = 4.0
    clip_init: str = ""  # fixed (init_logit) or search (clip_search.py); empty: the method's default
    lr_clip: float = 5e-3
    lr_lora: float = 5e-4
    weight_decay: float = 0.1
    lambda_reg: float = 0.1
    block_multipliers: list = field(default_factory=list)  # m_i per block; empty: all 1
    after_lora: bool | None = None  # penalise What + LoRA update; None: the method's default
    saliency_norm: str = "relative"
    loss_norm: str = "none"
    aug_loss: bool = True
    batch_size: int = 1
    seed: int = 42
    # beyond the seed paper (docs/CALIBRATION.md, "Beyond the paper")
    reserve_fraction: float = 0.0  # outlier reservation: this fraction of each linear's weights kept in 16 bits
    reserve_score: str = "error"  # outliers.SCORES
    lora_in_grid: bool = False  # LR-QAT: the low-rank update inside the quantizer, folded into the codes
    bit_budget: float = 0.0  # average code bits per weight, spent per linear by saliency; 0: every linear at `bits`
    sw_weight: float = 0.0  # weight of the sliced-Wasserstein term next to the block-output MSE
    sw_projections: int = 64
    scale_dtype: str = "float16"  # scales rounded to this dtype before the codes are fitted (exact 16-bit storage)

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"method={self.method!r} is not supported; allowed: {METHODS}")
        self.spec  # validates bits / group size
        if self.epochs < 0:
            raise ValueError(f"epochs={self.epochs} must be >= 0")
        if not self.schedule:
            self.schedule = default_schedule(self.method, self.epochs)
        self.schedule = [(str(s), int(e)) for s, e in self.schedule]
        for stage, ep in self.schedule:
            if stage not in STAGES:
                raise ValueError(f"schedule stage {stage!r} is not supported; allowed: {tuple(STAGES)}")
            if ep < 0:
                raise ValueError(f"schedule stage {stage!r} has epochs={ep}; it must be >= 0")
        if self.method == "apiq" and any(s != "opt" for s, _ in self.schedule):
            raise ValueError("method 'apiq' uses stage 'opt' only; use method 'saliq' for wpt / mixed stages")
        if self.loss_norm not in LOSS_NORMS:
            raise ValueError(f"loss_norm={self.loss_norm!r} is not supported; allowed: {LOSS_NORMS}")
        if not self.clip_init:
            self.clip_init = default_clip_init(self.method)
        if self.after_lora is None:
            self.after_lora = self.method == "saliq"  # see default_schedule
        if not isinstance(self.after_lora, bool):
            raise ValueError(f"after_lora={self.after_lora!r} must be True or False")
        if self.clip_init not in CLIP_INITS:
            raise ValueError(f"clip_init={self.clip_init!r} is not supported; allowed: {CLIP_INITS}")
        if self.saliency_norm not in saliency_mod.NORMALISATIONS:
            raise ValueError(f"saliency_norm={self.saliency_norm!r} is not supported; allowed: "
                             f"{saliency_mod.NORMALISATIONS}")
        if not _finite(self.lambda_reg) or self.lambda_reg < 0:
            raise ValueError(f"lambda_reg={self.lambda_reg} must be >= 0 and finite (0 turns the saliency "
                             "penalty off)")
        for name in ("lr_clip", "lr_lora", "weight_decay"):
            value = getattr(self, name)
            if not _finite(value) or value < 0:
                raise ValueError(f"{name}={value} must be >= 0 and finite")
        if not _finite(self.lora_alpha) or self.lora_alpha <= 0:
            raise ValueError(f"lora_alpha={self.lora_alpha} must be > 0 and finite")
        if not _finite(self.init_logit):
            raise ValueError(f"init_logit={self.init_logit} must be a finite number")
        if self.batch_size < 1:
            raise ValueError(f"batch_size={self.batch_size} must be >= 1")
        if self.lora_rank < 0:
            raise ValueError(f"lora_rank={self.lora_rank} must be >= 0 (0 disables LoRA)")
        if not (_finite(self.reserve_fraction) and 0.0 <= self.reserve_fraction < 0.5):
            raise ValueError(f"reserve_fraction={self.reserve_fraction} must lie in [0, 0.5)")
        if self.reserve_score not in outliers.SCORES:
            raise ValueError(f"reserve_score={self.reserve_score!r} is not supported; allowed: {outliers.SCORES}")
        if not isinstance(self.lora_in_grid, bool):
            raise ValueError(f"lora_in_grid={self.lora_in_grid!r} must be True or False")
        if self.lora_in_grid and self.lora_rank == 0:
            raise ValueError("lora_in_grid=True needs lora_rank > 0 (the low-rank update it trains)")
        top = min(self.bits + 1, 4)
        if self.bit_budget and not (_finite(self.bit_budget) and self.bits <= self.bit_budget <= top):
            raise ValueError(f"bit_budget={self.bit_budget} must be 0 (off) or lie in [{self.bits}, {top}] "
                             f"(bits={self.bits} and one more)")
        if not _finite(self.sw_weight) or self.sw_weight < 0:
            raise ValueError(f"sw_weight={self.sw_weight} must be >= 0 and finite (0 turns the term off)")
        if self.sw_projections < 1:
            raise ValueError(f"sw_projections={self.sw_projections} must be >= 1")
        if self.scale_dtype not in SCALE_DTYPES:
            raise ValueError(f"scale_dtype={self.scale_dtype!r} is not supported; allowed: {tuple(SCALE_DTYPES)}")
        self.block_multipliers = [float(m) for m in self.block_multipliers]
        if not all(_finite(m) and m >= 0 for m in self.block_multipliers):
            raise ValueError(f"block_multipliers={self.block_multipliers} must all be >= 0 and finite")

    @property
    def spec(self) -> QuantSpec:
        return QuantSpec(bits=self.bits, group_size=self.group_size, symmetric=self.symmetric)

    @property
    def uses_saliency(self) -> bool:
        if self.method != "saliq":
            return False
        return self.clip_init == "search" or self.reserve_fraction > 0 or bool(self.bit_budget) or (
            self.lambda_reg != 0 and any(s in ("wpt", "mixed") and e > 0 for s, e in self.schedule))

    @property
    def scale_torch_dtype(self):
        return SCALE_DTYPES[self.scale_dtype]

    def to_dict(self) -> dict:
        return asdict(self)

    def fingerprint_dict(self) -> dict:
        """The settings that determine the result (JSON-normalised): all of them, or for rtn the spec alone."""
        d = json.loads(json.dumps(self.to_dict()))
        if self.method == "rtn":
            return {k: d[k] for k in ("method", "bits", "group_size", "symmetric", "scale_dtype")}
        return d


def _finite(value) -> bool:
    try:
        return math.isfinite(value)
    except TypeError:
        return False


def default_clip_init(method: str) -> str:
    """Where the clipping logits start: apiq at init_logit (the paper's LWC); saliq from the saliency-weighted
    clipping search."""
    return "search" if method == "saliq" else "fixed"


def default_schedule(method: str, epochs: int) -> list:
    """apiq: opt x epochs. saliq: wpt x epochs, then opt x epochs (the seed paper's schedule shape): the same
    epochs of block-output training as apiq, preceded by weight-only epochs that need no forward pass. With
    saliq's defaults the wpt stage penalises What + the LoRA update (after_lora), so LoRA starts by fitting the
    saliency-weighted residual of the searched clipping. Chosen by measurement on the testbed (docs/NOTES.md,
    "Calibration"): it beat ApiQ, `mixed` and `opt` alone after the search at W2 and W3 g64."""
    if method == "apiq":
        return [("opt", epochs)]
    if method == "saliq":
        return [("wpt", epochs), ("opt", epochs)]
    return []


@dataclass
class CalibResult:
    log: list  # one dict per block and epoch
    block_seconds: list
    peak_memory_bytes: int
    seconds: float
    resumed_from: int = 0

    def summary(self) -> str:
        if not self.block_seconds:
            return f"calibration: {self.seconds:.1f} s"
        per = sum(self.block_seconds) / len(self.block_seconds)
        return (f"calibration: {len(self.block_seconds)} blocks, {self.seconds:.1f} s total, "
                f"{per:.2f} s per block (min {min(self.block_seconds):.2f}, max {max(self.block_seconds):.2f}), "
                f"peak memory {self.peak_memory_bytes / 2**20:.0f} MiB")


# ---------------------------------------------------------------- entry point
def check_spec_fits(model: nn.Module, spec: QuantSpec, label: str = "group_size="):
    """Fail before any work when the group size does not tile some layer's input dimension; the message names
    the first such layer and the group sizes that tile every layer."""
    from .spec import ALLOWED_GROUP_SIZES

    prefix = hf.blocks_prefix(model)
    layers = [(f"{prefix}.{i}.{name}", lin.in_features) for i, block in enumerate(hf.decoder_blocks(model))
              for name, lin in hf.block_linears(block).items()]
    for name, k in layers:
        if spec.group_size != -1 and k % spec.group_size:
            fits = [g for g in ALLOWED_GROUP_SIZES if g == -1 or all(kk % g == 0 for _, kk in layers)]
            raise ValueError(f"{label}{spec.group_size} does not divide in_features={k} of {name}; group "
                             f"sizes that fit this model: {', '.join(map(str, fits))}")


def quantize_rtn(model: nn.Module, spec: QuantSpec, scale_dtype=None) -> nn.Module:
    """Round-to-nearest: every block linear becomes a QuantLinear, in place."""
    for block in hf.decoder_blocks(model):
        for name, lin in hf.block_linears(block).items():
            hf.set_submodule(block, name, QuantLinear.from_linear(lin, spec, scale_dtype=scale_dtype))
    return model


def calibrate(model: nn.Module, samples: torch.Tensor, config: CalibConfig, work_dir=None,
              saliency: dict | None = None, device=None, amp: bool = True, offload_activations: bool = False,
              progress: bool = True, log_path=None, stop_after_block: int | None = None,
              run_info: dict | None = None, saliency_id: str | None = None) -> CalibResult:
    """Quantize `model` in place (block linears -> QuantLinear) with `config` on int64 `samples` [n, L].

    work_dir: checkpoint folder (resume happens automatically when it holds a run with the same settings).
    saliency: {qualified linear name: raw Fisher [N, K]}; computed from `samples` when the method needs it.
    device: where blocks train (default: the model's device); the model stays where it is and each block
    moves there in turn. amp: bf16 autocast on CUDA. offload_activations: keep X_fp / X_q on the CPU.
    stop_after_block: return after that block (used to test resume).
    run_info: what the run is computed from (`run_components`); its fingerprint guards every file in work_dir.
    Default: computed here from the model, the samples and the saliency (`saliency_id` names a saliency passed
    in; default: a digest of its tensors).
    """
    start = time.perf_counter()
    check_spec_fits(model, config.spec)
    if config.method == "rtn":
        quantize_rtn(model, config.spec, config.scale_torch_dtype)
        return CalibResult([], [], _peak_memory(device), time.perf_counter() - start)
    device = torch.device(device) if device is not None else next(model.parameters()).device
    distributed.check_batch(config.batch_size)
    if config.uses_saliency and saliency is None:
        saliency = saliency_mod.compute_saliency(model, samples, device=device, progress=progress)
    elif config.uses_saliency and saliency_id is None and run_info is None and work_dir is not None:
        saliency_id = tensors_digest(saliency)  # hashing copies every tensor to the host: only for a work dir
    trainer = _BlockTrainer(model, samples, config, work_dir, saliency, device, amp, offload_activations,
                            progress, log_path, run_info=run_info, saliency_id=saliency_id)
    return trainer.run(start, stop_after_block)


# ---------------------------------------------------------------- the trainer
class _BlockTrainer:
    def __init__(self, model, samples, config, work_dir, saliency, device, amp, offload, progress, log_path,
                 run_info=None, saliency_id=None):
        self.model, self.samples, self.cfg = model, samples, config
        self.blocks = hf.decoder_blocks(model)
        self.prefix = hf.blocks_prefix(model)
        self.saliency, self.saliency_id = saliency, saliency_id
        self.device = device
        self.amp = amp and device.type == "cuda"
        self.act_device = torch.device("cpu") if offload else device
        self.progress = progress
        self.work_dir = Path(work_dir) if work_dir is not None else None
        self.log_path = Path(log_path) if log_path is not None else (
            self.work_dir / "calibration_log.jsonl" if self.work_dir is not None else None)
        mult = list(config.block_multipliers) or [1.0] * len(self.blocks)
        if len(mult) != len(self.blocks):
            raise ValueError(f"block_multipliers has {len(mult)} values; the model has {len(self.blocks)} blocks")
        self.mult = [float(m) for m in mult]
        if not all(m >= 0 for m in self.mult):
            raise ValueError(f"block_multipliers={self.mult} must all be >= 0")
        # the fingerprint guards the files of a work dir; without one nothing is hashed (on a GPU, hashing the
        # model and the saliency copied them all to the host: ~0.5 s per 7B-shaped block)
        self.run_info = run_info if run_info is not None or self.work_dir is None else self._run_info()
        self.work = WorkDir(self.work_dir, fingerprint_of(self.run_info)) if self.work_dir is not None else None
        self.layer_bits = self._allocate_bits() if config.bit_budget else {}
        self.sw_gen = None

    def _allocate_bits(self) -> dict:
        """{qualified linear name: bits} under cfg.bit_budget (bit_allocation.py; raw saliency when there is one)."""
        weights = {f"{self.prefix}.{i}.{name}": lin.weight.detach()
                   for i, block in enumerate(self.blocks) for name, lin in hf.block_linears(block).items()}
        sal = None
        if self.saliency is not None:
            sal = {k: self.saliency[k] for k in weights}
        return bit_allocation.allocate(weights, sal, self.cfg.spec, self.cfg.bit_budget)

    def spec_of(self, i: int, name: str) -> QuantSpec:
        bits = self.layer_bits.get(f"{self.prefix}.{i}.{name}", self.cfg.bits)
        return QuantSpec(bits=bits, group_size=self.cfg.group_size, symmetric=self.cfg.symmetric)

    # ----- driver
    def run(self, start, stop_after_block):
        log, block_seconds, first = [], [], 0
        x_fp = x_q = None
        if self.work_dir is not None and distributed.is_main():
            check_or_write_manifest(self.work_dir, self.run_info)
        distributed.barrier()  # under torchrun only process 0 writes; the others read what it wrote
        state = self._load_progress()
        if state is not None:
            first, log, block_seconds = state["next_block"], state["log"], state["block_seconds"]
            torch.set_rng_state(torch.tensor(state["rng"], dtype=torch.uint8))
            x_fp, x_q = self._restore(first)
        if x_fp is None:
            x, self.kwargs = hf.capture_block_inputs(self.model, self.samples)
            x_fp = x.to(self.act_device, torch.float32)
            x_q = x_fp.clone()
        else:
            _, self.kwargs = hf.capture_block_inputs(self.model, self.samples[:1])
        self.kwargs = hf.kwargs_to(self.kwargs, self.device)
        self._rewrite_log(log)

        bar = None
        if self.progress and distributed.is_main():
            from tqdm.auto import tqdm

            bar = tqdm(total=len(self.blocks), initial=first, desc="calibrate", unit="block")
        for i in range(first, len(self.blocks)):
            t0 = time.perf_counter()
            x_fp, x_q, entries = self._calibrate_block(i, x_fp, x_q, bar)
            block_seconds.append(time.perf_counter() - t0)
            log.extend(entries)
            self._append_log(entries)
            self._save_progress(i, x_fp, x_q, log, block_seconds)
            if bar is not None:
                bar.update(1)
            if stop_after_block is not None and i >= stop_after_block:
                break
        if bar is not None:
            bar.close()
        return CalibResult(log, block_seconds, _peak_memory(self.device), time.perf_counter() - start, first)

    # ----- one block
    def _calibrate_block(self, i, x_fp, x_q, bar):
        cfg = self.cfg
        block = self.blocks[i]
        home = next(block.parameters()).device
        block.to(self.device)
        y_fp, y_aug = self._targets(block, x_fp, x_q)
        scale = self._channel_scale(y_fp)

        torch.manual_seed(cfg.seed * 1000 + i)  # LoRA init: identical whether resumed or not
        self.sw_gen = torch.Generator().manual_seed(cfg.seed * 1000 + i)  # the same directions too
        fq = {}
        for name, lin in hf.block_linears(block).items():
            fq[name] = FakeQuantLinear.from_linear(lin, self.spec_of(i, name), lora_rank=cfg.lora_rank,
                                                   lora_alpha=cfg.lora_alpha, init_logit=cfg.init_logit,
                                                   lora_in_grid=cfg.lora_in_grid)
            hf.set_submodule(block, name, fq[name])
        sal = self._block_saliency(i, fq) if cfg.uses_saliency else {}
        if cfg.reserve_fraction:  # before the search: the reserved weights leave their groups
            for name, m in fq.items():
                m.reserve(outliers.select(m.weight, sal.get(name), m.spec, cfg.reserve_fraction, cfg.reserve_score))
                if name in sal:
                    sal[name] = sal[name].masked_fill(m.reserved, 0.0)
        if cfg.clip_init == "search":  # S-weighted for saliq, the plain weight error otherwise
            for name, m in fq.items():
                hi, lo = search_clipping(m.base_weight(), m.spec, sal.get(name), cfg.init_logit)
                with torch.no_grad():
                    m.hi.copy_(hi)
                    m.lo.copy_(lo)
        params = [p for m in fq.values() for p in (m.hi, m.lo, m.lora_A, m.lora_B) if p is not None]
        opt = torch.optim.AdamW([
            {"params": [p for m in fq.values() for p in (m.hi, m.lo)], "lr": cfg.lr_clip},
            {"params": [p for m in fq.values() for p in (m.lora_A, m.lora_B) if p is not None], "lr": cfg.lr_lora},
        ], weight_decay=cfg.weight_decay, fused=self.device.type == "cuda")  # one kernel per step on a GPU
        gen = torch.Generator().manual_seed(cfg.seed + i)
        n = x_q.shape[0]
        entries, epoch_index = [], 0
        for stage, epochs in self.cfg.schedule:
            lam_loss, uses_reg = STAGES[stage]
            lam_reg = cfg.lambda_reg * self.mult[i] * uses_reg if cfg.method == "saliq" else 0.0
            if not lam_loss and not lam_reg:
                continue  # nothing to train: a wpt stage whose lambda_reg * m_i is 0
            for name, m in fq.items():
                m.set_saliency(sal[name] if lam_reg else None, after_lora=cfg.after_lora)
            for _ in range(epochs):
                t0 = time.perf_counter()
                # the epoch's sums stay on the device: no host synchronisation per step
                sums = torch.zeros(3, dtype=torch.float64, device=self.device)
                order = torch.randperm(n, generator=gen)
                for b0 in range(0, n, cfg.batch_size):
                    idx = order[b0 : b0 + cfg.batch_size]
                    # under torchrun each process takes an equal share of the batch (distributed.py)
                    loss, mse, pen = self._step_loss(block, fq, x_q, y_fp, y_aug, scale, distributed.shard(idx),
                                                     lam_loss, lam_reg)
                    step_sums = torch.stack([loss.detach().double(), torch.as_tensor(mse, dtype=torch.float64,
                                             device=self.device), torch.as_tensor(pen, dtype=torch.float64,
                                                                                  device=self.device)])
                    if self.device.type != "cuda" and distributed.world_size() == 1 and not torch.isfinite(loss):
                        self._non_finite(loss, i, stage, epoch_index)  # on the CPU checking costs nothing
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    distributed.average_gradients(params)
                    opt.step()
                    sums += step_sums * (len(idx) / n)
                loss_sum, mse_sum, pen_sum = distributed.mean_(sums).tolist()
                if not math.isfinite(loss_sum):  # on a GPU: checked once per epoch, before anything is saved
                    self._non_finite(loss_sum, i, stage, epoch_index)
                entry = {"block": i, "stage": stage, "epoch": epoch_index, "loss": loss_sum, "mse": mse_sum,
                         "penalty": pen_sum, "seconds": round(time.perf_counter() - t0, 4)}
                entries.append(entry)
                epoch_index += 1
                if bar is not None:
                    bar.set_postfix(block=i, epoch=epoch_index, loss=f"{loss_sum:.4g}")
        # Pack: the block now holds QuantLinear layers (LoRA kept), then the quantized activations move on.
        for name, m in fq.items():
            m.set_saliency(None)
            hf.set_submodule(block, name, m.to_quant_linear(scale_dtype=cfg.scale_torch_dtype))
        with torch.no_grad():
            x_q = self._run_all(block, x_q)
        block.to(home)
        return y_fp, x_q, entries

    def _non_finite(self, loss, i, stage, epoch_index):
        raise NonFiniteLossError(
            f"non-finite loss ({float(loss)}) at block {i}, stage {stage}, epoch {epoch_index}; "
            f"{self._finished_blocks(i)}. Lower --lr-clip / --lr-lora or --lambda-reg, or use fp32 (--no-amp)")

    def _step_loss(self, block, fq, x_q, y_fp, y_aug, scale, idx, lam_loss, lam_reg):
        zero = torch.zeros((), device=self.device)
        mse = pen = zero
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.amp):
            if lam_loss:
                y = hf.run_block(block, x_q[idx].to(self.device), self.kwargs).float()
                t_fp, t_aug = y_fp[idx].to(self.device), (y_aug[idx].to(self.device) if y_aug is not None else None)
                if scale is not None:
                    y, t_fp = y * scale, t_fp * scale
                    t_aug = t_aug * scale if t_aug is not None else None
                mse = ops.mse(y, t_fp)
                if t_aug is not None:
                    mse = mse + ops.mse(y, t_aug)
                if self.cfg.sw_weight:
                    mse = mse + self.cfg.sw_weight * sliced_wasserstein(y, t_fp, self.cfg.sw_projections,
                                                                        self.sw_gen)
                if lam_reg:  # the fused forward already computed each layer's penalty
                    pen = sum(m.penalty for m in fq.values())
            elif lam_reg:
                pen = sum(m.compute_penalty() for m in fq.values())
        loss = lam_loss * mse + lam_reg * pen
        return loss, mse.detach(), pen.detach() if torch.is_tensor(pen) else pen

    @torch.no_grad()
    def _targets(self, block, x_fp, x_q):
        y_fp = self._run_all(block, x_fp)
        y_aug = self._run_all(block, x_q) if self.cfg.aug_loss else None
        return y_fp, y_aug

    def _channel_scale(self, y_fp):
        """Per-channel factor applied to outputs and targets before the MSE (None: the plain MSE).

        channel: 1 / RMS of each hidden channel over the fp outputs (every channel counts by its relative error).
        outlier: 1 / max(RMS_c, median RMS): only channels far above the typical scale (the massive activations,
        |h| ~ 1e4 in SmolLM2) are scaled down to it, so they no longer swamp the loss; the others keep their
        absolute errors. Both are divided by the median RMS so the loss has the plain MSE's order of magnitude."""
        if self.cfg.loss_norm == "none" or self.cfg.method == "apiq":
            return None
        rms = y_fp.float().pow(2).mean(dim=(0, 1)).sqrt()
        med = rms.median().clamp_min(1e-12)
        if self.cfg.loss_norm == "channel":
            return (med / rms.clamp_min(1e-6 * float(rms.max()))).to(self.device)
        return (med / torch.maximum(rms, med)).to(self.device)

    def _run_all(self, block, x):
        out = torch.empty_like(x)
        bs = max(1, self.cfg.batch_size)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.amp):
            for j in range(0, x.shape[0], bs):
                out[j : j + bs] = hf.run_block(block, x[j : j + bs].to(self.device), self.kwargs).to(out.dtype)
        return out

    def _block_saliency(self, i, fq):
        out = {}
        for name, m in fq.items():
            key = f"{self.prefix}.{i}.{name}"
            if key not in self.saliency:
                raise ValueError(f"the saliency has no entry for {key}; recompute it for this model")
            out[name] = saliency_mod.normalise(self.saliency[key].to(self.device), m.weight, self.cfg.saliency_norm)
        return out

    def _finished_blocks(self, i) -> str:
        where = f" in {self.work_dir}" if self.work_dir is not None else " (no work dir: nothing is kept)"
        if i == 0:
            return "no block was finished"
        return f"block 0 is checkpointed{where}" if i == 1 else f"blocks 0..{i - 1} are checkpointed{where}"

    # ----- checkpoint / resume
    def _run_info(self) -> dict:
        """What this run is computed from, when the caller did not say (the library path; the CLI passes it)."""
        model_fp = model_fingerprint(self.model)
        data_fp = samples_fingerprint(self.samples)
        sal = None
        if self.cfg.uses_saliency:
            sal = self.saliency_id or saliency_fingerprint(model_fp, data_fp)
        return run_components(self.cfg, model_fp, data_fp, sal, self.amp)

    def _load_progress(self):
        return None if self.work is None else self.work.load_progress(len(self.blocks))

    def _restore(self, next_block):
        for i in range(next_block):
            block = self.blocks[i]
            state = self.work.load_checked(f"block_{i:04d}.safetensors")
            for name, lin in hf.block_linears(block).items():
                # LoRA rank and reserved weights as the finished block saved them (in-grid LoRA leaves none)
                lora = state.get(f"{name}.lora_A")
                values = state.get(f"{name}.sparse_values")
                q = QuantLinear.empty(lin.in_features, lin.out_features, self.spec_of(i, name),
                                      bias=lin.bias is not None, lora_rank=0 if lora is None else lora.shape[0],
                                      lora_alpha=self.cfg.lora_alpha, dtype=lin.weight.dtype,
                                      device=lin.weight.device, reserved=0 if values is None else values.shape[0])
                hf.set_submodule(block, name, q)
            block.load_state_dict(state)
        acts = self.work.load_checked(f"acts_{next_block:04d}.safetensors")
        return acts["x_fp"].to(self.act_device), acts["x_q"].to(self.act_device)

    def _save_progress(self, i, x_fp, x_q, log, block_seconds):
        if self.work is not None and distributed.is_main():
            self.work.commit_block(i, self.blocks[i].state_dict(), x_fp, x_q,
                                   {"log": log, "block_seconds": block_seconds, "config": self.cfg.to_dict()})

    def _rewrite_log(self, log):
        if self.log_path is None or not distributed.is_main():
            return
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self.log_path.write_text("".join(json.dumps(e) + "\n" for e in log))

    def _append_log(self, entries):
        if self.log_path is None or not distributed.is_main():
            return
        with open(self.log_path, "a") as f:
            for e in entries:
                f.write(json.dumps(e) + "\n")


def _peak_memory(device) -> int:
    if device is not None and torch.device(device).type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # Linux reports KiB
