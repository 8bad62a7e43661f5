// Storage types of the CPU kernels' tensors: how an element converts to and from fp32 (rounding as
// torch does), and round(x), the fp32 value x becomes once stored; whole runs of elements of a
// dtype known only at run time read into / written from fp32.
#pragma once

#include <cstring>

#include "native.h"

namespace splitfuse_native {

struct F32 {
  using T = float;
  static float load(float x) { return x; }
  static float store(float x) { return x; }
  static float round(float x) { return x; }
};
struct BF16 {
  using T = uint16_t;
  static float load(uint16_t x) { return bf16_to_float(x); }
  static uint16_t store(float x) { return float_to_bf16(x); }
  static float round(float x) { return bf16_to_float(float_to_bf16(x)); }
};
struct F16 {
  using T = uint16_t;
  static float load(uint16_t x) { return fp16_to_float(x); }
  static uint16_t store(float x) { return float_to_fp16(x); }
  static float round(float x) { return fp16_to_float(float_to_fp16(x)); }
};

// n values from p + offset as float32 (the dtype test out of the loop, so that it vectorizes)
inline void read_values(const void* p, int64_t offset, int64_t n, int64_t dtype, float* out) {
  if (dtype == DT_F32) {
    std::memcpy(out, static_cast<const float*>(p) + offset, n * sizeof(float));
  } else if (dtype == DT_BF16) {
    const uint16_t* v = static_cast<const uint16_t*>(p) + offset;
    for (int64_t i = 0; i < n; ++i) out[i] = bf16_to_float(v[i]);
  } else {
    const uint16_t* v = static_cast<const uint16_t*>(p) + offset;
    for (int64_t i = 0; i < n; ++i) out[i] = fp16_to_float(v[i]);
  }
}

// n float32 values to p + offset in dtype (the dtype test out of the loop, so that it vectorizes:
// a decode step writes about 13 thousand outputs per layer)
inline void write_values(const float* in, int64_t n, int64_t dtype, void* p, int64_t offset) {
  if (dtype == DT_F32) {
    std::memcpy(static_cast<float*>(p) + offset, in, n * sizeof(float));
  } else if (dtype == DT_BF16) {
    uint16_t* v = static_cast<uint16_t*>(p) + offset;
    for (int64_t i = 0; i < n; ++i) v[i] = float_to_bf16(in[i]);
  } else {
    uint16_t* v = static_cast<uint16_t*>(p) + offset;
    for (int64_t i = 0; i < n; ++i) v[i] = float_to_fp16(in[i]);
  }
}

}  // namespace splitfuse_native
