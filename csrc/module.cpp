// The Python module fierce_ext._C. `import fierce_ext._C` loads this library, which runs the op
// registrations of the other sources (TORCH_LIBRARY_FRAGMENT blocks): the CPU noise op always,
// the CUDA ops when the extension was built with CUDA. The module itself has no Python
// functions (the ops live in torch.ops.fierce_ext), so it needs no pybind11.
#include <Python.h>

PyMODINIT_FUNC PyInit__C(void) {
  static PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C",
                               "fierce_ext's compiled ops (see torch.ops.fierce_ext)", -1,
                               nullptr, nullptr, nullptr, nullptr, nullptr};
  return PyModule_Create(&module);
}
