// Python bindings of saliq._C: the CPU ops (ops.h), the SIMD path controls, and the CUDA ops when the
// CUDA objects were built (cuda_ops.h, macro SALIQ_WITH_CUDA).
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>
#include <torch/csrc/utils/pybind.h>

#include "cpu/cpu_features.h"
#include "cpu/cuda_ops.h"
#include "cpu/ops.h"
#include "cpu/work_pool.h"
#ifdef SALIQ_WITH_CUDA
#include "cuda/launchers.h"
#endif

namespace py = pybind11;

PYBIND11_MODULE(_C, m) {
  m.doc() = "saliq C++ / CUDA kernels";
  m.def("pack", &saliq::pack_cpu, "pack integers [N, K] into format v1 (CPU)");
  m.def("unpack", &saliq::unpack_cpu, "format v1 -> uint8 [N, K] (CPU)");
  m.def("repack3", &saliq::repack3_cpu, py::arg("lo"), py::arg("hi"), py::arg("into_cpu_layout"),
        "3-bit planes in format v1: their bits <-> the CPU word order's layout (CPU)");
  m.def("dequantize", &saliq::dequantize_cpu, "format v1 -> W [N, K] in the scales' dtype (CPU)");
  m.def("packed_matmul", &saliq::packed_matmul_cpu, "x W^T + bias with W in format v1 (CPU)");
  m.def("quant_linear", &saliq::quant_linear_cpu,
        "x W^T + lora_scale (x A^T) B^T + bias with W in format v1, in one call (CPU)");
  m.def("decode_serial_calls", &saliq::run_claimed_serial_calls,
        "calls that ran on one thread after a parallel call waited for a descheduled worker (a busy machine)");
  m.def("dense_linear", &saliq::dense_linear_cpu, "x W^T + bias for a dense W, small M (CPU)");
  m.def("packed_matmul_gemv_max_m", &saliq::packed_matmul_gemv_max_m);
  m.def("set_packed_matmul_gemv_max_m", &saliq::set_packed_matmul_gemv_max_m,
        "largest M served by the GEMV kernels (above: dequantized tiles + at::mm)");
  m.def("fake_quant_lwc_fwd", &saliq::fake_quant_lwc_fwd_cpu, "LWC fake quantization forward (CPU)");
  m.def("fake_quant_lwc_bwd", &saliq::fake_quant_lwc_bwd_cpu, "LWC fake quantization backward (CPU)");
  m.def("saliency_sq_error", &saliq::saliency_sq_error_cpu, "sum S (A - B)^2 and its gradient (CPU)");
  m.def("sparse_addmm", &saliq::sparse_addmm_cpu, "y + x Sp^T, Sp in CSR by output row, into out when given (CPU)");
  m.def("sliced_sparse_addmm_", &saliq::sliced_sparse_addmm_cpu,
        "y += x Sp^T in place, Sp in slices of 16 rows (saliq.sparse_slices.csr_slices) (CPU)");
  m.def("quant_linear_sliced", &saliq::quant_linear_sliced_cpu,
        "quant_linear, then + x Sp^T for reserved weights in slices of 16 rows, in one call (CPU)");

  m.def("cpu_isa", [] { return std::string(saliq::active_isa_name()); },
        "SIMD path in use: avx512 (avx512vnni, avx512bw when capped there), avx2vnni, avx2 or portable");
  m.def("cpu_isa_detected", [] { return std::string(saliq::isa_name(saliq::detected_isa())); });
  m.attr("built_with_avx_vnni") = (bool)SALIQ_HAS_AVXVNNI;  // the compiler knew AVX-VNNI: the VEX form is in
  m.def("set_cpu_isa_cap", [](const std::string& name) {
    saliq::IsaCap cap;
    TORCH_CHECK_VALUE(saliq::parse_isa_cap(name.c_str(), &cap),
                      "cpu isa cap must be portable, avx2, avx2vnni, avx512bw, avx512vnni or avx512, got ", name);
    saliq::set_isa_cap(cap);
  }, "cap the SIMD path (for tests): portable, avx2, avx2vnni (+ 256-bit VNNI), avx512bw (AVX-512 F/BW/VL only), "
     "avx512vnni (+ VNNI) or avx512 (all the CPU has)");

  m.def("cpu_gemv", [] { return std::string(saliq::gemv_precision_name(saliq::gemv_precision())); },
        "how the small-M GEMV treats activations: auto, exact, int8x1, int8x2 or int8x3");
  m.def("set_cpu_gemv", [](const std::string& name) {
    saliq::GemvPrecision precision;
    TORCH_CHECK_VALUE(saliq::parse_gemv_precision(name.c_str(), &precision),
                      "cpu gemv must be auto, exact, int8x1, int8x2 or int8x3, got ", name);
    saliq::set_gemv_precision(precision);
  }, "auto: int8 activation digits per dtype (docs/OPS.md); exact: fp32 products; int8xN: N digits for every dtype");

  m.attr("with_cuda") = py::bool_(saliq::kWithCuda);
#ifdef SALIQ_WITH_CUDA
  m.def("cuda_device_count", &saliq::cuda_device_count, "CUDA devices visible (0 with no driver / GPU)");
  m.def("cuda_check_device", &saliq::cuda_check_device, "raise a clear error when no usable GPU is present");
  m.def("cuda_packed_matmul", &saliq::packed_matmul_cuda, py::arg("x"), py::arg("qweight"), py::arg("qweight_hi"),
        py::arg("scales"), py::arg("zeros"), py::arg("bits"), py::arg("group_size"), py::arg("in_features"),
        py::arg("bias"), py::arg("stream"), py::arg("warps") = 0, py::arg("sp_rowptr") = py::none(),
        py::arg("sp_cols") = py::none(), py::arg("sp_vals") = py::none(), py::arg("lora_t") = py::none(),
        py::arg("lora_B") = py::none(), py::arg("lora_scale") = 0.0,
        "x W^T + bias, W in format v1: the tensor-core decode kernel for fp16 / bf16 x (M <= 16; adds the reserved "
        "weights' x Sp^T and the LoRA term lora_scale (x A^T) B^T when given), the fp32 GEMV for fp32 x (M <= 8)");
  m.def("cuda_decode_mma_warps", [](bool bf16, int64_t M, int64_t K, int64_t N, int64_t group_len, int64_t bits) {
    return saliq_cuda_decode_mma_warps(bf16 ? SALIQ_BF16 : SALIQ_F16, M, K, N, group_len, (int)bits);
  }, "warps per CTA the decode kernel chooses for this shape on the current GPU");
  m.def("cuda_decode_mma_set_codes", [](int64_t codes) {
    const int previous = saliq_cuda_decode_mma_set_codes((int)codes);
    TORCH_CHECK_VALUE(previous >= 0, "codes must be 0 (packed-fma decode) or 1 (subnormal codes), got ", codes);
    return previous;
  }, "how the decode kernel feeds 2/4-bit codes at M = 1 with fp16 x: 0 a packed fma per code pair (default), "
     "1 fp16 subnormals; returns the previous setting (process-wide, for the benchmark and tests)");
  m.def("cuda_dequantize", &saliq::dequantize_cuda, "W [N, K] = (q - z) * s from format v1, into out when given");
  m.def("cuda_fake_quant_lwc_fwd", &saliq::fake_quant_lwc_fwd_cuda);
  m.def("cuda_fake_quant_lwc_bwd", &saliq::fake_quant_lwc_bwd_cuda);
  m.def("cuda_saliency_sq_error", &saliq::saliency_sq_error_cuda);
  m.def("cuda_sparse_addmm", &saliq::sparse_addmm_cuda);
#endif
}
