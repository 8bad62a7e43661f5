// exp as torch's vectorised fp32 kernels compute it (softmax, silu): Sleef's expf_u10, FMA build
// (Cody-Waite reduction and a degree-6 polynomial with fused multiply-adds), scalar and 8 at a time
// with AVX2; the two agree bit for bit. Kernels that must match torch bit for bit use these instead
// of libm's expf.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>

#ifdef __AVX2__
#include <immintrin.h>
#endif

namespace splitfuse_native {

inline float sleef_pow2i(int q) {
  uint32_t bits = uint32_t(q + 0x7f) << 23;
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

inline float sleef_expf_u10(float d) {
  if (d < -104.0f) return 0.0f;
  if (d > 100.0f) return std::numeric_limits<float>::infinity();
  int q = int(std::nearbyintf(d * 1.442695040888963407359924681001892137426645954152985934135449406931f));
  float qf = float(q);
  float s = std::fmaf(qf, -0.693145751953125f, d);
  s = std::fmaf(qf, -1.428606765330187045e-06f, s);
  float u = 0.000198527617612853646278381f;
  u = std::fmaf(u, s, 0.00139304355252534151077271f);
  u = std::fmaf(u, s, 0.00833336077630519866943359f);
  u = std::fmaf(u, s, 0.0416664853692054748535156f);
  u = std::fmaf(u, s, 0.166666671633720397949219f);
  u = std::fmaf(u, s, 0.5f);
  u = 1.0f + std::fmaf(s * s, u, s);
  return u * sleef_pow2i(q >> 1) * sleef_pow2i(q - (q >> 1));
}

#ifdef __AVX2__
inline __m256 sleef_expf8_u10(__m256 d) {
  const __m256 log2e = _mm256_set1_ps(1.442695040888963407359924681001892137426645954152985934135449406931f);
  __m256i q = _mm256_cvtps_epi32(_mm256_mul_ps(d, log2e));
  __m256 qf = _mm256_cvtepi32_ps(q);
  __m256 s = _mm256_fmadd_ps(qf, _mm256_set1_ps(-0.693145751953125f), d);
  s = _mm256_fmadd_ps(qf, _mm256_set1_ps(-1.428606765330187045e-06f), s);
  __m256 u = _mm256_set1_ps(0.000198527617612853646278381f);
  u = _mm256_fmadd_ps(u, s, _mm256_set1_ps(0.00139304355252534151077271f));
  u = _mm256_fmadd_ps(u, s, _mm256_set1_ps(0.00833336077630519866943359f));
  u = _mm256_fmadd_ps(u, s, _mm256_set1_ps(0.0416664853692054748535156f));
  u = _mm256_fmadd_ps(u, s, _mm256_set1_ps(0.166666671633720397949219f));
  u = _mm256_fmadd_ps(u, s, _mm256_set1_ps(0.5f));
  u = _mm256_add_ps(_mm256_set1_ps(1.0f), _mm256_fmadd_ps(_mm256_mul_ps(s, s), u, s));
  __m256i half = _mm256_srai_epi32(q, 1);
  auto pow2i = [](__m256i e) {
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(e, _mm256_set1_epi32(0x7f)), 23));
  };
  u = _mm256_mul_ps(_mm256_mul_ps(u, pow2i(half)), pow2i(_mm256_sub_epi32(q, half)));
  u = _mm256_andnot_ps(_mm256_cmp_ps(d, _mm256_set1_ps(-104.0f), _CMP_LT_OQ), u);
  return _mm256_blendv_ps(u, _mm256_set1_ps(std::numeric_limits<float>::infinity()),
                          _mm256_cmp_ps(_mm256_set1_ps(100.0f), d, _CMP_LT_OQ));
}
#endif

}  // namespace splitfuse_native
