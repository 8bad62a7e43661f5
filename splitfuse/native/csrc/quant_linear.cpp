// Weight-only int8 / int4 linear: y[M, N] = x[M, K] @ dequantize(W)[N, K]^T (+ bias), W in
// QuantizedWeight's portable "rows" layout, read as it is stored (no repacking):
//   int8: int8 [N, K], w = q * scale, scales float32 [N, K / group_size] (per channel: group_size = K)
//   int4: uint8 [N, K / 2] (even k in the low nibble), w = (q - zero) * scale, scales float32 and
//         zeros uint8 [N, K / group_size]
// Up to kStreamMaxRows rows of x (decode) it is memory-bound: every weight byte is read once,
// widened to float32 in registers and multiplied with x (float32, converted once per call); the
// scale is applied once per group (sum_k q_k x_k, then * scale) and the zero point through the
// group sums of x:
//   sum_k (q_k - z) s x_k = s * sum_k q_k x_k - z s * sum_k x_k.
// int4 groups of a multiple of 64 values unpack 32 bytes with one AND per 8 values (no shifts or
// shuffles): each nibble stays where it is in its 32-bit word and converts to q * 16^j exactly, and x
// comes divided by 16^j (exact) to match, so that every product is q * x as written above.
// Converting x once per call (float32, permuted into the order the format reads, group sums) is
// vectorizable and costs a few microseconds at K = 4864.
// More rows (prefill chunks) dequantize a block of W rows to float32 once and reuse it for all.
// Threads split the output features (blocks of rows of W); each output is summed by one thread in
// a fixed order, so results do not depend on the number of threads.
#include <omp.h>

#include <algorithm>
#include <vector>

#include "lanes.h"
#include "native.h"
#include "storage.h"

#ifdef __AVX2__
#include <immintrin.h>
#endif

namespace {
using namespace splitfuse_native;

// the sum of n values in 8 partial sums (one dependent chain of additions takes 4864 x 3 cycles)
float sum_of(const float* v, int64_t n) {
  float lanes[8] = {};
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    for (int l = 0; l < 8; ++l) lanes[l] += v[i + l];
  float sum = 0.f;
  for (; i < n; ++i) sum += v[i];
  for (float lane : lanes) sum += lane;
  return sum;
}

// ---- 8 float32 lanes (lanes.h) and the reading of int8/int4 weights into them ----
struct Portable : PortableLanes {
  static F8 int8x8(const int8_t* p) { F8 r; for (int i = 0; i < 8; ++i) r.v[i] = float(p[i]); return r; }
  // 32 nibbles from 16 bytes as 4 x 8 lanes in int4's x order (see Int4Rows)
  static void int4x32(const uint8_t* p, F8 q[4]) {
    for (int j = 0; j < 4; ++j)
      for (int i = 0; i < 8; ++i) q[j].v[i] = float((p[4 * (i % 4) + j] >> (4 * (i / 4))) & 15);
  }
  // 64 nibbles in 32 bytes (eight 32-bit words), and vector j of them: lane i holds nibble j of
  // word i, left in place, i.e. q * 16^j (see Int4Rows64)
  struct I8 { uint32_t v[8]; };
  static I8 load_int4x64(const uint8_t* p) { I8 r; std::memcpy(r.v, p, sizeof r.v); return r; }
  static F8 nibbles(const I8& w, int j) {
    F8 r;
    for (int i = 0; i < 8; ++i) r.v[i] = float(j < 7 ? w.v[i] & (15u << (4 * j)) : w.v[i] >> 28);
    return r;
  }
  static void int4x64(const uint8_t* p, F8 q[8]) {
    const I8 v = load_int4x64(p);
    for (int j = 0; j < 8; ++j) q[j] = nibbles(v, j);
  }
};

#ifdef __AVX2__
struct Avx2 : Avx2Lanes {
  static F8 int8x8(const int8_t* p) {
    return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
  }
  // lane i of 32-bit word w: bytes 4i..4i+3 of the block; lanes 4..7 repeat them shifted by one
  // nibble, so that one shift and mask per vector j unpacks 8 values
  static void int4x32(const uint8_t* p, F8 q[4]) {
    __m256i v = _mm256_broadcastsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
    v = _mm256_srlv_epi32(v, _mm256_setr_epi32(0, 0, 0, 0, 4, 4, 4, 4));
    const __m256i mask = _mm256_set1_epi32(15);
    q[0] = _mm256_cvtepi32_ps(_mm256_and_si256(v, mask));
    q[1] = _mm256_cvtepi32_ps(_mm256_and_si256(_mm256_srli_epi32(v, 8), mask));
    q[2] = _mm256_cvtepi32_ps(_mm256_and_si256(_mm256_srli_epi32(v, 16), mask));
    q[3] = _mm256_cvtepi32_ps(_mm256_and_si256(_mm256_srli_epi32(v, 24), mask));
  }
  using I8 = __m256i;
  static I8 load_int4x64(const uint8_t* p) { return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)); }
  // one AND per vector and no shift (but for the top nibble, whose mask would set the sign bit): the
  // nibble stays at bit 4j and converts to q * 16^j exactly
  static F8 nibbles(I8 v, int j) {
    return j < 7 ? _mm256_cvtepi32_ps(_mm256_and_si256(v, _mm256_set1_epi32(15 << (4 * j))))
                 : _mm256_cvtepi32_ps(_mm256_srli_epi32(v, 28));
  }
  static void int4x64(const uint8_t* p, F8 q[8]) {
    const I8 v = load_int4x64(p);
    for (int j = 0; j < 8; ++j) q[j] = nibbles(v, j);
  }
};
#endif

// ---- the two weight formats: raw values q (as float) in blocks of kBlock values along k, and each
// group's scale and offset (w = q * scale + offset) ----
struct Int8Rows {
  const int8_t* data;
  const float* scales;
  int64_t K, num_groups;
  static constexpr bool kHasZeros = false;
  static constexpr int64_t kBlock = 32;
  // a single row of x reads one W row at a time: one sequential stream for the hardware prefetcher
  // (4 rows of a few hundred bytes each read ~1.5x slower), as cheap to unpack as int8 is
  static constexpr int64_t kDecodeRows = 1;
  float q(int64_t n, int64_t k) const { return float(data[n * K + k]); }
  const void* address(int64_t n, int64_t k) const { return data + n * K + k; }
  template <class V>
  void q_block(int64_t n, int64_t k, typename V::F8 q[4]) const {
    for (int j = 0; j < 4; ++j) q[j] = V::int8x8(data + n * K + k + 8 * j);
  }
  float scale(int64_t n, int64_t g) const { return scales[n * num_groups + g]; }
  float offset(int64_t, int64_t) const { return 0.f; }
  static int64_t x_index(int64_t i) { return i; }
  static float vector_unit(int) { return 1.f; }
};

// A block is 32 values in 16 bytes; unpacked as 4 vectors of 8 lanes, vector j lane i holding
// k = 8 (i % 4) + 2 j + i / 4 of the block (what one shift per vector gives): x is permuted to
// match once per call, in every whole block of a group.
struct Int4Rows {
  const uint8_t* data;
  const float* scales;
  const uint8_t* zeros;
  int64_t K, num_groups;
  static constexpr bool kHasZeros = true;
  static constexpr int64_t kBlock = 32;
  // a single row of x reads 4 W rows at once: unpacking bounds int4, and the rows share x's loads
  static constexpr int64_t kDecodeRows = 4;
  const void* address(int64_t n, int64_t k) const { return data + n * (K / 2) + k / 2; }
  float q(int64_t n, int64_t k) const {
    uint8_t byte = data[n * (K / 2) + k / 2];
    return float((k & 1) ? byte >> 4 : byte & 15);
  }
  template <class V>  // k a multiple of 32 from the group start (even)
  void q_block(int64_t n, int64_t k, typename V::F8 q[4]) const { V::int4x32(data + n * (K / 2) + k / 2, q); }
  float scale(int64_t n, int64_t g) const { return scales[n * num_groups + g]; }
  float offset(int64_t n, int64_t g) const { return -float(zeros[n * num_groups + g]) * scale(n, g); }
  // the k (within a block) whose x goes to position i of the permuted block
  static int64_t x_index(int64_t i) { return 8 * (i % 8 % 4) + 2 * (i / 8) + i % 8 / 4; }
  static float vector_unit(int) { return 1.f; }
};

// Groups of a multiple of 64 values read blocks of 64 in 32 bytes: vector j lane i holds k = 8 i + j
// of the block, as q * 16^j (vector_unit(j)); streaming divides x by the unit (exact: a power of
// two), dequantizing multiplies the scale by it, so every product q * x is what Int4Rows computes.
struct Int4Rows64 : Int4Rows {
  static constexpr int64_t kBlock = 64;
  template <class V>  // k a multiple of 64 from the group start (even)
  void q_block(int64_t n, int64_t k, typename V::F8 q[8]) const { V::int4x64(data + n * (K / 2) + k / 2, q); }
  static int64_t x_index(int64_t i) { return 8 * (i % 8) + i / 8; }
  static float vector_unit(int j) { return j < 7 ? float(1 << (4 * j)) : 1.f; }
};

struct Problem {
  const float* x;     // [M, K] float32, whole blocks of each group permuted as the format reads them
  const float* xsum;  // [M, num_groups]: sums of x over each group (int4's zero points)
  int64_t M, K, N, group_size, num_groups;
};

// how far ahead of each read of W to prefetch: rows are a few hundred bytes, too short for the
// hardware prefetcher to ramp up on before the next one starts (prefetches never fault, so reading
// past the last row is harmless)
constexpr int64_t kPrefetchBytes = 1024;

// y[m, n0 + r] for R rows of W and MT rows of x from m0: per group, sum q * x in vector lanes, then
// fold the group's scale into the running total
template <class V, int R, int MT, class W>
void tile(const W& w, const Problem& p, int64_t n0, int64_t m0, float* y /* [M, N] */) {
  using F8 = typename V::F8;
  constexpr int kVectors = W::kBlock / 8;
  // FMAs have a latency of about 4 cycles at 2 per cycle: 8 independent accumulators keep them busy
  // (R * MT outputs, each summed in kChains parts)
  constexpr int kChains = std::max(1, std::min(kVectors, 8 / (R * MT)));
  F8 total[R][MT];
  float rest[R][MT];
  for (int r = 0; r < R; ++r)
    for (int m = 0; m < MT; ++m) total[r][m] = V::zero(), rest[r][m] = 0.f;
  const float* x = p.x + m0 * p.K;
  for (int64_t g = 0; g < p.num_groups; ++g) {
    const int64_t k0 = g * p.group_size, k1 = std::min(p.K, k0 + p.group_size);
    const int64_t k_vec = k0 + (k1 - k0) / W::kBlock * W::kBlock;
    F8 part[R][MT][kChains];
    for (int r = 0; r < R; ++r)
      for (int m = 0; m < MT; ++m)
        for (int c = 0; c < kChains; ++c) part[r][m][c] = V::zero();
    for (int64_t k = k0; k < k_vec; k += W::kBlock) {
      for (int r = 0; r < R; ++r) {
        __builtin_prefetch(static_cast<const char*>(w.address(n0 + r, k)) + kPrefetchBytes);
        F8 q[kVectors];
        w.template q_block<V>(n0 + r, k, q);
        for (int j = 0; j < kVectors; ++j)
          for (int m = 0; m < MT; ++m)
            part[r][m][j % kChains] = V::fmadd(q[j], V::load(x + m * p.K + k + 8 * j), part[r][m][j % kChains]);
      }
    }
    for (int r = 0; r < R; ++r) {
      const float s = w.scale(n0 + r, g), b = w.offset(n0 + r, g);
      const F8 sv = V::set1(s);
      for (int m = 0; m < MT; ++m) {
        float tail = 0.f;  // the rest of a group narrower than a block
        for (int64_t k = k_vec; k < k1; ++k) tail += w.q(n0 + r, k) * x[m * p.K + k];
        F8 sum = part[r][m][0];
        for (int c = 1; c < kChains; ++c) sum = V::add(sum, part[r][m][c]);
        total[r][m] = V::fmadd(sum, sv, total[r][m]);
        rest[r][m] += s * tail;
        if (W::kHasZeros) rest[r][m] += b * p.xsum[(m0 + m) * p.num_groups + g];
      }
    }
  }
  for (int r = 0; r < R; ++r)
    for (int m = 0; m < MT; ++m) y[(m0 + m) * p.N + n0 + r] = V::hsum(total[r][m]) + rest[r][m];
}

constexpr int64_t kBlockRows = 4;

// One row of x against R rows of int4 W in 64-value blocks (groups of kGroupBlocks blocks; 0: as
// many as the call's group size says), the decode path that bounds int4. Apart from tile because:
// - each 8 values are unpacked where they are used (an array of them is spilled to the stack);
// - the running totals stay in memory (`totals`, R x 8 floats, touched once per group): in
//   registers they push the 8 accumulator chains out of AVX2's 16 registers, and the spills
//   lengthen the chains (the two together: gate/up 0.67 -> 0.52 ms, one row, one thread);
// - a group's blocks unroll when its size is known when compiled (64, 128, 256).
template <class V, int R, int kGroupBlocks>
void int4_decode_tile(const Int4Rows64& w, const Problem& p, int64_t n0, int64_t m, float* y, float* totals) {
  using F8 = typename V::F8;
  constexpr int kChains = 8 / R;  // 8 independent FMA chains in flight (see tile)
  const int64_t group_blocks = kGroupBlocks ? kGroupBlocks : p.group_size / Int4Rows64::kBlock;
  const int64_t row_bytes = p.K / 2;
  const uint8_t* rows = w.data + n0 * row_bytes;
  const float* x = p.x + m * p.K;
  const float* xsum = p.xsum + m * p.num_groups;
  float offset[R];
  for (int r = 0; r < R; ++r) V::store(totals + 8 * r, V::zero()), offset[r] = 0.f;
  for (int64_t g = 0; g < p.num_groups; ++g) {
    const float* xg = x + g * p.group_size;
    const uint8_t* wg = rows + g * p.group_size / 2;
    F8 part[R][kChains];
    for (int r = 0; r < R; ++r)
      for (int c = 0; c < kChains; ++c) part[r][c] = V::zero();
    for (int64_t b = 0; b < group_blocks; ++b) {
      for (int r = 0; r < R; ++r) {
        const uint8_t* block = wg + r * row_bytes + 32 * b;
        // past its row's end, a row prefetches the row that follows it in the next tile (R rows on)
        const bool within_row = (g * p.group_size / 2 + 32 * b + kPrefetchBytes) < row_bytes;
        __builtin_prefetch(block + kPrefetchBytes + (within_row ? 0 : (R - 1) * row_bytes));
        const typename V::I8 v = V::load_int4x64(block);
        for (int j = 0; j < 8; ++j)
          part[r][j % kChains] = V::fmadd(V::nibbles(v, j), V::load(xg + 64 * b + 8 * j), part[r][j % kChains]);
      }
    }
    for (int r = 0; r < R; ++r) {
      const F8 s = V::set1(w.scale(n0 + r, g));
      F8 total = V::load(totals + 8 * r);
      for (int c = 0; c < kChains; ++c) total = V::fmadd(part[r][c], s, total);
      V::store(totals + 8 * r, total);
      offset[r] += w.offset(n0 + r, g) * xsum[g];
    }
  }
  for (int r = 0; r < R; ++r) y[m * p.N + n0 + r] = V::hsum(V::load(totals + 8 * r)) + offset[r];
}

constexpr int kInt4DecodeRows = 4;  // 2 rows (4 chains each) read about 5 % slower

// the kBlockRows rows of W from n0 against the last row of x (m), W::kDecodeRows at a time
template <class V, class W>
void decode_rows(const W& w, const Problem& p, int64_t n0, int64_t m, float* y) {
  for (int64_t r = 0; r < kBlockRows; r += W::kDecodeRows) tile<V, W::kDecodeRows, 1>(w, p, n0 + r, m, y);
}

template <class V>
void decode_rows(const Int4Rows64& w, const Problem& p, int64_t n0, int64_t m, float* y) {
  constexpr int R = kInt4DecodeRows;
  alignas(32) float totals[8 * R];
  for (int64_t r = 0; r < kBlockRows; r += R) {
    switch (p.group_size) {
      case 64: int4_decode_tile<V, R, 1>(w, p, n0 + r, m, y, totals); break;
      case 128: int4_decode_tile<V, R, 2>(w, p, n0 + r, m, y, totals); break;
      case 256: int4_decode_tile<V, R, 4>(w, p, n0 + r, m, y, totals); break;
      default: int4_decode_tile<V, R, 0>(w, p, n0 + r, m, y, totals);
    }
  }
}

// rows [n0, n0 + count) of W, count <= kBlockRows, against every row of x: up to 4 rows of x share
// each unpacked weight (1 W row x 4 x rows); a last single x row goes through decode_rows
template <class V, int MT, class W>
void rows_of_w(const W& w, const Problem& p, int64_t n0, int64_t count, int64_t m0, float* y) {
  for (int64_t r = 0; r < count; ++r) tile<V, 1, MT>(w, p, n0 + r, m0, y);
}

template <class V, class W>
void block(const W& w, const Problem& p, int64_t n0, int64_t count, float* y) {
  int64_t m = 0;
  for (; m + 4 <= p.M; m += 4) rows_of_w<V, 4>(w, p, n0, count, m, y);
  if (p.M - m == 3) rows_of_w<V, 3>(w, p, n0, count, m, y), m += 3;
  if (p.M - m == 2) rows_of_w<V, 2>(w, p, n0, count, m, y), m += 2;
  if (m < p.M) {
    if (count == kBlockRows) {
      decode_rows<V>(w, p, n0, m, y);
    } else {
      for (int64_t r = 0; r < count; ++r) tile<V, 1, 1>(w, p, n0 + r, m, y);
    }
  }
}

// ---- more rows of x (prefill chunks): dequantize a block of W rows to float32 once, then multiply
// it with every row of x in register tiles (4 W rows x 3 x rows) ----
constexpr int64_t kDequantRows = 16;
constexpr int64_t kStreamMaxRows = 4;  // above this many rows of x, dequantizing once is faster

// rows [n0, n0 + count) of W as float32 [count, K], in the (permuted) k order of Problem::x
template <class V, class W>
void dequantize_rows(const W& w, const Problem& p, int64_t n0, int64_t count, float* out) {
  using F8 = typename V::F8;
  constexpr int kVectors = W::kBlock / 8;
  for (int64_t r = 0; r < count; ++r) {
    float* row = out + r * p.K;
    for (int64_t g = 0; g < p.num_groups; ++g) {
      const int64_t k0 = g * p.group_size, k1 = std::min(p.K, k0 + p.group_size);
      const int64_t k_vec = k0 + (k1 - k0) / W::kBlock * W::kBlock;
      const float s = w.scale(n0 + r, g), b = w.offset(n0 + r, g);
      const F8 bv = V::set1(b);
      F8 sv[kVectors];  // the scale of one raw unit of each vector
      for (int j = 0; j < kVectors; ++j) sv[j] = V::set1(s / W::vector_unit(j));
      for (int64_t k = k0; k < k_vec; k += W::kBlock) {
        F8 q[kVectors];
        w.template q_block<V>(n0 + r, k, q);
        for (int j = 0; j < kVectors; ++j) V::store(row + k + 8 * j, V::fmadd(q[j], sv[j], bv));
      }
      for (int64_t k = k_vec; k < k1; ++k) row[k] = w.q(n0 + r, k) * s + b;
    }
  }
}

// y[m0 .. m0 + MT, n0 .. n0 + R] from R dequantized rows of W (stride K) and MT rows of x
template <class V, int R, int MT>
void dot_tile(const float* w, const Problem& p, int64_t n0, int64_t m0, float* y) {
  using F8 = typename V::F8;
  const float* x = p.x + m0 * p.K;
  const int64_t k_vec = p.K & ~int64_t(7);
  F8 acc[R][MT];
  for (int r = 0; r < R; ++r)
    for (int m = 0; m < MT; ++m) acc[r][m] = V::zero();
  for (int64_t k = 0; k < k_vec; k += 8) {
    F8 xv[MT];
    for (int m = 0; m < MT; ++m) xv[m] = V::load(x + m * p.K + k);
    for (int r = 0; r < R; ++r) {
      const F8 wv = V::load(w + r * p.K + k);
      for (int m = 0; m < MT; ++m) acc[r][m] = V::fmadd(wv, xv[m], acc[r][m]);
    }
  }
  for (int r = 0; r < R; ++r) {
    for (int m = 0; m < MT; ++m) {
      float sum = V::hsum(acc[r][m]);
      for (int64_t k = k_vec; k < p.K; ++k) sum += w[r * p.K + k] * x[m * p.K + k];
      y[(m0 + m) * p.N + n0 + r] = sum;
    }
  }
}

template <class V, int MT>
void dot_rows(const float* w, const Problem& p, int64_t n0, int64_t count, int64_t m0, float* y) {
  int64_t r = 0;
  for (; r + 4 <= count; r += 4) dot_tile<V, 4, MT>(w + r * p.K, p, n0 + r, m0, y);
  for (; r < count; ++r) dot_tile<V, 1, MT>(w + r * p.K, p, n0 + r, m0, y);
}

template <class V, class W>
void dequantized_block(const W& w, const Problem& p, int64_t n0, int64_t count, float* scratch, float* y) {
  dequantize_rows<V>(w, p, n0, count, scratch);
  int64_t m = 0;
  for (; m + 3 <= p.M; m += 3) dot_rows<V, 3>(scratch, p, n0, count, m, y);
  if (p.M - m == 2) dot_rows<V, 2>(scratch, p, n0, count, m, y);
  if (p.M - m == 1) dot_rows<V, 1>(scratch, p, n0, count, m, y);
}

template <class V, class W>
void run(const W& w, const Problem& p, int64_t num_threads, float* y) {
  if (p.M <= kStreamMaxRows) {
    const int64_t num_blocks = (p.N + kBlockRows - 1) / kBlockRows;
#pragma omp parallel for num_threads(num_threads) schedule(static) if (num_threads > 1)
    for (int64_t b = 0; b < num_blocks; ++b) {
      const int64_t n0 = b * kBlockRows;
      block<V>(w, p, n0, std::min(kBlockRows, p.N - n0), y);
    }
    return;
  }
  const int64_t num_blocks = (p.N + kDequantRows - 1) / kDequantRows;
#pragma omp parallel num_threads(num_threads) if (num_threads > 1)
  {
    std::vector<float> scratch(kDequantRows * p.K);
#pragma omp for schedule(static)
    for (int64_t b = 0; b < num_blocks; ++b) {
      const int64_t n0 = b * kDequantRows;
      dequantized_block<V>(w, p, n0, std::min(kDequantRows, p.N - n0), scratch.data(), y);
    }
  }
}

template <class W>
void run_any(const W& w, const Problem& p, int64_t num_threads, bool vectorized, float* y) {
#ifdef __AVX2__
  if (vectorized) return run<Avx2>(w, p, num_threads, y);
#endif
  (void)vectorized;
  run<Portable>(w, p, num_threads, y);
}

// The arguments both formats share, read and checked; the work, done without the GIL.
struct Call {
  const void* x;
  int64_t x_dtype, M, K, N, group_size;
  const void* bias;  // [N] in x's dtype, or nullptr
  void* out;         // [M, N] in x's dtype
  int64_t num_threads;
  bool vectorized;

  bool check(const char* name) const {
    if (x_dtype < DT_F32 || x_dtype > DT_F16) {
      PyErr_Format(PyExc_ValueError, "%s: x_dtype must be 0 (float32), 1 (bfloat16) or 2 (float16); got %lld",
                   name, static_cast<long long>(x_dtype));
      return false;
    }
    if (M < 0 || K <= 0 || N < 0 || group_size <= 0 || K % group_size) {
      PyErr_Format(PyExc_ValueError, "%s: expected M >= 0, N >= 0, K > 0 and group_size dividing K; got M=%lld "
                   "K=%lld N=%lld group_size=%lld", name, static_cast<long long>(M), static_cast<long long>(K),
                   static_cast<long long>(N), static_cast<long long>(group_size));
      return false;
    }
    return true;
  }

  template <class W>
  void compute(const W& w) const {
    const int64_t num_groups = K / group_size;
    // x in float32, each whole block of each group permuted into the order the format reads (and,
    // when streaming, divided by the unit of the vector that reads it)
    const bool streaming = M <= kStreamMaxRows;
    float inverse_unit[W::kBlock / 8];
    for (int j = 0; j < W::kBlock / 8; ++j) inverse_unit[j] = streaming ? 1.f / W::vector_unit(j) : 1.f;
    std::vector<float> x32(M * K), row(K);
    std::vector<float> xsum(W::kHasZeros ? M * num_groups : 0);  // sums of x over each group
    for (int64_t m = 0; m < M; ++m) {
      read_values(x, m * K, K, x_dtype, row.data());
      for (int64_t g = 0, k0 = 0; k0 < K; ++g, k0 += group_size) {
        const int64_t k_vec = k0 + group_size / W::kBlock * W::kBlock;
        for (int64_t b = k0; b < k_vec; b += W::kBlock)
          for (int64_t i = 0; i < W::kBlock; ++i) x32[m * K + b + i] = row[b + W::x_index(i)] * inverse_unit[i / 8];
        for (int64_t k = k_vec; k < k0 + group_size; ++k) x32[m * K + k] = row[k];
        if (W::kHasZeros) xsum[m * num_groups + g] = sum_of(row.data() + k0, group_size);
      }
    }
    const float* xf = x32.data();
    const bool direct = x_dtype == DT_F32 && bias == nullptr;  // write float32 results in place
    std::vector<float> y32(direct ? 0 : M * N);
    float* y = direct ? static_cast<float*>(out) : y32.data();
    Problem p{xf, xsum.data(), M, K, N, group_size, num_groups};
    run_any(w, p, num_threads, vectorized, y);
    if (direct) return;
    std::vector<float> bias32(bias ? N : 0);
    if (bias) read_values(bias, 0, N, x_dtype, bias32.data());
    for (int64_t m = 0; m < M; ++m) {
      float* row = y + m * N;
      for (int64_t n = 0; n < static_cast<int64_t>(bias32.size()); ++n) row[n] += bias32[n];
      write_values(row, N, x_dtype, out, m * N);
    }
  }
};

// int8_linear(x, x_dtype, M, K, data, N, scales, group_size, bias, out, num_threads, vectorized)
PyObject* int8_linear(PyObject*, PyObject* const* items, Py_ssize_t count) {
  if (!check_arity("int8_linear", count, 12)) return nullptr;
  Args a{items, count};
  Call call{a.ptr<const void>(0), a.i64(1), a.i64(2), a.i64(3), a.i64(5), a.i64(7), a.ptr<const void>(8),
            a.ptr<void>(9), a.i64(10), a.i64(11) != 0};
  Int8Rows w{a.ptr<const int8_t>(4), a.ptr<const float>(6), call.K, 0};
  if (failed() || !call.check("int8_linear")) return nullptr;
  w.num_groups = call.K / call.group_size;
  Py_BEGIN_ALLOW_THREADS
  call.compute(w);
  Py_END_ALLOW_THREADS
  Py_RETURN_NONE;
}

// int4_linear(x, x_dtype, M, K, data, N, scales, zeros, group_size, bias, out, num_threads, vectorized)
PyObject* int4_linear(PyObject*, PyObject* const* items, Py_ssize_t count) {
  if (!check_arity("int4_linear", count, 13)) return nullptr;
  Args a{items, count};
  Call call{a.ptr<const void>(0), a.i64(1), a.i64(2), a.i64(3), a.i64(5), a.i64(8), a.ptr<const void>(9),
            a.ptr<void>(10), a.i64(11), a.i64(12) != 0};
  Int4Rows w{a.ptr<const uint8_t>(4), a.ptr<const float>(6), a.ptr<const uint8_t>(7), call.K, 0};
  if (failed() || !call.check("int4_linear")) return nullptr;
  if (call.K % 2 || call.group_size % 2) {
    PyErr_Format(PyExc_ValueError, "int4_linear: K and group_size must be even (two values per byte); got K=%lld "
                 "group_size=%lld", static_cast<long long>(call.K), static_cast<long long>(call.group_size));
    return nullptr;
  }
  w.num_groups = call.K / call.group_size;
  Py_BEGIN_ALLOW_THREADS
  if (call.group_size % Int4Rows64::kBlock == 0) {
    call.compute(Int4Rows64{w});
  } else {
    call.compute(w);
  }
  Py_END_ALLOW_THREADS
  Py_RETURN_NONE;
}

PyMethodDef methods[] = {
    {"int8_linear", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(int8_linear)), METH_FASTCALL,
     "int8_linear(x, x_dtype, M, K, data, N, scales, group_size, bias, out, num_threads, vectorized)"},
    {"int4_linear", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(int4_linear)), METH_FASTCALL,
     "int4_linear(x, x_dtype, M, K, data, N, scales, zeros, group_size, bias, out, num_threads, vectorized)"},
    {nullptr, nullptr, 0, nullptr}};

}  // namespace

SPLITFUSE_NATIVE_MODULE(quant_linear, methods)
