// Sampled rows of one step, one fused pass per row: temperature, top-k, top-p (HF's rule), and the
// Philox exponential race, drawing the token splitfuse.core.sampler's torch path draws.
//
// Exactness. The kept set is decided with the reference's own float operations: x / T, the k-th
// largest value, and for top-p the softmax of the ascending row as torch's CPU kernel computes it
// (Sleef's expf_u10 with FMA, a sum in `lanes` vector lanes then a shuffle tree, times 1 / sum)
// and its cumulative sum accumulated in double, as torch's cumsum does. Long rows skip the sort
// where error bounds prove the same cut (bounded_cut); short rows, and long rows the bounds leave
// open, sort and reproduce those sums operation for operation (sorted_cut).
// The race's two logs are torch.log in the reference (MKL or Sleef, within a few ulps), so a row
// whose best two keys lie within that error of each other is left undecided, as is a row whose
// top-p cutoff falls inside a run of equal values (torch.sort's tie order decides there), a row
// with NaN or +inf, and a row that keeps nothing: the caller draws those rows with the torch path.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <utility>
#include <vector>

#include "native.h"
#include "sleef_exp.h"  // exp as torch's vectorised softmax computes it

#ifdef __AVX2__
#include <immintrin.h>
#endif

namespace {

using splitfuse_native::sleef_expf_u10;
#ifdef __AVX2__
using splitfuse_native::sleef_expf8_u10;
#endif

constexpr int64_t kUndecided = -1;
constexpr float kInf = std::numeric_limits<float>::infinity();
constexpr float kLowestKey = -3.4e38f;  // the reference clamps a kept token's key here

// ---- Philox-4x32-10 word 0, as tl.randint(seed, offset) (splitfuse/core/philox.py) ----
inline uint32_t philox_word0(uint64_t seed, uint64_t offset) {
  uint32_t k0 = uint32_t(seed), k1 = uint32_t(seed >> 32);
  uint32_t c0 = uint32_t(offset), c1 = uint32_t(offset >> 32), c2 = 0, c3 = 0;
  for (int round = 0; round < 10; ++round) {
    uint64_t a = uint64_t(0xD2511F53u) * c0, b = uint64_t(0xCD9E8D57u) * c2;
    uint32_t n0 = uint32_t(b >> 32) ^ c1 ^ k0, n2 = uint32_t(a >> 32) ^ c3 ^ k1;
    c1 = uint32_t(b);
    c3 = uint32_t(a);
    c0 = n0;
    c2 = n2;
    k0 += 0x9E3779B9u;
    k1 += 0xBB67AE85u;
  }
  return c0;
}

// softmax(sorted)'s 1 / sum for an ascending row of `num_low` -inf then `n` values (max last),
// with exps written to e: torch's reduce_all order (position q adds into lane q % lanes, in
// order of q; then the shuffle tree pairs lanes half apart)
float softmax_scale(const float* values, int64_t n, int64_t num_low, int lanes, float* e) {
  const float max = values[n - 1];
  alignas(32) float acc[16] = {0};
  int64_t i = 0;
  auto one = [&](int64_t k) {
    e[k] = sleef_expf_u10(values[k] - max);
    int lane = int((num_low + k) % lanes);
    acc[lane] = acc[lane] + e[k];
  };
  for (; i < n && (num_low + i) % lanes != 0; ++i) one(i);  // up to a whole vector of positions
#ifdef __AVX2__
  __m256 acc0 = _mm256_load_ps(acc), acc1 = _mm256_load_ps(acc + 8);
  const __m256 top = _mm256_set1_ps(max);
  for (; i + lanes <= n; i += lanes) {
    __m256 e0 = sleef_expf8_u10(_mm256_sub_ps(_mm256_loadu_ps(values + i), top));
    _mm256_storeu_ps(e + i, e0);
    acc0 = _mm256_add_ps(acc0, e0);
    if (lanes == 16) {
      __m256 e1 = sleef_expf8_u10(_mm256_sub_ps(_mm256_loadu_ps(values + i + 8), top));
      _mm256_storeu_ps(e + i + 8, e1);
      acc1 = _mm256_add_ps(acc1, e1);
    }
  }
  _mm256_store_ps(acc, acc0);
  _mm256_store_ps(acc + 8, acc1);
#endif
  for (; i < n; ++i) one(i);
  for (int half = lanes / 2; half >= 1; half /= 2)
    for (int j = 0; j < half; ++j) acc[j] = acc[j] + acc[j + half];
  return 1.0f / acc[0];
}

// ---- sorting and selection on float bits: radix passes instead of comparison sorts ----
// an unsigned key in the float's order (finite values; -0 sorts just below +0, which are equal)
inline uint32_t order_key(float v) {
  uint32_t bits;
  std::memcpy(&bits, &v, 4);
  return bits ^ ((bits >> 31) ? 0xFFFFFFFFu : 0x80000000u);
}

inline float from_order_key(uint32_t key) {
  uint32_t bits = key ^ ((key >> 31) ? 0x80000000u : 0xFFFFFFFFu);
  float v;
  std::memcpy(&v, &bits, 4);
  return v;
}

// values ascending, by a least-significant-digit radix sort over 11 + 11 + 10 bits
void radix_sort(std::vector<float>& values, std::vector<uint32_t>& keys, std::vector<uint32_t>& spare) {
  const size_t n = values.size();
  keys.resize(n);
  spare.resize(n);
  uint32_t counts[3][2048] = {};
  for (size_t i = 0; i < n; ++i) {
    uint32_t key = order_key(values[i]);
    keys[i] = key;
    ++counts[0][key & 2047];
    ++counts[1][(key >> 11) & 2047];
    ++counts[2][key >> 22];
  }
  for (int pass = 0; pass < 3; ++pass) {
    const int shift = 11 * pass;
    uint32_t* count = counts[pass];
    if (count[(keys[0] >> shift) & 2047] == n) continue;  // one digit everywhere: already in order
    uint32_t total = 0;
    for (int d = 0; d < 2048; ++d) {
      uint32_t c = count[d];
      count[d] = total;
      total += c;
    }
    for (size_t i = 0; i < n; ++i) spare[count[(keys[i] >> shift) & 2047]++] = keys[i];
    keys.swap(spare);
  }
  for (size_t i = 0; i < n; ++i) values[i] = from_order_key(keys[i]);
}

// ---- compaction: the indices (or values) of x at or above a floor, in order ----
#ifdef __AVX2__
// for each 8-bit mask, the lanes it selects, packed to the front
inline const __m256i* compaction_table() {
  static const auto table = [] {
    std::vector<int32_t> t(256 * 8, 0);
    for (int mask = 0; mask < 256; ++mask)
      for (int lane = 0, k = 0; lane < 8; ++lane)
        if (mask >> lane & 1) t[mask * 8 + k++] = lane;
    return t;
  }();
  return reinterpret_cast<const __m256i*>(table.data());
}
#endif

// out (room for n + 8) gets the j with x[j] >= floor (as indices, or the values with `values`)
template <bool values>
int64_t compact_at_least(const float* x, int64_t n, float floor, void* out) {
  int64_t count = 0, j = 0;
#ifdef __AVX2__
  const __m256i* table = compaction_table();
  const __m256 bound = _mm256_set1_ps(floor);
  for (; j + 8 <= n; j += 8) {
    __m256 v = _mm256_loadu_ps(x + j);
    int mask = _mm256_movemask_ps(_mm256_cmp_ps(v, bound, _CMP_GE_OQ));
    __m256i order = _mm256_loadu_si256(table + mask);
    if (values)
      _mm256_storeu_ps(static_cast<float*>(out) + count, _mm256_permutevar8x32_ps(v, order));
    else
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(static_cast<int32_t*>(out) + count),
                          _mm256_add_epi32(order, _mm256_set1_epi32(int32_t(j))));
    count += __builtin_popcount(unsigned(mask));
  }
#endif
  for (; j < n; ++j) {
    if (values)
      static_cast<float*>(out)[count] = x[j];
    else
      static_cast<int32_t*>(out)[count] = int32_t(j);
    count += x[j] >= floor;
  }
  return count;
}

// The k-th largest of scaled (0 < k < n, no NaN), and in `pool` the indices of the values at or
// above a floor below it: each block's maximum is one of the values, so at least k values are >=
// the k-th largest block maximum, and nth_element runs on those alone
float kth_largest(const std::vector<float>& scaled, int64_t k, std::vector<float>& maxima, std::vector<int32_t>& pool,
                  std::vector<float>& candidates) {
  const int64_t n = int64_t(scaled.size()), block = n / (4 * k);
  float floor = -kInf;
  if (block >= 2) {
    const int64_t num_blocks = n / block;
    maxima.resize(num_blocks);
    for (int64_t b = 0; b < num_blocks; ++b) {
      const float* v = scaled.data() + b * block;
      float m = v[0];
      for (int64_t i = 1; i < block; ++i) m = v[i] > m ? v[i] : m;
      maxima[b] = m;
    }
    std::nth_element(maxima.begin(), maxima.end() - k, maxima.end());
    floor = *(maxima.end() - k);
  }
  pool.resize(n + 8);
  const int64_t count = compact_at_least<false>(scaled.data(), n, floor, pool.data());
  pool.resize(count);
  candidates.resize(count);
  for (int64_t i = 0; i < count; ++i) candidates[i] = scaled[pool[i]];
  std::nth_element(candidates.begin(), candidates.end() - k, candidates.end());
  return *(candidates.end() - k);
}

struct Row {
  const float* logits;
  int64_t vocab;
  float temperature;
  int64_t top_k;
  double top_p;
  uint64_t seed;
  uint64_t counter;
};

struct Scratch {
  std::vector<float> scaled, values, exps, maxima;
  std::vector<uint32_t> keys, spare, count;
  std::vector<int32_t> kept, pool;
  std::vector<float> keys_out;
  std::vector<uint16_t> buckets;
  std::vector<double> mass;
  std::vector<std::pair<float, float>> pairs;
};

// Where HF's top-p rule cuts an ascending row of `num_low` -inf then the values: the first
// `dropped` positions fall; `cutoff` is the value at position `dropped`, `before` the one just
// below it (when dropped > 0)
struct Cut {
  int64_t dropped;
  float cutoff, before;
};

// HF's rule on the sorted row: drop while the cumulative mass (torch's cumsum accumulates in
// double) is <= the limit; the -inf positions have mass 0. Sorts s.values.
Cut sorted_cut(Scratch& s, int64_t num_low, float limit, int lanes, int64_t V) {
  const int64_t n = int64_t(s.values.size());
  radix_sort(s.values, s.keys, s.spare);
  s.exps.resize(n);
  const float scale = softmax_scale(s.values.data(), n, num_low, lanes, s.exps.data());
  int64_t dropped = num_low;
  double mass = 0.0;
  for (int64_t i = 0; i < n; ++i) {
    mass += double(s.exps[i] * scale);
    if (!(float(mass) <= limit)) break;
    ++dropped;
  }
  dropped = std::min(dropped, V - 1);
  auto at = [&](int64_t pos) { return pos < num_low ? -kInf : s.values[pos - num_low]; };
  return {dropped, at(dropped), dropped > 0 ? at(dropped - 1) : std::nanf("")};
}

// The same cut without sorting the row, when error bounds prove it: the softmax sum's rounding in
// torch's order is bounded from value buckets (a term can only be added to the partial sums after
// it, and those hold values >= its own), which brackets torch's 1 / sum between two floats; the
// cumulative mass, monotone in that scale, is then walked bucket by bucket, sorting only the
// bucket where it passes the limit. False (the caller sorts) where a bound leaves it open.
bool bounded_cut(Scratch& s, int64_t num_low, float limit, int lanes, Cut& cut) {
  const std::vector<float>& v = s.values;
  const int64_t n = int64_t(v.size()), positions = n + num_low;
  if (!(limit > 0.0f)) return false;
  float max = v[0];
  for (int64_t i = 1; i < n; ++i) max = v[i] > max ? v[i] : max;
  s.exps.resize(n);
  float* e = s.exps.data();
  int64_t i = 0;
#ifdef __AVX2__
  for (; i + 8 <= n; i += 8)
    _mm256_storeu_ps(e + i, sleef_expf8_u10(_mm256_sub_ps(_mm256_loadu_ps(v.data() + i), _mm256_set1_ps(max))));
#endif
  for (; i < n; ++i) e[i] = sleef_expf_u10(v[i] - max);

  constexpr int kBuckets = 2048;  // the top 11 bits of the order key: sign, exponent, 2 mantissa bits
  s.buckets.resize(n);
  std::vector<uint32_t>& count = s.count;
  std::vector<double>& mass = s.mass;
  count.resize(kBuckets);
  mass.resize(kBuckets);
  // the values' buckets span [first, last]: only those are cleared and walked
  const int first = int(order_key(*std::min_element(v.begin(), v.end())) >> 21), last = int(order_key(max) >> 21);
  for (int b = first; b <= last; ++b) {
    count[b] = 0;
    mass[b] = 0.0;
  }
  for (i = 0; i < n; ++i) {
    uint16_t b = uint16_t(order_key(v[i]) >> 21);
    s.buckets[i] = b;
    ++count[b];
    mass[b] += e[i];
  }
  double sum = 0.0, lane_term = 0.0;
  int64_t at_or_above = 0;
  for (int b = last; b >= first; --b) {
    at_or_above += count[b];
    sum += mass[b];
    lane_term += mass[b] * (double(at_or_above) / lanes + 2.0);
  }
  // |torch's float sum - sum| <= u * (the lane partial sums + one sum per tree level), u = 2^-24;
  // 1.01 covers partial sums already rounded up, the last term this double sum's own error
  const double bound = 1.01 * 0x1p-24 * (lane_term + std::log2(double(lanes)) * sum) + 4.0 * positions * 0x1p-53 * sum;
  const float sum_lo = std::nextafterf(float(sum - bound), 0.0f), sum_hi = std::nextafterf(float(sum + bound), kInf);
  const float scales[2] = {1.0f / sum_hi, 1.0f / sum_lo};
  // float(D) <= limit exactly when D < mid (or D == mid and limit even); the reference's double
  // cumsum and ours differ by at most each one's rounding, N * 2^-53 * D
  const double mid = (double(limit) + double(std::nextafterf(limit, kInf))) / 2.0;
  auto slack = [&](double d) { return 2.02 * double(positions) * 0x1p-53 * d; };
  // the bucket where the mass passes the limit, by the bucket masses (within rounding of the walk below)
  const double scale_mid = (double(scales[0]) + double(scales[1])) / 2.0;
  double approx = 0.0;
  int crossing = first;
  int64_t dropped_below = num_low;
  for (; crossing <= last; ++crossing) {
    if (approx + mass[crossing] * scale_mid > mid) break;
    approx += mass[crossing] * scale_mid;
    dropped_below += count[crossing];
  }
  if (crossing > last) return false;  // the cut is at the very top: the sorted path clamps it
  // the exact masses below that bucket (any order: within slack), their largest value, and the
  // bucket's own values in order
  double below[2] = {0.0, 0.0};
  float top_below = -kInf;
  s.pairs.clear();
  i = 0;
#ifdef __AVX2__
  __m256d acc[4] = {_mm256_setzero_pd(), _mm256_setzero_pd(), _mm256_setzero_pd(), _mm256_setzero_pd()};
  const __m256i bucket_of_crossing = _mm256_set1_epi32(crossing);
  __m256 tops = _mm256_set1_ps(-kInf);
  for (; i + 8 <= n; i += 8) {
    __m256i b = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(s.buckets.data() + i)));
    __m256 is_below = _mm256_castsi256_ps(_mm256_cmpgt_epi32(bucket_of_crossing, b));
    __m256 ev = _mm256_and_ps(_mm256_loadu_ps(e + i), is_below);
    tops = _mm256_max_ps(tops, _mm256_blendv_ps(_mm256_set1_ps(-kInf), _mm256_loadu_ps(v.data() + i), is_below));
    for (int which = 0; which < 2; ++which) {
      __m256 p = _mm256_mul_ps(ev, _mm256_set1_ps(scales[which]));
      acc[2 * which] = _mm256_add_pd(acc[2 * which], _mm256_cvtps_pd(_mm256_castps256_ps128(p)));
      acc[2 * which + 1] = _mm256_add_pd(acc[2 * which + 1], _mm256_cvtps_pd(_mm256_extractf128_ps(p, 1)));
    }
    if (!_mm256_testz_si256(_mm256_cmpeq_epi32(b, bucket_of_crossing), _mm256_cmpeq_epi32(b, bucket_of_crossing)))
      for (int k = 0; k < 8; ++k)
        if (s.buckets[i + k] == crossing) s.pairs.emplace_back(v[i + k], e[i + k]);
  }
  alignas(32) double parts[4];
  alignas(32) float top_parts[8];
  for (int which = 0; which < 2; ++which) {
    _mm256_store_pd(parts, _mm256_add_pd(acc[2 * which], acc[2 * which + 1]));
    below[which] = (parts[0] + parts[1]) + (parts[2] + parts[3]);
  }
  _mm256_store_ps(top_parts, tops);
  for (float t : top_parts) top_below = t > top_below ? t : top_below;
#endif
  for (; i < n; ++i) {
    if (s.buckets[i] < crossing) {
      below[0] += double(e[i] * scales[0]);
      below[1] += double(e[i] * scales[1]);
      top_below = v[i] > top_below ? v[i] : top_below;
    } else if (s.buckets[i] == crossing) {
      s.pairs.emplace_back(v[i], e[i]);
    }
  }
  std::sort(s.pairs.begin(), s.pairs.end());
  Cut found[2];
  for (int which = 0; which < 2; ++which) {
    double d = below[which];
    if (!(d + slack(d) < mid)) return false;  // every position below the bucket must fall
    int64_t dropped = dropped_below;
    float before = dropped_below > num_low ? top_below : (num_low > 0 ? -kInf : std::nanf(""));
    bool crossed = false;
    for (const auto& [value, exp] : s.pairs) {
      const double next = d + double(exp * scales[which]);
      if (next - slack(next) > mid) {
        found[which] = {dropped, value, before};
        crossed = true;
        break;
      }
      if (!(next + slack(next) < mid)) return false;  // too close to call
      d = next;
      ++dropped;
      before = value;
    }
    if (!crossed) return false;  // not in this bucket after all: the sorted path decides
  }
  if (found[0].dropped != found[1].dropped) return false;
  cut = found[0];
  return true;
}

// rows shorter than this sort outright: the bounds pay off on long rows
constexpr int64_t kBoundedFrom = 256;

// The least scaled logit kept (top-k then top-p), or NaN when the torch path must decide. With
// top-k on, s.pool holds the indices that can be kept; otherwise it is left empty (every index).
float threshold(const Row& row, Scratch& s, int lanes) {
  const int64_t V = row.vocab;
  float thr = -kInf;
  s.pool.clear();
  const bool top_k = row.top_k > 0 && row.top_k < V;
  if (top_k) thr = kth_largest(s.scaled, row.top_k, s.maxima, s.pool, s.values);
  if (!(row.top_p < 1.0)) return thr;
  if (V < lanes) return std::nanf("");  // torch's reduce_all takes another order there
  const float limit = float(1.0 - row.top_p);
  // the finite values top-k keeps (all finite values without it): >= the lowest float
  const float floor = std::max(thr, -std::numeric_limits<float>::max());
  int64_t n = 0;
  if (top_k) {
    s.values.resize(s.pool.size());
    for (int32_t j : s.pool) {
      s.values[n] = s.scaled[j];
      n += s.scaled[j] >= floor;
    }
  } else {
    s.values.resize(V + 8);
    n = compact_at_least<true>(s.scaled.data(), V, floor, s.values.data());
  }
  s.values.resize(n);
  const int64_t num_low = V - n;  // top-k's drops and -inf sort first
  if (n == 0 || limit < 0.0f) return std::nanf("");
  Cut cut;
  if (!(n >= kBoundedFrom && bounded_cut(s, num_low, limit, lanes, cut))) cut = sorted_cut(s, num_low, limit, lanes, V);
  if (cut.dropped > 0 && cut.before == cut.cutoff) return std::nanf("");  // the sort's tie order decides
  return std::max(thr, cut.cutoff);
}

#ifdef __AVX2__
// high and low words of the 32 x 32-bit products of x and a constant, 8 lanes
inline void mul_hi_lo(__m256i x, uint32_t a, __m256i& hi, __m256i& lo) {
  const __m256i m = _mm256_set1_epi32(int(a));
  lo = _mm256_mullo_epi32(x, m);
  __m256i even = _mm256_mul_epu32(x, m), odd = _mm256_mul_epu32(_mm256_srli_epi64(x, 32), m);
  hi = _mm256_blend_epi32(_mm256_srli_epi64(even, 32), odd, 0xAA);
}

// philox_word0 for 8 offsets (low and high words) under one seed
inline __m256i philox8_word0(uint64_t seed, __m256i c0, __m256i c1) {
  __m256i k0 = _mm256_set1_epi32(int(uint32_t(seed))), k1 = _mm256_set1_epi32(int(uint32_t(seed >> 32)));
  __m256i c2 = _mm256_setzero_si256(), c3 = _mm256_setzero_si256();
  for (int round = 0; round < 10; ++round) {
    __m256i hi_a, lo_a, hi_b, lo_b;
    mul_hi_lo(c0, 0xD2511F53u, hi_a, lo_a);
    mul_hi_lo(c2, 0xCD9E8D57u, hi_b, lo_b);
    c0 = _mm256_xor_si256(_mm256_xor_si256(hi_b, c1), k0);
    c2 = _mm256_xor_si256(_mm256_xor_si256(hi_a, c3), k1);
    c1 = lo_b;
    c3 = lo_a;
    k0 = _mm256_add_epi32(k0, _mm256_set1_epi32(int(0x9E3779B9u)));
    k1 = _mm256_add_epi32(k1, _mm256_set1_epi32(int(0xBB67AE85u)));
  }
  return c0;
}

// natural log of 8 positive normal floats, Sleef's xlogf (within 3.5 ulp; the race's margin,
// key_error, allows far more)
inline __m256 log8(__m256 d) {
  __m256i bits = _mm256_castps_si256(_mm256_mul_ps(d, _mm256_set1_ps(0.7071f)));
  __m256i e = _mm256_sub_epi32(_mm256_and_si256(_mm256_srli_epi32(bits, 23), _mm256_set1_epi32(0xff)),
                               _mm256_set1_epi32(0x7e));
  __m256 m = _mm256_mul_ps(d, _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_sub_epi32(_mm256_set1_epi32(0x7f), e), 23)));
  __m256 x = _mm256_div_ps(_mm256_sub_ps(m, _mm256_set1_ps(1.0f)), _mm256_add_ps(m, _mm256_set1_ps(1.0f)));
  __m256 x2 = _mm256_mul_ps(x, x);
  __m256 t = _mm256_set1_ps(0.2371599674224853515625f);
  t = _mm256_fmadd_ps(t, x2, _mm256_set1_ps(0.285279005765914916992188f));
  t = _mm256_fmadd_ps(t, x2, _mm256_set1_ps(0.400005519390106201171875f));
  t = _mm256_fmadd_ps(t, x2, _mm256_set1_ps(0.666666567325592041015625f));
  t = _mm256_fmadd_ps(t, x2, _mm256_set1_ps(2.0f));
  return _mm256_fmadd_ps(x, t, _mm256_mul_ps(_mm256_set1_ps(0.693147180559945286226764f), _mm256_cvtepi32_ps(e)));
}

struct Row;
__m256 race_keys8(const Row& row, const int32_t* tokens, uint64_t base, float inv_t);
#endif

// How far the reference's key may be from ours: its logs are torch.log (within a few ulps)
inline float key_error(float key) { return 0x1p-14f + std::fabs(key) * 0x1p-20f; }

#ifdef __AVX2__
// the race's keys for 8 kept tokens: philox.exponential's noise, the scalar loop's formula
__m256 race_keys8(const Row& row, const int32_t* tokens, uint64_t base, float inv_t) {
  const __m256i j = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(tokens));
  const __m256i base_lo = _mm256_set1_epi32(int(uint32_t(base))), flip = _mm256_set1_epi32(int(0x80000000u));
  const __m256i lo = _mm256_add_epi32(base_lo, j);
  // a carry into the high word where the low word wrapped (unsigned lo < base_lo)
  const __m256i carry = _mm256_cmpgt_epi32(_mm256_xor_si256(base_lo, flip), _mm256_xor_si256(lo, flip));
  const __m256i hi = _mm256_sub_epi32(_mm256_set1_epi32(int(uint32_t(base >> 32))), carry);
  const __m256i r = philox8_word0(row.seed, lo, hi);
  __m256 u = _mm256_add_ps(_mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_srli_epi32(r, 1)), _mm256_set1_ps(0x1p-31f)),
                           _mm256_set1_ps(0x1p-32f));
  __m256 series = _mm256_mul_ps(u, _mm256_add_ps(_mm256_set1_ps(1.0f), _mm256_mul_ps(_mm256_set1_ps(0.5f), u)));
  __m256 tail = _mm256_max_ps(_mm256_sub_ps(_mm256_set1_ps(1.0f), u), _mm256_set1_ps(0x1p-26f));
  __m256 from_log = _mm256_sub_ps(_mm256_setzero_ps(), log8(tail));
  __m256 e = _mm256_blendv_ps(from_log, series, _mm256_cmp_ps(u, _mm256_set1_ps(1.0e-3f), _CMP_LT_OQ));
  __m256 x = _mm256_i32gather_ps(row.logits, j, 4);
  return _mm256_max_ps(_mm256_sub_ps(_mm256_mul_ps(x, _mm256_set1_ps(inv_t)), log8(e)), _mm256_set1_ps(kLowestKey));
}
#endif

int64_t sample_row(const Row& row, Scratch& s, int lanes) {
  const int64_t V = row.vocab;
  s.scaled.resize(V);
  float* scaled = s.scaled.data();
  bool bad = false;  // NaN or +inf anywhere: the torch path's rules for those decide
  for (int64_t j = 0; j < V; ++j) {
    scaled[j] = row.logits[j] / row.temperature;
    bad |= !(scaled[j] < kInf);
  }
  if (bad) return kUndecided;
  const float thr = threshold(row, s, lanes);
  if (std::isnan(thr)) return kUndecided;
  const float keep_from = std::max(thr, -std::numeric_limits<float>::max());
  int64_t num_kept = 0;
  if (s.pool.empty()) {
    s.kept.resize(V + 8);
    num_kept = compact_at_least<false>(scaled, V, keep_from, s.kept.data());
  } else {  // top-k's candidates hold every index that can be kept
    s.kept.resize(s.pool.size());
    for (int32_t j : s.pool) {
      s.kept[num_kept] = j;
      num_kept += scaled[j] >= keep_from;
    }
  }
  s.kept.resize(num_kept);
  if (s.kept.empty()) return kUndecided;

  const float inv_t = 1.0f / row.temperature;
  const uint64_t base = row.counter * uint64_t(V);
  s.keys_out.resize(num_kept);
  float* keys = s.keys_out.data();
  int64_t i = 0;
#ifdef __AVX2__
  for (; i + 8 <= num_kept; i += 8) _mm256_storeu_ps(keys + i, race_keys8(row, s.kept.data() + i, base, inv_t));
#endif
  for (; i < num_kept; ++i) {
    // Exp(1) noise exactly as philox.exponential, with correctly rounded logs
    const int32_t j = s.kept[i];
    float u = float(int32_t(philox_word0(row.seed, base + uint64_t(j)) >> 1)) * 0x1p-31f + 0x1p-32f;
    float e = u < 1.0e-3f ? u * (1.0f + 0.5f * u) : -float(std::log(double(std::max(1.0f - u, 0x1p-26f))));
    keys[i] = std::max(row.logits[j] * inv_t - float(std::log(double(e))), kLowestKey);
  }
  float best = -kInf, second = -kInf;
  int64_t best_token = kUndecided;
  for (i = 0; i < num_kept; ++i) {
    const float key = keys[i];
    if (!std::isfinite(key)) return kUndecided;
    if (key > best) {
      second = best;
      best = key;
      best_token = s.kept[i];
    } else if (key > second) {
      second = key;
    }
  }
  if (second > -kInf && !(best - second > key_error(best) + key_error(second))) return kUndecided;
  return best_token;
}

using splitfuse_native::Args;

// sample(logits, num_rows, vocab, row_stride, temperatures f32, top_ks i64, top_ps f64, seeds i64,
//        counters i64, out i64, lanes): out[r] = the row's token, or -1 where the torch path decides
PyObject* sample(PyObject*, PyObject* const* items, Py_ssize_t count) {
  if (!splitfuse_native::check_arity("sample", count, 11)) return nullptr;
  Args a{items, count};
  const float* logits = a.ptr<const float>(0);
  const int64_t num_rows = a.i64(1), vocab = a.i64(2), stride = a.i64(3);
  const float* temps = a.ptr<const float>(4);
  const int64_t* top_ks = a.ptr<const int64_t>(5);
  const double* top_ps = a.ptr<const double>(6);
  const int64_t* seeds = a.ptr<const int64_t>(7);
  const int64_t* counters = a.ptr<const int64_t>(8);
  int64_t* out = a.ptr<int64_t>(9);
  const int lanes = int(a.i64(10));
  if (splitfuse_native::failed()) return nullptr;
  if (lanes != 8 && lanes != 16) {
    PyErr_Format(PyExc_ValueError, "sample: lanes must be 8 or 16 (torch's float vector width), got %d", lanes);
    return nullptr;
  }
  Py_BEGIN_ALLOW_THREADS
#pragma omp parallel
  {
    Scratch scratch;
#pragma omp for schedule(dynamic, 1)
    for (int64_t r = 0; r < num_rows; ++r) {
      Row row{logits + r * stride, vocab, temps[r], top_ks[r], top_ps[r], uint64_t(seeds[r]), uint64_t(counters[r])};
      out[r] = sample_row(row, scratch, lanes);
    }
  }
  Py_END_ALLOW_THREADS
  Py_RETURN_NONE;
}

// softmax(values, out, n, lanes): torch.softmax of an ascending float32 row, as the kernel computes it
PyObject* sorted_softmax(PyObject*, PyObject* const* items, Py_ssize_t count) {
  if (!splitfuse_native::check_arity("sorted_softmax", count, 4)) return nullptr;
  Args a{items, count};
  const float* values = a.ptr<const float>(0);
  float* out = a.ptr<float>(1);
  const int64_t n = a.i64(2);
  const int lanes = int(a.i64(3));
  if (splitfuse_native::failed()) return nullptr;
  if ((lanes != 8 && lanes != 16) || n < lanes) {
    PyErr_Format(PyExc_ValueError, "sorted_softmax: needs lanes 8 or 16 and n >= lanes, got %d and %lld",
                 lanes, static_cast<long long>(n));
    return nullptr;
  }
  const float scale = softmax_scale(values, n, 0, lanes, out);
  for (int64_t i = 0; i < n; ++i) out[i] = out[i] * scale;
  Py_RETURN_NONE;
}

PyMethodDef methods[] = {
    {"sample", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)(void)>(sample)), METH_FASTCALL,
     "Draw every sampled row's token in one pass per row (-1: left to the torch path)."},
    {"sorted_softmax", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)(void)>(sorted_softmax)),
     METH_FASTCALL, "torch.softmax of an ascending row, as the top-p filter computes it."},
    {nullptr, nullptr, 0, nullptr}};

}  // namespace

SPLITFUSE_NATIVE_MODULE(sampling, methods)
