// Self-registration for the ops of libra_megatron._C.
//
// Every csrc/*.cpp that exposes functions defines `static void register_xxx(pybind11::module_& m)` and
// adds `LIBRA_REGISTER_OPS(register_xxx)` at file scope. bindings.cpp calls every registered function
// when the module is imported, so adding an op never edits a shared file.
#pragma once

#include <torch/extension.h>

#include <vector>

namespace libra {

using OpsRegistrar = void (*)(pybind11::module_&);

// The registrars of all translation units; filled by static initialisers before PyInit__C runs.
std::vector<OpsRegistrar>& ops_registrars();

struct RegisterOps {
  explicit RegisterOps(OpsRegistrar fn) { ops_registrars().push_back(fn); }
};

}  // namespace libra

#define LIBRA_REGISTER_OPS(fn) static ::libra::RegisterOps libra_register_##fn(fn)
