"""The `cpp` backend (CPU C++ kernels in saliq._C) and, when saliq._C was built with CUDA, the `cuda` backend.

Importing this module registers them in `saliq.backends`; an ImportError (saliq._C not built) leaves them
unavailable. Each function has the signature of the same-named function in saliq/ref.py or saliq/packing.py.

CPU SIMD paths are chosen at run time (AVX-512 > AVX2/FMA > portable); `set_cpu_isa("avx2")` or the
environment variable SALIQ_CPU_ISA caps the choice, `cpu_isa()` reports the path in use.
The `cuda` functions raise RuntimeError with the CUDA error string when no usable GPU is present.
"""
from __future__ import annotations

import contextlib
from typing import Optional

import torch

from . import backends, ref

try:
    from . import _C
except ImportError as exc:  # the extension was not built: the backends stay unavailable
    raise ImportError(
        f"saliq._C is not built ({exc}); run `pip install --no-build-isolation -e .` or "
        "`python setup.py build_ext --inplace`") from exc

WITH_CUDA: bool = bool(_C.with_cuda)
CUDA_DECODE_MAX_M = 16  # fp16 / bf16 x: the tensor-core decode kernel
CUDA_GEMV_MAX_M = 8  # fp32 x: the fp32 GEMV


def cuda_max_m(dtype: torch.dtype) -> int:
    """Most rows of x the cuda packed_matmul kernels serve for activations of this dtype."""
    return CUDA_DECODE_MAX_M if dtype in (torch.float16, torch.bfloat16) else CUDA_GEMV_MAX_M


def cpu_isa() -> str:
    """SIMD path the CPU kernels use: 'avx512', 'avx2vnni' (AVX2 with 256-bit VNNI), 'avx2' or 'portable'
    ('avx512vnni' / 'avx512bw' while capped there)."""
    return _C.cpu_isa()


def set_cpu_isa(name: str) -> None:
    """Cap the CPU SIMD path; the CPU's own support still applies. 'portable', 'avx2' (no VNNI, as a Zen 3),
    'avx2vnni' (and 256-bit VNNI, as an Alder Lake; AVX-512 CPUs run it with the EVEX encoding), 'avx512bw'
    (AVX-512 F/BW/VL only, as a Skylake-SP), 'avx512vnni' (and VNNI, as a Cascade Lake) or 'avx512' (all the CPU
    has)."""
    _C.set_cpu_isa_cap(name)


def cpu_gemv() -> str:
    """How the CPU packed GEMV (M <= 32) treats activations: 'auto', 'exact', 'int8x1', 'int8x2' or 'int8x3'."""
    return _C.cpu_gemv()


def set_cpu_gemv(name: str) -> None:
    """'auto' (default; SALIQ_CPU_GEMV sets the initial value): x rounded to int8 digits per weight group, three
    for fp32 x, two for fp16 / bf16 (docs/OPS.md); 'exact': fp32 products of the codes with x; 'int8xN': N
    digits for every dtype."""
    _C.set_cpu_gemv(name)


# ---------------------------------------------------------------- cpp (CPU)
def pack(q, bits):
    return _C.pack(q, bits)


def unpack(qweight, qweight_hi, bits, in_features):
    return _C.unpack(qweight, qweight_hi, bits, in_features)


def dequantize(qweight, qweight_hi, scales, zeros, bits, group_size, in_features):
    return _C.dequantize(qweight, qweight_hi, scales, zeros, bits, group_size, in_features)


def packed_matmul(x, qweight, qweight_hi, scales, zeros, bits, group_size, in_features,
                  bias: Optional[torch.Tensor]):
    return _C.packed_matmul(x, qweight, qweight_hi, scales, zeros, bits, group_size, in_features, bias)


def packed_linear(x, qweight, qweight_hi, scales, zeros, bits, group_size, in_features, bias, lora_A, lora_B,
                  lora_scale):
    """x What^T + lora_scale (x A^T) B^T + bias in one call (saliq/ref.py packed_linear for x [M, K])."""
    return _C.quant_linear(x, qweight, qweight_hi, scales, zeros, bits, group_size, in_features, bias, lora_A, lora_B,
                           lora_scale)


def packed_linear_sliced(x, qweight, qweight_hi, scales, zeros, bits, group_size, in_features, bias, lora_A, lora_B,
                         lora_scale, slices):
    """packed_linear plus x Sp^T for reserved weights in slices of 16 rows (saliq/sparse_slices.py), in one call."""
    return _C.quant_linear_sliced(x, qweight, qweight_hi, scales, zeros, bits, group_size, in_features, bias, lora_A,
                                  lora_B, lora_scale, *slices)


# ops.packed_linear_trusted runs a backend's packed_matmul and LoRA term in one call where the backend offers it,
# and the reserved weights too where it offers that
packed_matmul.with_lora = packed_linear
packed_linear.with_slices = packed_linear_sliced
# the C++ kernels read a weight in the CPU word order too (1-D planes, saliq/word_order.py); ops.py hands the other
# backends format v1
for _fn in (unpack, dequantize, packed_matmul):
    _fn.cpu_word_order = True

DENSE_MAX_ROWS = 4  # decode, batch <= 4; more rows are a GEMM, which torch does well


def dense_linear(x, weight, bias=None):
    """x W^T + bias for a float W: rows of W split across threads for a few rows of x, else F.linear."""
    if x.numel() > DENSE_MAX_ROWS * x.shape[-1] or x.dtype != weight.dtype:
        return torch.nn.functional.linear(x, weight, bias)
    return _C.dense_linear(x, weight, bias)


def fake_quant_lwc_fwd(W, hi, lo, S, delta, bits, group_size, symmetric):
    return _C.fake_quant_lwc_fwd(W, hi, lo, S, delta, bits, group_size, symmetric)


def fake_quant_lwc_bwd(grad_what, grad_reg, W, hi, lo, S, delta, bits, group_size, symmetric, need_dW):
    return _C.fake_quant_lwc_bwd(grad_what, grad_reg, W, hi, lo, S, delta, bits, group_size, symmetric, need_dW)


def saliency_sq_error(A, B, S, need_grad):
    return _C.saliency_sq_error(A, B, S, need_grad)


for _op, _fn in (("pack", pack), ("unpack", unpack), ("dequantize", dequantize), ("packed_matmul", packed_matmul),
                 ("dense_linear", dense_linear),
                 ("fake_quant_lwc_fwd", fake_quant_lwc_fwd), ("fake_quant_lwc_bwd", fake_quant_lwc_bwd),
                 ("saliency_sq_error", saliency_sq_error)):
    backends.register("cpp", _op, _fn)


# ---------------------------------------------------------------- cuda
def cuda_device_count() -> int:
    """CUDA devices the saliq CUDA kernels can see (0 without a driver or GPU, or when not built)."""
    return int(_C.cuda_device_count()) if WITH_CUDA else 0


_cuda_checked = False
_raw_stream = getattr(torch._C, "_cuda_getCurrentRawStream", None)


def _cuda_ready(t: torch.Tensor) -> int:
    """Raise a clear error unless a GPU is usable and t is on it; returns the current stream as an integer."""
    if not WITH_CUDA:
        raise RuntimeError("saliq._C was built without CUDA (no CUDA toolkit at build time): the cuda backend "
                           "is unavailable; rebuild with nvcc on PATH or CUDA_HOME set")
    global _cuda_checked
    if not _cuda_checked:
        _C.cuda_check_device()  # RuntimeError naming the CUDA error (no driver, no device, ...)
        _cuda_checked = True
    if t.device.type != "cuda":
        raise RuntimeError(f"the cuda backend needs CUDA tensors, got a tensor on {t.device}")
    # the raw handle of the current stream: no Python stream object per call (decode calls are microseconds)
    if _raw_stream is not None:
        return _raw_stream(t.device.index)
    return torch.cuda.current_stream(t.device).cuda_stream


def _on_device(t: torch.Tensor):
    """The launchers use the current device: switch only when t lives elsewhere."""
    if t.device.index == torch.cuda.current_device():
        return contextlib.nullcontext()
    return torch.cuda.device(t.device)


def cuda_packed_matmul(x, qweight, qweight_hi, scales, zeros, bits, group_size, in_features,
                       bias: Optional[torch.Tensor], warps: int = 0):
    """x W^T + bias: the tensor-core decode kernel for fp16 / bf16 x with M <= 16, the fp32 GEMV for fp32 x with
    M <= 8; larger M runs the reference (the registry sends those to Triton). `warps` (1..16) overrides the
    decode kernel's warps per CTA (benchmarks)."""
    stream = _cuda_ready(x)
    if x.shape[0] > cuda_max_m(x.dtype):
        return ref.packed_matmul(x, qweight, qweight_hi, scales, zeros, bits, group_size, in_features, bias)
    with _on_device(x):
        return _C.cuda_packed_matmul(x, qweight, qweight_hi, scales, zeros, bits, group_size, in_features, bias,
                                     stream, warps)


def _cuda_packed_matmul_with_extras(x, qweight, qweight_hi, scales, zeros, bits, group_size, in_features, bias,
                                    lora_A=None, lora_B=None, lora_scale=0.0, rowptr=None, cols=None, vals=None):
    """x W^T + bias + lora_scale (x A^T) B^T + x Sp^T, the LoRA and reserved-weight terms added inside the decode
    kernel's launch (Sp: int32 CSR by output feature, fp32 values, checked by the caller; either term may be
    absent); None where that kernel does not serve x (the caller adds the terms itself). x A^T, [M, r], is one
    small GEMM before it."""
    if x.dtype not in (torch.float16, torch.bfloat16) or not 1 <= x.shape[0] <= CUDA_DECODE_MAX_M:
        return None
    stream = _cuda_ready(x)
    lora_t = None if lora_A is None else x @ lora_A.to(x.dtype).t()
    with _on_device(x):
        return _C.cuda_packed_matmul(x, qweight, qweight_hi, scales, zeros, bits, group_size, in_features, bias,
                                     stream, 0, rowptr, cols, vals, lora_t, lora_B, float(lora_scale))


cuda_packed_matmul.with_extras = _cuda_packed_matmul_with_extras


def cuda_fake_quant_lwc_fwd(W, hi, lo, S, delta, bits, group_size, symmetric):
    stream = _cuda_ready(W)
    with _on_device(W):
        return _C.cuda_fake_quant_lwc_fwd(W, hi, lo, S, delta, bits, group_size, symmetric, stream)


def cuda_fake_quant_lwc_bwd(grad_what, grad_reg, W, hi, lo, S, delta, bits, group_size, symmetric, need_dW):
    stream = _cuda_ready(W)
    with _on_device(W):
        return _C.cuda_fake_quant_lwc_bwd(grad_what, grad_reg, W, hi, lo, S, delta, bits, group_size, symmetric,
                                          need_dW, stream)


def cuda_saliency_sq_error(A, B, S, need_grad):
    stream = _cuda_ready(A)
    with _on_device(A):
        return _C.cuda_saliency_sq_error(A, B, S, need_grad, stream)


def cuda_dequantize(qweight, qweight_hi, scales, zeros, bits, group_size, in_features):
    """Format v1 -> W [N, K] in scales.dtype (ref.dequantize), one thread per packed word."""
    stream = _cuda_ready(qweight)
    with _on_device(qweight):
        return _C.cuda_dequantize(qweight, qweight_hi, scales, zeros, bits, group_size, in_features, None, stream)


def cuda_dequantize_into(out, qweight, qweight_hi, scales, zeros, bits, group_size, in_features):
    """cuda_dequantize written into `out` (contiguous [N, K], any float dtype: one rounding from fp32)."""
    stream = _cuda_ready(qweight)
    with _on_device(qweight):
        return _C.cuda_dequantize(qweight, qweight_hi, scales, zeros, bits, group_size, in_features, out, stream)


if WITH_CUDA:
    from . import regimes

    regimes.install()
    for _op, _fn in (("packed_matmul", cuda_packed_matmul), ("fake_quant_lwc_fwd", cuda_fake_quant_lwc_fwd),
                     ("fake_quant_lwc_bwd", cuda_fake_quant_lwc_bwd), ("saliency_sq_error", cuda_saliency_sq_error),
                     ("dequantize", cuda_dequantize)):
        backends.register("cuda", _op, _fn)


# ---------------------------------------------------------------- sparse_addmm (cpp and cuda)
def sparse_addmm_into(y, x, rowptr, cols, vals, out):
    """y + x Sp^T written into out (which may be y)."""
    return _C.sparse_addmm(y, x, rowptr, cols, vals, out)


def sparse_addmm(y, x, rowptr, cols, vals):
    return _C.sparse_addmm(y, x, rowptr, cols, vals, None)


def sliced_sparse_addmm_(y, x, slices):
    """y += x Sp^T in place from Sp in slices of 16 rows (saliq/sparse_slices.py)."""
    return _C.sliced_sparse_addmm_(y, x, *slices)


sparse_addmm.into = sparse_addmm_into  # ops.sparse_addmm_ writes over y with it
sparse_addmm.sliced = sliced_sparse_addmm_  # and with this where the caller holds the sliced form
backends.register("cpp", "sparse_addmm", sparse_addmm)


def cuda_sparse_addmm_into(y, x, rowptr, cols, vals, out):
    stream = _cuda_ready(x)
    with _on_device(x):
        return _C.cuda_sparse_addmm(y, x, rowptr, cols, vals, out, stream)


def cuda_sparse_addmm(y, x, rowptr, cols, vals):
    return cuda_sparse_addmm_into(y, x, rowptr, cols, vals, None)


cuda_sparse_addmm.into = cuda_sparse_addmm_into
if WITH_CUDA:
    backends.register("cuda", "sparse_addmm", cuda_sparse_addmm)
