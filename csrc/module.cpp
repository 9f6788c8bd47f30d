// The Python module resfused._C. Importing it runs the TORCH_LIBRARY registrations of every
// source file; the module itself says how it was built (read by resfused.info) and holds one
// plain function for the eval fast path, `tensor_state` (resfused/runtime/module_state.py).
#include <Python.h>
#include <torch/csrc/autograd/python_variable.h>

#include <cstdint>

#ifndef RESFUSED_CUDA_ARCHS
#define RESFUSED_CUDA_ARCHS ""
#endif

// tensor_state(tensors: list[Tensor]) -> bytes: for each tensor its storage's address, its
// storage offset and its version counter (-1 for an inference tensor, which has none), as three
// int64 each. A fused block compares these bytes with the ones of its snapshot on every eval
// call: one call instead of two Python attribute reads per tensor (~0.2 us per tensor). Reads only:
// the storage's const address (no copy-on-write materialization), no allocation but the bytes.
static PyObject* tensor_state(PyObject* /*self*/, PyObject* arg) {
  if (!PyList_Check(arg)) {
    PyErr_SetString(PyExc_TypeError, "tensor_state: expected a list of tensors");
    return nullptr;
  }
  const Py_ssize_t n = PyList_GET_SIZE(arg);
  PyObject* out = PyBytes_FromStringAndSize(nullptr, n * 3 * static_cast<Py_ssize_t>(sizeof(int64_t)));
  if (out == nullptr) return nullptr;
  auto* words = reinterpret_cast<int64_t*>(PyBytes_AS_STRING(out));
  for (Py_ssize_t i = 0; i < n; ++i) {
    PyObject* item = PyList_GET_ITEM(arg, i);
    if (!THPVariable_Check(item)) {
      Py_DECREF(out);
      PyErr_Format(PyExc_TypeError, "tensor_state: item %zd is a %s, not a tensor", i, Py_TYPE(item)->tp_name);
      return nullptr;
    }
    const at::Tensor& t = THPVariable_Unpack(item);
    const bool has_storage = t.has_storage();
    words[3 * i] = has_storage ? reinterpret_cast<intptr_t>(t.storage().data()) : 0;
    words[3 * i + 1] = has_storage ? t.storage_offset() : 0;
    words[3 * i + 2] = t.is_inference() ? -1 : static_cast<int64_t>(t._version());
  }
  return out;
}

static PyMethodDef resfused_methods[] = {
    {"tensor_state", tensor_state, METH_O, "Storage address, offset and version of each tensor, as bytes."},
    {nullptr, nullptr, 0, nullptr}};

static struct PyModuleDef resfused_module = {
    PyModuleDef_HEAD_INIT, "_C", "resfused kernels (registered as torch.ops.resfused)", -1, resfused_methods};

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
