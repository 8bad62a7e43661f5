// Compiled CPU ops of the cpu-native backend, registered as torch.ops.splitfuse_cpu_native.*.
//
// paged_attention: ragged causal attention of a Dynamic SplitFuse step reading K/V straight from
//   the paged cache [2, num_blocks, block_size, Hkv, D] through the block tables (no gather copy).
//   Work unit = (sequence, tile of up to QUERY_TILE new tokens, kv head); its rows are the tile's
//   tokens x the G query heads of that kv head, so every key row loaded serves all of them (GQA).
//   Keys are visited in chunks of KEY_CHUNK positions with an online softmax in fp32; units are
//   ordered longest first and handed to OpenMP threads dynamically (decodes and prompt chunks differ
//   in cost by orders of magnitude).
// rms_norm_residual: (x + residual, RMSNorm of it) in one pass over each row.
// rotary / rotary_write_kv: rotary embedding of q and k (GPT-NeoX or GPT-J layout, partial rotary),
//   the second also storing rotated k and v into the cache at slot_mapping.
//
// Built with -ffp-contract=off: the elementwise ops then round exactly as torch's fp32 ops do.

#include <ATen/ATen.h>
#include <torch/library.h>
#include <omp.h>

#include <algorithm>
#include <cstring>
#include <cmath>
#include <limits>
#include <vector>

namespace {

constexpr int QUERY_TILE = 8;
constexpr int KEY_CHUNK = 64;
constexpr float NEG_INF = -std::numeric_limits<float>::infinity();

template <typename T>
inline float to_float(T x) { return static_cast<float>(x); }

// A row of D elements as floats: the row itself for float, else converted into buf.
template <typename T>
inline const float* row_as_float(const T* src, float* buf, int D) {
  for (int d = 0; d < D; ++d) buf[d] = to_float(src[d]);
  return buf;
}
template <>
inline const float* row_as_float<float>(const float* src, float*, int) { return src; }

// ---- 8-wide float vectors (GCC/Clang vector extensions; AVX with -march=native, SSE pairs without)
typedef float v8f __attribute__((vector_size(32)));
typedef int32_t v8i __attribute__((vector_size(32)));

inline v8f load8(const float* p) { v8f v; std::memcpy(&v, p, sizeof v); return v; }
inline void store8(float* p, v8f v) { std::memcpy(p, &v, sizeof v); }
inline v8f splat8(float x) { return v8f{x, x, x, x, x, x, x, x}; }
inline float hsum8(v8f v) { return ((v[0] + v[4]) + (v[1] + v[5])) + ((v[2] + v[6]) + (v[3] + v[7])); }

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
  int d = 0;
  for (; d + 8 <= D; d += 8) store8(acc + d, load8(acc + d) * splat8(alpha));
  for (; d < D; ++d) acc[d] *= alpha;
}

inline void axpy(float* acc, float p, const float* v, int D) {
  const v8f pv = splat8(p);
  int d = 0;
  for (; d + 8 <= D; d += 8) store8(acc + d, load8(acc + d) + pv * load8(v + d));
  for (; d < D; ++d) acc[d] += p * v[d];
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
    for (int j = j_lo; j < j_hi; ++j) axpy(acc, p[j], v[j], D);
  }
}

inline void accumulate_any(float* acc, const float* p, const float* const* v, int j_lo, int j_hi, int D) {
  switch (D) {
    case 32: return accumulate<32>(acc, p, v, j_lo, j_hi, D);
    case 64: return accumulate<64>(acc, p, v, j_lo, j_hi, D);
    case 128: return accumulate<128>(acc, p, v, j_lo, j_hi, D);
    default: return accumulate<0>(acc, p, v, j_lo, j_hi, D);
  }
}

struct WorkUnit {
  int seq, token0, num_tokens, first_pos, kv_head;
  int64_t cost;
};

struct Scratch {
  std::vector<float> q, acc, m, l, k_chunk, v_chunk;
};

template <typename T>
void attend_unit(const WorkUnit& w, const T* q, int64_t q_st, int64_t q_sh, const T* k_cache, const T* v_cache,
                 int64_t slot_stride, const int32_t* table, int block_size, int G, int D, float scale,
                 int window, float softcap, T* out, int64_t o_st, int64_t o_sh, Scratch& s) {
  const int R = w.num_tokens * G;  // row r = token (r / G), query head kv_head * G + r % G
  s.q.resize(static_cast<size_t>(R) * D);
  s.acc.assign(static_cast<size_t>(R) * D, 0.f);
  s.m.assign(R, NEG_INF);
  s.l.assign(R, 0.f);
  s.k_chunk.resize(static_cast<size_t>(KEY_CHUNK) * D);
  s.v_chunk.resize(static_cast<size_t>(KEY_CHUNK) * D);
  for (int r = 0; r < R; ++r) {
    const T* src = q + (w.token0 + r / G) * q_st + (w.kv_head * G + r % G) * q_sh;
    for (int d = 0; d < D; ++d) s.q[r * D + d] = to_float(src[d]);
  }
  const int last_pos = w.first_pos + w.num_tokens - 1;
  const int lo = window > 0 ? std::max(0, w.first_pos - window + 1) : 0;
  const int64_t head_off = static_cast<int64_t>(w.kv_head) * D;
  alignas(32) float sc[KEY_CHUNK];
  const float* k_rows[KEY_CHUNK];  // the cache's own rows for float, converted copies otherwise
  const float* v_rows[KEY_CHUNK];
  const v8i lane = {0, 1, 2, 3, 4, 5, 6, 7};
  const bool capped = softcap > 0.f;
  for (int c0 = lo; c0 <= last_pos; c0 += KEY_CHUNK) {
    const int n = std::min(KEY_CHUNK, last_pos + 1 - c0);
    // walk the block table (no division per key)
    int blk = c0 / block_size, off = c0 - blk * block_size;
    for (int j = 0; j < n; ++j) {
      const int64_t slot = static_cast<int64_t>(table[blk]) * block_size + off;
      k_rows[j] = row_as_float(k_cache + slot * slot_stride + head_off, s.k_chunk.data() + j * D, D);
      v_rows[j] = row_as_float(v_cache + slot * slot_stride + head_off, s.v_chunk.data() + j * D, D);
      if (++off == block_size) { off = 0; ++blk; }
    }
    for (int j = n; j < (n + 7) / 8 * 8; ++j) k_rows[j] = k_rows[0];  // padding lanes, masked below
    for (int r = 0; r < R; ++r) {
      const int qpos = w.first_pos + r / G;
      // visible keys of this row in the chunk: [j_lo, j_hi)
      const int j_hi = std::min(n, qpos - c0 + 1);
      const int j_lo = window > 0 ? std::max(0, qpos - window + 1 - c0) : 0;
      if (j_hi <= j_lo) continue;
      const float* qr = s.q.data() + r * D;
      // only the 8-key groups that hold visible keys (causal and window edges skip the rest)
      const int g0 = j_lo / 8 * 8, g1 = (j_hi + 7) / 8 * 8;
      v8f vmax = splat8(NEG_INF);
      for (int j = g0; j < g1; j += 8) {
        v8f score = dot8(qr, k_rows + j, D) * splat8(scale);
        if (capped)
          for (int i = 0; i < 8; ++i) score[i] = softcap * std::tanh(score[i] / softcap);
        const v8i idx = lane + j;
        score = (idx >= j_lo) & (idx < j_hi) ? score : splat8(NEG_INF);
        store8(sc + j, score);
        vmax = vmax > score ? vmax : score;
      }
      const float cmax = std::max(std::max(std::max(vmax[0], vmax[1]), std::max(vmax[2], vmax[3])),
                                  std::max(std::max(vmax[4], vmax[5]), std::max(vmax[6], vmax[7])));
      // online softmax: rescale once per chunk, then accumulate p * v
      const float m_new = std::max(s.m[r], cmax);
      float* acc = s.acc.data() + r * D;
      if (s.m[r] != m_new) {
        const float alpha = s.m[r] == NEG_INF ? 0.f : std::exp(s.m[r] - m_new);
        s.l[r] *= alpha;
        scale_row(acc, alpha, D);
        s.m[r] = m_new;
      }
      v8f lsum = splat8(0.f);
      for (int j = g0; j < g1; j += 8) {
        const v8f p = exp8(load8(sc + j) - splat8(m_new));
        store8(sc + j, p);
        lsum += p;
      }
      s.l[r] += hsum8(lsum);
      accumulate_any(acc, sc, v_rows, j_lo, j_hi, D);
    }
  }
  for (int r = 0; r < R; ++r) {
    T* dst = out + (w.token0 + r / G) * o_st + (w.kv_head * G + r % G) * o_sh;
    const float inv = 1.f / s.l[r];
    for (int d = 0; d < D; ++d) dst[d] = static_cast<T>(s.acc[r * D + d] * inv);
  }
}

template <typename T>
void paged_attention_impl(const at::Tensor& q, const at::Tensor& kv, const at::Tensor& query_start,
                          const at::Tensor& context_lens, const at::Tensor& block_tables, double scale,
                          int64_t window, double softcap, at::Tensor& out) {
  const int H = q.size(1), D = q.size(2);
  const int block_size = kv.size(2), Hkv = kv.size(3);
  const int G = H / Hkv;
  const int S = context_lens.size(0);
  const int32_t* qs = query_start.data_ptr<int32_t>();
  const int32_t* cl = context_lens.data_ptr<int32_t>();
  std::vector<WorkUnit> units;
  for (int s = 0; s < S; ++s) {
    const int n_q = qs[s + 1] - qs[s];
    const int first = cl[s] - n_q;  // new tokens are the last n_q of the context
    for (int a = 0; a < n_q; a += QUERY_TILE) {
      const int n = std::min(QUERY_TILE, n_q - a);
      const int keys = window > 0 ? std::min<int>(first + a + n, window + n - 1) : first + a + n;
      for (int h = 0; h < Hkv; ++h)
        units.push_back({s, qs[s] + a, n, first + a, h, static_cast<int64_t>(keys) * n});
    }
  }
  std::stable_sort(units.begin(), units.end(), [](const WorkUnit& x, const WorkUnit& y) { return x.cost > y.cost; });
  const T* q_ptr = q.data_ptr<T>();
  const T* k_cache = kv.data_ptr<T>();
  const T* v_cache = k_cache + kv.stride(0);
  const int32_t* tables = block_tables.data_ptr<int32_t>();
  const int64_t table_stride = block_tables.stride(0);
  const int64_t slot_stride = kv.stride(2);  // Hkv * D: the cache is contiguous (checked)
  T* out_ptr = out.data_ptr<T>();
  const int64_t num_units = static_cast<int64_t>(units.size());
#pragma omp parallel if (num_units > 1)
  {
    Scratch scratch;
#pragma omp for schedule(dynamic, 1)
    for (int64_t i = 0; i < num_units; ++i) {
      const WorkUnit& w = units[i];
      attend_unit<T>(w, q_ptr, q.stride(0), q.stride(1), k_cache, v_cache, slot_stride,
                     tables + w.seq * table_stride, block_size, G, D, static_cast<float>(scale),
                     static_cast<int>(window), static_cast<float>(softcap), out_ptr, out.stride(0), out.stride(1),
                     scratch);
    }
  }
}

void check_int32_host(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kInt && t.is_contiguous(), "cpu-native: ", name,
              " must be a contiguous int32 CPU tensor, got ", t.scalar_type(), " on ", t.device());
}

at::Tensor paged_attention(const at::Tensor& q, const at::Tensor& kv, const at::Tensor& query_start,
                           const at::Tensor& context_lens, const at::Tensor& block_tables, double scale,
                           int64_t window, double softcap) {
  TORCH_CHECK(q.dim() == 3 && kv.dim() == 5 && kv.size(0) == 2, "cpu-native paged_attention: expected q [T, H, D] "
              "and kv [2, blocks, block_size, Hkv, D], got ", q.sizes(), " and ", kv.sizes());
  TORCH_CHECK(kv.size(4) == q.size(2) && q.size(1) % kv.size(3) == 0, "cpu-native paged_attention: q ", q.sizes(),
              " does not match kv ", kv.sizes(), " (same D, H a multiple of Hkv)");
  TORCH_CHECK(q.scalar_type() == kv.scalar_type(), "cpu-native paged_attention: q is ", q.scalar_type(),
              ", the cache ", kv.scalar_type(), "; expected one dtype");
  TORCH_CHECK(q.device().is_cpu() && kv.device().is_cpu() && kv.is_contiguous() && q.stride(2) == 1,
              "cpu-native paged_attention: q (unit last stride) and a contiguous kv cache on the CPU expected");
  check_int32_host(query_start, "query_start");
  check_int32_host(context_lens, "context_lens");
  check_int32_host(block_tables, "block_tables");
  TORCH_CHECK(query_start.size(0) == context_lens.size(0) + 1 && block_tables.size(0) == context_lens.size(0),
              "cpu-native paged_attention: query_start needs S + 1 entries and block_tables S rows");
  at::Tensor out = at::empty(q.sizes(), q.options());
  if (q.size(0) == 0) return out;
  switch (q.scalar_type()) {
    case at::kFloat:
      paged_attention_impl<float>(q, kv, query_start, context_lens, block_tables, scale, window, softcap, out);
      break;
    case at::kBFloat16:
      paged_attention_impl<at::BFloat16>(q, kv, query_start, context_lens, block_tables, scale, window, softcap, out);
      break;
    case at::kHalf:
      paged_attention_impl<at::Half>(q, kv, query_start, context_lens, block_tables, scale, window, softcap, out);
      break;
    default:
      TORCH_CHECK(false, "cpu-native paged_attention: unsupported dtype ", q.scalar_type());
  }
  return out;
}

// ---- rms_norm with the residual add fused (float32) ---------------------------------------------
// Same operations as the reference: h = x + r; out = w * (h * (1 / sqrt(mean(h^2) + eps))).
std::tuple<at::Tensor, at::Tensor> rms_norm_residual(const at::Tensor& x, const at::Tensor& residual,
                                                     const at::Tensor& weight, double eps) {
  TORCH_CHECK(x.scalar_type() == at::kFloat && residual.scalar_type() == at::kFloat &&
              weight.scalar_type() == at::kFloat, "cpu-native rms_norm_residual: float32 tensors expected");
  TORCH_CHECK(x.is_contiguous() && residual.is_contiguous() && weight.is_contiguous() &&
              x.sizes() == residual.sizes() && weight.numel() == x.size(-1),
              "cpu-native rms_norm_residual: contiguous x and residual of one shape, weight [N] expected");
  const int64_t N = x.size(-1), M = N ? x.numel() / N : 0;
  at::Tensor out = at::empty_like(x), sum = at::empty_like(x);
  const float *xp = x.data_ptr<float>(), *rp = residual.data_ptr<float>(), *wp = weight.data_ptr<float>();
  float *op = out.data_ptr<float>(), *sp = sum.data_ptr<float>();
  const float epsf = static_cast<float>(eps);
#pragma omp parallel for if (M * N > 32768)
  for (int64_t i = 0; i < M; ++i) {
    const float *a = xp + i * N, *b = rp + i * N;
    float* h = sp + i * N;
    float part[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
    int64_t d = 0;
    for (; d + 8 <= N; d += 8)
      for (int k = 0; k < 8; ++k) {
        const float v = a[d + k] + b[d + k];
        h[d + k] = v;
        part[k] += v * v;
      }
    float tail = 0.f;
    for (; d < N; ++d) {
      h[d] = a[d] + b[d];
      tail += h[d] * h[d];
    }
    const float total = ((part[0] + part[4]) + (part[1] + part[5])) + ((part[2] + part[6]) + (part[3] + part[7])) + tail;
    const float inv = 1.f / std::sqrt(total / static_cast<float>(N) + epsf);
    float* o = op + i * N;
    for (int64_t j = 0; j < N; ++j) o[j] = wp[j] * (h[j] * inv);
  }
  return {out, sum};
}

// ---- rotary embedding (float32), optionally fused with the KV-cache write ------------------------
// As the reference: o1 = x1 * cos - x2 * sin, o2 = x2 * cos + x1 * sin on (first half, second half)
// of the rotary features (GPT-NeoX) or on (even, odd) ones (GPT-J); features past rotary_dim copied.
inline void rotate_row(const float* x, float* o, const float* cos, const float* sin, int half, int D,
                       bool interleaved) {
  if (interleaved) {
    for (int i = 0; i < half; ++i) {
      const float x1 = x[2 * i], x2 = x[2 * i + 1];
      o[2 * i] = x1 * cos[i] - x2 * sin[i];
      o[2 * i + 1] = x2 * cos[i] + x1 * sin[i];
    }
  } else {
    for (int i = 0; i < half; ++i) {
      const float x1 = x[i], x2 = x[i + half];
      o[i] = x1 * cos[i] - x2 * sin[i];
      o[i + half] = x2 * cos[i] + x1 * sin[i];
    }
  }
  for (int d = 2 * half; d < D; ++d) o[d] = x[d];
}

void check_rotary(const at::Tensor& x, const char* name) {
  TORCH_CHECK(x.scalar_type() == at::kFloat && x.dim() == 3 && x.stride(2) == 1,
              "cpu-native rotary: ", name, " must be float32 [T, heads, D] with a unit last stride");
}

// Rotates q and k into q_out, k_out; with a cache, k_out and v are also stored at slot_mapping.
void rotary_core(const at::Tensor& q, const at::Tensor& k, const at::Tensor& positions, const at::Tensor& cos_sin,
                 int64_t rotary_dim, bool interleaved, at::Tensor& q_out, at::Tensor* k_out, const at::Tensor* v,
                 at::Tensor* kv, const at::Tensor* slots) {
  check_rotary(q, "q");
  check_rotary(k, "k");
  TORCH_CHECK(cos_sin.scalar_type() == at::kFloat && cos_sin.is_contiguous() && positions.scalar_type() == at::kLong
              && positions.is_contiguous(), "cpu-native rotary: float32 cos_sin and int64 positions expected");
  const int64_t T = q.size(0), H = q.size(1), Hkv = k.size(1), D = q.size(2);
  const int half = static_cast<int>(rotary_dim / 2), table_width = cos_sin.size(1);
  TORCH_CHECK(rotary_dim % 2 == 0 && rotary_dim <= D && rotary_dim <= table_width,
              "cpu-native rotary: rotary_dim ", rotary_dim, " must be even and fit D ", D, " and the cos/sin table");
  const int64_t* pos = positions.data_ptr<int64_t>();
  TORCH_CHECK(positions.numel() == T, "cpu-native rotary: positions needs one entry per token");
  for (int64_t t = 0; t < T; ++t)
    TORCH_CHECK(pos[t] >= 0 && pos[t] < cos_sin.size(0), "cpu-native rotary: position ", pos[t],
                " is outside the cos/sin table of ", cos_sin.size(0), " positions");
  const float* table = cos_sin.data_ptr<float>();
  const int table_half = table_width / 2;
  const int64_t* slot_ptr = slots ? slots->data_ptr<int64_t>() : nullptr;
  float* k_cache = kv ? kv->data_ptr<float>() : nullptr;
  const int64_t slot_stride = kv ? kv->stride(2) : 0;
  float* v_cache = kv ? k_cache + kv->stride(0) : nullptr;
#pragma omp parallel for if (T * (H + Hkv) * D > 32768)
  for (int64_t t = 0; t < T; ++t) {
    const float* cos = table + pos[t] * table_width;
    const float* sin = cos + table_half;
    for (int64_t h = 0; h < H; ++h)
      rotate_row(q.data_ptr<float>() + t * q.stride(0) + h * q.stride(1),
                 q_out.data_ptr<float>() + (t * H + h) * D, cos, sin, half, D, interleaved);
    for (int64_t h = 0; h < Hkv; ++h) {
      const float* src = k.data_ptr<float>() + t * k.stride(0) + h * k.stride(1);
      if (k_out) rotate_row(src, k_out->data_ptr<float>() + (t * Hkv + h) * D, cos, sin, half, D, interleaved);
      if (kv) {
        float* kd = k_cache + slot_ptr[t] * slot_stride + h * D;
        rotate_row(src, kd, cos, sin, half, D, interleaved);
        const float* vs = v->data_ptr<float>() + t * v->stride(0) + h * v->stride(1);
        std::copy(vs, vs + D, v_cache + slot_ptr[t] * slot_stride + h * D);
      }
    }
  }
}

std::tuple<at::Tensor, at::Tensor> rotary(const at::Tensor& q, const at::Tensor& k, const at::Tensor& positions,
                                          const at::Tensor& cos_sin, int64_t rotary_dim, bool interleaved) {
  at::Tensor q_out = at::empty(q.sizes(), q.options()), k_out = at::empty(k.sizes(), k.options());
  rotary_core(q, k, positions, cos_sin, rotary_dim, interleaved, q_out, &k_out, nullptr, nullptr, nullptr);
  return {q_out, k_out};
}

at::Tensor rotary_write_kv(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& positions,
                           const at::Tensor& cos_sin, at::Tensor kv, const at::Tensor& slot_mapping,
                           int64_t rotary_dim, bool interleaved) {
  check_rotary(v, "v");
  TORCH_CHECK(kv.scalar_type() == at::kFloat && kv.is_contiguous() && kv.dim() == 5 && kv.size(3) == k.size(1) &&
              kv.size(4) == q.size(2), "cpu-native rotary_write_kv: a contiguous float32 cache [2, blocks, "
              "block_size, Hkv, D] matching k expected, got ", kv.sizes());
  TORCH_CHECK(slot_mapping.scalar_type() == at::kLong && slot_mapping.is_contiguous() &&
              slot_mapping.size(0) == q.size(0), "cpu-native rotary_write_kv: int64 slot_mapping [T] expected");
  at::Tensor q_out = at::empty(q.sizes(), q.options());
  rotary_core(q, k, positions, cos_sin, rotary_dim, interleaved, q_out, nullptr, &v, &kv, &slot_mapping);
  return q_out;
}

}  // namespace

TORCH_LIBRARY(splitfuse_cpu_native, m) {
  m.def("paged_attention(Tensor q, Tensor kv, Tensor query_start, Tensor context_lens, Tensor block_tables, "
        "float scale, int window, float softcap) -> Tensor", &paged_attention);
  m.def("rms_norm_residual(Tensor x, Tensor residual, Tensor weight, float eps) -> (Tensor, Tensor)",
        &rms_norm_residual);
  m.def("rotary(Tensor q, Tensor k, Tensor positions, Tensor cos_sin, int rotary_dim, bool interleaved) "
        "-> (Tensor, Tensor)", &rotary);
  m.def("rotary_write_kv(Tensor q, Tensor k, Tensor v, Tensor positions, Tensor cos_sin, Tensor(a!) kv, "
        "Tensor slot_mapping, int rotary_dim, bool interleaved) -> Tensor", &rotary_write_kv);
}
