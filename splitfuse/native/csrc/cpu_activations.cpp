// The cpu backend's gated MLP activations (module splitfuse.native._cpu_activations):
//   silu_and_mul / gelu_and_mul: x [M, 2I] = [gate | up] -> act(gate) * up, [M, I], in one pass.
// Rounding follows the reference ops (torch_ops.py): act(gate) is computed in fp32, rounded to the
// storage type, and multiplied by up in fp32 before the final rounding (F.silu(gate).mul_(up));
// the formulas are torch's own, term for term; fp32 silu uses torch's exp and matches it bit for bit
// (on AVX2), gelu uses libm's erf / tanh and may differ from torch's vectorised ones in the last bit.
// Each row is computed by one thread start to end: results do not depend on the thread count.

#include "native.h"
#include "sleef_exp.h"
#include "storage.h"

#include <algorithm>
#include <cmath>

namespace {

using namespace splitfuse_native;

// outputs above which rows run in parallel (about 200 us on one thread): a region costs microseconds to start
// on a quiet machine and up to a scheduler time slice when the other core is busy with another process
constexpr int64_t PARALLEL_MIN_ELEMENTS = 1 << 18;
constexpr int64_t CHUNK = 64;                     // elements per pass: the activation, then the product

enum Act { ACT_SILU = 0, ACT_GELU = 1, ACT_GELU_TANH = 2 };

// torch's formulas (aten/src/ATen/native/cpu/Activation.cpp), in its order of operations. torch runs
// the vectorised formula over each row's first multiple of VEC_RUN elements and the scalar one
// (libm) over the rest: run(g, a, n_vec, n) follows that split for a chunk whose first n_vec
// elements are in the vectorised run. silu's vectorised exp is torch's own (sleef_exp.h), so fp32
// silu matches it bit for bit on AVX2; gelu's erf / tanh are libm's throughout.
constexpr int64_t VEC_RUN = 16;

struct Silu {
  static float scalar(float x) { return x / (1.f + std::exp(-x)); }
  static void run(const float* g, float* a, int64_t n_vec, int64_t n) {
    int64_t j = 0;
#ifdef __AVX2__
    const __m256 one = _mm256_set1_ps(1.f), sign = _mm256_set1_ps(-0.f);
    for (; j + 8 <= n_vec; j += 8) {
      const __m256 x = _mm256_loadu_ps(g + j);
      _mm256_storeu_ps(a + j, _mm256_div_ps(x, _mm256_add_ps(one, sleef_expf8_u10(_mm256_xor_ps(x, sign)))));
    }
#endif
    for (; j < n_vec; ++j) a[j] = g[j] / (1.f + sleef_expf_u10(-g[j]));
    for (; j < n; ++j) a[j] = scalar(g[j]);
  }
};

struct Gelu {
  static void run(const float* g, float* a, int64_t, int64_t n) {
    for (int64_t j = 0; j < n; ++j) a[j] = g[j] * 0.5f * (1.f + std::erf(g[j] * static_cast<float>(M_SQRT1_2)));
  }
};

struct GeluTanh {
  static void run(const float* g, float* a, int64_t, int64_t n) {
    const float beta = static_cast<float>(M_SQRT2 * M_2_SQRTPI * 0.5), kappa = 0.044715f;
    for (int64_t j = 0; j < n; ++j) {
      const float x = g[j], inner = beta * (x + kappa * (x * x * x));
      a[j] = 0.5f * x * (1.f + std::tanh(inner));
    }
  }
};

template <typename S, typename A>
void gated(const void* x_, void* out_, int64_t M, int64_t I) {
  using T = typename S::T;
  const T* xp = static_cast<const T*>(x_);
  T* op = static_cast<T*>(out_);
  const int64_t vec_end = I / VEC_RUN * VEC_RUN;
#pragma omp parallel for if (M * I > PARALLEL_MIN_ELEMENTS)
  for (int64_t i = 0; i < M; ++i) {
    const T *gate = xp + i * 2 * I, *up = gate + I;
    T* o = op + i * I;
    float g[CHUNK], act[CHUNK];
    for (int64_t j0 = 0; j0 < I; j0 += CHUNK) {
      const int64_t n = std::min(CHUNK, I - j0), n_vec = std::clamp<int64_t>(vec_end - j0, 0, n);
#pragma omp simd
      for (int64_t j = 0; j < n; ++j) g[j] = S::load(gate[j0 + j]);
      A::run(g, act, n_vec, n);
      // act(gate) rounded to the storage type, times up, rounded again: F.silu(gate).mul_(up)
#pragma omp simd
      for (int64_t j = 0; j < n; ++j) o[j0 + j] = S::store(S::round(act[j]) * S::load(up[j0 + j]));
    }
  }
}

template <typename S>
void gated_for(int64_t act, const void* x, void* out, int64_t M, int64_t I) {
  if (act == ACT_SILU) gated<S, Silu>(x, out, M, I);
  else if (act == ACT_GELU) gated<S, Gelu>(x, out, M, I);
  else gated<S, GeluTanh>(x, out, M, I);
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
  if (dtype == DT_F32) gated_for<F32>(act, x, out, M, I);
  else if (dtype == DT_BF16) gated_for<BF16>(act, x, out, M, I);
  else gated_for<F16>(act, x, out, M, I);
  Py_END_ALLOW_THREADS
  Py_RETURN_NONE;
}

PyMethodDef methods[] = {
    {"gated_and_mul", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(py_gated_and_mul)), METH_FASTCALL,
     "act(gate) * up for x = [gate | up] (silu, gelu or gelu-tanh)."},
    {nullptr, nullptr, 0, nullptr}};

}  // namespace

SPLITFUSE_NATIVE_MODULE(cpu_activations, methods)
