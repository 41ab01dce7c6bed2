// CPU kernels for the train step, called from XLA through its FFI (ladder_cpu/kernels.py).
//
// Why: on the 2-core x86 machines we measured, MKL's single-precision GEMM runs
// the step's matmul shapes faster than XLA:CPU's own dot kernels, and XLA has no
// fused attention on CPU: its batched (B*H, L, K) dots run well below the 2-D
// matmul rate (docs/performance-log.md). Everything here is fp32.
//
// Threads: MKL is linked sequential (no OpenMP pool competing with XLA's);
// each kernel splits its work into independent parts and runs them on XLA's
// own intra-op thread pool, the calling thread included. A part that no
// other thread has picked up by the time the caller runs out of work is run
// by the caller, so a busy pool never deadlocks the call.
//
// Layouts are row-major. Attention takes q, k, v and returns o as (B, L, H, K)
// (model.py's letters), and reads each head's (L, K) rows with a stride of
// H * K, so the model needs no transposes around it.

#include <algorithm>
#include <atomic>
#include <cmath>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <immintrin.h>
#include <limits>
#include <memory>
#include <mutex>
#include <sched.h>
#include <thread>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

// Ranked buffer types (aliases: the FFI binding macros cannot take a comma in a template).
using Vector = ffi::Buffer<ffi::F32, 1>;
using Matrix = ffi::Buffer<ffi::F32, 2>;
using Rank3 = ffi::Buffer<ffi::F32, 3>;
using Rank4 = ffi::Buffer<ffi::F32, 4>;

// The CBLAS entry point (MKL's libmkl_intel_lp64: 32-bit ints).
extern "C" void cblas_sgemm(int layout, int trans_a, int trans_b, int m, int n, int k, float alpha,
                            const float* a, int lda, const float* b, int ldb, float beta, float* c,
                            int ldc);
// MKL's vector exp (VML), elementwise y = exp(a); exp(-inf) = 0 keeps masked scores at 0.
extern "C" void vmsExp(int n, const float* a, float* y, long long mode);

namespace {

constexpr int kRowMajor = 101, kNoTrans = 111, kTrans = 112;
constexpr long long kVmlHighAccuracy = 0x2;  // VML_HA: within 1 ulp

void Exp(int64_t n, float* x) { vmsExp(static_cast<int>(n), x, x, kVmlHighAccuracy); }

// C[m, n] = alpha * op(A) op(B) + beta * C, all row-major with leading dims.
void Sgemm(bool ta, bool tb, int64_t m, int64_t n, int64_t k, float alpha, const float* a,
           int64_t lda, const float* b, int64_t ldb, float beta, float* c, int64_t ldc) {
  cblas_sgemm(kRowMajor, ta ? kTrans : kNoTrans, tb ? kTrans : kNoTrans, static_cast<int>(m),
              static_cast<int>(n), static_cast<int>(k), alpha, a, static_cast<int>(lda), b,
              static_cast<int>(ldb), beta, c, static_cast<int>(ldc));
}

// Scratch floats, left uninitialised (a std::vector would write zeros first).
struct Scratch {
  std::unique_ptr<float[]> buf;
  explicit Scratch(int64_t n) : buf(n > 0 ? new float[n] : nullptr) {}
  float* data() const { return buf.get(); }
  float& operator[](int64_t i) const { return buf[i]; }
};

// Parts 0..parts-1 of one call, shared between the caller and pool threads.
struct Job {
  std::function<void(int64_t)> fn;
  int64_t parts = 0;
  std::atomic<int64_t> next{0}, done{0};
  std::mutex mu;
  std::condition_variable cv;

  void Work() {
    for (int64_t i; (i = next.fetch_add(1)) < parts;) {
      fn(i);
      if (done.fetch_add(1) + 1 == parts) {
        std::lock_guard<std::mutex> lock(mu);
        cv.notify_all();
      }
    }
  }
};

// Runs fn(0) .. fn(parts - 1) on the caller and up to num_threads - 1 pool threads.
void ParallelFor(ffi::ThreadPool& pool, int64_t parts, std::function<void(int64_t)> fn) {
  auto job = std::make_shared<Job>();
  job->fn = std::move(fn);
  job->parts = parts;
  int64_t helpers = std::min<int64_t>(pool.num_threads(), parts) - 1;
  for (int64_t t = 0; t < helpers; ++t) pool.Schedule([job] { job->Work(); });
  job->Work();
  // Only parts already claimed by a helper are waited for: they are running.
  std::unique_lock<std::mutex> lock(job->mu);
  job->cv.wait(lock, [&] { return job->done.load() == job->parts; });
}

// ---------------------------------------------------------------- matmul
//
// One input against g weights, as a layer's q, k and v projections: y_i = x w_i, and in one
// backward call dx = sum_i dy_i w_i^T and dw_i = x^T dy_i. With one call instead of g (and
// of 2 g in the backward), XLA's executor no longer starts independent GEMMs at once, each
// on both of two cores; the input gradient is accumulated in place (beta = 1), where g
// products would need g - 1 adds after them. A single matmul is the group of one.
// Measured in docs/performance-log.md, item 40.

struct Operand {
  const float* data;
  int64_t rows, cols;
};

// Buffers [first, first + count) of the remaining args as (data, rows, cols); false if one
// is not a rank-2 f32 buffer.
bool Operands(const ffi::RemainingArgs& args, size_t first, size_t count,
              std::vector<Operand>& out) {
  for (size_t i = first; i < first + count; ++i) {
    auto buf = args.get<Matrix>(i);
    if (!buf.has_value()) return false;
    auto d = buf->dimensions();
    out.push_back({buf->typed_data(), d[0], d[1]});
  }
  return true;
}

bool Results(const ffi::RemainingRets& rets, size_t count, std::vector<float*>& out) {
  for (size_t i = 0; i < count; ++i) {
    auto buf = rets.get<Matrix>(i);
    if (!buf.has_value()) return false;
    out.push_back((*buf)->typed_data());
  }
  return true;
}

// Parts of n rows for `threads`, each of at least 64 rows (MKL's kernels want some height).
int64_t RowParts(int64_t n, int64_t threads) {
  return std::max<int64_t>(1, std::min<int64_t>(threads, n / 64));
}

// args: x (N, D), w_0 .. w_{g-1} (D, F_i); rets: y_i (N, F_i). Rows of x are split across
// threads, and each part runs all g products on its rows while they are in cache.
ffi::Error MatmulGroupFwd(ffi::ThreadPool pool, Matrix x, ffi::RemainingArgs args,
                          ffi::RemainingRets rets) {
  const int64_t n = x.dimensions()[0], d = x.dimensions()[1];
  const size_t g = args.size();
  std::vector<Operand> w;
  std::vector<float*> y;
  if (!Operands(args, 0, g, w) || !Results(rets, g, y))
    return ffi::Error::InvalidArgument("matmul_group: operands must be 2-D float32");
  for (const Operand& wi : w)
    if (wi.rows != d) return ffi::Error::InvalidArgument("matmul_group: inner dims differ");
  const float* px = x.typed_data();
  const int64_t parts = RowParts(n, pool.num_threads()), rows = (n + parts - 1) / parts;
  ParallelFor(pool, parts, [&](int64_t p) {
    const int64_t r0 = p * rows, r1 = std::min(n, r0 + rows);
    if (r0 >= r1) return;
    for (size_t i = 0; i < g; ++i)
      Sgemm(false, false, r1 - r0, w[i].cols, d, 1.0f, px + r0 * d, d, w[i].data, w[i].cols,
            0.0f, y[i] + r0 * w[i].cols, w[i].cols);
  });
  return ffi::Error::Success();
}

// args: x (N, D), w_0 .. w_{g-1} (D, F_i), dy_0 .. dy_{g-1} (N, F_i);
// rets: dx (N, D), dw_0 .. dw_{g-1} (D, F_i).
// dx: rows split across threads. dw: where there are more tokens than D (the usual case),
// the tokens are split, each part multiplies its own slice of x and dy, and the partial
// products are summed: split by rows of dw, every thread would pack all of dy again (MKL's
// packing is per call; docs/performance-log.md, item 28). Else rows of dw.
ffi::Error MatmulGroupBwd(ffi::ThreadPool pool, Matrix x, ffi::RemainingArgs args,
                          ffi::Result<Matrix> dx, ffi::RemainingRets rets) {
  const int64_t n = x.dimensions()[0], d = x.dimensions()[1];
  if (args.size() % 2 != 0) return ffi::Error::InvalidArgument("matmul_group: g weights, g dys");
  const size_t g = args.size() / 2;
  std::vector<Operand> w, dy;
  std::vector<float*> dw;
  if (!Operands(args, 0, g, w) || !Operands(args, g, g, dy) || !Results(rets, g, dw))
    return ffi::Error::InvalidArgument("matmul_group: operands must be 2-D float32");
  for (size_t i = 0; i < g; ++i)
    if (w[i].rows != d || dy[i].rows != n || dy[i].cols != w[i].cols)
      return ffi::Error::InvalidArgument("matmul_group: dy and w shapes differ");
  const float* px = x.typed_data();
  float* pdx = dx->typed_data();
  const int64_t threads = pool.num_threads();
  // dx[r0:r1] = sum_i dy_i[r0:r1] w_i^T, accumulated in place.
  const int64_t parts = RowParts(n, threads), rows = (n + parts - 1) / parts;
  ParallelFor(pool, parts, [&](int64_t p) {
    const int64_t r0 = p * rows, r1 = std::min(n, r0 + rows);
    if (r0 >= r1) return;
    for (size_t i = 0; i < g; ++i)
      Sgemm(false, true, r1 - r0, d, w[i].cols, 1.0f, dy[i].data + r0 * w[i].cols, w[i].cols,
            w[i].data, w[i].cols, i == 0 ? 0.0f : 1.0f, pdx + r0 * d, d);
  });
  if (n > d && threads > 1 && n >= 128) {
    const int64_t kparts = std::min<int64_t>(threads, n / 64), span = (n + kparts - 1) / kparts;
    // Part 0 writes dw; the others their own partial products, added to dw below.
    int64_t total = 0;
    for (const Operand& wi : w) total += wi.rows * wi.cols;
    std::unique_ptr<float[]> partial(new float[(kparts - 1) * total]);
    ParallelFor(pool, kparts, [&](int64_t p) {
      const int64_t k0 = p * span, k1 = std::min(n, k0 + span);  // k0 < k1: kparts <= n / 64
      float* out = p == 0 ? nullptr : partial.get() + (p - 1) * total;
      for (size_t i = 0; i < g; ++i) {
        const int64_t f = w[i].cols;
        Sgemm(true, false, d, f, k1 - k0, 1.0f, px + k0 * d, d, dy[i].data + k0 * f, f, 0.0f,
              p == 0 ? dw[i] : out, f);
        if (p != 0) out += d * f;
      }
    });
    // dw_i += the other parts' products; each thread takes a share of dw_i's rows.
    const int64_t rparts = threads, drows = (d + rparts - 1) / rparts;
    ParallelFor(pool, rparts, [&](int64_t p) {
      int64_t offset = 0;
      for (size_t i = 0; i < g; ++i) {
        const int64_t f = w[i].cols, i0 = std::min(d, p * drows) * f,
                      i1 = std::min(d, (p + 1) * drows) * f;
        float* dst = dw[i];
        for (int64_t q = 0; q < kparts - 1; ++q) {
          const float* src = partial.get() + q * total + offset;
#pragma omp simd
          for (int64_t j = i0; j < i1; ++j) dst[j] += src[j];
        }
        offset += d * f;
      }
    });
  } else {
    // dw_i[r0:r1] = x[:, r0:r1]^T dy_i.
    const int64_t dparts = RowParts(d, threads), drows = (d + dparts - 1) / dparts;
    ParallelFor(pool, dparts, [&](int64_t p) {
      const int64_t r0 = p * drows, r1 = std::min(d, r0 + drows);
      if (r0 >= r1) return;
      for (size_t i = 0; i < g; ++i)
        Sgemm(true, false, r1 - r0, w[i].cols, n, 1.0f, px + r0, d, dy[i].data, w[i].cols,
              0.0f, dw[i] + r0 * w[i].cols, w[i].cols);
    });
  }
  return ffi::Error::Success();
}

// ------------------------------------------------------------- attention
//
// Exact causal softmax attention, one (batch, head) pair per part, in query
// blocks of `block` rows: block i multiplies only keys 0 .. end of block i, so
// the upper triangle is never computed. The backward needs the probabilities
// again. Either the forward saves them (`probs`: each block's (rows, r1)
// rectangle, packed block after block, zero above the diagonal), or it saves
// the log-sum-exp of each query row and the backward recomputes them from it,
// as FlashAttention does. kernels.py picks one by the memory it costs.

struct Dims {
  int64_t B, L, H, K;
  int64_t ld() const { return H * K; }                                  // row stride of q, k, v, o
  int64_t offset(int64_t bh) const { return (bh / H) * L * H * K + (bh % H) * K; }
};

Dims DimsOf(const Rank4& x) {
  auto d = x.dimensions();
  return Dims{d[0], d[1], d[2], d[3]};
}

// Entries of one (batch, head) pair's packed probabilities: sum over blocks of rows * r1.
int64_t PackedProbs(int64_t L, int64_t block) {
  int64_t n = 0;
  for (int64_t r0 = 0; r0 < L; r0 += block) n += (std::min(L, r0 + block) - r0) * std::min(L, r0 + block);
  return n;
}

// Scores of query rows [r0, r1) against keys [0, r1): s = scale * q k^T, row stride r1.
void Scores(const Dims& d, const float* q, const float* k, float scale, int64_t r0, int64_t r1,
            float* s) {
  Sgemm(false, true, r1 - r0, r1, d.K, scale, q + r0 * d.ld(), d.ld(), k, d.ld(), 0.0f, s, r1);
}

// o = softmax(causal scores) v. The probabilities go to `probs` (packed, B * H blocks of
// PackedProbs entries) when it is given, else to a scratch block; each row's log-sum-exp
// goes to `lse` (B, H, L) when it is given.
void Forward(ffi::ThreadPool& pool, const Dims d, const float* pq, const float* pk,
             const float* pv, float* po, float* probs, float* lse, float scale, int64_t block) {
  const int64_t packed = PackedProbs(d.L, block);
  ParallelFor(pool, d.B * d.H, [=](int64_t bh) {
    const int64_t off = d.offset(bh), ld = d.ld();
    const float *qh = pq + off, *kh = pk + off, *vh = pv + off;
    float* oh = po + off;
    Scratch scratch(probs ? 0 : block * d.L);
    float* s = probs ? probs + bh * packed : scratch.data();
    for (int64_t r0 = 0; r0 < d.L; r0 += block) {
      const int64_t r1 = std::min(d.L, r0 + block);
      Scores(d, qh, kh, scale, r0, r1, s);
      // Softmax of row r over keys 0..r, in place; zero above the diagonal.
      for (int64_t r = r0; r < r1; ++r) {
        float* row = s + (r - r0) * r1;
        std::fill(row + r + 1, row + r1, 0.0f);
        float mx = row[0];
#pragma omp simd reduction(max : mx)
        for (int64_t j = 0; j <= r; ++j) mx = std::max(mx, row[j]);
#pragma omp simd
        for (int64_t j = 0; j <= r; ++j) row[j] -= mx;
        Exp(r + 1, row);
        float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
        for (int64_t j = 0; j <= r; ++j) sum += row[j];
        const float inv = 1.0f / sum;
#pragma omp simd
        for (int64_t j = 0; j <= r; ++j) row[j] *= inv;
        if (lse) lse[bh * d.L + r] = mx + std::log(sum);
      }
      Sgemm(false, false, r1 - r0, d.K, r1, 1.0f, s, r1, vh, ld, 0.0f, oh + r0 * ld, ld);
      if (probs) s += (r1 - r0) * r1;
    }
  });
}

ffi::Error AttentionFwd(ffi::ThreadPool pool, Rank4 q, Rank4 k, Rank4 v, ffi::Result<Rank4> o,
                        ffi::Result<Rank3> lse, float scale, int64_t block) {
  Forward(pool, DimsOf(q), q.typed_data(), k.typed_data(), v.typed_data(), o->typed_data(),
          nullptr, lse->typed_data(), scale, block);
  return ffi::Error::Success();
}

ffi::Error AttentionFwdProbs(ffi::ThreadPool pool, Rank4 q, Rank4 k, Rank4 v,
                             ffi::Result<Rank4> o, ffi::Result<Rank3> probs, float scale,
                             int64_t block) {
  const Dims d = DimsOf(q);
  if (probs->dimensions()[2] != PackedProbs(d.L, block))
    return ffi::Error::InvalidArgument("attention: probs has the wrong packed length");
  Forward(pool, d, q.typed_data(), k.typed_data(), v.typed_data(), o->typed_data(),
          probs->typed_data(), nullptr, scale, block);
  return ffi::Error::Success();
}

// dq, dk, dv, from the saved probabilities (`probs`) or recomputed from the log-sum-exp.
void Backward(ffi::ThreadPool& pool, const Dims d, const float* pq, const float* pk,
              const float* pv, const float* po, const float* probs, const float* plse,
              const float* pdo, float* pdq, float* pdk, float* pdv, float scale, int64_t block) {
  const int64_t packed = PackedProbs(d.L, block);
  ParallelFor(pool, d.B * d.H, [=](int64_t bh) {
    const int64_t off = d.offset(bh), ld = d.ld();
    const float *qh = pq + off, *kh = pk + off, *vh = pv + off, *oh = po + off, *doh = pdo + off;
    float *dqh = pdq + off, *dkh = pdk + off, *dvh = pdv + off;
    const float* saved = probs ? probs + bh * packed : nullptr;
    Scratch p(probs ? 0 : block * d.L), dp(block * d.L), delta(d.L);
    for (int64_t r = 0; r < d.L; ++r) {  // delta_r = do_r . o_r; dk, dv accumulate from 0
      float acc = 0.0f;
#pragma omp simd reduction(+ : acc)
      for (int64_t c = 0; c < d.K; ++c) acc += doh[r * ld + c] * oh[r * ld + c];
      delta[r] = acc;
      std::fill(dkh + r * ld, dkh + r * ld + d.K, 0.0f);
      std::fill(dvh + r * ld, dvh + r * ld + d.K, 0.0f);
    }
    for (int64_t r0 = 0; r0 < d.L; r0 += block) {
      const int64_t r1 = std::min(d.L, r0 + block), rows = r1 - r0;
      const float* pb = saved;  // this block's probabilities, row stride r1
      if (saved) {
        saved += rows * r1;
      } else {  // p = exp(s - lse), zero above the diagonal
        Scores(d, qh, kh, scale, r0, r1, p.data());
        for (int64_t r = r0; r < r1; ++r) {
          float* row = p.data() + (r - r0) * r1;
          const float lse_r = plse[bh * d.L + r];
#pragma omp simd
          for (int64_t j = 0; j <= r; ++j) row[j] -= lse_r;
          Exp(r + 1, row);
          std::fill(row + r + 1, row + r1, 0.0f);
        }
        pb = p.data();
      }
      // dv[0:r1] += p^T do;  dp = do v[0:r1]^T
      Sgemm(true, false, r1, d.K, rows, 1.0f, pb, r1, doh + r0 * ld, ld, 1.0f, dvh, ld);
      Sgemm(false, true, rows, r1, d.K, 1.0f, doh + r0 * ld, ld, vh, ld, 0.0f, dp.data(), r1);
      for (int64_t r = r0; r < r1; ++r) {  // ds = p * (dp - delta), into dp
        float* row = dp.data() + (r - r0) * r1;
        const float* prow = pb + (r - r0) * r1;
#pragma omp simd
        for (int64_t j = 0; j < r1; ++j) row[j] = prow[j] * (row[j] - delta[r]);
      }
      // dq[r0:r1] = scale ds k[0:r1];  dk[0:r1] += scale ds^T q[r0:r1]
      Sgemm(false, false, rows, d.K, r1, scale, dp.data(), r1, kh, ld, 0.0f, dqh + r0 * ld, ld);
      Sgemm(true, false, r1, d.K, rows, scale, dp.data(), r1, qh + r0 * ld, ld, 1.0f, dkh, ld);
    }
  });
}

ffi::Error AttentionBwd(ffi::ThreadPool pool, Rank4 q, Rank4 k, Rank4 v, Rank4 o, Rank3 lse,
                        Rank4 d_o, ffi::Result<Rank4> dq, ffi::Result<Rank4> dk,
                        ffi::Result<Rank4> dv, float scale, int64_t block) {
  Backward(pool, DimsOf(q), q.typed_data(), k.typed_data(), v.typed_data(), o.typed_data(),
           nullptr, lse.typed_data(), d_o.typed_data(), dq->typed_data(), dk->typed_data(),
           dv->typed_data(), scale, block);
  return ffi::Error::Success();
}

ffi::Error AttentionBwdProbs(ffi::ThreadPool pool, Rank4 q, Rank4 k, Rank4 v, Rank4 o,
                             Rank3 probs, Rank4 d_o, ffi::Result<Rank4> dq,
                             ffi::Result<Rank4> dk, ffi::Result<Rank4> dv, float scale,
                             int64_t block) {
  const Dims d = DimsOf(q);
  if (probs.dimensions()[2] != PackedProbs(d.L, block))
    return ffi::Error::InvalidArgument("attention: probs has the wrong packed length");
  Backward(pool, d, q.typed_data(), k.typed_data(), v.typed_data(), o.typed_data(),
           probs.typed_data(), nullptr, d_o.typed_data(), dq->typed_data(), dk->typed_data(),
           dv->typed_data(), scale, block);
  return ffi::Error::Success();
}

// ------------------------------------------------------ RMSNorm, LayerNorm
//
// Backward of y = xhat w (+ b), xhat = (x - mu) r, r = 1 / sqrt(mean((x - mu)^2) + eps) per
// row, with mu = mean(x) for LayerNorm (kCenter) and mu = 0 for RMSNorm. With g = dy w:
//   dx = r (g - mean(g) - xhat mean(g xhat)),  dw = sum over rows of dy xhat,  db = sum of dy;
// RMSNorm has no mean(g) term and no b. Each row (D floats) stays in L1 over its passes.
// XLA's autodiff of the same is slower (docs/performance-log.md, items 30, 39): it
// materialises broadcasts of r and w for the reductions. Rows are split across threads;
// each part sums its own dw (and db), and the parts are added at the end.

template <bool kCenter>
void NormBwd(ffi::ThreadPool& pool, int64_t n, int64_t d, const float* px, const float* pw,
             const float* pdy, float* pdx, float* pdw, float* pdb, float eps) {
  const int64_t parts = std::max<int64_t>(1, std::min<int64_t>(pool.num_threads(), n / 64));
  const int64_t rows = (n + parts - 1) / parts;
  // Per part: dw's partial sums, then db's (LayerNorm).
  const int64_t stride = kCenter ? 2 * d : d;
  std::vector<float> partial(parts * stride, 0.0f);
  ParallelFor(pool, parts, [&](int64_t p) {
    float* dwp = partial.data() + p * stride;
    float* dbp = dwp + d;
    for (int64_t i = p * rows; i < std::min(n, (p + 1) * rows); ++i) {
      const float *xi = px + i * d, *dyi = pdy + i * d;
      float mu = 0.0f;
      if constexpr (kCenter) {
#pragma omp simd reduction(+ : mu)
        for (int64_t j = 0; j < d; ++j) mu += xi[j];
        mu /= d;
      }
      // Sums of (x - mu)^2, g (x - mu) and g.
      float ss = 0.0f, c = 0.0f, gs = 0.0f;
#pragma omp simd reduction(+ : ss, c, gs)
      for (int64_t j = 0; j < d; ++j) {
        const float xc = xi[j] - mu, g = dyi[j] * pw[j];
        ss += xc * xc;
        c += g * xc;
        gs += g;
      }
      // dx = r g - r mean(g) - (x - mu) r^3 mean(g (x - mu)).
      const float r = 1.0f / std::sqrt(ss / d + eps), k = r * r * r * (c / d);
      const float shift = kCenter ? r * (gs / d) : 0.0f;
      float* dxi = pdx + i * d;
#pragma omp simd
      for (int64_t j = 0; j < d; ++j) {
        const float xc = xi[j] - mu;
        dxi[j] = r * dyi[j] * pw[j] - shift - k * xc;
        dwp[j] += dyi[j] * xc * r;
        if constexpr (kCenter) dbp[j] += dyi[j];
      }
    }
  });
  for (int64_t j = 0; j < d; ++j) {
    float acc = 0.0f, acc_b = 0.0f;
    for (int64_t p = 0; p < parts; ++p) {
      acc += partial[p * stride + j];
      if constexpr (kCenter) acc_b += partial[p * stride + d + j];
    }
    pdw[j] = acc;
    if constexpr (kCenter) pdb[j] = acc_b;
  }
}

ffi::Error RmsNormBwd(ffi::ThreadPool pool, Matrix x, Vector w, Matrix dy,
                      ffi::Result<Matrix> dx, ffi::Result<Vector> dw, float eps) {
  const int64_t n = x.dimensions()[0], d = x.dimensions()[1];
  if (w.dimensions()[0] != d) return ffi::Error::InvalidArgument("rms_norm: scale size differs");
  NormBwd<false>(pool, n, d, x.typed_data(), w.typed_data(), dy.typed_data(), dx->typed_data(),
                 dw->typed_data(), nullptr, eps);
  return ffi::Error::Success();
}

ffi::Error LayerNormBwd(ffi::ThreadPool pool, Matrix x, Vector w, Matrix dy,
                        ffi::Result<Matrix> dx, ffi::Result<Vector> dw, ffi::Result<Vector> db,
                        float eps) {
  const int64_t n = x.dimensions()[0], d = x.dimensions()[1];
  if (w.dimensions()[0] != d) return ffi::Error::InvalidArgument("layer_norm: scale size differs");
  NormBwd<true>(pool, n, d, x.typed_data(), w.typed_data(), dy.typed_data(), dx->typed_data(),
                dw->typed_data(), db->typed_data(), eps);
  return ffi::Error::Success();
}

}  // namespace

// The attention handlers' signatures; the saved tensor is the log-sum-exp (B, H, L) or the
// packed probabilities (B, H, PackedProbs).
static auto AttentionFwdBinding() {
  return ffi::Ffi::Bind()
      .Ctx<ffi::ThreadPool>()
      .Arg<Rank4>()  // q
      .Arg<Rank4>()  // k
      .Arg<Rank4>()  // v
      .Ret<Rank4>()  // o
      .Ret<Rank3>()  // saved: lse or probs
      .Attr<float>("scale")
      .Attr<int64_t>("block");
}

static auto AttentionBwdBinding() {
  return ffi::Ffi::Bind()
      .Ctx<ffi::ThreadPool>()
      .Arg<Rank4>()  // q
      .Arg<Rank4>()  // k
      .Arg<Rank4>()  // v
      .Arg<Rank4>()  // o
      .Arg<Rank3>()  // saved: lse or probs
      .Arg<Rank4>()  // do
      .Ret<Rank4>()  // dq
      .Ret<Rank4>()  // dk
      .Ret<Rank4>()  // dv
      .Attr<float>("scale")
      .Attr<int64_t>("block");
}

XLA_FFI_DEFINE_HANDLER_SYMBOL(LadderAttentionFwd, AttentionFwd, AttentionFwdBinding());
XLA_FFI_DEFINE_HANDLER_SYMBOL(LadderAttentionFwdProbs, AttentionFwdProbs, AttentionFwdBinding());
XLA_FFI_DEFINE_HANDLER_SYMBOL(LadderAttentionBwd, AttentionBwd, AttentionBwdBinding());
XLA_FFI_DEFINE_HANDLER_SYMBOL(LadderAttentionBwdProbs, AttentionBwdProbs, AttentionBwdBinding());

// The norms' backward signatures share x (N, D), w (D), dy (N, D) -> dx, dw; LayerNorm's
// returns db as well.
static auto NormBwdBinding() {
  return ffi::Ffi::Bind()
      .Ctx<ffi::ThreadPool>()
      .Arg<Matrix>()   // x
      .Arg<Vector>()   // w
      .Arg<Matrix>()   // dy
      .Ret<Matrix>()   // dx
      .Ret<Vector>();  // dw
}

XLA_FFI_DEFINE_HANDLER_SYMBOL(LadderRmsNormBwd, RmsNormBwd, NormBwdBinding().Attr<float>("eps"));
XLA_FFI_DEFINE_HANDLER_SYMBOL(LadderLayerNormBwd, LayerNormBwd,
                              NormBwdBinding().Ret<Vector>().Attr<float>("eps"));  // + db

XLA_FFI_DEFINE_HANDLER_SYMBOL(LadderMatmulGroupFwd, MatmulGroupFwd,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<Matrix>()     // x (N, D)
                                  .RemainingArgs()   // w_0 .. w_{g-1}
                                  .RemainingRets());  // y_0 .. y_{g-1}

XLA_FFI_DEFINE_HANDLER_SYMBOL(LadderMatmulGroupBwd, MatmulGroupBwd,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<Matrix>()     // x (N, D)
                                  .RemainingArgs()   // w_0 .. w_{g-1}, dy_0 .. dy_{g-1}
                                  .Ret<Matrix>()     // dx
                                  .RemainingRets());  // dw_0 .. dw_{g-1}

// ------------------------------------------------------------ keep awake
//
// A VM's idle vCPU halts, and a halted vCPU may lose its physical core to
// another guest: when the host is busy, waking it again is slow. XLA's pool
// threads sleep whenever they run out of work, many times per step (PyTorch's
// OpenMP threads spin instead). So
// while a run trains, one spinner per core takes up idle time at SCHED_IDLE
// priority, which any other thread preempts at once: the vCPU then never goes
// idle, and a woken pool thread finds its core running (docs/performance-log.md,
// item 42). Spinners are started on first use and park on a condition
// variable while off.

namespace {

struct Spinners {
  std::mutex mu;
  std::condition_variable cv;
  std::atomic<bool> on{false};
  int started = 0, idle = 0, failed = 0;  // threads; of them at SCHED_IDLE; refused it
};

Spinners* TheSpinners() {
  static Spinners* s = new Spinners;  // never destroyed: its threads run until the process exits
  return s;
}

void Spin(Spinners* s) {
  sched_param param{};
  bool ok = sched_setscheduler(0, SCHED_IDLE, &param) == 0;  // 0: this thread
  {
    std::lock_guard<std::mutex> lock(s->mu);
    ++(ok ? s->idle : s->failed);
  }
  s->cv.notify_all();
  if (!ok) return;  // a spinner at normal priority would take cores from the work
  for (;;) {
    {
      std::unique_lock<std::mutex> lock(s->mu);
      s->cv.wait(lock, [s] { return s->on.load(); });
    }
    while (s->on.load(std::memory_order_relaxed)) _mm_pause();
  }
}

}  // namespace

// Turns the spinners on (threads > 0: at least that many, started as needed) or off (0).
// Returns how many spin at idle priority; fewer than asked if the system refused SCHED_IDLE.
extern "C" int LadderKeepAwake(int threads) {
  Spinners* s = TheSpinners();
  std::unique_lock<std::mutex> lock(s->mu);
  s->on.store(threads > 0);
  for (; s->started < threads; ++s->started) std::thread(Spin, s).detach();
  s->cv.notify_all();
  s->cv.wait(lock, [s] { return s->idle + s->failed == s->started; });
  return s->idle;
}
