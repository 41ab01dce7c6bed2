// CPU kernels for the train step, called from XLA through its FFI (research/cpu_kernels.py).
//
// Why: on a 2-core x86 machine, MKL's single-precision GEMM runs the step's
// matmul shapes 8-25% faster than XLA:CPU's own dot kernels, and XLA has no
// fused attention on CPU: its batched (B*H, L, K) dots ran at a third of the
// 2-D matmul rate (experiments/perf.md). Everything here is fp32.
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
#include <limits>
#include <memory>
#include <mutex>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

// Ranked buffer types (aliases: the FFI binding macros cannot take a comma in a template).
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

// c = op(a) @ op(b) for 2-D a, b; the rows of c are split across threads.
ffi::Error Matmul(ffi::ThreadPool pool, Matrix a, Matrix b,
                  ffi::Result<Matrix> c, bool trans_a, bool trans_b) {
  auto da = a.dimensions(), db = b.dimensions();
  int64_t m = trans_a ? da[1] : da[0], k = trans_a ? da[0] : da[1];
  int64_t n = trans_b ? db[0] : db[1];
  if ((trans_b ? db[1] : db[0]) != k) return ffi::Error::InvalidArgument("matmul: inner dims differ");
  const float* pa = a.typed_data();
  const float* pb = b.typed_data();
  float* pc = c->typed_data();
  // Row blocks of at least 64 keep each GEMM large enough for MKL's kernels.
  int64_t parts = std::max<int64_t>(1, std::min<int64_t>(pool.num_threads(), m / 64));
  int64_t rows = (m + parts - 1) / parts;
  ParallelFor(pool, parts, [=](int64_t p) {
    int64_t r0 = p * rows, r1 = std::min(m, r0 + rows);
    if (r0 >= r1) return;
    // Row r of op(a) is row r of a, or column r of a when transposed.
    const float* a0 = trans_a ? pa + r0 : pa + r0 * da[1];
    Sgemm(trans_a, trans_b, r1 - r0, n, k, 1.0f, a0, da[1], pb, db[1], 0.0f, pc + r0 * n, n);
  });
  return ffi::Error::Success();
}

// ------------------------------------------------------------- attention
//
// Exact causal softmax attention, one (batch, head) pair per part, in query
// blocks of `block` rows: block i multiplies only keys 0 .. end of block i, so
// the upper triangle is never computed. The forward saves the log-sum-exp of
// each query row; the backward recomputes the probabilities from it (as
// FlashAttention does) instead of storing the (L, L) matrix.

struct Dims {
  int64_t B, L, H, K;
  int64_t ld() const { return H * K; }                                  // row stride of q, k, v, o
  int64_t offset(int64_t bh) const { return (bh / H) * L * H * K + (bh % H) * K; }
};

Dims DimsOf(const Rank4& x) {
  auto d = x.dimensions();
  return Dims{d[0], d[1], d[2], d[3]};
}

// Scores of query rows [r0, r1) against keys [0, r1): s = scale * q k^T, masked to -inf above
// the diagonal. s has row stride r1.
void CausalScores(const Dims& d, const float* q, const float* k, float scale, int64_t r0,
                  int64_t r1, float* s) {
  Sgemm(false, true, r1 - r0, r1, d.K, scale, q + r0 * d.ld(), d.ld(), k, d.ld(), 0.0f, s, r1);
  for (int64_t r = r0; r < r1; ++r) {
    float* row = s + (r - r0) * r1;
    std::fill(row + r + 1, row + r1, -std::numeric_limits<float>::infinity());
  }
}

ffi::Error AttentionFwd(ffi::ThreadPool pool, Rank4 q, Rank4 k,
                        Rank4 v, ffi::Result<Rank4> o,
                        ffi::Result<Rank3> lse, float scale, int64_t block) {
  const Dims d = DimsOf(q);
  const float *pq = q.typed_data(), *pk = k.typed_data(), *pv = v.typed_data();
  float *po = o->typed_data(), *plse = lse->typed_data();
  ParallelFor(pool, d.B * d.H, [=](int64_t bh) {
    const int64_t off = d.offset(bh);
    const float *qh = pq + off, *kh = pk + off, *vh = pv + off;
    float* oh = po + off;
    float* lse_h = plse + bh * d.L;  // (B, H, L)
    std::vector<float> s(block * d.L);
    for (int64_t r0 = 0; r0 < d.L; r0 += block) {
      const int64_t r1 = std::min(d.L, r0 + block);
      CausalScores(d, qh, kh, scale, r0, r1, s.data());
      // Softmax of each row over keys 0..r, in place: subtract the row max, one exp over the
      // whole block (masked entries are -inf and become 0), normalise.
      for (int64_t r = r0; r < r1; ++r) {
        float* row = s.data() + (r - r0) * r1;
        float mx = row[0];
#pragma omp simd reduction(max : mx)
        for (int64_t j = 0; j <= r; ++j) mx = std::max(mx, row[j]);
#pragma omp simd
        for (int64_t j = 0; j < r1; ++j) row[j] -= mx;
        lse_h[r] = mx;
      }
      Exp((r1 - r0) * r1, s.data());
      for (int64_t r = r0; r < r1; ++r) {
        float* row = s.data() + (r - r0) * r1;
        float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
        for (int64_t j = 0; j <= r; ++j) sum += row[j];
        const float inv = 1.0f / sum;
#pragma omp simd
        for (int64_t j = 0; j <= r; ++j) row[j] *= inv;
        lse_h[r] += std::log(sum);
      }
      Sgemm(false, false, r1 - r0, d.K, r1, 1.0f, s.data(), r1, vh, d.ld(), 0.0f,
            oh + r0 * d.ld(), d.ld());
    }
  });
  return ffi::Error::Success();
}

ffi::Error AttentionBwd(ffi::ThreadPool pool, Rank4 q, Rank4 k,
                        Rank4 v, Rank4 o,
                        Rank3 lse, Rank4 d_o,
                        ffi::Result<Rank4> dq, ffi::Result<Rank4> dk,
                        ffi::Result<Rank4> dv, float scale, int64_t block) {
  const Dims d = DimsOf(q);
  const float *pq = q.typed_data(), *pk = k.typed_data(), *pv = v.typed_data();
  const float *po = o.typed_data(), *plse = lse.typed_data(), *pdo = d_o.typed_data();
  float *pdq = dq->typed_data(), *pdk = dk->typed_data(), *pdv = dv->typed_data();
  ParallelFor(pool, d.B * d.H, [=](int64_t bh) {
    const int64_t off = d.offset(bh), ld = d.ld();
    const float *qh = pq + off, *kh = pk + off, *vh = pv + off, *oh = po + off, *doh = pdo + off;
    const float* lse_h = plse + bh * d.L;
    float *dqh = pdq + off, *dkh = pdk + off, *dvh = pdv + off;
    std::vector<float> p(block * d.L), dp(block * d.L), delta(d.L);
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
      CausalScores(d, qh, kh, scale, r0, r1, p.data());
      for (int64_t r = r0; r < r1; ++r) {  // p = exp(s - lse): the forward's probabilities
        float* row = p.data() + (r - r0) * r1;
        const float lse_r = lse_h[r];
#pragma omp simd
        for (int64_t j = 0; j < r1; ++j) row[j] -= lse_r;
      }
      Exp(rows * r1, p.data());
      // dv[0:r1] += p^T do;  dp = do v[0:r1]^T
      Sgemm(true, false, r1, d.K, rows, 1.0f, p.data(), r1, doh + r0 * ld, ld, 1.0f, dvh, ld);
      Sgemm(false, true, rows, r1, d.K, 1.0f, doh + r0 * ld, ld, vh, ld, 0.0f, dp.data(), r1);
      for (int64_t r = r0; r < r1; ++r) {  // ds = p * (dp - delta), into dp
        float* row = dp.data() + (r - r0) * r1;
        const float* prow = p.data() + (r - r0) * r1;
#pragma omp simd
        for (int64_t j = 0; j < r1; ++j) row[j] = prow[j] * (row[j] - delta[r]);
      }
      // dq[r0:r1] = scale ds k[0:r1];  dk[0:r1] += scale ds^T q[r0:r1]
      Sgemm(false, false, rows, d.K, r1, scale, dp.data(), r1, kh, ld, 0.0f, dqh + r0 * ld, ld);
      Sgemm(true, false, r1, d.K, rows, scale, dp.data(), r1, qh + r0 * ld, ld, 1.0f, dkh, ld);
    }
  });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(LadderMatmul, Matmul,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<Matrix>()
                                  .Arg<Matrix>()
                                  .Ret<Matrix>()
                                  .Attr<bool>("trans_a")
                                  .Attr<bool>("trans_b"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(LadderAttentionFwd, AttentionFwd,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<Rank4>()
                                  .Arg<Rank4>()
                                  .Arg<Rank4>()
                                  .Ret<Rank4>()
                                  .Ret<Rank3>()
                                  .Attr<float>("scale")
                                  .Attr<int64_t>("block"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(LadderAttentionBwd, AttentionBwd,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<Rank4>()
                                  .Arg<Rank4>()
                                  .Arg<Rank4>()
                                  .Arg<Rank4>()
                                  .Arg<Rank3>()
                                  .Arg<Rank4>()
                                  .Ret<Rank4>()
                                  .Ret<Rank4>()
                                  .Ret<Rank4>()
                                  .Attr<float>("scale")
                                  .Attr<int64_t>("block"));
