"""The CPU plugin's MKL kernels (ladder_cpu/kernels.py) compute what XLA computes, gradients
included, to within fp32 rounding; its keep-awake spinners (ladder_cpu/awake.py) spin inside
their block only.

Tolerances follow from fp32 error bounds, not from trial: an fp32 dot product of length
K is off by at most gamma_K * sum_i |x_i y_i| (gamma_K = K u / (1 - K u), u = 2^-24;
Higham, Accuracy and Stability of Numerical Algorithms, 2002, sec. 3.1), in any order of
summation, with or without FMA. MKL and XLA each obey the bound, so they differ by at most
twice it, elementwise. Attention and the norms chain a few such sums with exp, sqrt and
divisions; their bounds (below) propagate the same per-operation errors to first order.
Worst-case bounds sit far above the errors rounding makes in practice, so the matmul,
attention and norm tests also check that theirs still reject a kernel that rounded its
inputs to bfloat16 (a relative error of 2^-9): each test can fail.
"""

import os
import platform
import shutil
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ladder_cpu import awake, kernels
from research import kernels as registry
from research import plugins
from tests.bounds import U, assert_bound_catches, assert_close_to_bound, gamma

X86_LINUX = sys.platform == "linux" and platform.machine() == "x86_64"
UNAVAILABLE = kernels.unavailable()
needs_kernels = pytest.mark.skipif(UNAVAILABLE is not None, reason=f"MKL kernels: {UNAVAILABLE}")


def _bf16(a):
    """`a` rounded to bfloat16 and back: what a kernel computing in bf16 would see."""
    return a.astype(jnp.bfloat16).astype(jnp.float32)


def _abs64(a) -> np.ndarray:
    return np.abs(np.asarray(a, np.float64))


def _matmul_bound(k: int, a_abs, b_abs) -> np.ndarray:
    """Bound on two fp32 evaluations of a @ b (inner dim k) differing: 2 gamma_k (|a| @ |b|)."""
    return 2 * gamma(k) * (a_abs @ b_abs)


def _normal(seed, shape):
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape, np.float32))


@pytest.fixture(scope="module", autouse=True)
def _plugin():
    plugins.load("cpu")  # registers the mkl kernels (attention is reached through the registry)


@pytest.mark.skipif(not X86_LINUX or kernels._mkl_dir() is None
                    or not (os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++")),
                    reason="needs x86-64 Linux, MKL (the cpu extra) and a C++ compiler")
def test_kernels_build_where_mkl_and_a_compiler_are_installed():
    # Where this holds, every kernel test below runs: a build error must not turn into skips.
    assert kernels.unavailable() is None


@pytest.mark.skipif(not X86_LINUX, reason="the MKL check comes after the platform check")
def test_without_mkl_they_say_why(monkeypatch):
    monkeypatch.setattr(kernels, "_mkl_dir", lambda: None)
    assert "MKL not found" in kernels.unavailable.__wrapped__()


# (N, D) @ (D, F): rows not a multiple of the 64-row split, and a tiny one.
@needs_kernels
@pytest.mark.parametrize("n, d, f", [(300, 48, 33), (5, 7, 3)])
def test_matmul_and_its_gradients_match_xla(n, d, f):
    x, w, dy = _normal(0, (n, d)), _normal(1, (d, f)), _normal(2, (n, f))

    def loss(mm, x, w):  # its cotangent of mm(x, w) is dy, exactly
        return (mm(x, w) * dy).sum()

    mkl = jax.jit(jax.grad(lambda x, w: loss(kernels.matmul, x, w), argnums=(0, 1)))
    ref = jax.jit(jax.grad(lambda x, w: loss(jnp.matmul, x, w), argnums=(0, 1)))
    y, y_ref = jax.jit(kernels.matmul)(x, w), x @ w
    bound = _matmul_bound(d, _abs64(x), _abs64(w))
    assert_close_to_bound(y, y_ref, bound)
    assert_bound_catches(_bf16(x) @ _bf16(w), y_ref, bound)
    (dx, dw), (dx_ref, dw_ref) = mkl(x, w), ref(x, w)
    assert_close_to_bound(dx, dx_ref, _matmul_bound(f, _abs64(dy), _abs64(w).T))  # dy @ w^T
    assert_close_to_bound(dw, dw_ref, _matmul_bound(n, _abs64(x).T, _abs64(dy)))  # x^T @ dy


# A group of three widths. The weight gradients split the tokens across threads where there
# are more tokens than D (300 > 48), else dw's rows (100 < 200); x's gradient sums the group.
@needs_kernels
@pytest.mark.parametrize("n, d", [(300, 48), (100, 200)])
def test_matmul_group_and_its_gradients_match_xla(n, d):
    fs = (33, d, 5)
    x = _normal(0, (n, d))
    ws = tuple(_normal(1 + i, (d, f)) for i, f in enumerate(fs))
    dys = tuple(_normal(4 + i, (n, f)) for i, f in enumerate(fs))

    def loss(group, x, ws):
        return sum((y * dy).sum() for y, dy in zip(group(x, ws), dys))

    def xla_group(x, ws):
        return tuple(x @ w for w in ws)

    mkl = jax.jit(jax.grad(lambda x, ws: loss(kernels.matmul_group, x, ws), argnums=(0, 1)))
    ref = jax.jit(jax.grad(lambda x, ws: loss(xla_group, x, ws), argnums=(0, 1)))
    for w, y, y_ref in zip(ws, jax.jit(kernels.matmul_group)(x, ws), xla_group(x, ws)):
        assert_close_to_bound(y, y_ref, _matmul_bound(d, _abs64(x), _abs64(w)))
    (dx, dws), (dx_ref, dws_ref) = mkl(x, ws), ref(x, ws)
    # dx = sum_i dy_i @ w_i^T: one sum of sum(fs) products, plus the additions of the group's
    # partial sums (len(fs) - 1 more roundings), in whatever order either side takes.
    dx_abs = sum(_abs64(dy) @ _abs64(w).T for dy, w in zip(dys, ws))
    assert_close_to_bound(dx, dx_ref, 2 * gamma(sum(fs) + len(fs) - 1) * dx_abs)
    for dw, dw_ref, dy in zip(dws, dws_ref, dys):  # x^T @ dy_i: inner dim n
        assert_close_to_bound(dw, dw_ref, _matmul_bound(n, _abs64(x).T, _abs64(dy)))


def _attention_bounds(q, k, v, do, scale: float) -> tuple[np.ndarray, ...]:
    """Bounds on two fp32 evaluations of causal attention differing: o and its dq, dk, dv
    for the cotangent `do`, each (B, L, H, K). First-order propagation, per query row i:

    - scores s = scale q.k: off by at most delta_i = gamma_{K+1} scale max_j |q_i|.|k_j|;
    - softmax: log p is 2-Lipschitz in the scores (max norm), and evaluating it rounds the
      argument of exp (|s - max| or |s - lse| <= 2 sigma_i, sigma_i = max_j |s_ij| + log L,
      a few roundings: 4 u sigma_i), exp itself (<= 2 ulps in MKL's VML and XLA: 4u), the
      row sum (gamma_L, also in a log-sum-exp) and the division: each p_ij is within a
      relative eps_i = 2 delta_i + 4 u sigma_i + 2 gamma_L + 16 u of the exact one;
    - o = p @ v, and the backward's sums (dp = do v^T, D = do.o or sum_j p dp, ds = p (dp - D),
      dq = scale ds k, dk = scale ds^T q, dv = p^T do) each add gamma_n of their sums of
      |terms|, plus what their inputs carry. The kernel sums dq, dk, dv over query blocks
      of 64, scaling and adding each block's partial sum: gamma of L + 2 (blocks) + 1.
    """
    q, k, v, do = (np.asarray(a, np.float64).transpose(0, 2, 1, 3) for a in (q, k, v, do))  # BxHxLxK
    L, K = q.shape[2:]
    causal = np.tril(np.ones((L, L), bool))
    kt, vt = k.swapaxes(-1, -2), v.swapaxes(-1, -2)
    s = np.where(causal, scale * q @ kt, -np.inf)
    p = np.exp(s - s.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    delta = gamma(K + 1) * scale * np.where(causal, np.abs(q) @ np.abs(kt), 0).max(-1)
    sigma = np.where(causal, np.abs(s), 0).max(-1) + np.log(L)
    eps = (2 * delta + 4 * U * sigma + 2 * gamma(L) + 16 * U)[..., None]  # BxHxLx1
    n_sum = L + 2 * -(-L // kernels.ATTENTION_BLOCK) + 1
    o = p @ v
    e_o = (eps + gamma(L)) * (p @ np.abs(v))
    dp, e_dp = do @ vt, gamma(K) * (np.abs(do) @ np.abs(vt))
    D = (do * o).sum(-1, keepdims=True)
    e_D = (gamma(K) * (np.abs(do) * np.abs(o)).sum(-1, keepdims=True)  # do.o, o as computed
           + (np.abs(do) * e_o).sum(-1, keepdims=True)
           + (gamma(L) + eps) * (p * np.abs(dp)).sum(-1, keepdims=True)  # or sum_j p dp
           + (p * e_dp).sum(-1, keepdims=True))
    ds = p * (dp - D)
    e_ds = p * (eps * np.abs(dp - D) + e_dp + e_D + 2 * U * (np.abs(dp) + np.abs(D)))
    e_dq = scale * (gamma(n_sum) * np.abs(ds) + e_ds) @ np.abs(k)
    e_dk = scale * (gamma(n_sum) * np.abs(ds) + e_ds).swapaxes(-1, -2) @ np.abs(q)
    e_dv = p.swapaxes(-1, -2) @ ((gamma(n_sum) + eps) * np.abs(do))
    return tuple(2 * e.transpose(0, 2, 1, 3) for e in (e_o, e_dq, e_dk, e_dv))


# L = 100 ends in a partial query block (kernels.ATTENTION_BLOCK = 64); scale 1/K is muP's.
# Both backward paths: probabilities saved by the forward, or recomputed from the log-sum-exp.
@needs_kernels
@pytest.mark.parametrize("saved", [True, False], ids=["probs", "lse"])
@pytest.mark.parametrize("L, scale", [(100, None), (128, 1 / 16), (1, None)])
def test_attention_and_its_gradients_match_xla(L, scale, saved, monkeypatch):
    monkeypatch.setattr(kernels, "saves_probs", lambda L, K: saved)
    B, H, K = 2, 3, 16
    q, k, v, do = (_normal(i, (B, L, H, K)) * 2 for i in range(4))

    def results(name):  # the kernels as the model calls them: through the registry
        fn = registry.attention(name)
        out = jax.jit(lambda q, k, v: fn(q, k, v, scale=scale))(q, k, v)
        grads = jax.jit(jax.grad(lambda q, k, v: (fn(q, k, v, scale=scale) * do).sum(),
                                 argnums=(0, 1, 2)))(q, k, v)
        return (out, *grads)

    bounds = _attention_bounds(q, k, v, do, K**-0.5 if scale is None else scale)
    ref = results("xla")
    for got, want, bound in zip(results("mkl"), ref, bounds):
        assert_close_to_bound(got, want, bound)
    if L > 1:  # one key: o = v whatever the scores, exactly
        wrong = registry.attention("xla")(_bf16(q), _bf16(k), _bf16(v), scale=scale)
        assert_bound_catches(wrong, ref[0], bounds[0])


@needs_kernels
@pytest.mark.parametrize("groups", [1, 2])
def test_grouped_query_attention_matches_xla(groups):
    """With G < H key/value heads (model.n_kv_heads) the plugin repeats k and v to H heads
    for its kernel; XLA reads the groups directly. The same values and gradients: the
    bounds are those of H-head attention on the repeated k and v, and the k, v gradients
    add the R = H / G heads that share them (R more terms, each within its own bound)."""
    B, L, H, K = 2, 100, 4, 16
    R = H // groups
    q, do = (_normal(i, (B, L, H, K)) * 2 for i in (0, 3))
    k, v = (_normal(i, (B, L, groups, K)) * 2 for i in (1, 2))

    def results(name):
        fn = registry.attention(name)
        out = jax.jit(lambda q, k, v: fn(q, k, v))(q, k, v)
        grads = jax.jit(jax.grad(lambda q, k, v: (fn(q, k, v) * do).sum(), argnums=(0, 1, 2)))(q, k, v)
        return (out, *grads)

    rep = lambda x: jnp.repeat(x, R, axis=2)  # noqa: E731
    o_b, dq_b, dk_b, dv_b = _attention_bounds(q, rep(k), rep(v), do, K**-0.5)
    _, dk_rep, dv_rep = (_abs64(g) for g in jax.grad(
        lambda q, k, v: (registry.attention("xla")(q, k, v) * do).sum(), argnums=(0, 1, 2))(q, rep(k), rep(v)))

    def grouped(bound, terms):  # sum of the R heads' bounds, plus the R-term sum's rounding
        shape = (B, L, groups, R, K)
        return bound.reshape(shape).sum(3) + 2 * gamma(R) * terms.reshape(shape).sum(3)

    bounds = (o_b, dq_b, grouped(dk_b, dk_rep), grouped(dv_b, dv_rep))
    ref = results("xla")
    for got, want, bound in zip(results("mkl"), ref, bounds):
        assert_close_to_bound(got, want, bound)
    if groups > 1:  # query head h on the wrong group is caught
        wrong = registry.attention("xla")(q, k[:, :, ::-1], v[:, :, ::-1])
        assert_bound_catches(wrong, ref[0], o_b)


def _norm_bounds(x, w, dy, eps: float, center: bool) -> tuple[np.ndarray, ...]:
    """Bounds on two fp32 evaluations of RMSNorm (LayerNorm: `center`) differing: y and the
    gradients dx, dw, db for the cotangent `dy`. First-order propagation, per row n:
    mu = mean(x) (LayerNorm) is off by e = gamma_{D+1} mean|x|; x - mu by e + u|x - mu|;
    ms = mean((x - mu)^2) by gamma_{D+4} ms + 2 mean|x - mu| e; r = 1 / sqrt(ms + eps) by a
    relative rho = ms's error / (2 (ms + eps)) + 8u (the add, sqrt and divide, or XLA's
    rsqrt, within 4 ulps). Then xhat = (x - mu) r, y = xhat w (+ b), and the backward
    dx = r (g - mean g - xhat mean(g xhat)) with g = dy w, dw = sum_n dy xhat, db = sum_n dy,
    each a few roundings (products, differences) on top of gamma_n of its sums' |terms|."""
    x, w, dy = (np.asarray(a, np.float64) for a in (x, w, dy))
    N, D = x.shape
    mean = lambda a: a.mean(-1, keepdims=True)  # noqa: E731
    xc = x - mean(x) if center else x
    e_mu = gamma(D + 1) * mean(np.abs(x)) if center else 0.0
    ms = mean(xc * xc)
    r = 1 / np.sqrt(ms + eps)
    rho = (gamma(D + 4) * ms + 2 * mean(np.abs(xc)) * e_mu) / (2 * (ms + eps)) + 8 * U
    xh, g = xc * r, dy * w
    e_xh = r * e_mu + (rho + 2 * U) * np.abs(xh)
    e_y = np.abs(w) * e_xh + 2 * U * np.abs(xh * w) + (U * np.abs(xh * w) if center else 0)
    c1 = mean(g) if center else 0.0
    c2 = mean(g * xh)
    e_c1 = gamma(D + 2) * mean(np.abs(g)) if center else 0.0
    e_c2 = gamma(D + 3) * mean(np.abs(g * xh)) + mean(np.abs(g) * e_xh)
    terms = r * (np.abs(g) + np.abs(c1) + np.abs(xh * c2))
    e_dx = (rho + 6 * U) * terms + r * (e_c1 + e_xh * np.abs(c2) + np.abs(xh) * e_c2)
    # Sums over rows, which the kernel splits across threads and adds at the end.
    e_dw = gamma(N + 2) * np.abs(dy * xh).sum(0) + (np.abs(dy) * e_xh).sum(0)
    e_db = gamma(N) * np.abs(dy).sum(0)
    return 2 * e_y, 2 * e_dx, 2 * e_dw, 2 * e_db


# Rows not a multiple of the 64-row split, and fewer rows than one part. The rows have a
# mean far from 0 (+2), which LayerNorm's backward must remove.
@needs_kernels
@pytest.mark.parametrize("n, d", [(300, 48), (5, 7)])
@pytest.mark.parametrize("kind", ["rmsnorm", "layernorm"])
def test_norms_and_their_gradients_match_xla(kind, n, d):
    x, dy = _normal(0, (n, d)) * 3 + 2, _normal(1, (n, d))
    w, b = 1 + 0.1 * _normal(2, (d,)), 0.1 * _normal(3, (d,))
    center = kind == "layernorm"

    def ref(x, w, b):  # written out here, not taken from ladder_cpu or model
        if center:
            x = x - x.mean(-1, keepdims=True)
        y = x * jax.lax.rsqrt((x * x).mean(-1, keepdims=True) + 1e-6) * w
        return y + b if center else y

    def kernel(x, w, b):
        return kernels.layer_norm(x, w, b, 1e-6) if center else kernels.rms_norm(x, w, 1e-6)

    def loss(norm, x, w, b):
        return (norm(x, w, b) * dy).sum()

    e_y, e_dx, e_dw, e_db = _norm_bounds(x, w, dy, 1e-6, center)
    y_ref = ref(x, w, b)
    assert_close_to_bound(jax.jit(kernel)(x, w, b), y_ref, e_y)
    assert_bound_catches(ref(_bf16(x), w, b), y_ref, e_y)
    mkl = jax.jit(jax.grad(lambda x, w, b: loss(kernel, x, w, b), argnums=(0, 1, 2)))
    xla = jax.jit(jax.grad(lambda x, w, b: loss(ref, x, w, b), argnums=(0, 1, 2)))
    (dx, dw, db), (dx_ref, dw_ref, db_ref) = mkl(x, w, b), xla(x, w, b)
    assert_close_to_bound(dx, dx_ref, e_dx)
    assert_close_to_bound(dw, dw_ref, e_dw)
    if center:
        assert_close_to_bound(db, db_ref, e_db)
    else:  # b is not an input of RMSNorm: both gradients are zero
        assert not np.any(db) and not np.any(db_ref)


def test_probabilities_are_saved_only_where_they_cost_no_more_than_q_k_v_o():
    # The reference shapes (L 256, K 64) save them; longer sequences recompute.
    assert kernels.packed_probs(256) == 64 * (64 + 128 + 192 + 256)
    assert kernels.packed_probs(100) == 64 * 64 + 36 * 100
    assert kernels.saves_probs(256, 64) and not kernels.saves_probs(1024, 64)


def _idle_threads() -> dict[int, tuple[str, int]]:
    """This process's SCHED_IDLE threads: tid -> (state letter, CPU ticks so far)."""
    out = {}
    for tid in map(int, os.listdir("/proc/self/task")):
        try:
            if os.sched_getscheduler(tid) != os.SCHED_IDLE:
                continue
            with open(f"/proc/self/task/{tid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except (FileNotFoundError, ProcessLookupError):  # a thread that just exited
            continue
        out[tid] = (fields[0], int(fields[11]) + int(fields[12]))  # state; utime + stime
    return out


def _states_settle(want: str, seconds: float = 2.0) -> dict[int, tuple[str, int]]:
    """_idle_threads() once all are in state `want` (or after `seconds`: the caller checks)."""
    deadline = time.monotonic() + seconds
    threads = _idle_threads()
    while {state for state, _ in threads.values()} != {want} and time.monotonic() < deadline:
        time.sleep(0.01)
        threads = _idle_threads()
    return threads


@needs_kernels
def test_keep_awake_spins_one_idle_priority_thread_per_core_inside_the_block_only():
    cores = len(os.sched_getaffinity(0))
    with awake.keep_awake():
        with awake.keep_awake():  # nested: the same spinners
            assert len(_idle_threads()) == cores
        # The inner block's end leaves them on: runnable (R), always, whether or not the
        # cores have idle time to give them (under the parallel test run they may get none).
        spinning = _states_settle("R")
        assert len(spinning) == cores and {s for s, _ in spinning.values()} == {"R"}, spinning
    # Off: parked (S), taking no time; none started anew on the next use.
    parked = _states_settle("S")
    assert len(parked) == cores and {s for s, _ in parked.values()} == {"S"}, parked
    time.sleep(0.3)
    assert sum(ticks for _, ticks in _idle_threads().values()) - sum(t for _, t in parked.values()) <= 1
    with awake.keep_awake():
        assert _idle_threads().keys() == parked.keys()
        assert {s for s, _ in _states_settle("R").values()} == {"R"}


@needs_kernels
def test_the_loop_hook_spins_from_start_to_end():
    hook = awake.KeepAwakeHook(required=True)
    hook.start(0)
    try:
        assert {s for s, _ in _states_settle("R").values()} == {"R"}
    finally:
        hook.end()
    assert {s for s, _ in _states_settle("S").values()} == {"S"}


def test_keep_awake_where_the_kernels_cannot_load(monkeypatch):
    # on (required): an error that says why; auto: the block runs without spinners.
    monkeypatch.setattr(kernels, "unavailable", lambda: "MKL not found (...)")
    with pytest.raises(RuntimeError, match="keep_awake: MKL not found"):
        with awake.keep_awake(required=True):
            pass
    ran = []
    with awake.keep_awake(required=False):
        ran.append(True)
    assert ran == [True]
