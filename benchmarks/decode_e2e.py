"""End-to-end decode speed of a quantized LLaMA-2-7B-shaped model: saliq.nn.QuantLinear against fp16.

A LLaMA-2-7B-shaped LlamaForCausalLM with random weights (no download) is built directly on the GPU: on the
meta device first, then materialised in fp16 with a cheap in-place init (std 0.02, norms 1). For the
quantized runs the 7 linears of every block are QuantLinear layers on random packed weights (random integer
codes, scales ~ U(0.001, 0.02), zero points in [0, 2^bits - 1]) created on the GPU: no quantization.

Decoding does not use HF's generate, caches or mask helpers. `StaticDecoder` is a small functional LLaMA
forward over the HF model's own submodules (embed_tokens, input_layernorm, q/k/v/o_proj,
post_attention_layernorm, gate/up/down_proj with act_fn, norm, lm_head) with a preallocated static KV cache
[batch, heads, max_len, head_dim] per layer, the position held in a device tensor, cache writes by
index_copy_, and attention over the whole static cache with an additive mask built on the device: every
decode step has the same shapes and no host synchronisation, so one step is captured in a CUDA graph and
replayed. Greedy next token by argmax on the device.

Per model (fp16 once, then each bit width) and batch size: prefill a 16-token prompt token by token (eager),
3 eager warm-up steps on a side stream (saliq's ops pick and tune their kernels on the first call), capture
one decode step, check that replaying it reproduces the eager tokens, then time `new_tokens` replays with
CUDA events. tokens/s = batch * new_tokens / seconds; peak memory = torch.cuda.max_memory_allocated() over
the model's build and its decode at that batch size.

    python benchmarks/decode_e2e.py                              # GPU: {fp16, 2, 3, 4-bit} x batch {1, 8}
    python benchmarks/decode_e2e.py --bits 4 --batch 1 --json out.json
    python benchmarks/decode_e2e.py --smoke                      # tiny config on the CPU, eager, no graphs

benchmarks/gpu_report.py calls `run(bits_list, batches, new_tokens, smoke)` and gets the records.
"""
from __future__ import annotations

import argparse
import gc
import json
import platform
import sys
import time
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

# LLaMA-2-7B (meta-llama/Llama-2-7b-hf config.json), and a tiny config of the same family for the CPU
LLAMA2_7B = dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                 num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096,
                 rms_norm_eps=1e-5)
SMOKE = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=4, max_position_embeddings=512, rms_norm_eps=1e-5)
# the 7 linears of a LLaMA block, as (submodule, attribute) of a decoder layer
LINEARS = (("self_attn", "q_proj"), ("self_attn", "k_proj"), ("self_attn", "v_proj"), ("self_attn", "o_proj"),
           ("mlp", "gate_proj"), ("mlp", "up_proj"), ("mlp", "down_proj"))
GIB = float(1 << 30)


# ------------------------------------------------------------------------------------------- config
def make_config(smoke: bool = False, **overrides):
    """A LlamaConfig of LLaMA-2-7B's shape (smoke: a tiny one)."""
    from transformers import LlamaConfig

    return LlamaConfig(**{**(SMOKE if smoke else LLAMA2_7B), **overrides})


def head_dim_of(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def rope_theta_of(config) -> float:
    """RoPE base from transformers 5.x `rope_parameters` or the older `rope_theta`; plain RoPE only."""
    params = getattr(config, "rope_parameters", None)
    scaling = getattr(config, "rope_scaling", None)
    theta, rope_type = None, "default"
    if isinstance(params, dict) and params:
        theta = params.get("rope_theta")
        rope_type = params.get("rope_type", params.get("type", "default"))
    elif isinstance(scaling, dict) and scaling:
        rope_type = scaling.get("rope_type", scaling.get("type", "default"))
    if theta is None:
        theta = getattr(config, "rope_theta", None)
    if theta is None:
        theta = 10000.0
    if rope_type not in (None, "default"):
        raise NotImplementedError(f"rope_type={rope_type!r}: only plain RoPE (LLaMA-2) is implemented")
    return float(theta)


def inv_freq_of(config) -> torch.Tensor:
    """RoPE inverse frequencies [head_dim / 2], fp32 on the CPU, computed as transformers does."""
    dim = head_dim_of(config)
    return 1.0 / (rope_theta_of(config) ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))


# ------------------------------------------------------------------------------------------- model
def random_quant_linear(out_features: int, in_features: int, bits: int, group_size: int, device,
                        dtype: torch.dtype, chunk_elems: int = 1 << 24):
    """A saliq.nn.QuantLinear on a random packed weight built on `device`: random codes, scales
    ~ U(0.001, 0.02), zero points in [0, 2^bits - 1]. Packed by row chunks so the int64 temporaries of
    pack_weight stay small (they would otherwise count in the peak memory)."""
    from saliq.nn import QuantLinear
    from saliq.packing import PackedWeight, pack_weight
    from saliq.spec import QuantSpec

    spec = QuantSpec(bits=bits, group_size=group_size)
    groups = spec.num_groups(in_features)
    rows = max(1, chunk_elems // in_features)
    parts = []
    for r0 in range(0, out_features, rows):
        r = min(rows, out_features - r0)
        q = torch.randint(0, 1 << bits, (r, in_features), device=device, dtype=torch.int32)
        s = torch.empty(r, groups, device=device, dtype=torch.float32).uniform_(0.001, 0.02)
        z = torch.randint(0, 1 << bits, (r, groups), device=device, dtype=torch.int32).float()
        parts.append(pack_weight(q, s, z, spec, dtype=dtype))
        del q, s, z

    def cat(name):
        ts = [getattr(p, name) for p in parts]
        return torch.cat(ts, 1) if ts[0].dim() == 2 else ts[0]  # 1-D: the empty qweight_hi of 2/4-bit

    packed = PackedWeight(qweight=cat("qweight"), qweight_hi=cat("qweight_hi"), scales=cat("scales"),
                          zeros=cat("zeros"), bits=bits, group_size=group_size, in_features=in_features,
                          out_features=out_features)
    del parts
    return QuantLinear(packed, spec=spec)


@torch.no_grad()
def build_model(config, bits: Optional[int], group_size: int = 64, device="cuda",
                dtype: torch.dtype = torch.float16, seed: int = 0):
    """LlamaForCausalLM of `config` with random weights on `device` in `dtype`, without HF's init and without
    a host copy. bits None: dense; else the 7 linears of every block are random QuantLinear layers (the
    dense linears they replace are never allocated)."""
    from transformers import LlamaForCausalLM

    if config.num_key_value_heads != config.num_attention_heads:
        raise NotImplementedError(
            f"num_key_value_heads={config.num_key_value_heads} != num_attention_heads="
            f"{config.num_attention_heads}: grouped-query attention is not supported (LLaMA-2-7B has none)")
    torch.manual_seed(seed)
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    model.to(dtype)  # meta: free
    if bits is not None:
        for layer in model.model.layers:
            for sub, name in LINEARS:
                setattr(getattr(layer, sub), name, nn.Identity())  # placeholder, replaced below
    model.to_empty(device=device)
    for pname, p in model.named_parameters():
        if pname.endswith("bias"):  # LLaMA has none; zero them if a config adds some
            p.zero_()
        elif p.dim() == 1:  # RMSNorm weights
            p.fill_(1.0)
        else:
            p.normal_(0.0, 0.02)
    inv_freq = inv_freq_of(config)
    for bname, b in model.named_buffers():  # rotary buffers (unused by StaticDecoder; kept right for HF)
        if bname.endswith("inv_freq") and tuple(b.shape) == tuple(inv_freq.shape):
            b.copy_(inv_freq)
    if bits is not None:
        for layer in model.model.layers:
            for sub, name in LINEARS:
                n, k = _linear_shape(config, name)
                setattr(getattr(layer, sub), name, random_quant_linear(n, k, bits, group_size, device, dtype))
    return model.eval()


def _linear_shape(config, name: str) -> tuple[int, int]:
    """[out_features, in_features] of one of the 7 linears."""
    h, i = config.hidden_size, config.intermediate_size
    qkv = config.num_attention_heads * head_dim_of(config)
    return {"q_proj": (qkv, h), "k_proj": (config.num_key_value_heads * head_dim_of(config), h),
            "v_proj": (config.num_key_value_heads * head_dim_of(config), h), "o_proj": (h, qkv),
            "gate_proj": (i, h), "up_proj": (i, h), "down_proj": (h, i)}[name]


# ------------------------------------------------------------------------------------------- decoder
def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class StaticDecoder:
    """Functional LLaMA forward over an HF LlamaForCausalLM's submodules with a static KV cache.

    State (all device tensors, fixed addresses, so one decode step can be captured in a CUDA graph):
    k_cache / v_cache [batch, heads, max_len, head_dim] per layer, `pos` (0-d int64: the position of the next
    token fed in), `tokens` [batch, 1] (the next input token), `generated` [batch, max_len + 1] (every token
    by absolute position: the prompt, then the greedy tokens).
    """

    def __init__(self, model, batch: int, max_len: int):
        cfg = model.config
        if cfg.num_key_value_heads != cfg.num_attention_heads:
            raise NotImplementedError("grouped-query attention (num_key_value_heads != num_attention_heads) "
                                      "is not supported")
        self.model, self.batch, self.max_len = model, batch, max_len
        self.embed, self.norm, self.lm_head = model.model.embed_tokens, model.model.norm, model.lm_head
        self.layers = list(model.model.layers)
        self.heads, self.head_dim = cfg.num_attention_heads, head_dim_of(cfg)
        self.scaling = self.head_dim ** -0.5
        w = self.embed.weight
        self.device, self.dtype = w.device, w.dtype
        shape = (batch, self.heads, max_len, self.head_dim)
        self.k_cache = [torch.zeros(shape, device=self.device, dtype=self.dtype) for _ in self.layers]
        self.v_cache = [torch.zeros(shape, device=self.device, dtype=self.dtype) for _ in self.layers]
        # cos/sin tables by position, as transformers computes them (fp32, then the activation dtype)
        freqs = torch.arange(max_len, dtype=torch.int64).float()[:, None] * inv_freq_of(cfg)[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        self.cos = emb.cos().to(device=self.device, dtype=self.dtype)
        self.sin = emb.sin().to(device=self.device, dtype=self.dtype)
        self.arange = torch.arange(max_len, device=self.device)
        self.pos = torch.zeros((), dtype=torch.int64, device=self.device)
        self.tokens = torch.zeros(batch, 1, dtype=torch.int64, device=self.device)
        self.generated = torch.zeros(batch, max_len + 1, dtype=torch.int64, device=self.device)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """Logits [batch, T, vocab] of tokens ids [batch, T] at positions pos .. pos+T-1 (attending to the
        cache); writes their keys/values into the cache and advances pos by T. No host synchronisation."""
        B, T = ids.shape
        H, D, S = self.heads, self.head_dim, self.max_len
        positions = self.pos + self.arange[:T]  # [T], on the device
        cos = self.cos.index_select(0, positions)[None, None]  # [1, 1, T, D]
        sin = self.sin.index_select(0, positions)[None, None]
        allowed = self.arange[None, :] <= positions[:, None]  # [T, S]: causal over the static cache
        mask = torch.zeros(T, S, dtype=torch.float32, device=self.device).masked_fill_(~allowed, float("-inf"))
        x = self.embed(ids)
        for layer, kc, vc in zip(self.layers, self.k_cache, self.v_cache):
            attn, mlp = layer.self_attn, layer.mlp
            h = layer.input_layernorm(x)
            q = attn.q_proj(h).view(B, T, H, D).transpose(1, 2)
            k = attn.k_proj(h).view(B, T, H, D).transpose(1, 2)
            v = attn.v_proj(h).view(B, T, H, D).transpose(1, 2)
            q = q * cos + _rotate_half(q) * sin
            k = k * cos + _rotate_half(k) * sin
            kc.index_copy_(2, positions, k)
            vc.index_copy_(2, positions, v)
            # one fused attention kernel over the static cache (masked past pos)
            o = F.scaled_dot_product_attention(q, kc, vc, attn_mask=mask.to(self.dtype), scale=self.scaling)
            o = o.transpose(1, 2).reshape(B, T, H * D)
            x = x + attn.o_proj(o)
            h = layer.post_attention_layernorm(x)
            x = x + mlp.down_proj(mlp.act_fn(mlp.gate_proj(h)) * mlp.up_proj(h))
        logits = self.lm_head(self.norm(x))
        self.pos.add_(T)
        return logits

    def _emit(self, logits: torch.Tensor) -> None:
        """Greedy next token from the last position's logits -> generated[:, pos] and tokens."""
        nxt = logits[:, -1].argmax(-1).view(self.batch, 1)
        self.generated.index_copy_(1, self.pos.view(1), nxt)
        self.tokens.copy_(nxt)

    @torch.no_grad()
    def prefill(self, prompt: torch.Tensor, chunk: Optional[int] = None) -> torch.Tensor:
        """Reset, run the prompt [batch, P] (in chunks of `chunk` tokens; None: at once), emit the first
        greedy token. Returns the prompt's logits [batch, P, vocab]."""
        P = prompt.shape[1]
        if P >= self.max_len:
            raise ValueError(f"prompt of {P} tokens does not fit max_len={self.max_len}")
        self.pos.zero_()
        self.generated.zero_()
        self.generated[:, :P] = prompt
        chunk = chunk or P
        logits = torch.cat([self.forward(prompt[:, i:i + chunk]) for i in range(0, P, chunk)], dim=1)
        self._emit(logits)
        return logits

    @torch.no_grad()
    def decode_step(self) -> torch.Tensor:
        """Feed `tokens` at `pos`, emit the greedy next token; returns the logits [batch, 1, vocab].
        Graph-capturable: fixed shapes, device-side position, no host synchronisation."""
        logits = self.forward(self.tokens)
        self._emit(logits)
        return logits

    def rewind(self, pos: int, tokens: torch.Tensor) -> None:
        """Go back to position `pos` with next input `tokens` (cache entries past pos are masked, then
        overwritten)."""
        self.pos.fill_(pos)
        self.tokens.copy_(tokens)


# ------------------------------------------------------------------------------------------- measurement
def _max_len(prompt_len: int, steps: int) -> int:
    return -(-(prompt_len + steps) // 16) * 16


@torch.no_grad()
def measure_decode(model, batch: int, new_tokens: int, prompt_len: int = 16, use_graph: bool = True,
                   warmup: int = 3, seed: int = 0) -> dict:
    """Decode `new_tokens` tokens after a `prompt_len`-token random prompt; returns seconds and checks.

    CUDA + use_graph: one decode step captured in a CUDA graph and replayed (falls back to eager, with a
    warning, when capture fails). Otherwise eager steps timed with the wall clock (CUDA: events)."""
    cfg = model.config
    cuda = model.lm_head.weight.device.type == "cuda"
    dec = StaticDecoder(model, batch, _max_len(prompt_len, max(new_tokens, warmup)))
    gen = torch.Generator().manual_seed(seed)
    prompt = torch.randint(0, cfg.vocab_size, (batch, prompt_len), generator=gen).to(dec.device)
    # on CUDA the prompt goes token by token: the same M = batch rows as decode, so saliq's kernels tune
    # only the decode buckets
    dec.prefill(prompt, chunk=1 if cuda else None)
    p0, tok0 = prompt_len, dec.tokens.clone()
    out = {"cuda_graph": False, "graph_matches_eager": None}
    graph = None
    if cuda:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up before capture (kernel choice, cuBLAS handles, workspaces)
            for _ in range(warmup):
                dec.decode_step()
        torch.cuda.current_stream().wait_stream(side)
        eager_tokens = dec.generated[:, p0 + 1:p0 + 1 + warmup].clone()
        if use_graph:
            try:
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph):
                    logits = dec.decode_step()
                out["cuda_graph"] = True
            except Exception as exc:  # report and time eagerly rather than lose the run
                graph = None
                print(f"  CUDA graph capture failed, timing eager decode instead: {type(exc).__name__}: "
                      f"{str(exc).splitlines()[0][:300] if str(exc) else ''}", file=sys.stderr)
                torch.cuda.synchronize()
        if graph is not None:
            dec.rewind(p0, tok0)
            for _ in range(warmup):
                graph.replay()
            out["graph_matches_eager"] = bool(torch.equal(dec.generated[:, p0 + 1:p0 + 1 + warmup],
                                                          eager_tokens))
            if not out["graph_matches_eager"]:
                print("  warning: the replayed graph's tokens differ from the eager steps'", file=sys.stderr)
            step = graph.replay
        else:
            step = dec.decode_step
        dec.rewind(p0, tok0)
        step()  # one untimed step (graph upload)
        dec.rewind(p0, tok0)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(new_tokens):
            last = step()
        end.record()
        end.synchronize()
        seconds = start.elapsed_time(end) / 1e3
        if graph is not None:
            last = logits  # the graph's static output: the last replay's logits
    else:
        for _ in range(min(warmup, 1)):
            dec.decode_step()
        dec.rewind(p0, tok0)
        t = time.perf_counter()
        for _ in range(new_tokens):
            last = dec.decode_step()
        seconds = time.perf_counter() - t
    out["finite"] = bool(torch.isfinite(last).all())
    out["seconds"] = seconds
    out["tokens"] = dec.generated[:, :p0 + 1 + new_tokens].cpu()
    del graph, dec
    return out


def _free() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.empty_cache()


def run(bits_list: Sequence[int] = (2, 3, 4), batches: Sequence[int] = (1, 8), new_tokens: int = 128,
        smoke: bool = False, group_size: int = 64, prompt_len: int = 16, use_graph: bool = True,
        seed: int = 0, verbose: bool = True) -> list[dict]:
    """Decode tokens/s and peak memory of the QuantLinear model at each bit width and batch size against
    the fp16 model (measured once per batch size). smoke: tiny config on the CPU in fp32, eager, wall clock.

    Returns one record per (bits, batch): op "decode", bits, group, M (= batch), N/K None, dtype,
    tokens_per_s, tokens_per_s_fp16, x_fp16, peak_gib, peak_gib_fp16, and details."""
    if smoke:
        device, dtype, use_graph = torch.device("cpu"), torch.float32, False
    else:
        if not torch.cuda.is_available():
            raise RuntimeError("decode_e2e needs a CUDA GPU (use --smoke for the tiny CPU run)")
        device, dtype = torch.device("cuda"), torch.float16
    cfg = make_config(smoke)
    cuda = device.type == "cuda"
    dense: dict[int, dict] = {}
    records = []
    for bits in [None, *bits_list]:  # fp16 first: its numbers are needed by every quantized record
        label = "fp16" if bits is None and cuda else ("dense" if bits is None else f"{bits}-bit")
        _free()
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        model = build_model(cfg, bits, group_size, device, dtype, seed)
        if cuda:
            torch.cuda.synchronize()
            build_peak = torch.cuda.max_memory_allocated()
            model_bytes = torch.cuda.memory_allocated()
        else:
            build_peak = model_bytes = None
        if verbose:
            print(f"{label}: built in {time.perf_counter() - t0:.1f} s"
                  + (f", {model_bytes / GIB:.2f} GiB" if cuda else ""), file=sys.stderr)
        for batch in batches:
            if cuda:
                torch.cuda.reset_peak_memory_stats()
            t0 = time.perf_counter()
            m = measure_decode(model, batch, new_tokens, prompt_len, use_graph, seed=seed)
            peak = max(build_peak, torch.cuda.max_memory_allocated()) / GIB if cuda else None
            _free()
            tps = batch * new_tokens / m["seconds"]
            if verbose:
                print(f"{label} batch {batch}: {tps:.1f} tokens/s ({m['seconds'] * 1e3 / new_tokens:.2f} ms/step, "
                      f"graph={m['cuda_graph']}, finite={m['finite']}, {time.perf_counter() - t0:.1f} s)",
                      file=sys.stderr)
            info = {"tokens_per_s": tps, "peak_gib": peak, "ms_per_step": m["seconds"] * 1e3 / new_tokens,
                    "cuda_graph": m["cuda_graph"], "graph_matches_eager": m["graph_matches_eager"],
                    "finite": m["finite"], "model_gib": None if model_bytes is None else model_bytes / GIB}
            if bits is None:
                dense[batch] = info
                continue
            ref = dense[batch]
            records.append({
                "op": "decode", "bits": bits, "group": group_size, "M": batch, "N": None, "K": None,
                "dtype": str(dtype).replace("torch.", ""),
                "tokens_per_s": tps, "tokens_per_s_fp16": ref["tokens_per_s"],
                "x_fp16": tps / ref["tokens_per_s"],
                "peak_gib": peak, "peak_gib_fp16": ref["peak_gib"],
                "ms_per_step": info["ms_per_step"], "ms_per_step_fp16": ref["ms_per_step"],
                "model_gib": info["model_gib"], "model_gib_fp16": ref["model_gib"],
                "new_tokens": new_tokens, "prompt_len": prompt_len,
                "cuda_graph": m["cuda_graph"], "cuda_graph_fp16": ref["cuda_graph"],
                "graph_matches_eager": m["graph_matches_eager"], "finite": m["finite"],
                "finite_fp16": ref["finite"],
                "model": "llama-2-7b-shape (random weights)" if not smoke else "tiny llama (smoke)",
            })
        del model
        _free()
    return records


# ------------------------------------------------------------------------------------------- output
COLUMNS = [("bits", "bits"), ("M", "batch"), ("tokens_per_s", "tokens/s"), ("tokens_per_s_fp16", "fp16 tokens/s"),
           ("x_fp16", "x fp16"), ("peak_gib", "peak GiB"), ("peak_gib_fp16", "fp16 peak GiB")]


def markdown(records: list[dict]) -> str:
    def fmt(v):
        if isinstance(v, float):
            return f"{v:.3g}" if abs(v) < 1000 else f"{v:.0f}"
        return "" if v is None else str(v)

    lines = ["| " + " | ".join(h for _, h in COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(fmt(r.get(k)) for k, _ in COLUMNS) + " |" for r in records]
    return "\n".join(lines) + "\n"


def meta(smoke: bool, new_tokens: int) -> dict:
    import transformers

    return {"device": torch.cuda.get_device_name() if (torch.cuda.is_available() and not smoke)
            else f"cpu-{platform.machine()}", "torch": torch.__version__, "transformers": transformers.__version__,
            "new_tokens": new_tokens, "smoke": smoke,
            "date": time.strftime("%Y-%m-%d")}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bits", type=int, nargs="+", default=[2, 3, 4])
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--prompt-len", type=int, default=16)
    ap.add_argument("--group", type=int, default=64)
    ap.add_argument("--smoke", action="store_true", help="tiny config on the CPU, fp32, eager (no CUDA graphs)")
    ap.add_argument("--no-graph", action="store_true", help="time eager decode steps instead of a CUDA graph")
    ap.add_argument("--json", default=None, help="write {meta, records} to this path")
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    records = run(args.bits, args.batch, args.new_tokens, smoke=args.smoke, group_size=args.group,
                  prompt_len=args.prompt_len, use_graph=not args.no_graph)
    print(markdown(records))
    print(f"total {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"meta": meta(args.smoke, args.new_tokens), "records": records}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
