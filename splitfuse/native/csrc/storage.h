// Storage types of the CPU kernels' tensors: how an element converts to and from fp32 (rounding as
// torch does), and round(x), the fp32 value x becomes once stored.
#pragma once

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

}  // namespace splitfuse_native
