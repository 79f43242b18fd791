// cuBLAS weight-gradient GEMM with beta = 1 into main_grad (the role of apex's fused_weight_gradient_mlp_cuda).
// Semantics in wgrad_accum.h; PyTorch reference in libra_megatron/ops/wgrad_accum.py.
//
// Column-major view (cuBLAS): the row-major main_grad [out, in] is C' [in, out] with ldc = in; input [N, in]
// is X' [in, N] (ld = input row stride) and grad_output [N, out] is G' [out, N]. main_grad += G^T X is
// C' += X' . G'^T: gemm(op_a = N, op_b = T, m = in, n = out, k = N), alpha = beta = 1, fp32 compute
// (CUBLAS_COMPUTE_32F: tensor cores for fp16/bf16 inputs, true fp32 for fp32 inputs, like torch's default).
//
// cuBLAS is resolved at run time from the copy torch already loaded (dlsym), so neither the build nor the
// extension's import depends on cuBLAS headers or on linking a particular libcublas: the few declarations
// below are cuBLAS's stable C ABI (the same approach Triton takes). When <cublas_v2.h> is available the
// constants are checked against it at compile time.
#include "wgrad_accum.h"

#include <cuda_runtime.h>
#include <dlfcn.h>
#include <library_types.h>

#include <mutex>
#include <unordered_map>

#if defined(__has_include)
#if __has_include(<cublas_v2.h>)
#include <cublas_v2.h>
#define LIBRA_HAVE_CUBLAS_HEADER 1
#endif
#endif

namespace {

using cublas_status = int;  // cublasStatus_t; 0 is CUBLAS_STATUS_SUCCESS
using cublas_handle = void*;  // cublasHandle_t (an opaque cublasContext*)

constexpr int kOpN = 0;              // CUBLAS_OP_N
constexpr int kOpT = 1;              // CUBLAS_OP_T
constexpr int kCompute32F = 68;      // CUBLAS_COMPUTE_32F
constexpr int kGemmDefault = -1;     // CUBLAS_GEMM_DEFAULT

#ifdef LIBRA_HAVE_CUBLAS_HEADER
static_assert(CUBLAS_STATUS_SUCCESS == 0, "cuBLAS ABI changed");
static_assert(CUBLAS_OP_N == kOpN && CUBLAS_OP_T == kOpT, "cuBLAS ABI changed");
static_assert(CUBLAS_COMPUTE_32F == kCompute32F, "cuBLAS ABI changed");
static_assert(CUBLAS_GEMM_DEFAULT == kGemmDefault, "cuBLAS ABI changed");
static_assert(sizeof(cublasHandle_t) == sizeof(cublas_handle), "cuBLAS ABI changed");
#endif

using CreateFn = cublas_status (*)(cublas_handle*);
using SetStreamFn = cublas_status (*)(cublas_handle, cudaStream_t);
using GemmExFn = cublas_status (*)(cublas_handle, int, int, int, int, int, const void*, const void*, cudaDataType,
                                   int, const void*, cudaDataType, int, const void*, void*, cudaDataType, int, int,
                                   int);

struct Cublas {
  CreateFn create = nullptr;
  SetStreamFn set_stream = nullptr;
  GemmExFn gemm_ex = nullptr;
  const char* error = nullptr;
};

void* find_symbol(const char* name) {
  if (void* symbol = dlsym(RTLD_DEFAULT, name)) return symbol;
  // torch loads cuBLAS as a dependency of libtorch_cuda (not always into the global scope): find that copy.
  for (const char* library : {"libcublas.so.13", "libcublas.so.12", "libcublas.so.11", "libcublas.so"}) {
    if (void* handle = dlopen(library, RTLD_NOW | RTLD_NOLOAD)) {
      if (void* symbol = dlsym(handle, name)) return symbol;
    }
  }
  for (const char* library : {"libcublas.so.13", "libcublas.so.12", "libcublas.so.11", "libcublas.so"}) {
    if (void* handle = dlopen(library, RTLD_NOW | RTLD_GLOBAL)) {
      if (void* symbol = dlsym(handle, name)) return symbol;
    }
  }
  return nullptr;
}

const Cublas& cublas() {
  static const Cublas api = [] {
    Cublas a;
    a.create = reinterpret_cast<CreateFn>(find_symbol("cublasCreate_v2"));
    a.set_stream = reinterpret_cast<SetStreamFn>(find_symbol("cublasSetStream_v2"));
    a.gemm_ex = reinterpret_cast<GemmExFn>(find_symbol("cublasGemmEx"));
    if (!a.create || !a.set_stream || !a.gemm_ex) a.error = "wgrad_gemm_accum: cuBLAS (libcublas) is not loaded";
    return a;
  }();
  return api;
}

// One handle per (thread, device), as torch's handle pool does: a cuBLAS handle must not be used by two host
// threads at once, and autograd runs one backward thread per device.
cublas_handle handle_for_current_device(const Cublas& api, const char** error) {
  thread_local std::unordered_map<int, cublas_handle> handles;
  int device = 0;
  if (cudaGetDevice(&device) != cudaSuccess) {
    *error = "wgrad_gemm_accum: cudaGetDevice failed";
    return nullptr;
  }
  auto found = handles.find(device);
  if (found != handles.end()) return found->second;
  cublas_handle handle = nullptr;
  if (api.create(&handle) != 0) {
    *error = "wgrad_gemm_accum: cublasCreate failed";
    return nullptr;
  }
  handles.emplace(device, handle);
  return handle;
}

cudaDataType cuda_type(libra::WgradDtype dtype) {
  switch (dtype) {
    case libra::WgradDtype::kFloat16: return CUDA_R_16F;
    case libra::WgradDtype::kBFloat16: return CUDA_R_16BF;
    default: return CUDA_R_32F;
  }
}

constexpr int64_t kMaxInt = 2147483647;

}  // namespace

namespace libra {

const char* wgrad_gemm_accum_cuda(const WgradArgs& a, void* stream) {
  if (a.rows == 0 || a.in_features == 0 || a.out_features == 0) return nullptr;  // nothing to add
  for (int64_t v : {a.rows, a.in_features, a.out_features, a.input_stride, a.grad_stride}) {
    if (v > kMaxInt) return "wgrad_gemm_accum: a dimension or stride exceeds cuBLAS's 32-bit int";
  }
  const Cublas& api = cublas();
  if (api.error != nullptr) return api.error;
  const char* error = nullptr;
  cublas_handle handle = handle_for_current_device(api, &error);
  if (handle == nullptr) return error;
  if (api.set_stream(handle, static_cast<cudaStream_t>(stream)) != 0) return "wgrad_gemm_accum: cublasSetStream failed";
  const float one = 1.0f;  // alpha = beta = 1 (fp32 scalars: the compute type is 32F)
  const cublas_status status = api.gemm_ex(
      handle, kOpN, kOpT, static_cast<int>(a.in_features), static_cast<int>(a.out_features), static_cast<int>(a.rows),
      &one, a.input, cuda_type(a.input_dtype), static_cast<int>(a.input_stride), a.grad_output,
      cuda_type(a.input_dtype), static_cast<int>(a.grad_stride), &one, a.main_grad, cuda_type(a.grad_dtype),
      static_cast<int>(a.in_features), kCompute32F, kGemmDefault);
  if (status != 0) return "wgrad_gemm_accum: cublasGemmEx failed (unsupported dtype combination or bad layout)";
  return nullptr;
}

}  // namespace libra
