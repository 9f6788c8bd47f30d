// The Python module resfused._C. Importing it runs the TORCH_LIBRARY registrations of every
// source file; the module itself only says how it was built (read by resfused.info).
#include <Python.h>

#ifndef RESFUSED_CUDA_ARCHS
#define RESFUSED_CUDA_ARCHS ""
#endif

static struct PyModuleDef resfused_module = {PyModuleDef_HEAD_INIT, "_C",
                                             "resfused kernels (registered as torch.ops.resfused)", -1, nullptr};

PyMODINIT_FUNC PyInit__C(void) {
  PyObject* m = PyModule_Create(&resfused_module);
  if (m == nullptr) return nullptr;
#ifdef RESFUSED_WITH_CUDA
  PyModule_AddIntConstant(m, "with_cuda", 1);
#else
  PyModule_AddIntConstant(m, "with_cuda", 0);
#endif
  PyModule_AddStringConstant(m, "cuda_archs", RESFUSED_CUDA_ARCHS);
  return m;
}
