// Sampled rows of one step, one fused pass per row: temperature, top-k, top-p (HF's rule), and the
// Philox exponential race, drawing the token splitfuse.core.sampler's torch path draws.
//
// Exactness. The kept set is decided with the reference's own float operations: x / T, the k-th
// largest value, and for top-p the softmax of the ascending row as torch's CPU kernel computes it
// (Sleef's expf_u10 with FMA, a sum in `lanes` vector lanes then a shuffle tree, times 1 / sum)
// and its cumulative sum accumulated in double, as torch's cumsum does. The race's two logs are
// torch.log in the reference (MKL or Sleef, within a few ulps), so a row whose best two keys lie
// within that error of each other is left undecided, as is a row whose top-p cutoff falls inside
// a run of equal values (torch.sort's tie order decides there), a row with NaN or +inf, and a row
// that keeps nothing: the caller draws those rows with the torch path.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

#include "native.h"

namespace {

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

// ---- exp as torch's vectorised softmax computes it: Sleef's expf_u10 (FMA build) ----
inline float pow2i(int q) {
  uint32_t bits = uint32_t(q + 0x7f) << 23;
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

inline float sleef_expf_u10(float d) {
  if (d < -104.0f) return 0.0f;
  if (d > 100.0f) return kInf;
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
  return u * pow2i(q >> 1) * pow2i(q - (q >> 1));
}

// softmax(sorted)'s 1 / sum for an ascending row of `num_low` -inf then `n` values (max last),
// with exps written to e: torch's reduce_all order (position q in lane q % lanes, then the tree)
float softmax_scale(const float* values, int64_t n, int64_t num_low, int lanes, float* e) {
  float max = values[n - 1];
  float acc[16] = {0};
  for (int64_t i = 0; i < n; ++i) {
    e[i] = sleef_expf_u10(values[i] - max);
    int lane = int((num_low + i) % lanes);
    acc[lane] = acc[lane] + e[i];
  }
  for (int half = lanes / 2; half >= 1; half /= 2)
    for (int j = 0; j < half; ++j) acc[j] = acc[j] + acc[j + half];
  return 1.0f / acc[0];
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
  std::vector<float> scaled, values, exps;
  std::vector<int32_t> kept;
};

// The least scaled logit kept (top-k then top-p), or NaN when the torch path must decide.
float threshold(const Row& row, Scratch& s, int lanes) {
  const int64_t V = row.vocab;
  float thr = -kInf;
  if (row.top_k > 0 && row.top_k < V) {
    s.values.assign(s.scaled.begin(), s.scaled.end());
    std::nth_element(s.values.begin(), s.values.begin() + (V - row.top_k), s.values.end());
    thr = s.values[V - row.top_k];
  }
  if (!(row.top_p < 1.0)) return thr;
  if (V < lanes) return std::nanf("");  // torch's reduce_all takes another order there
  const float limit = float(1.0 - row.top_p);
  s.values.clear();
  for (float v : s.scaled)
    if (v >= thr && v > -kInf) s.values.push_back(v);
  const int64_t n = int64_t(s.values.size()), num_low = V - n;  // top-k's drops and -inf sort first
  if (n == 0 || limit < 0.0f) return std::nanf("");
  std::sort(s.values.begin(), s.values.end());
  s.exps.resize(n);
  const float scale = softmax_scale(s.values.data(), n, num_low, lanes, s.exps.data());
  // HF's rule on the ascending row: drop while the cumulative mass (torch's cumsum accumulates in
  // double) is <= the limit; the -inf positions have mass 0
  int64_t dropped = num_low;
  double mass = 0.0;
  for (int64_t i = 0; i < n; ++i) {
    mass += double(s.exps[i] * scale);
    if (!(float(mass) <= limit)) break;
    ++dropped;
  }
  dropped = std::min(dropped, V - 1);
  auto at = [&](int64_t pos) { return pos < num_low ? -kInf : s.values[pos - num_low]; };
  const float cutoff = at(dropped);
  if (dropped > 0 && at(dropped - 1) == cutoff) return std::nanf("");  // the sort's tie order decides
  return std::max(thr, cutoff);
}

// How far the reference's key may be from ours: its logs are torch.log (within a few ulps)
inline float key_error(float key) { return 0x1p-14f + std::fabs(key) * 0x1p-20f; }

int64_t sample_row(const Row& row, Scratch& s, int lanes) {
  const int64_t V = row.vocab;
  s.scaled.resize(V);
  for (int64_t j = 0; j < V; ++j) {
    float v = row.logits[j] / row.temperature;
    if (std::isnan(v) || v == kInf) return kUndecided;
    s.scaled[j] = v;
  }
  const float thr = threshold(row, s, lanes);
  if (std::isnan(thr)) return kUndecided;
  const float keep_from = std::max(thr, -std::numeric_limits<float>::max());
  s.kept.clear();
  for (int64_t j = 0; j < V; ++j)
    if (s.scaled[j] >= keep_from) s.kept.push_back(int32_t(j));
  if (s.kept.empty()) return kUndecided;

  const float inv_t = 1.0f / row.temperature;
  const uint64_t base = row.counter * uint64_t(V);
  float best = -kInf, second = -kInf;
  int64_t best_token = kUndecided;
  for (int32_t j : s.kept) {
    // Exp(1) noise exactly as philox.exponential, with correctly rounded logs
    float u = float(int32_t(philox_word0(row.seed, base + uint64_t(j)) >> 1)) * 0x1p-31f + 0x1p-32f;
    float e = u < 1.0e-3f ? u * (1.0f + 0.5f * u) : -float(std::log(double(std::max(1.0f - u, 0x1p-26f))));
    float key = std::max(row.logits[j] * inv_t - float(std::log(double(e))), kLowestKey);
    if (!std::isfinite(key)) return kUndecided;
    if (key > best) {
      second = best;
      best = key;
      best_token = j;
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
