// The cpu backend's gated MLP activations (module splitfuse.native._cpu_activations):
//   silu_and_mul / gelu_and_mul: x [M, 2I] = [gate | up] -> act(gate) * up, [M, I], in one pass.
// Rounding follows the reference ops (torch_ops.py): act(gate) is computed in fp32, rounded to the
// storage type, and multiplied by up in fp32 before the final rounding (F.silu(gate).mul_(up));
// the formulas are torch's own, term for term, so fp32 results differ from torch only where its
// vectorised exp/erf/tanh round differently from libm's (a last-bit difference, rarely).
// Each row is computed by one thread start to end: results do not depend on the thread count.

#include "native.h"

#include <algorithm>
#include <cmath>

namespace {

using namespace splitfuse_native;

constexpr int64_t PARALLEL_MIN_ELEMENTS = 32768;  // below this a parallel region costs more than it saves
constexpr int64_t CHUNK = 64;                     // elements per pass: the activation, then the product

enum DType { DT_F32 = 0, DT_BF16 = 1, DT_F16 = 2 };
enum Act { ACT_SILU = 0, ACT_GELU = 1, ACT_GELU_TANH = 2 };

// element <-> fp32 for each storage type
struct AsF32 {
  using T = float;
  static float in(float v) { return v; }
  static float out(float v) { return v; }
};
struct AsBF16 {
  using T = uint16_t;
  static float in(uint16_t v) { return bf16_to_float(v); }
  static uint16_t out(float v) { return float_to_bf16(v); }
};
struct AsF16 {
  using T = uint16_t;
  static float in(uint16_t v) { return fp16_to_float(v); }
  static uint16_t out(float v) { return float_to_fp16(v); }
};

// exp as torch's vectorised fp32 silu computes it on AVX2 (Sleef's expf_u10: Cody-Waite reduction
// and a degree-6 polynomial with fused multiply-adds), so that fp32 silu matches it bit for bit
inline float sleef_expf(float d) {
  const float q = std::nearbyint(d * 1.442695040888963407359924681001892137426645954152985934135449406931f);
  float s = std::fma(q, -0.693145751953125f, d);
  s = std::fma(q, -1.428606765330187045e-06f, s);
  float u = 0.000198527617612853646278381f;
  u = std::fma(u, s, 0.00139304355252534151077271f);
  u = std::fma(u, s, 0.00833336077630519866943359f);
  u = std::fma(u, s, 0.0416664853692054748535156f);
  u = std::fma(u, s, 0.166666671633720397949219f);
  u = std::fma(u, s, 0.5f);
  u = 1.0f + std::fma(s * s, u, s);
  const int32_t e = static_cast<int32_t>(q), h = e >> 1;
  auto pow2 = [](int32_t k) { const uint32_t bits = uint32_t(k + 0x7f) << 23; float f; std::memcpy(&f, &bits, 4); return f; };
  u = u * pow2(h) * pow2(e - h);
  if (d < -104.f) u = 0.f;
  if (d > 100.f) u = INFINITY;
  return std::isnan(d) ? d : u;
}

// torch's formulas (aten/src/ATen/native/cpu/Activation.cpp), in its order of operations
inline float silu(float x) { return x / (1.f + std::exp(-x)); }
inline float silu_vec(float x) { return x / (1.f + sleef_expf(-x)); }
inline float gelu(float x) { return x * 0.5f * (1.f + std::erf(x * static_cast<float>(M_SQRT1_2))); }
inline float gelu_tanh(float x) {
  const float beta = static_cast<float>(M_SQRT2 * M_2_SQRTPI * 0.5), kappa = 0.044715f;
  const float inner = beta * (x + kappa * (x * x * x));
  return 0.5f * x * (1.f + std::tanh(inner));
}

// torch runs the vectorised formula over each row's first multiple of VEC_RUN elements and the scalar
// one (libm) over the rest; F_vec and F_tail follow that split
constexpr int64_t VEC_RUN = 16;

template <typename S, float (*F_vec)(float), float (*F_tail)(float)>
void gated(const void* x_, void* out_, int64_t M, int64_t I) {
  using T = typename S::T;
  const T* xp = static_cast<const T*>(x_);
  T* op = static_cast<T*>(out_);
#pragma omp parallel for if (M * I > PARALLEL_MIN_ELEMENTS)
  for (int64_t i = 0; i < M; ++i) {
    const T *gate = xp + i * 2 * I, *up = gate + I;
    T* o = op + i * I;
    float act[CHUNK];
    const int64_t vec_end = I / VEC_RUN * VEC_RUN;
    for (int64_t j0 = 0; j0 < I; j0 += CHUNK) {
      const int64_t n = std::min(CHUNK, I - j0);
      // the libm calls stay scalar; the conversions and the product around them vectorise
      for (int64_t j = 0; j < n; ++j) {
        const float g = S::in(gate[j0 + j]);
        act[j] = S::in(S::out(j0 + j < vec_end ? F_vec(g) : F_tail(g)));
      }
#pragma omp simd
      for (int64_t j = 0; j < n; ++j) o[j0 + j] = S::out(act[j] * S::in(up[j0 + j]));
    }
  }
}

template <typename S>
void gated_for(int64_t act, const void* x, void* out, int64_t M, int64_t I) {
  if (act == ACT_SILU) gated<S, silu_vec, silu>(x, out, M, I);
  else if (act == ACT_GELU) gated<S, gelu, gelu>(x, out, M, I);
  else gated<S, gelu_tanh, gelu_tanh>(x, out, M, I);
}

// gated_and_mul(dtype, activation, x, out, rows, I): x contiguous [rows, 2I], out contiguous [rows, I];
// dtype 0/1/2 = float32/bfloat16/float16, activation 0/1/2 = silu/gelu (erf)/gelu (tanh)
PyObject* py_gated_and_mul(PyObject*, PyObject* const* items, Py_ssize_t count) {
  if (!check_arity("gated_and_mul", count, 6)) return nullptr;
  const Args in{items, count};
  const int64_t dtype = in.i64(0), act = in.i64(1), M = in.i64(4), I = in.i64(5);
  const void* x = in.ptr<const void>(2);
  void* out = in.ptr<void>(3);
  if (failed()) return nullptr;
  if (dtype < DT_F32 || dtype > DT_F16 || act < ACT_SILU || act > ACT_GELU_TANH || M < 0 || I <= 0) {
    PyErr_Format(PyExc_ValueError,
                 "gated_and_mul: dtype %lld (expected 0-2), activation %lld (expected 0-2), rows %lld (>= 0), "
                 "I %lld (> 0)", static_cast<long long>(dtype), static_cast<long long>(act),
                 static_cast<long long>(M), static_cast<long long>(I));
    return nullptr;
  }
  Py_BEGIN_ALLOW_THREADS
  if (dtype == DT_F32) gated_for<AsF32>(act, x, out, M, I);
  else if (dtype == DT_BF16) gated_for<AsBF16>(act, x, out, M, I);
  else gated_for<AsF16>(act, x, out, M, I);
  Py_END_ALLOW_THREADS
  Py_RETURN_NONE;
}

PyMethodDef methods[] = {
    {"gated_and_mul", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(py_gated_and_mul)), METH_FASTCALL,
     "act(gate) * up for x = [gate | up] (silu, gelu or gelu-tanh)."},
    {nullptr, nullptr, 0, nullptr}};

}  // namespace

SPLITFUSE_NATIVE_MODULE(cpu_activations, methods)
