// 8 float32 lanes for the streaming kernels: AVX2 registers (Avx2Lanes), or plain arrays
// (PortableLanes: the path for other CPUs, also built on AVX2 machines so that tests can check it).
// A kernel derives its own struct from each to add how it reads its weights into lanes.
#pragma once

#include <cstring>

#ifdef __AVX2__
#include <immintrin.h>
#endif

namespace splitfuse_native {

struct PortableLanes {
  struct F8 { float v[8]; };
  static F8 zero() { return F8{}; }
  static F8 set1(float a) { F8 r; for (float& v : r.v) v = a; return r; }
  static F8 load(const float* p) { F8 r; std::memcpy(r.v, p, sizeof r.v); return r; }
  static void store(float* p, const F8& a) { std::memcpy(p, a.v, sizeof a.v); }
  static F8 add(const F8& a, const F8& b) {
    F8 r;
    for (int i = 0; i < 8; ++i) r.v[i] = a.v[i] + b.v[i];
    return r;
  }
  static F8 fmadd(const F8& a, const F8& b, const F8& c) {
    F8 r;
    for (int i = 0; i < 8; ++i) r.v[i] = a.v[i] * b.v[i] + c.v[i];
    return r;
  }
  static float hsum(const F8& a) {
    float s = 0.f;
    for (float v : a.v) s += v;
    return s;
  }
};

#ifdef __AVX2__
struct Avx2Lanes {
  using F8 = __m256;
  static F8 zero() { return _mm256_setzero_ps(); }
  static F8 set1(float a) { return _mm256_set1_ps(a); }
  static F8 load(const float* p) { return _mm256_loadu_ps(p); }
  static void store(float* p, F8 a) { _mm256_storeu_ps(p, a); }
  static F8 add(F8 a, F8 b) { return _mm256_add_ps(a, b); }
  static F8 fmadd(F8 a, F8 b, F8 c) { return _mm256_fmadd_ps(a, b, c); }
  static float hsum(F8 a) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
  }
};
#endif

}  // namespace splitfuse_native
