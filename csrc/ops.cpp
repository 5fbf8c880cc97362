// Every schema of the dalle_fast op library. Kernels live in cpu/<op>_cpu.cpp and cuda/<op>_cuda.cu,
// fake kernels and autograd in dalle_fast/ops/<op>.py.
#include <Python.h>
#include <torch/library.h>

#include <string>

extern "C" {
// `import dalle_fast._C` loads this library, which runs the registrations below.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}

namespace dalle_fast {
std::string build_info() {
#ifdef WITH_CUDA
  return "cpu,cuda";
#else
  return "cpu";
#endif
}
}  // namespace dalle_fast

TORCH_LIBRARY(dalle_fast, m) {
  m.def("_build_info() -> str", &dalle_fast::build_info);

  // ---- gumbel_softmax (begin) ----
  // ---- gumbel_softmax (end) ----

  // ---- logit_laplace (begin) ----
  // ---- logit_laplace (end) ----

  // ---- sparse_attention (begin) ----
  // ---- sparse_attention (end) ----
}
