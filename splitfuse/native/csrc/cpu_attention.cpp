// The cpu backend's compiled attention path (module splitfuse.native._cpu_attention); the Python
// side (splitfuse/backends/cpu/native_ops.py) checks dtypes and shapes and passes raw pointers.
//
// paged_attention: ragged causal attention of a Dynamic SplitFuse step reading K/V straight from
//   the paged cache [2, num_blocks, block_size, Hkv, D] through the block tables (no gather copy).
//   Work unit = (sequence, tile of new tokens, kv head); its rows are the tile's tokens x the G
//   query heads of that kv head, so every key row loaded serves all of them (GQA). Keys are visited
//   in chunks of KEY_CHUNK positions with an online softmax in fp32; a unit of many rows (a prompt
//   chunk) computes a chunk as two small matrix products with register tiles and fused
//   multiply-adds, a small unit row by row. A decode (one new token) with a large enough GQA group
//   is one unit over every kv head reading whole slot rows, its key range split into parts (merged
//   after) when the step has few decodes. Units are
//   ordered longest first and handed to OpenMP threads dynamically (decodes and prompt chunks differ
//   in cost by orders of magnitude). Each unit is computed by one thread start to end and how a
//   step is cut into units depends on the step alone, so the result does not depend on the number
//   of threads.
// rotary: rotary embedding of q and k (GPT-NeoX or GPT-J pairs, partial rotary), optionally also
//   storing the rotated k and v into the cache at slot_mapping (the fused KV write).
// rms_norm: RMSNorm of x, or of x + residual in the same pass (returning the sum too).
//
// Every op takes fp32, bf16 or fp16 tensors and rounds as the plain-torch reference ops do: bf16
// and fp16 elementwise ops round to the storage type after each operation, as torch does; attention
// and norm statistics accumulate in fp32. Built with -ffp-contract=off: the only fused multiply-adds
// are the explicit ones of the attention tiles and the decodes' P x V (fp32 accumulations, not
// rounded as torch's ops).
//
// Vectors: 8-float GCC vector types; with -march=native on an AVX2 machine they are ymm registers,
// without AVX the compiler splits them into SSE pairs (or scalars elsewhere), same results.

#include "native.h"
#include "storage.h"

#include <omp.h>

#ifdef __FMA__
#include <immintrin.h>
#endif

#include <algorithm>
#include <cmath>
#include <limits>
#include <numeric>
#include <type_traits>
#include <vector>

namespace {

using namespace splitfuse_native;

constexpr int QUERY_TILE = 8;
constexpr int KEY_CHUNK = 64;
constexpr float NEG_INF = -std::numeric_limits<float>::infinity();
// rotary / rms_norm run in parallel only above this many elements (about 100 us on one thread): a region
// costs microseconds to start on a quiet machine and up to a scheduler time slice when the other core is busy
constexpr int64_t PARALLEL_MIN_ELEMENTS = 1 << 18;

// false (ValueError set) unless dtype is one of DType's codes; checked while holding the GIL
bool check_dtype(int64_t dtype) {
  if (dtype == DT_F32 || dtype == DT_BF16 || dtype == DT_F16) return true;
  PyErr_Format(PyExc_ValueError, "dtype code %lld: expected 0 (float32), 1 (bfloat16) or 2 (float16)",
               static_cast<long long>(dtype));
  return false;
}

// Runs fn(S{}) for the storage type of a checked dtype code, without the GIL.
template <typename Fn>
void run_without_gil(int64_t dtype, Fn&& fn) {
  Py_BEGIN_ALLOW_THREADS
  if (dtype == DT_F32) fn(F32{});
  else if (dtype == DT_BF16) fn(BF16{});
  else fn(F16{});
  Py_END_ALLOW_THREADS
}

// A row of D elements as floats: the row itself for fp32, else converted into buf.
template <typename S>
inline const float* row_as_float(const typename S::T* src, float* buf, int D) {
  if constexpr (std::is_same_v<S, F32>) {
    return src;
  } else {
#pragma omp simd
    for (int d = 0; d < D; ++d) buf[d] = S::load(src[d]);
    return buf;
  }
}

// ---- 8-wide float vectors --------------------------------------------------------------------------
typedef float v8f __attribute__((vector_size(32)));
typedef int32_t v8i __attribute__((vector_size(32)));

inline v8f load8(const float* p) { v8f v; std::memcpy(&v, p, sizeof v); return v; }
inline void store8(float* p, v8f v) { std::memcpy(p, &v, sizeof v); }
inline v8f splat8(float x) { return v8f{x, x, x, x, x, x, x, x}; }
inline float hsum8(v8f v) { return ((v[0] + v[4]) + (v[1] + v[5])) + ((v[2] + v[6]) + (v[3] + v[7])); }

// 8 elements of storage type S as floats, rounded to S, and stored as S: fp32 and bf16 in vector
// registers (bf16 rounds to nearest even with integer lanes, NaN stays NaN), fp16 lane by lane.
typedef uint32_t v8u __attribute__((vector_size(32)));
typedef uint16_t v8h __attribute__((vector_size(16)));

inline v8u bf16_bits8(v8f x) {  // the bf16 of each lane, in the upper half of a 32-bit lane
  const v8u bits = (v8u)x;
  const v8u rounded = (bits + 0x7fffu + ((bits >> 16) & 1u)) & 0xffff0000u;
  const v8u quiet_nan = (bits | 0x400000u) & 0xffff0000u;
  return (bits & 0x7fffffffu) > 0x7f800000u ? quiet_nan : rounded;
}

template <typename S>
inline v8f vload(const typename S::T* p) {
  if constexpr (std::is_same_v<S, F32>) {
    return load8(p);
  } else if constexpr (std::is_same_v<S, BF16>) {
    v8h h;
    std::memcpy(&h, p, sizeof h);
    return (v8f)(__builtin_convertvector(h, v8u) << 16);
  } else {
    v8f v;
    for (int i = 0; i < 8; ++i) v[i] = S::load(p[i]);
    return v;
  }
}

template <typename S>
inline v8f vround(v8f x) {
  if constexpr (std::is_same_v<S, F32>) {
    return x;
  } else if constexpr (std::is_same_v<S, BF16>) {
    return (v8f)bf16_bits8(x);
  } else {
    for (int i = 0; i < 8; ++i) x[i] = S::round(x[i]);
    return x;
  }
}

template <typename S>
inline void vstore(typename S::T* p, v8f x) {
  if constexpr (std::is_same_v<S, F32>) {
    store8(p, x);
  } else if constexpr (std::is_same_v<S, BF16>) {
    const v8h h = __builtin_convertvector(bf16_bits8(x) >> 16, v8h);
    std::memcpy(p, &h, sizeof h);
  } else {
    for (int i = 0; i < 8; ++i) p[i] = S::store(x[i]);
  }
}

// The 8 dot products of q with k[0..7] as one vector: one accumulator per key, then a transposing
// tree of shuffles and adds (no horizontal sum per key).
inline v8f dot8(const float* q, const float* const* k, int D) {
  v8f a0 = splat8(0.f), a1 = a0, a2 = a0, a3 = a0, a4 = a0, a5 = a0, a6 = a0, a7 = a0;
  int d = 0;
  for (; d + 8 <= D; d += 8) {
    const v8f qv = load8(q + d);
    a0 += qv * load8(k[0] + d); a1 += qv * load8(k[1] + d); a2 += qv * load8(k[2] + d); a3 += qv * load8(k[3] + d);
    a4 += qv * load8(k[4] + d); a5 += qv * load8(k[5] + d); a6 += qv * load8(k[6] + d); a7 += qv * load8(k[7] + d);
  }
  const v8f t01 = __builtin_shufflevector(a0, a1, 0, 8, 2, 10, 4, 12, 6, 14) + __builtin_shufflevector(a0, a1, 1, 9, 3, 11, 5, 13, 7, 15);
  const v8f t23 = __builtin_shufflevector(a2, a3, 0, 8, 2, 10, 4, 12, 6, 14) + __builtin_shufflevector(a2, a3, 1, 9, 3, 11, 5, 13, 7, 15);
  const v8f t45 = __builtin_shufflevector(a4, a5, 0, 8, 2, 10, 4, 12, 6, 14) + __builtin_shufflevector(a4, a5, 1, 9, 3, 11, 5, 13, 7, 15);
  const v8f t67 = __builtin_shufflevector(a6, a7, 0, 8, 2, 10, 4, 12, 6, 14) + __builtin_shufflevector(a6, a7, 1, 9, 3, 11, 5, 13, 7, 15);
  const v8f u03 = __builtin_shufflevector(t01, t23, 0, 1, 8, 9, 4, 5, 12, 13) + __builtin_shufflevector(t01, t23, 2, 3, 10, 11, 6, 7, 14, 15);
  const v8f u47 = __builtin_shufflevector(t45, t67, 0, 1, 8, 9, 4, 5, 12, 13) + __builtin_shufflevector(t45, t67, 2, 3, 10, 11, 6, 7, 14, 15);
  v8f r = __builtin_shufflevector(u03, u47, 0, 1, 2, 3, 8, 9, 10, 11) + __builtin_shufflevector(u03, u47, 4, 5, 6, 7, 12, 13, 14, 15);
  for (; d < D; ++d)
    for (int i = 0; i < 8; ++i) r[i] += q[d] * k[i][d];
  return r;
}

// exp of 8 lanes (Cephes' expf: range reduction by ln 2, degree-5 polynomial; ~1 ulp). Lanes at
// -inf give 0 exactly (masked keys); the softmax inputs here are <= 0.
inline v8f exp8(v8f x) {
  const v8i finite = x > splat8(-88.f);
  x = x < splat8(-88.f) ? splat8(-88.f) : x;
  v8f fx = x * splat8(1.44269504088896341f) + splat8(0.5f);
  v8i n = __builtin_convertvector(fx, v8i);
  v8f t = __builtin_convertvector(n, v8f);
  n -= (v8i)(t > fx) & 1;  // floor: truncation rounds negatives up
  const v8f nf = __builtin_convertvector(n, v8f);
  x = x - nf * splat8(0.693359375f) - nf * splat8(-2.12194440e-4f);
  v8f y = splat8(1.9875691500e-4f);
  y = y * x + splat8(1.3981999507e-3f);
  y = y * x + splat8(8.3334519073e-3f);
  y = y * x + splat8(4.1665795894e-2f);
  y = y * x + splat8(1.6666665459e-1f);
  y = y * x + splat8(5.0000001201e-1f);
  y = y * (x * x) + x + splat8(1.f);
  const v8i bits = (n + 127) << 23;
  v8f scale;
  std::memcpy(&scale, &bits, sizeof scale);
  v8f out = y * scale;
  v8i masked;
  std::memcpy(&masked, &out, sizeof masked);
  masked &= finite;
  std::memcpy(&out, &masked, sizeof out);
  return out;
}

// acc[0:D] = acc * alpha (alpha != 1 only when the running max moved)
inline void scale_row(float* acc, float alpha, int D) {
#pragma omp simd
  for (int d = 0; d < D; ++d) acc[d] *= alpha;
}

// acc[0:D] += sum over j in [j_lo, j_hi) of p[j] * v[j][0:D]. With D known at compile time (DC)
// the accumulator stays in registers across the keys instead of a load and a store per key.
template <int DC>
inline void accumulate(float* acc, const float* p, const float* const* v, int j_lo, int j_hi, int D) {
  if constexpr (DC > 0) {
    v8f a[DC / 8];
    for (int i = 0; i < DC / 8; ++i) a[i] = load8(acc + 8 * i);
    for (int j = j_lo; j < j_hi; ++j) {
      const v8f pv = splat8(p[j]);
      for (int i = 0; i < DC / 8; ++i) a[i] += pv * load8(v[j] + 8 * i);
    }
    for (int i = 0; i < DC / 8; ++i) store8(acc + 8 * i, a[i]);
  } else {
    for (int j = j_lo; j < j_hi; ++j) {
      const float pj = p[j];
      const float* vj = v[j];
#pragma omp simd
      for (int d = 0; d < D; ++d) acc[d] += pj * vj[d];
    }
  }
}

inline void accumulate_any(float* acc, const float* p, const float* const* v, int j_lo, int j_hi, int D) {
  switch (D) {
    case 32: return accumulate<32>(acc, p, v, j_lo, j_hi, D);
    case 64: return accumulate<64>(acc, p, v, j_lo, j_hi, D);
    case 128: return accumulate<128>(acc, p, v, j_lo, j_hi, D);
    case 256: return accumulate<256>(acc, p, v, j_lo, j_hi, D);
    default: return accumulate<0>(acc, p, v, j_lo, j_hi, D);
  }
}

// ---- paged attention -----------------------------------------------------------------------------
// decode: a unit of one token and every kv head over keys [key0, key1) of its context, whose softmax
// state goes to partials[partial] for a merge, or straight to the output (partial -1)
struct WorkUnit {
  int seq, token0, num_tokens, first_pos, kv_head;
  int64_t cost;
  bool decode = false;
  int key0 = 0, key1 = 0, partial = -1;
};

// A decode whose keys were split over several units: its partial states, merged in order.
struct DecodeMerge {
  int token0, first_partial, num_parts;
};

struct Plan {
  std::vector<WorkUnit> units;
  std::vector<DecodeMerge> merges;
  int num_partials = 0;
};

struct Scratch {
  std::vector<float> q, acc, m, l, k_chunk, v_chunk, p;

  // for R rows of D dims computed row by row (running max -inf, sum and output 0) over key chunks
  // of rows `width` elements wide
  void start_rows(int R, int D, int width) {
    q.resize(static_cast<size_t>(R) * D);
    acc.assign(static_cast<size_t>(R) * D, 0.f);
    m.assign(R, NEG_INF);
    l.assign(R, 0.f);
    k_chunk.resize(static_cast<size_t>(KEY_CHUNK) * width);
    v_chunk.resize(static_cast<size_t>(KEY_CHUNK) * width);
  }
};

struct AttentionArgs {
  const void* q;
  int64_t q_stride_t, q_stride_h;  // elements; the last stride is 1
  void* out;                       // contiguous [T, H, D]
  const void* kv;                  // contiguous [2, num_blocks, block_size, Hkv, D]
  int64_t num_blocks, block_size, num_kv_heads, head_dim, num_heads, num_tokens;
  const int32_t* query_start;   // [S + 1]
  const int32_t* context_lens;  // [S]
  int64_t num_seqs;
  const int32_t* block_tables;  // [S, table_stride]
  int64_t table_stride;
  float scale, softcap;  // softcap 0: none
  int window;            // 0: none
  int path;              // AttentionPath
};

// Which kernel computes a unit: by its shape, or (side-by-side benchmarks, tests) always one of them.
// PATH_DECODE: decodes by attend_decode, other units as PATH_AUTO (which runs decodes that way
// too where the GQA group is large enough, see DECODE_MIN_GROUP).
enum AttentionPath : int { PATH_AUTO = 0, PATH_ROWS = 1, PATH_TILES = 2, PATH_DECODE = 3 };

// The keys and values a unit reads: its sequence's blocks of the cache, its kv head, whose G query
// heads make the unit's rows (row r = token r / G, query head kv_head * G + r % G).
template <typename S>
struct UnitKeys {
  using T = typename S::T;
  const T *k_cache, *v_cache;
  const int32_t* table;
  int64_t slot_stride, head_off;
  int block_size, D, G;

  UnitKeys(const WorkUnit& w, const AttentionArgs& a)
      : k_cache(static_cast<const T*>(a.kv)),
        v_cache(k_cache + a.num_blocks * a.block_size * a.num_kv_heads * a.head_dim),
        table(a.block_tables + w.seq * a.table_stride),
        slot_stride(a.num_kv_heads * a.head_dim),
        head_off(static_cast<int64_t>(w.kv_head) * a.head_dim),
        block_size(static_cast<int>(a.block_size)),
        D(static_cast<int>(a.head_dim)),
        G(static_cast<int>(a.num_heads / a.num_kv_heads)) {}

  // k_rows[j], v_rows[j] = the rows of position c0 + j (j < n) as floats: the cache's own rows for
  // fp32, converted copies in s otherwise. Walks the block table (no division per key). Then asks
  // for the next chunk's rows (up to position end) ahead: the blocks are scattered over the cache,
  // and a head's rows are strided within them, so the hardware prefetchers do not see them coming.
  void gather(int c0, int n, int end, const float** k_rows, const float** v_rows, Scratch& s) const {
    gather_rows(c0, n, end, head_off, D, k_rows, v_rows, s);
  }

  // As gather, the whole slot rows (every kv head, Hkv * D elements) of positions c0 .. c0 + n.
  void gather_slots(int c0, int n, int end, const float** k_rows, const float** v_rows, Scratch& s) const {
    gather_rows(c0, n, end, 0, static_cast<int>(slot_stride), k_rows, v_rows, s);
  }

  // the `width` elements from `row_off` of each slot
  void gather_rows(int c0, int n, int end, int64_t row_off, int width, const float** k_rows, const float** v_rows,
                   Scratch& s) const {
    int blk = c0 / block_size, off = c0 - blk * block_size;
    for (int j = 0; j < n; ++j) {
      const int64_t slot = static_cast<int64_t>(table[blk]) * block_size + off;
      k_rows[j] = row_as_float<S>(k_cache + slot * slot_stride + row_off, s.k_chunk.data() + j * width, width);
      v_rows[j] = row_as_float<S>(v_cache + slot * slot_stride + row_off, s.v_chunk.data() + j * width, width);
      if (++off == block_size) { off = 0; ++blk; }
    }
    prefetch_rows(blk, off, std::min(end - c0 - n, KEY_CHUNK), row_off, width);
  }

  // asks for `count` slots' rows from block table entry blk, offset off, ahead of their use
  void prefetch_rows(int blk, int off, int count, int64_t row_off, int width) const {
    const int64_t row_bytes = static_cast<int64_t>(width) * sizeof(T);
    for (int j = 0; j < count; ++j) {
      const int64_t slot = static_cast<int64_t>(table[blk]) * block_size + off;
      const char* k_row = reinterpret_cast<const char*>(k_cache + slot * slot_stride + row_off);
      const char* v_row = reinterpret_cast<const char*>(v_cache + slot * slot_stride + row_off);
      for (int64_t b = 0; b < row_bytes; b += 64) {
        __builtin_prefetch(k_row + b);
        __builtin_prefetch(v_row + b);
      }
      if (++off == block_size) { off = 0; ++blk; }
    }
  }
};

// How a row's chunk of keys k_rows / v_rows [0, n) is read and scored. k_rows holds n rounded up
// to 8 pointers (padding lanes are masked).
struct RowChunk {
  const float* const* k_rows;
  const float* const* v_rows;
  int D;
  float scale, softcap;  // softcap 0: none
};

// sc[j] = the scores of row qr against the keys of the 8-key groups [g0, g1), -inf outside the
// visible [j_lo, j_hi); returns their maximum
inline float row_scores(const RowChunk& c, const float* qr, int j_lo, int j_hi, int g0, int g1, float* sc) {
  const v8i lane = {0, 1, 2, 3, 4, 5, 6, 7};
  v8f vmax = splat8(NEG_INF);
  for (int j = g0; j < g1; j += 8) {
    v8f score = dot8(qr, c.k_rows + j, c.D) * splat8(c.scale);
    if (c.softcap > 0.f)
      for (int i = 0; i < 8; ++i) score[i] = c.softcap * std::tanh(score[i] / c.softcap);
    const v8i idx = lane + j;
    score = (idx >= j_lo) & (idx < j_hi) ? score : splat8(NEG_INF);
    store8(sc + j, score);
    vmax = vmax > score ? vmax : score;
  }
  return std::max(std::max(std::max(vmax[0], vmax[1]), std::max(vmax[2], vmax[3])),
                  std::max(std::max(vmax[4], vmax[5]), std::max(vmax[6], vmax[7])));
}

// Online softmax over the chunk's scores sc[g0, g1) of maximum cmax: rescales the row's running
// sum l and output acc once if its max m moved, then turns sc into probabilities and adds them to l.
inline void row_softmax(float* sc, int g0, int g1, float cmax, float& m, float& l, float* acc, int D) {
  const float m_new = std::max(m, cmax);
  if (m != m_new) {
    const float alpha = m == NEG_INF ? 0.f : std::exp(m - m_new);
    l *= alpha;
    scale_row(acc, alpha, D);
    m = m_new;
  }
  v8f lsum = splat8(0.f);
  for (int j = g0; j < g1; j += 8) {
    const v8f p = exp8(load8(sc + j) - splat8(m_new));
    store8(sc + j, p);
    lsum += p;
  }
  l += hsum8(lsum);
}

// One row over a chunk with visible keys [j_lo, j_hi): scores against 8 keys at a time (only the
// groups that hold visible keys: causal and window edges skip the rest), softmax, then P x V.
inline void attend_row_chunk(const RowChunk& c, const float* qr, int j_lo, int j_hi, float& m, float& l,
                             float* acc) {
  alignas(32) float sc[KEY_CHUNK];
  const int g0 = j_lo / 8 * 8, g1 = (j_hi + 7) / 8 * 8;
  const float cmax = row_scores(c, qr, j_lo, j_hi, g0, g1, sc);
  row_softmax(sc, g0, g1, cmax, m, l, acc, c.D);
  accumulate_any(acc, sc, c.v_rows, j_lo, j_hi, c.D);
}

// The unit row by row: each row's scores against 8 keys at a time, then its P x V.
template <typename S>
void attend_rows(const WorkUnit& w, const AttentionArgs& a, Scratch& s) {
  using T = typename S::T;
  const UnitKeys<S> keys(w, a);
  const int D = keys.D, G = keys.G, R = w.num_tokens * G, window = a.window;  // row r: see UnitKeys
  s.start_rows(R, D, D);
  const T* q = static_cast<const T*>(a.q);
  for (int r = 0; r < R; ++r) {
    const T* src = q + (w.token0 + r / G) * a.q_stride_t + (w.kv_head * G + r % G) * a.q_stride_h;
#pragma omp simd
    for (int d = 0; d < D; ++d) s.q[r * D + d] = S::load(src[d]);
  }
  const int last_pos = w.first_pos + w.num_tokens - 1;
  const int lo = window > 0 ? std::max(0, w.first_pos - window + 1) : 0;
  const float* k_rows[KEY_CHUNK];
  const float* v_rows[KEY_CHUNK];
  const RowChunk chunk{k_rows, v_rows, D, a.scale, a.softcap};
  for (int c0 = lo; c0 <= last_pos; c0 += KEY_CHUNK) {
    const int n = std::min(KEY_CHUNK, last_pos + 1 - c0);
    keys.gather(c0, n, last_pos + 1, k_rows, v_rows, s);
    for (int j = n; j < (n + 7) / 8 * 8; ++j) k_rows[j] = k_rows[0];  // padding lanes, masked below
    for (int r = 0; r < R; ++r) {
      const int qpos = w.first_pos + r / G;
      // visible keys of this row in the chunk: [j_lo, j_hi)
      const int j_hi = std::min(n, qpos - c0 + 1);
      const int j_lo = window > 0 ? std::max(0, qpos - window + 1 - c0) : 0;
      if (j_hi <= j_lo) continue;
      attend_row_chunk(chunk, s.q.data() + r * D, j_lo, j_hi, s.m[r], s.l[r], s.acc.data() + r * D);
    }
  }
  T* out = static_cast<T*>(a.out);
  for (int r = 0; r < R; ++r) {
    T* dst = out + ((w.token0 + r / G) * a.num_heads + w.kv_head * G + r % G) * D;
    const float inv = 1.f / s.l[r];
#pragma omp simd
    for (int d = 0; d < D; ++d) dst[d] = S::store(s.acc[r * D + d] * inv);
  }
}

// ---- query tiles as small matrix products ----------------------------------------------------------
// A unit with many rows (a prompt chunk: tokens x GQA group) works with its rows as the vector lanes:
// queries transposed once per unit (qt [D][Rp]), per key chunk the scores st [n][Rp] = K Q^T and the
// output ot [D][Rp] += V^T P^T as small matrix products with register tiles (every broadcast key or
// value element serves 8 to 24 rows) and fused multiply-adds; the online softmax runs 8 rows at a
// time with no horizontal reductions. Rp = rows rounded up to 8; padding rows are never stored.
constexpr int TILE_ROWS = 48;     // rows (tokens x group) a prompt unit aims at; plan_units sizes units by it
constexpr int TILE_MIN_ROWS = 6;  // fewer rows (a chunk of 2 tokens of a small group): the row-by-row kernel
constexpr int TILE_KEYS = 4;      // keys of a score register tile
constexpr int TILE_DIMS = 4;      // head dims of an output register tile
constexpr int TILE_VECTORS = 3;   // row vectors (of 8 rows) of a register tile

// a * b + c, fused where the CPU has FMA
inline v8f fma8(v8f a, v8f b, v8f c) {
#ifdef __FMA__
  return (v8f)_mm256_fmadd_ps((__m256)a, (__m256)b, (__m256)c);
#else
  return a * b + c;
#endif
}

// exp of 8 softmax inputs x - max (<= 0, -inf for masked keys, NaN where a row has seen no key
// yet): Cephes' expf as exp8, with fused multiply-adds and round-to-nearest (about half the
// instructions). Inputs below -88, -inf and NaN give exactly 0: the clamp to -88 makes 2^n vanish.
inline v8f exp8_softmax(v8f x) {
#if defined(__FMA__) && defined(__AVX__)
  x = (v8f)_mm256_max_ps((__m256)x, (__m256)splat8(-88.f));  // NaN -> -88 (max returns its second operand)
  const v8f n = (v8f)_mm256_round_ps((__m256)(x * splat8(1.44269504088896341f)),
                                     _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  v8f r = fma8(n, splat8(-0.693359375f), x);
  r = fma8(n, splat8(2.12194440e-4f), r);
  v8f y = splat8(1.9875691500e-4f);
  y = fma8(y, r, splat8(1.3981999507e-3f));
  y = fma8(y, r, splat8(8.3334519073e-3f));
  y = fma8(y, r, splat8(4.1665795894e-2f));
  y = fma8(y, r, splat8(1.6666665459e-1f));
  y = fma8(y, r, splat8(5.0000001201e-1f));
  y = fma8(y, r * r, r) + splat8(1.f);
  const v8i bits = (__builtin_convertvector(n, v8i) + 127) << 23;
  return y * (v8f)bits;
#else
  return exp8(x);
#endif
}

// x[i][j] <- x[j][i]: an 8 x 8 block transposed in registers (unpack, shuffle, swap 128-bit halves)
inline void transpose8(v8f* x) {
  v8f t[8], u[8];
  for (int i = 0; i < 8; i += 2) {
    t[i] = __builtin_shufflevector(x[i], x[i + 1], 0, 8, 1, 9, 4, 12, 5, 13);
    t[i + 1] = __builtin_shufflevector(x[i], x[i + 1], 2, 10, 3, 11, 6, 14, 7, 15);
  }
  for (int i = 0; i < 8; i += 4) {
    u[i] = __builtin_shufflevector(t[i], t[i + 2], 0, 1, 8, 9, 4, 5, 12, 13);
    u[i + 1] = __builtin_shufflevector(t[i], t[i + 2], 2, 3, 10, 11, 6, 7, 14, 15);
    u[i + 2] = __builtin_shufflevector(t[i + 1], t[i + 3], 0, 1, 8, 9, 4, 5, 12, 13);
    u[i + 3] = __builtin_shufflevector(t[i + 1], t[i + 3], 2, 3, 10, 11, 6, 7, 14, 15);
  }
  for (int i = 0; i < 4; ++i) {
    x[i] = __builtin_shufflevector(u[i], u[i + 4], 0, 1, 2, 3, 8, 9, 10, 11);
    x[i + 4] = __builtin_shufflevector(u[i], u[i + 4], 4, 5, 6, 7, 12, 13, 14, 15);
  }
}

// How a chunk's raw dot products become scores: scale, softcap (0: none), and the causal / window
// mask where some row does not see every key of the chunk.
struct ScoreRule {
  float scale, softcap;
  bool masked;
  int c0;                                      // position of the chunk's first key
  const v8i *first_visible, *last_visible;     // per row lane
};

// st[j][0 .. 8 NV) = score of k[j] . qt[:, 0 .. 8 NV) for the KB keys from j0 (row stride ld); cmax
// takes their maximum per row lane (-inf where masked)
template <int KB, int NV>
inline void score_tile(const float* const* k, int j0, const float* qt, float* st, int ld, int D,
                       const ScoreRule& rule, v8f* cmax) {
  v8f acc[KB][NV];
  for (int i = 0; i < KB; ++i)
    for (int u = 0; u < NV; ++u) acc[i][u] = splat8(0.f);
  for (int d = 0; d < D; ++d) {
    v8f qv[NV];
    for (int u = 0; u < NV; ++u) qv[u] = load8(qt + d * ld + 8 * u);
    for (int i = 0; i < KB; ++i) {
      const v8f kb = splat8(k[j0 + i][d]);
      for (int u = 0; u < NV; ++u) acc[i][u] = fma8(kb, qv[u], acc[i][u]);
    }
  }
  for (int i = 0; i < KB; ++i) {
    const v8i pos = v8i{} + (rule.c0 + j0 + i);
    for (int u = 0; u < NV; ++u) {
      v8f score = acc[i][u] * splat8(rule.scale);
      if (rule.softcap > 0.f)
        for (int e = 0; e < 8; ++e) score[e] = rule.softcap * std::tanh(score[e] / rule.softcap);
      if (rule.masked)
        score = (pos >= rule.first_visible[u]) & (pos <= rule.last_visible[u]) ? score : splat8(NEG_INF);
      cmax[u] = cmax[u] > score ? cmax[u] : score;
      store8(st + (j0 + i) * ld + 8 * u, score);
    }
  }
}

// ot[d0 + i][0 .. 8 NV) += sum over j < n of v[j][d0 + i] * pt[j][0 .. 8 NV), i < TILE_DIMS (row stride ld)
template <int NV>
inline void value_tile(const float* const* v, int n, const float* pt, float* ot, int ld, int d0) {
  v8f acc[TILE_DIMS][NV];
  for (int i = 0; i < TILE_DIMS; ++i)
    for (int u = 0; u < NV; ++u) acc[i][u] = load8(ot + (d0 + i) * ld + 8 * u);
  for (int j = 0; j < n; ++j) {
    v8f pv[NV];
    for (int u = 0; u < NV; ++u) pv[u] = load8(pt + j * ld + 8 * u);
    for (int i = 0; i < TILE_DIMS; ++i) {
      const v8f vb = splat8(v[j][d0 + i]);
      for (int u = 0; u < NV; ++u) acc[i][u] = fma8(vb, pv[u], acc[i][u]);
    }
  }
  for (int i = 0; i < TILE_DIMS; ++i)
    for (int u = 0; u < NV; ++u) store8(ot + (d0 + i) * ld + 8 * u, acc[i][u]);
}

// Scores, online softmax, then P V of one chunk of n keys for the NV row vectors at qt, st, ot.
template <int NV>
void chunk_products(const float* const* k, const float* const* v, int n, const float* qt, float* st, float* ot,
                    int ld, int D, v8f* m, v8f* l, const ScoreRule& rule) {
  v8f cmax[NV];
  for (int u = 0; u < NV; ++u) cmax[u] = splat8(NEG_INF);
  int j = 0;
  for (; j + TILE_KEYS <= n; j += TILE_KEYS) score_tile<TILE_KEYS, NV>(k, j, qt, st, ld, D, rule, cmax);
  for (; j < n; ++j) score_tile<1, NV>(k, j, qt, st, ld, D, rule, cmax);
  for (int u = 0; u < NV; ++u) {
    const v8f m_new = m[u] > cmax[u] ? m[u] : cmax[u];
    // exp of -inf or NaN is 0: a row with no visible key so far keeps l = 0, acc = 0
    const v8f alpha = exp8_softmax(m[u] - m_new);
    v8f lsum = splat8(0.f);
    for (j = 0; j < n; ++j) {
      const v8f p = exp8_softmax(load8(st + j * ld + 8 * u) - m_new);
      store8(st + j * ld + 8 * u, p);
      lsum += p;
    }
    l[u] = l[u] * alpha + lsum;
    m[u] = m_new;
    for (int d = 0; d < D; ++d) store8(ot + d * ld + 8 * u, load8(ot + d * ld + 8 * u) * alpha);
  }
  for (int d0 = 0; d0 < D; d0 += TILE_DIMS) value_tile<NV>(v, n, st, ot, ld, d0);
}

// The unit with its rows as vector lanes (head_dim a multiple of 8); the same keys, masks
// and online softmax as attend_rows.
template <typename S>
void attend_tiles(const WorkUnit& w, const AttentionArgs& a, Scratch& s) {
  using T = typename S::T;
  const UnitKeys<S> keys(w, a);
  const int D = keys.D, G = keys.G, R = w.num_tokens * G, window = a.window;  // row r: see UnitKeys
  const int NVR = (R + 7) / 8, ld = NVR * 8;
  s.q.assign(static_cast<size_t>(D) * ld, 0.f);    // qt [D][ld]
  s.acc.assign(static_cast<size_t>(D) * ld, 0.f);  // ot [D][ld]
  s.p.resize(static_cast<size_t>(KEY_CHUNK) * ld);  // st [KEY_CHUNK][ld]
  s.k_chunk.resize(static_cast<size_t>(KEY_CHUNK) * D);
  s.v_chunk.resize(static_cast<size_t>(KEY_CHUNK) * D);
  const T* q = static_cast<const T*>(a.q);
  for (int r0 = 0; r0 < R; r0 += 8)  // 8 rows x 8 dims at a time
    for (int d0 = 0; d0 < D; d0 += 8) {
      v8f x[8];
      for (int i = 0; i < 8; ++i) {
        const int r = r0 + i;
        x[i] = r < R ? vload<S>(q + (w.token0 + r / G) * a.q_stride_t + (w.kv_head * G + r % G) * a.q_stride_h + d0)
                     : splat8(0.f);
      }
      transpose8(x);
      for (int i = 0; i < 8; ++i) store8(s.q.data() + (d0 + i) * ld + r0, x[i]);
    }
  const int last_pos = w.first_pos + w.num_tokens - 1;
  // per row lane: running max, sum, and its visible key positions (padding rows: the last token's)
  std::vector<v8f> m(NVR, splat8(NEG_INF)), l(NVR, splat8(0.f));
  std::vector<v8i> first_visible(NVR), last_visible(NVR);
  for (int r = 0; r < ld; ++r) {
    const int qpos = r < R ? w.first_pos + r / G : last_pos;
    last_visible[r / 8][r % 8] = qpos;
    first_visible[r / 8][r % 8] = window > 0 ? qpos - window + 1 : 0;
  }
  const int lo = window > 0 ? std::max(0, w.first_pos - window + 1) : 0;
  const float* k_rows[KEY_CHUNK];
  const float* v_rows[KEY_CHUNK];
  for (int c0 = lo; c0 <= last_pos; c0 += KEY_CHUNK) {
    const int n = std::min(KEY_CHUNK, last_pos + 1 - c0);
    keys.gather(c0, n, last_pos + 1, k_rows, v_rows, s);
    for (int u = 0; u < NVR; u += TILE_VECTORS) {
      const int nv = std::min(TILE_VECTORS, NVR - u);
      // this row block's tokens: keys past its last one are skipped, keys past its first one masked
      const int block_first = w.first_pos + 8 * u / G;
      const int block_last = w.first_pos + (std::min(R, 8 * (u + nv)) - 1) / G;
      const int nu = std::min(n, block_last - c0 + 1);
      if (nu <= 0) continue;
      const float* qt = s.q.data() + 8 * u;
      float *st = s.p.data() + 8 * u, *ot = s.acc.data() + 8 * u;
      const ScoreRule rule{a.scale, a.softcap, window > 0 || c0 + nu - 1 > block_first, c0,
                           first_visible.data() + u, last_visible.data() + u};
      switch (nv) {
        case 3: chunk_products<3>(k_rows, v_rows, nu, qt, st, ot, ld, D, &m[u], &l[u], rule); break;
        case 2: chunk_products<2>(k_rows, v_rows, nu, qt, st, ot, ld, D, &m[u], &l[u], rule); break;
        default: chunk_products<1>(k_rows, v_rows, nu, qt, st, ot, ld, D, &m[u], &l[u], rule);
      }
    }
  }
  T* out = static_cast<T*>(a.out);
  for (int r0 = 0; r0 < R; r0 += 8) {
    const v8f inv = splat8(1.f) / l[r0 / 8];
    for (int d0 = 0; d0 < D; d0 += 8) {
      v8f x[8];
      for (int i = 0; i < 8; ++i) x[i] = load8(s.acc.data() + (d0 + i) * ld + r0);
      transpose8(x);
      for (int i = 0; i < 8 && r0 + i < R; ++i) {
        const int r = r0 + i;
        vstore<S>(out + ((w.token0 + r / G) * a.num_heads + w.kv_head * G + r % G) * D + d0, x[i] * splat8(inv[i]));
      }
    }
  }
}

// ---- decodes: one token, every kv head ---------------------------------------------------------------
// The G rows (query heads) of one kv head over keys [0, n) of a chunk, every key visible to every
// row (a decode): each row's scores and softmax as attend_row_chunk, then P x V for two rows at a
// time, each value vector loaded once for both and whole 128-byte rows at a time (fused
// multiply-adds). Keys transposed in registers for the scores, or value slices narrower than 32
// dims, ran slower with K/V coming from memory, though faster from cache.
constexpr int VALUE_ROWS = 2;  // rows of a P x V register block
constexpr int VALUE_DIMS = 4;  // vectors of 8 dims of a P x V register block

// acc[g][d0 .. d0 + 8 DV) += sum over j < n of p[g][j] * v[j][d0 .. d0 + 8 DV), g < RB (p rows
// KEY_CHUNK apart, acc rows D apart)
template <int RB, int DV>
inline void group_values(const float* const* v, const float* p, int n, float* acc, int D, int d0) {
  v8f a[RB][DV];
  for (int g = 0; g < RB; ++g)
    for (int u = 0; u < DV; ++u) a[g][u] = load8(acc + g * D + d0 + 8 * u);
  for (int j = 0; j < n; ++j) {
    v8f vv[DV];
    for (int u = 0; u < DV; ++u) vv[u] = load8(v[j] + d0 + 8 * u);
    for (int g = 0; g < RB; ++g) {
      const v8f pg = splat8(p[g * KEY_CHUNK + j]);
      for (int u = 0; u < DV; ++u) a[g][u] = fma8(pg, vv[u], a[g][u]);
    }
  }
  for (int g = 0; g < RB; ++g)
    for (int u = 0; u < DV; ++u) store8(acc + g * D + d0 + 8 * u, a[g][u]);
}

// rows q[0 .. G) (stride D) with their m, l, acc; sc: G * KEY_CHUNK floats of scratch
void attend_group_chunk(const RowChunk& c, const float* q, int G, int n, float* m, float* l, float* acc, float* sc) {
  const int g1 = (n + 7) / 8 * 8, D = c.D;
  for (int g = 0; g < G; ++g) {
    float* sg = sc + g * KEY_CHUNK;
    row_softmax(sg, 0, g1, row_scores(c, q + g * D, 0, n, 0, g1, sg), m[g], l[g], acc + g * D, D);
  }
  constexpr int width = 8 * VALUE_DIMS;
  if (D % width != 0) {
    for (int g = 0; g < G; ++g) accumulate_any(acc + g * D, sc + g * KEY_CHUNK, c.v_rows, 0, n, D);
    return;
  }
  int g = 0;
  for (; g + VALUE_ROWS <= G; g += VALUE_ROWS)
    for (int d0 = 0; d0 < D; d0 += width)
      group_values<VALUE_ROWS, VALUE_DIMS>(c.v_rows, sc + g * KEY_CHUNK, n, acc + g * D, D, d0);
  for (; g < G; ++g)
    for (int d0 = 0; d0 < D; d0 += width)
      group_values<1, VALUE_DIMS>(c.v_rows, sc + g * KEY_CHUNK, n, acc + g * D, D, d0);
}

// A decode's unit reads each slot's whole row (all kv heads, contiguous) once, so a block is read
// in order rather than one head's rows at the slot stride, Hkv times over. Row r = query head r
// (kv head r / G). A long context on few sequences is split into key ranges (plan_units), each
// unit leaving its softmax state (m, l, unnormalised output) in partials for merge_decode.
template <typename S>
void attend_decode(const WorkUnit& w, const AttentionArgs& a, Scratch& s, float* partials) {
  using T = typename S::T;
  const UnitKeys<S> keys(w, a);
  const int D = keys.D, G = keys.G, H = static_cast<int>(a.num_heads), Hkv = static_cast<int>(a.num_kv_heads);
  s.start_rows(H, D, Hkv * D);
  s.p.resize(static_cast<size_t>(KEY_CHUNK) * G);
  const T* q = static_cast<const T*>(a.q);
  for (int r = 0; r < H; ++r) {
    const T* src = q + w.token0 * a.q_stride_t + r * a.q_stride_h;
#pragma omp simd
    for (int d = 0; d < D; ++d) s.q[r * D + d] = S::load(src[d]);
  }
  const float* k_slots[KEY_CHUNK];
  const float* v_slots[KEY_CHUNK];
  const float* k_rows[KEY_CHUNK];
  const float* v_rows[KEY_CHUNK];
  const RowChunk chunk{k_rows, v_rows, D, a.scale, a.softcap};
  for (int c0 = w.key0; c0 < w.key1; c0 += KEY_CHUNK) {
    const int n = std::min(KEY_CHUNK, w.key1 - c0);
    keys.gather_slots(c0, n, w.key1, k_slots, v_slots, s);  // every key visible (see plan_decode)
    for (int h = 0; h < Hkv; ++h) {
      for (int j = 0; j < n; ++j) {
        k_rows[j] = k_slots[j] + h * D;
        v_rows[j] = v_slots[j] + h * D;
      }
      for (int j = n; j < (n + 7) / 8 * 8; ++j) k_rows[j] = k_rows[0];  // padding lanes, masked
      const int r0 = h * G;
      float* acc = s.acc.data() + r0 * D;
      attend_group_chunk(chunk, s.q.data() + r0 * D, G, n, &s.m[r0], &s.l[r0], acc, s.p.data());
    }
  }
  if (w.partial >= 0) {
    float* part = partials + static_cast<int64_t>(w.partial) * H * (D + 2);  // m [H], l [H], acc [H][D]
    std::copy(s.m.begin(), s.m.end(), part);
    std::copy(s.l.begin(), s.l.end(), part + H);
    std::copy(s.acc.begin(), s.acc.end(), part + 2 * H);
    return;
  }
  T* out = static_cast<T*>(a.out) + static_cast<int64_t>(w.token0) * H * D;
  for (int r = 0; r < H; ++r) {
    const float inv = 1.f / s.l[r];
#pragma omp simd
    for (int d = 0; d < D; ++d) out[r * D + d] = S::store(s.acc[r * D + d] * inv);
  }
}

// A split decode's output from its parts' states, in part order (the same sums on any thread).
template <typename S>
void merge_decode(const DecodeMerge& mg, const AttentionArgs& a, const float* partials) {
  using T = typename S::T;
  const int D = static_cast<int>(a.head_dim), H = static_cast<int>(a.num_heads);
  const int64_t part_size = static_cast<int64_t>(H) * (D + 2);
  const float* first = partials + mg.first_partial * part_size;
  T* out = static_cast<T*>(a.out) + static_cast<int64_t>(mg.token0) * H * D;
  std::vector<float> acc(D);
  for (int r = 0; r < H; ++r) {
    float m = NEG_INF;
    for (int p = 0; p < mg.num_parts; ++p) m = std::max(m, first[p * part_size + r]);
    float l = 0.f;
    std::fill(acc.begin(), acc.end(), 0.f);
    for (int p = 0; p < mg.num_parts; ++p) {
      const float* part = first + p * part_size;
      const float weight = std::exp(part[r] - m);
      l += part[H + r] * weight;
      const float* pacc = part + 2 * H + r * D;
#pragma omp simd
      for (int d = 0; d < D; ++d) acc[d] += pacc[d] * weight;
    }
    const float inv = 1.f / l;
#pragma omp simd
    for (int d = 0; d < D; ++d) out[r * D + d] = S::store(acc[d] * inv);
  }
}

// Decodes by attend_decode (plan_units made them units of every kv head), tiles for prompt-chunk
// units with enough rows, row by row for small units (memory-bound: the tiles' transposes and
// padding lanes did not pay there); the choice depends on the unit alone, so results do not depend
// on the number of threads.
template <typename S>
void attend_unit(const WorkUnit& w, const AttentionArgs& a, Scratch& s, float* partials) {
  if (w.decode) return attend_decode<S>(w, a, s, partials);
  const bool tiles = a.head_dim % 8 == 0 &&
                     (a.path == PATH_TILES ||
                      ((a.path == PATH_AUTO || a.path == PATH_DECODE) && w.num_tokens > 1 &&
                       w.num_tokens * (a.num_heads / a.num_kv_heads) >= TILE_MIN_ROWS));
  if (tiles) attend_tiles<S>(w, a, s);
  else attend_rows<S>(w, a, s);
}

template <typename S>
void paged_attention_impl(const AttentionArgs& a, const Plan& plan) {
  const int64_t num_units = static_cast<int64_t>(plan.units.size());
  const int64_t num_merges = static_cast<int64_t>(plan.merges.size());
  std::vector<float> partials(static_cast<size_t>(plan.num_partials) * a.num_heads * (a.head_dim + 2));
#pragma omp parallel if (num_units > 1)
  {
    Scratch scratch;
#pragma omp for schedule(dynamic, 1)
    for (int64_t i = 0; i < num_units; ++i) attend_unit<S>(plan.units[i], a, scratch, partials.data());
#pragma omp for schedule(dynamic, 1)
    for (int64_t i = 0; i < num_merges; ++i) merge_decode<S>(plan.merges[i], a, partials.data());
  }
}

// Key ranges of a decode: few decodes in a step (batch 1) are split so that the step has at least
// this many units for the threads. The split depends on the step alone, not on the thread count.
constexpr int DECODE_MIN_UNITS = 4;
// PATH_AUTO runs decodes by attend_decode from this GQA group size: the value vectors it loads once
// for two rows paid there (0.5B shape, group 7), not with groups of 2 when K/V come from memory.
constexpr int DECODE_MIN_GROUP = 4;
constexpr int DECODE_MIN_PART_CHUNKS = 2;  // key chunks of a key range at least

// The decode of sequence s (its token token0 at position qpos) as units of every kv head over key
// ranges of whole KEY_CHUNKs from the window's first key (so every key of a range is visible),
// want_parts of them or fewer.
void plan_decode(int s, int token0, int qpos, int window, int want_parts, int64_t num_kv_heads, Plan& plan) {
  const int lo = window > 0 ? std::max(0, qpos - window + 1) : 0, end = qpos + 1;
  const int chunks = (end - lo + KEY_CHUNK - 1) / KEY_CHUNK;
  const int target = std::max(1, std::min(want_parts, chunks / DECODE_MIN_PART_CHUNKS));
  const int part_chunks = (chunks + target - 1) / target;
  const int parts = (chunks + part_chunks - 1) / part_chunks;
  if (parts > 1) plan.merges.push_back({token0, plan.num_partials, parts});
  for (int p = 0; p < parts; ++p) {
    const int key0 = lo + p * part_chunks * KEY_CHUNK, key1 = std::min(end, key0 + part_chunks * KEY_CHUNK);
    WorkUnit w{s, token0, 1, qpos, 0, static_cast<int64_t>(key1 - key0) * num_kv_heads};
    w.decode = true;
    w.key0 = key0;
    w.key1 = key1;
    w.partial = parts > 1 ? plan.num_partials++ : -1;
    plan.units.push_back(w);
  }
}

// Tokens per unit for the register tiles: rows (tokens x group size G) a multiple of 8 (no padding
// lanes), as many as fit TILE_ROWS.
int tile_tokens(int G) {
  const int step = 8 / std::gcd(G, 8);
  return step * std::max(1, TILE_ROWS / (step * G));
}

// The work units of a step, longest first; false (ValueError set) when the metadata does not
// describe a valid step (a raw-pointer kernel must not read past the cache or the block tables).
bool plan_units(const AttentionArgs& a, Plan& plan) {
  std::vector<WorkUnit>& units = plan.units;
  const int32_t* qs = a.query_start;
  if (qs[0] != 0 || qs[a.num_seqs] != a.num_tokens) {
    PyErr_Format(PyExc_ValueError, "query_start must run from 0 to the %lld tokens, got %d..%d",
                 static_cast<long long>(a.num_tokens), qs[0], qs[a.num_seqs]);
    return false;
  }
  const int64_t max_keys = a.table_stride * a.block_size;
  const int tile = a.path == PATH_ROWS ? QUERY_TILE : tile_tokens(static_cast<int>(a.num_heads / a.num_kv_heads));
  const bool decodes_apart =
      a.path == PATH_DECODE || (a.path == PATH_AUTO && a.num_heads / a.num_kv_heads >= DECODE_MIN_GROUP);
  int num_decodes = 0;
  for (int s = 0; s < a.num_seqs; ++s) num_decodes += qs[s + 1] - qs[s] == 1;
  const int want_parts = num_decodes > 0 ? (DECODE_MIN_UNITS + num_decodes - 1) / num_decodes : 1;
  for (int s = 0; s < a.num_seqs; ++s) {
    const int n_q = qs[s + 1] - qs[s], ctx = a.context_lens[s];
    if (n_q < 0 || ctx < n_q || ctx > max_keys) {
      PyErr_Format(PyExc_ValueError, "sequence %d: %d new tokens and context_lens %d do not fit its block "
                   "table of %lld blocks (need 0 <= new tokens <= context_lens <= blocks * block_size)",
                   s, n_q, ctx, static_cast<long long>(a.table_stride));
      return false;
    }
    const int32_t* table = a.block_tables + s * a.table_stride;
    for (int64_t b = 0; b < (ctx + a.block_size - 1) / a.block_size; ++b) {
      if (table[b] < 0 || table[b] >= a.num_blocks) {
        PyErr_Format(PyExc_ValueError, "block_tables[%d, %lld] = %d is not a block of the cache (0..%lld)", s,
                     static_cast<long long>(b), table[b], static_cast<long long>(a.num_blocks - 1));
        return false;
      }
    }
    const int first = ctx - n_q;  // new tokens are the last n_q of the context
    if (n_q == 1 && decodes_apart) {
      plan_decode(s, qs[s], first, static_cast<int>(a.window), want_parts, a.num_kv_heads, plan);
      continue;
    }
    for (int t = 0; t < n_q; t += tile) {
      const int n = std::min(tile, n_q - t);
      const int keys = a.window > 0 ? std::min<int>(first + t + n, a.window + n - 1) : first + t + n;
      for (int h = 0; h < a.num_kv_heads; ++h)
        units.push_back({s, qs[s] + t, n, first + t, h, static_cast<int64_t>(keys) * n});
    }
  }
  std::stable_sort(units.begin(), units.end(), [](const WorkUnit& x, const WorkUnit& y) { return x.cost > y.cost; });
  return true;
}

// paged_attention(dtype, q, q_stride_t, q_stride_h, out, kv, num_blocks, block_size, num_kv_heads,
//                 head_dim, num_heads, num_tokens, query_start, context_lens, num_seqs, block_tables,
//                 table_stride, scale, window, softcap, path)
PyObject* py_paged_attention(PyObject*, PyObject* const* items, Py_ssize_t count) {
  if (!check_arity("paged_attention", count, 21)) return nullptr;
  const Args in{items, count};
  AttentionArgs a{in.ptr<const void>(1), in.i64(2), in.i64(3), in.ptr<void>(4), in.ptr<const void>(5),
                  in.i64(6), in.i64(7), in.i64(8), in.i64(9), in.i64(10), in.i64(11),
                  in.ptr<const int32_t>(12), in.ptr<const int32_t>(13), in.i64(14), in.ptr<const int32_t>(15),
                  in.i64(16), static_cast<float>(in.f64(17)), static_cast<float>(in.f64(19)),
                  static_cast<int>(in.i64(18)), static_cast<int>(in.i64(20))};
  const int64_t dtype = in.i64(0);
  if (failed() || !check_dtype(dtype)) return nullptr;
  if (a.path < PATH_AUTO || a.path > PATH_DECODE) {
    PyErr_Format(PyExc_ValueError, "path %d: expected 0 (by shape), 1 (row by row), 2 (register tiles) or 3 "
                 "(decodes over every kv head)", a.path);
    return nullptr;
  }
  if (a.num_kv_heads <= 0 || a.num_heads % a.num_kv_heads != 0 || a.head_dim <= 0 || a.block_size <= 0) {
    PyErr_Format(PyExc_ValueError, "num_heads %lld must be a multiple of num_kv_heads %lld; head_dim and "
                 "block_size must be positive", static_cast<long long>(a.num_heads),
                 static_cast<long long>(a.num_kv_heads));
    return nullptr;
  }
  if (a.num_tokens == 0) Py_RETURN_NONE;
  Plan plan;
  if (!plan_units(a, plan)) return nullptr;
  run_without_gil(dtype, [&](auto s) { paged_attention_impl<decltype(s)>(a, plan); });
  Py_RETURN_NONE;
}

// ---- rotary embedding, optionally fused with the KV-cache write ---------------------------------
// As the reference: o1 = x1 * cos - x2 * sin, o2 = x2 * cos + x1 * sin on (first half, second half)
// of the rotary features (GPT-NeoX) or on (even, odd) ones (GPT-J); features past rotary_dim copied.
// In bf16/fp16 every product and sum rounds to the storage type, as torch's ops on those tensors do.
template <typename S>
inline void rotate_pair(typename S::T x1_, typename S::T x2_, typename S::T cos_, typename S::T sin_,
                        typename S::T& o1, typename S::T& o2) {
  const float x1 = S::load(x1_), x2 = S::load(x2_), c = S::load(cos_), s = S::load(sin_);
  o1 = S::store(S::round(x1 * c) - S::round(x2 * s));
  o2 = S::store(S::round(x2 * c) + S::round(x1 * s));
}

template <typename S>
inline void rotate_row(const typename S::T* x, typename S::T* o, const typename S::T* cos,
                       const typename S::T* sin, int half, int D, bool interleaved) {
  // GPT-J pairs are interleaved (left to the compiler); GPT-NeoX halves are contiguous: vectors
  if (interleaved) {
#pragma omp simd
    for (int i = 0; i < half; ++i) rotate_pair<S>(x[2 * i], x[2 * i + 1], cos[i], sin[i], o[2 * i], o[2 * i + 1]);
  } else {
    int i = 0;
    for (; i + 8 <= half; i += 8) {  // the same operations, 8 pairs at a time
      const v8f x1 = vload<S>(x + i), x2 = vload<S>(x + i + half), c = vload<S>(cos + i), s = vload<S>(sin + i);
      vstore<S>(o + i, vround<S>(x1 * c) - vround<S>(x2 * s));
      vstore<S>(o + i + half, vround<S>(x2 * c) + vround<S>(x1 * s));
    }
    for (; i < half; ++i) rotate_pair<S>(x[i], x[i + half], cos[i], sin[i], o[i], o[i + half]);
  }
  for (int d = 2 * half; d < D; ++d) o[d] = x[d];
}

struct RotaryArgs {
  const void *q, *k;
  int64_t q_stride_t, q_stride_h, k_stride_t, k_stride_h;
  void *q_out, *k_out;  // contiguous [T, H, D], [T, Hkv, D]; k_out may be null (fused write only)
  int64_t num_tokens, num_heads, num_kv_heads, head_dim;
  const int64_t* positions;  // [T]
  const void* cos_sin;       // contiguous [table_rows, table_width] = cos | sin
  int64_t table_rows, table_width, rotary_dim;
  bool interleaved;
  // the fused KV write (kv null: none): v [T, Hkv, D] strided, cache contiguous, slots [T]
  const void* v;
  int64_t v_stride_t, v_stride_h;
  void* kv;
  int64_t num_slots;
  const int64_t* slots;
};

template <typename S>
void rotary_impl(const RotaryArgs& a) {
  using T = typename S::T;
  const int D = static_cast<int>(a.head_dim), half = static_cast<int>(a.rotary_dim / 2);
  const int64_t T_ = a.num_tokens, H = a.num_heads, Hkv = a.num_kv_heads, slot_stride = Hkv * a.head_dim;
  const T* q = static_cast<const T*>(a.q);
  const T* k = static_cast<const T*>(a.k);
  const T* v = static_cast<const T*>(a.v);
  const T* table = static_cast<const T*>(a.cos_sin);
  T* q_out = static_cast<T*>(a.q_out);
  T* k_out = static_cast<T*>(a.k_out);
  T* k_cache = static_cast<T*>(a.kv);
  T* v_cache = k_cache ? k_cache + a.num_slots * slot_stride : nullptr;
#pragma omp parallel for if (T_ * (H + Hkv) * D > PARALLEL_MIN_ELEMENTS)
  for (int64_t t = 0; t < T_; ++t) {
    const T* cos = table + a.positions[t] * a.table_width;
    const T* sin = cos + a.table_width / 2;
    for (int64_t h = 0; h < H; ++h)
      rotate_row<S>(q + t * a.q_stride_t + h * a.q_stride_h, q_out + (t * H + h) * D, cos, sin, half, D,
                    a.interleaved);
    for (int64_t h = 0; h < Hkv; ++h) {
      const T* src = k + t * a.k_stride_t + h * a.k_stride_h;
      if (k_out) rotate_row<S>(src, k_out + (t * Hkv + h) * D, cos, sin, half, D, a.interleaved);
      if (k_cache) {
        rotate_row<S>(src, k_cache + a.slots[t] * slot_stride + h * D, cos, sin, half, D, a.interleaved);
        const T* vs = v + t * a.v_stride_t + h * a.v_stride_h;
        std::copy(vs, vs + D, v_cache + a.slots[t] * slot_stride + h * D);
      }
    }
  }
}

bool check_rotary(const RotaryArgs& a) {
  if (a.rotary_dim <= 0 || a.rotary_dim % 2 || a.rotary_dim > a.head_dim || a.rotary_dim > a.table_width) {
    PyErr_Format(PyExc_ValueError, "rotary_dim %lld must be even, positive and fit head_dim %lld and the cos/sin "
                 "table's %lld columns", static_cast<long long>(a.rotary_dim), static_cast<long long>(a.head_dim),
                 static_cast<long long>(a.table_width));
    return false;
  }
  for (int64_t t = 0; t < a.num_tokens; ++t) {
    if (a.positions[t] < 0 || a.positions[t] >= a.table_rows) {
      PyErr_Format(PyExc_ValueError, "positions[%lld] = %lld is outside the cos/sin table of %lld positions",
                   static_cast<long long>(t), static_cast<long long>(a.positions[t]),
                   static_cast<long long>(a.table_rows));
      return false;
    }
    if (a.kv && (a.slots[t] < 0 || a.slots[t] >= a.num_slots)) {
      PyErr_Format(PyExc_ValueError, "slot_mapping[%lld] = %lld is not a slot of the cache (0..%lld)",
                   static_cast<long long>(t), static_cast<long long>(a.slots[t]),
                   static_cast<long long>(a.num_slots - 1));
      return false;
    }
  }
  return true;
}

// rotary(dtype, q, q_stride_t, q_stride_h, k, k_stride_t, k_stride_h, q_out, k_out, num_tokens,
//        num_heads, num_kv_heads, head_dim, positions, cos_sin, table_rows, table_width, rotary_dim,
//        interleaved, v, v_stride_t, v_stride_h, kv, num_slots, slot_mapping)
// k_out None: only the fused write; kv None: no write (v, slot_mapping ignored).
PyObject* py_rotary(PyObject*, PyObject* const* items, Py_ssize_t count) {
  if (!check_arity("rotary", count, 25)) return nullptr;
  const Args in{items, count};
  RotaryArgs a{in.ptr<const void>(1), in.ptr<const void>(4), in.i64(2), in.i64(3), in.i64(5), in.i64(6),
               in.ptr<void>(7), in.ptr<void>(8), in.i64(9), in.i64(10), in.i64(11), in.i64(12),
               in.ptr<const int64_t>(13), in.ptr<const void>(14), in.i64(15), in.i64(16), in.i64(17),
               PyObject_IsTrue(items[18]) == 1, in.ptr<const void>(19), in.i64(20), in.i64(21), in.ptr<void>(22),
               in.i64(23), in.ptr<const int64_t>(24)};
  const int64_t dtype = in.i64(0);
  if (failed() || !check_dtype(dtype) || !check_rotary(a)) return nullptr;
  run_without_gil(dtype, [&](auto s) { rotary_impl<decltype(s)>(a); });
  Py_RETURN_NONE;
}

// ---- RMSNorm, optionally of x + residual ----------------------------------------------------------
// As the reference: h = x (+ residual, rounded to the storage type); inv = 1 / sqrt(mean(h^2) + eps)
// in fp32; out = w * round(h * inv) (Llama), or round((h * inv) * (offset + w)) with a weight offset
// (Gemma). One thread per row: the sums do not depend on the thread count.
template <typename S>
void rms_norm_impl(const void* x_, const void* r_, const void* w_, void* out_, void* sum_, int64_t M, int64_t N,
                   float eps, float offset) {
  using T = typename S::T;
  const T *xp = static_cast<const T*>(x_), *rp = static_cast<const T*>(r_), *wp = static_cast<const T*>(w_);
  T *op = static_cast<T*>(out_), *sp = static_cast<T*>(sum_);
#pragma omp parallel if (M * N > PARALLEL_MIN_ELEMENTS)
  {
    std::vector<float> h(N);
#pragma omp for
    for (int64_t i = 0; i < M; ++i) {
      const T* a = xp + i * N;
      v8f part = splat8(0.f);
      int64_t d = 0;
      if (rp) {
        const T* b = rp + i * N;
        T* s = sp + i * N;
#pragma omp simd
        for (int64_t j = 0; j < N; ++j) {
          s[j] = S::store(S::load(a[j]) + S::load(b[j]));
          h[j] = S::load(s[j]);
        }
      } else {
#pragma omp simd
        for (int64_t j = 0; j < N; ++j) h[j] = S::load(a[j]);
      }
      for (; d + 8 <= N; d += 8) {
        const v8f v = load8(h.data() + d);
        part += v * v;
      }
      float tail = 0.f;
      for (; d < N; ++d) tail += h[d] * h[d];
      const float inv = 1.f / std::sqrt((hsum8(part) + tail) / static_cast<float>(N) + eps);
      T* o = op + i * N;
      if (offset != 0.f) {
#pragma omp simd
        for (int64_t j = 0; j < N; ++j) o[j] = S::store((h[j] * inv) * (offset + S::load(wp[j])));
      } else {
#pragma omp simd
        for (int64_t j = 0; j < N; ++j) o[j] = S::store(S::load(wp[j]) * S::round(h[j] * inv));
      }
    }
  }
}

// rms_norm(dtype, x, residual, weight, out, sum, rows, cols, eps, weight_offset); residual and sum
// None: the norm of x alone
PyObject* py_rms_norm(PyObject*, PyObject* const* items, Py_ssize_t count) {
  if (!check_arity("rms_norm", count, 10)) return nullptr;
  const Args in{items, count};
  const int64_t dtype = in.i64(0), M = in.i64(6), N = in.i64(7);
  const void *x = in.ptr<const void>(1), *r = in.ptr<const void>(2), *w = in.ptr<const void>(3);
  void *out = in.ptr<void>(4), *sum = in.ptr<void>(5);
  const float eps = static_cast<float>(in.f64(8)), offset = static_cast<float>(in.f64(9));
  if (failed() || !check_dtype(dtype)) return nullptr;
  if ((r == nullptr) != (sum == nullptr) || N <= 0) {
    PyErr_SetString(PyExc_ValueError, "residual and sum come together (both or neither); cols must be positive");
    return nullptr;
  }
  run_without_gil(dtype, [&](auto s) { rms_norm_impl<decltype(s)>(x, r, w, out, sum, M, N, eps, offset); });
  Py_RETURN_NONE;
}

PyMethodDef methods[] = {
    {"paged_attention", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(py_paged_attention)),
     METH_FASTCALL, "Ragged causal attention over the paged KV cache (see cpu_attention.cpp)."},
    {"rotary", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(py_rotary)), METH_FASTCALL,
     "Rotary embedding of q and k, optionally storing rotated k and v into the cache."},
    {"rms_norm", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(py_rms_norm)), METH_FASTCALL,
     "RMSNorm of x, or of x + residual (writing the sum too)."},
    {nullptr, nullptr, 0, nullptr}};

}  // namespace

SPLITFUSE_NATIVE_MODULE(cpu_attention, methods)
