// Shared by splitfuse's C++ CPU kernels: argument reading for METH_FASTCALL functions, bf16/fp16
// conversion, and the module boilerplate. The kernels take raw pointers (tensor.data_ptr()) and
// plain numbers, never torch objects: they build with a C++ compiler alone, at install time.
#pragma once

#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <cstdint>
#include <cstring>

namespace splitfuse_native {

// ---- bf16 / fp16 <-> fp32, rounding as torch does (to nearest even; NaN stays NaN) ----
inline float bf16_to_float(uint16_t v) {
  uint32_t bits = uint32_t(v) << 16;
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

inline uint16_t float_to_bf16(float f) {
  uint32_t bits;
  std::memcpy(&bits, &f, 4);
  if ((bits & 0x7fffffffu) > 0x7f800000u) return uint16_t((bits >> 16) | 0x40u);  // quiet NaN
  bits += 0x7fffu + ((bits >> 16) & 1u);
  return uint16_t(bits >> 16);
}

inline float fp16_to_float(uint16_t h) {
  uint32_t sign = uint32_t(h & 0x8000u) << 16, exp = (h >> 10) & 0x1fu, mant = h & 0x3ffu, bits;
  if (exp == 0x1fu) {
    bits = sign | 0x7f800000u | (mant << 13);
  } else if (exp != 0) {
    bits = sign | ((exp + 112u) << 23) | (mant << 13);
  } else if (mant == 0) {
    bits = sign;
  } else {  // subnormal: normalise
    exp = 113u;
    while (!(mant & 0x400u)) { mant <<= 1; --exp; }
    bits = sign | (exp << 23) | ((mant & 0x3ffu) << 13);
  }
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

inline uint16_t float_to_fp16(float f) {
  uint32_t bits;
  std::memcpy(&bits, &f, 4);
  uint32_t sign = (bits >> 16) & 0x8000u, abs = bits & 0x7fffffffu;
  if (abs > 0x7f800000u) return uint16_t(sign | 0x7e00u);                 // NaN
  if (abs >= 0x477ff000u) return uint16_t(sign | 0x7c00u);                // overflow -> inf
  if (abs < 0x38800000u) {                                                // subnormal or zero
    if (abs < 0x33000000u) return uint16_t(sign);
    uint32_t exp = abs >> 23, mant = (abs & 0x7fffffu) | 0x800000u, shift = 126u - exp;
    uint32_t half = mant >> shift, rest = mant & ((1u << shift) - 1u), mid = 1u << (shift - 1u);
    if (rest > mid || (rest == mid && (half & 1u))) ++half;
    return uint16_t(sign | half);
  }
  uint32_t rounded = abs + 0xfffu + ((abs >> 13) & 1u);
  return uint16_t(sign | ((rounded - 0x38000000u) >> 13));
}

// ---- element types of float tensors, as splitfuse.native.DTYPE_CODES passes them ----
enum DType : int64_t { DT_F32 = 0, DT_BF16 = 1, DT_F16 = 2 };

// ---- arguments: every function is METH_FASTCALL over ints (pointers, sizes) and floats ----
struct Args {
  PyObject* const* items;
  Py_ssize_t count;

  // an address from tensor.data_ptr(); nullptr for None
  template <typename T>
  T* ptr(Py_ssize_t i) const {
    return items[i] == Py_None ? nullptr : static_cast<T*>(PyLong_AsVoidPtr(items[i]));
  }
  int64_t i64(Py_ssize_t i) const { return PyLong_AsLongLong(items[i]); }
  double f64(Py_ssize_t i) const { return PyFloat_AsDouble(items[i]); }
};

// false (with a TypeError set) unless exactly `expected` arguments came; then reading them failed
// only if a Python error is pending (check with `failed()` after reading)
inline bool check_arity(const char* name, Py_ssize_t got, Py_ssize_t expected) {
  if (got == expected) return true;
  PyErr_Format(PyExc_TypeError, "%s takes %zd arguments (%zd given)", name, expected, got);
  return false;
}

inline bool failed() { return PyErr_Occurred() != nullptr; }

}  // namespace splitfuse_native

#ifndef SPLITFUSE_BUILD_TAG
#define SPLITFUSE_BUILD_TAG "unknown"
#endif

// Defines PyInit__<name> for the module splitfuse.native._<name> with these methods; the module
// carries BUILD_TAG (the CPU it was built for, see cpu_tag.py).
#define SPLITFUSE_NATIVE_MODULE(name, methods)                                                  \
  static PyModuleDef name##_module_def = {PyModuleDef_HEAD_INIT, "splitfuse.native._" #name,   \
                                          nullptr, -1, methods};                               \
  PyMODINIT_FUNC PyInit__##name(void) {                                                        \
    PyObject* module = PyModule_Create(&name##_module_def);                                    \
    if (module && PyModule_AddStringConstant(module, "BUILD_TAG", SPLITFUSE_BUILD_TAG) < 0) {  \
      Py_DECREF(module);                                                                       \
      return nullptr;                                                                          \
    }                                                                                          \
    return module;                                                                             \
  }
