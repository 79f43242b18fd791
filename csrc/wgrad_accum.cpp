// Weight-gradient GEMM accumulated in place into main_grad (semantics in wgrad_accum.h; PyTorch reference in
// libra_megatron/ops/wgrad_accum.py). This file validates the arguments and dispatches:
//   - CUDA tensors: cuBLAS GEMM with beta = 1 (wgrad_accum_cuda.cu, built under LIBRA_WITH_CUDA);
//   - CPU tensors: at::addmm_ with beta = 1 on fp32 (or main_grad-typed) operands, the same math.
#include "registry.h"

#include "wgrad_accum.h"

#include <algorithm>

#ifdef LIBRA_WITH_CUDA
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#endif

namespace {

libra::WgradDtype wgrad_dtype(const at::Tensor& t, const char* name) {
  switch (t.scalar_type()) {
    case at::kFloat: return libra::WgradDtype::kFloat32;
    case at::kHalf: return libra::WgradDtype::kFloat16;
    case at::kBFloat16: return libra::WgradDtype::kBFloat16;
    default: TORCH_CHECK(false, "wgrad_gemm_accum: ", name, " must be float32, float16 or bfloat16, got ", t.scalar_type());
  }
}

// A 2-D view [rows, width] with a unit inner stride (a copy only when the layout has none).
at::Tensor as_rows(const at::Tensor& t, int64_t width) {
  at::Tensor rows = t.reshape({-1, width});
  if (rows.stride(1) != 1 || (rows.size(0) > 1 && rows.stride(0) < width)) rows = rows.contiguous();
  return rows;
}

// main_grad[out, in] += grad_output[..., out]^T . input[..., in]  (leading dimensions flattened into rows).
void wgrad_gemm_accum(const at::Tensor& input, const at::Tensor& grad_output, at::Tensor main_grad) {
  TORCH_CHECK(main_grad.dim() == 2, "wgrad_gemm_accum: main_grad must be [out, in], got ", main_grad.sizes());
  TORCH_CHECK(main_grad.is_contiguous(), "wgrad_gemm_accum: main_grad must be contiguous");
  TORCH_CHECK(input.dim() >= 1 && grad_output.dim() >= 1, "wgrad_gemm_accum: input and grad_output need a feature dimension");
  const int64_t out_features = main_grad.size(0), in_features = main_grad.size(1);
  TORCH_CHECK(input.size(-1) == in_features, "wgrad_gemm_accum: input has ", input.size(-1),
              " features, main_grad expects ", in_features);
  TORCH_CHECK(grad_output.size(-1) == out_features, "wgrad_gemm_accum: grad_output has ", grad_output.size(-1),
              " features, main_grad expects ", out_features);
  TORCH_CHECK(input.numel() / std::max<int64_t>(in_features, 1) == grad_output.numel() / std::max<int64_t>(out_features, 1),
              "wgrad_gemm_accum: input ", input.sizes(), " and grad_output ", grad_output.sizes(), " have different row counts");
  TORCH_CHECK(input.scalar_type() == grad_output.scalar_type(), "wgrad_gemm_accum: input is ", input.scalar_type(),
              ", grad_output is ", grad_output.scalar_type(), " (they must match)");
  TORCH_CHECK(input.device() == main_grad.device() && grad_output.device() == main_grad.device(),
              "wgrad_gemm_accum: tensors on different devices (", input.device(), ", ", grad_output.device(), ", ",
              main_grad.device(), ")");
  libra::WgradArgs a;
  a.input_dtype = wgrad_dtype(input, "input");
  a.grad_dtype = wgrad_dtype(main_grad, "main_grad");
  TORCH_CHECK(a.grad_dtype == libra::WgradDtype::kFloat32 || a.grad_dtype == a.input_dtype,
              "wgrad_gemm_accum: a ", main_grad.scalar_type(), " main_grad needs ", main_grad.scalar_type(),
              " inputs, got ", input.scalar_type());
  if (main_grad.numel() == 0 || input.numel() == 0) return;
  const at::Tensor x = as_rows(input, in_features);
  const at::Tensor g = as_rows(grad_output, out_features);
  if (main_grad.device().is_cpu()) {
    const auto dtype = main_grad.scalar_type();
    main_grad.addmm_(g.t().to(dtype), x.to(dtype));
    return;
  }
#ifdef LIBRA_WITH_CUDA
  TORCH_CHECK(main_grad.device().is_cuda(), "wgrad_gemm_accum: unsupported device ", main_grad.device());
  a.input = x.data_ptr();
  a.grad_output = g.data_ptr();
  a.main_grad = main_grad.data_ptr();
  a.rows = x.size(0);
  a.in_features = in_features;
  a.out_features = out_features;
  a.input_stride = x.size(0) > 1 ? x.stride(0) : in_features;
  a.grad_stride = g.size(0) > 1 ? g.stride(0) : out_features;
  const c10::cuda::CUDAGuard guard(main_grad.device());
  const char* error =
      libra::wgrad_gemm_accum_cuda(a, c10::cuda::getCurrentCUDAStream(main_grad.device().index()).stream());
  TORCH_CHECK(error == nullptr, error);
#else
  TORCH_CHECK(false, "wgrad_gemm_accum: libra_megatron._C was built without CUDA; tensor is on ", main_grad.device());
#endif
}

void register_wgrad_accum(pybind11::module_& m) {
  m.def("wgrad_gemm_accum", &wgrad_gemm_accum,
        "main_grad[out, in] += grad_output[..., out]^T @ input[..., in] in place (cuBLAS beta=1 on CUDA)",
        pybind11::arg("input"), pybind11::arg("grad_output"), pybind11::arg("main_grad"));
}

}  // namespace

LIBRA_REGISTER_OPS(register_wgrad_accum);
