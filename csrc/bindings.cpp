// The libra_megatron._C module: version/build identity plus every op registered with LIBRA_REGISTER_OPS.
#include "registry.h"

#ifndef LIBRA_CSRC_HASH
#define LIBRA_CSRC_HASH "unknown"
#endif

namespace libra {

std::vector<OpsRegistrar>& ops_registrars() {
  static std::vector<OpsRegistrar> registrars;
  return registrars;
}

}  // namespace libra

PYBIND11_MODULE(_C, m) {
  m.doc() = "libra-megatron C++/CUDA extension (LFQ quantisation, dataset index builders)";
  // Hash of csrc/ at build time: the Python loader compares it with the sources to detect a stale build.
  m.attr("csrc_hash") = LIBRA_CSRC_HASH;
#ifdef LIBRA_WITH_CUDA
  m.attr("with_cuda") = true;
#else
  m.attr("with_cuda") = false;
#endif
#ifdef _OPENMP
  m.attr("with_openmp") = true;
#else
  m.attr("with_openmp") = false;
#endif
  for (auto fn : libra::ops_registrars()) fn(m);
}
