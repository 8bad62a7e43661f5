// Dense bf16 / fp16 linear for few rows of x (decode): y[M, N] = x[M, K] @ W[N, K]^T (+ bias), on
// CPUs without native bf16 / fp16 dot products, where torch's own bf16 GEMM is slow.
// Memory-bound: every weight value is read once, widened to float32 in registers (bf16: a 16-bit
// shift; fp16: F16C's conversion) and multiplied with up to 4 rows of x (float32, converted once per
// call); the next part of each weight row is prefetched. Every output is one float32 sum rounded once
// to x's dtype (with the bias added before rounding), as a bf16 GEMM's fp32 accumulation does.
// Threads split the output features (blocks of W rows); each output is summed by one thread in a
// fixed order, so results do not depend on the number of threads.
#include <omp.h>

#include <algorithm>
#include <vector>

#include "lanes.h"
#include "native.h"
#include "storage.h"

namespace {
using namespace splitfuse_native;

inline float to_float(uint16_t v, int64_t dtype) { return dtype == DT_BF16 ? bf16_to_float(v) : fp16_to_float(v); }

// ---- 8 float32 lanes (lanes.h) and the widening of 8 weight values into them ----
struct Portable : PortableLanes {
  template <int64_t DTYPE>
  static F8 widen(const uint16_t* p) { F8 r; for (int i = 0; i < 8; ++i) r.v[i] = to_float(p[i], DTYPE); return r; }
};

#ifdef __AVX2__
struct Avx2 : Avx2Lanes {
  // bf16 is the top half of a float32: zero-extend to 32 bits and shift up; fp16 through F16C
  template <int64_t DTYPE>
  static F8 widen(const uint16_t* p) {
    const __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
    if (DTYPE == DT_BF16) return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(v), 16));
#ifdef __F16C__
    return _mm256_cvtph_ps(v);
#else
    float values[8];  // (no AVX2 CPU lacks F16C: for completeness)
    for (int i = 0; i < 8; ++i) values[i] = fp16_to_float(p[i]);
    return _mm256_loadu_ps(values);
#endif
  }
};
#endif

constexpr int64_t kPrefetchBytes = 1024;  // how far ahead in each weight row
constexpr int64_t kBlockRows = 12;        // W rows per unit of work: tiles of 3 or 4 rows fit it
constexpr int64_t kMaxRows = 64;          // rows of x one call takes (more: the caller's fp32 GEMM)

struct Problem {
  const float* x;        // [M, K] float32
  const uint16_t* w;     // [N, K] bf16 or fp16
  const void* bias;      // [N] in x's dtype, or nullptr
  void* out;             // [M, N] in x's dtype
  int64_t x_dtype, M, K, N;
};

inline void write_value(const Problem& p, int64_t m, int64_t n, float v) {
  if (p.bias != nullptr) {
    v += p.x_dtype == DT_F32 ? static_cast<const float*>(p.bias)[n]
                             : to_float(static_cast<const uint16_t*>(p.bias)[n], p.x_dtype);
  }
  const int64_t i = m * p.N + n;
  if (p.x_dtype == DT_F32) {
    static_cast<float*>(p.out)[i] = v;
  } else {
    static_cast<uint16_t*>(p.out)[i] = p.x_dtype == DT_BF16 ? float_to_bf16(v) : float_to_fp16(v);
  }
}

// y[m0 .. m0 + MT, n0 .. n0 + R]: R weight rows streamed once, each widened vector multiplied with MT
// rows of x (R * MT accumulators, at most 12 of the 16 AVX2 registers)
template <class V, int64_t DTYPE, int R, int MT>
void tile(const Problem& p, int64_t n0, int64_t m0) {
  using F8 = typename V::F8;
  const float* x = p.x + m0 * p.K;
  const uint16_t* w = p.w + n0 * p.K;
  // independent sums per output (C), so that at least 4 FMA chains hide the FMA latency
  constexpr int C = R * MT >= 4 ? 1 : 4 / (R * MT);
  const int64_t k_vec = p.K / (8 * C) * (8 * C);
  F8 acc[R][MT][C];
  for (int r = 0; r < R; ++r)
    for (int m = 0; m < MT; ++m)
      for (int c = 0; c < C; ++c) acc[r][m][c] = V::zero();
  for (int64_t k = 0; k < k_vec; k += 8 * C) {
    for (int r = 0; r < R; ++r) {
      __builtin_prefetch(reinterpret_cast<const char*>(w + r * p.K + k) + kPrefetchBytes);
      for (int c = 0; c < C; ++c) {
        const F8 wv = V::template widen<DTYPE>(w + r * p.K + k + 8 * c);
        for (int m = 0; m < MT; ++m) acc[r][m][c] = V::fmadd(wv, V::load(x + m * p.K + k + 8 * c), acc[r][m][c]);
      }
    }
  }
  for (int r = 0; r < R; ++r) {
    for (int m = 0; m < MT; ++m) {
      for (int c = 1; c < C; ++c) acc[r][m][0] = V::add(acc[r][m][0], acc[r][m][c]);
      float sum = V::hsum(acc[r][m][0]);
      for (int64_t k = k_vec; k < p.K; ++k) sum += to_float(w[r * p.K + k], DTYPE) * x[m * p.K + k];
      write_value(p, m0 + m, n0 + r, sum);
    }
  }
}

// rows [n0, n0 + count) of W against MT rows of x from m0, in tiles of R rows
template <class V, int64_t DTYPE, int R, int MT>
void rows_of_w(const Problem& p, int64_t n0, int64_t count, int64_t m0) {
  int64_t r = 0;
  for (; r + R <= count; r += R) tile<V, DTYPE, R, MT>(p, n0 + r, m0);
  for (; r < count; ++r) tile<V, DTYPE, 1, MT>(p, n0 + r, m0);
}

// a block of W rows against every row of x: 4 rows of x at a time (3 W rows each), the block stays
// in cache between them; the remaining 1-3 rows of x take 4 W rows at a time
template <class V, int64_t DTYPE>
void block(const Problem& p, int64_t n0, int64_t count) {
  int64_t m = 0;
  for (; m + 4 <= p.M; m += 4) rows_of_w<V, DTYPE, 3, 4>(p, n0, count, m);
  if (p.M - m == 3) rows_of_w<V, DTYPE, 4, 3>(p, n0, count, m);
  if (p.M - m == 2) rows_of_w<V, DTYPE, 4, 2>(p, n0, count, m);
  if (p.M - m == 1) rows_of_w<V, DTYPE, 4, 1>(p, n0, count, m);
}

template <class V, int64_t DTYPE>
void run(const Problem& p, int64_t num_threads) {
  const int64_t num_blocks = (p.N + kBlockRows - 1) / kBlockRows;
#pragma omp parallel for num_threads(num_threads) schedule(static) if (num_threads > 1)
  for (int64_t b = 0; b < num_blocks; ++b) {
    const int64_t n0 = b * kBlockRows;
    block<V, DTYPE>(p, n0, std::min(kBlockRows, p.N - n0));
  }
}

template <int64_t DTYPE>
void run_any(const Problem& p, int64_t num_threads, bool vectorized) {
#ifdef __AVX2__
  if (vectorized) return run<Avx2, DTYPE>(p, num_threads);
#endif
  (void)vectorized;
  run<Portable, DTYPE>(p, num_threads);
}

// dense_linear(x, x_dtype, M, K, weight, w_dtype, N, bias, out, num_threads, vectorized)
// x [M, K] and out [M, N] in x_dtype, weight [N, K] in w_dtype (bf16 or fp16), bias [N] in x_dtype
// or None; all contiguous.
PyObject* dense_linear(PyObject*, PyObject* const* items, Py_ssize_t count) {
  if (!check_arity("dense_linear", count, 11)) return nullptr;
  Args a{items, count};
  const void* x = a.ptr<const void>(0);
  const int64_t x_dtype = a.i64(1), M = a.i64(2), K = a.i64(3), w_dtype = a.i64(5), N = a.i64(6);
  Problem p{nullptr, a.ptr<const uint16_t>(4), a.ptr<const void>(7), a.ptr<void>(8), x_dtype, M, K, N};
  const int64_t num_threads = a.i64(9);
  const bool vectorized = a.i64(10) != 0;
  if (failed()) return nullptr;
  if (x_dtype < DT_F32 || x_dtype > DT_F16 || (w_dtype != DT_BF16 && w_dtype != DT_F16)) {
    PyErr_Format(PyExc_ValueError, "dense_linear: x_dtype must be 0, 1 or 2 and w_dtype 1 (bfloat16) or 2 "
                 "(float16); got x_dtype=%lld w_dtype=%lld", static_cast<long long>(x_dtype),
                 static_cast<long long>(w_dtype));
    return nullptr;
  }
  if (M < 0 || M > kMaxRows || K <= 0 || N < 0) {
    PyErr_Format(PyExc_ValueError, "dense_linear: expected 0 <= M <= %lld, K > 0 and N >= 0; got M=%lld K=%lld "
                 "N=%lld", static_cast<long long>(kMaxRows), static_cast<long long>(M), static_cast<long long>(K),
                 static_cast<long long>(N));
    return nullptr;
  }
  Py_BEGIN_ALLOW_THREADS
  std::vector<float> x32(M * K);
  read_values(x, 0, M * K, x_dtype, x32.data());
  p.x = x32.data();
  if (w_dtype == DT_BF16) {
    run_any<DT_BF16>(p, num_threads, vectorized);
  } else {
    run_any<DT_F16>(p, num_threads, vectorized);
  }
  Py_END_ALLOW_THREADS
  Py_RETURN_NONE;
}

PyMethodDef methods[] = {
    {"dense_linear", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(dense_linear)), METH_FASTCALL,
     "dense_linear(x, x_dtype, M, K, weight, w_dtype, N, bias, out, num_threads, vectorized)"},
    {nullptr, nullptr, 0, nullptr}};

}  // namespace

SPLITFUSE_NATIVE_MODULE(dense_linear, methods)
