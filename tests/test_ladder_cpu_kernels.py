"""The MKL CPU kernels (research/cpu_kernels.py) compute what XLA computes, gradients included."""

import os
import platform
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from research import attention, config, cpu_kernels
from research import sharding as shd
from research import step as steplib
from tests.conftest import compose

X86_LINUX = sys.platform == "linux" and platform.machine() == "x86_64"
pytestmark = pytest.mark.skipif(not X86_LINUX, reason="MKL kernels are built on x86-64 Linux only")


def _normal(seed, shape):
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape, np.float32))


def test_kernels_build_here():
    # `make install` puts MKL in the venv (the cpu extra): the kernels must load, not fall back.
    assert cpu_kernels.unavailable() is None


def test_without_mkl_they_say_why(monkeypatch):
    monkeypatch.setattr(cpu_kernels, "_mkl_dir", lambda: None)
    assert "MKL not found" in cpu_kernels.unavailable.__wrapped__()


# (N, D) @ (D, F): rows not a multiple of the 64-row split, and a tiny one.
@pytest.mark.parametrize("n, d, f", [(300, 48, 33), (5, 7, 3)])
def test_matmul_and_its_gradients_match_xla(n, d, f):
    x, w, dy = _normal(0, (n, d)), _normal(1, (d, f)), _normal(2, (n, f))

    def loss(mm, x, w):
        return (mm(x, w) * dy).sum()

    mkl = jax.jit(jax.value_and_grad(lambda x, w: loss(cpu_kernels.matmul, x, w), argnums=(0, 1)))
    ref = jax.jit(jax.value_and_grad(lambda x, w: loss(jnp.matmul, x, w), argnums=(0, 1)))
    (l_mkl, g_mkl), (l_ref, g_ref) = mkl(x, w), ref(x, w)
    np.testing.assert_allclose(jax.jit(cpu_kernels.matmul)(x, w), x @ w, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(l_mkl, l_ref, rtol=1e-5)
    for a, b in zip(g_mkl, g_ref):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


# A group of three widths. The weight gradients split the tokens across threads where there
# are more tokens than D (300 > 48), else dw's rows (100 < 200); x's gradient sums the group.
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

    mkl = jax.jit(jax.grad(lambda x, ws: loss(cpu_kernels.matmul_group, x, ws), argnums=(0, 1)))
    ref = jax.jit(jax.grad(lambda x, ws: loss(xla_group, x, ws), argnums=(0, 1)))
    for y, y_ref in zip(jax.jit(cpu_kernels.matmul_group)(x, ws), xla_group(x, ws)):
        np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-5)
    (dx, dws), (dx_ref, dws_ref) = mkl(x, ws), ref(x, ws)
    np.testing.assert_allclose(dx, dx_ref, rtol=1e-5, atol=1e-4)
    for a, b in zip(dws, dws_ref):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-4)


# L = 100 ends in a partial query block (cpu_kernels.ATTENTION_BLOCK = 64); scale 1/K is muP's.
# Both backward paths: probabilities saved by the forward, or recomputed from the log-sum-exp.
@pytest.mark.parametrize("saved", [True, False], ids=["probs", "lse"])
@pytest.mark.parametrize("L, scale", [(100, None), (128, 1 / 16), (1, None)])
def test_attention_and_its_gradients_match_xla(L, scale, saved, monkeypatch):
    monkeypatch.setattr(cpu_kernels, "saves_probs", lambda L, K: saved)
    B, H, K = 2, 3, 16
    q, k, v, do = (_normal(i, (B, L, H, K)) * 2 for i in range(4))

    def loss(kind, q, k, v):
        return (attention.causal_attention(kind, q, k, v, scale) * do).sum()

    outs = {}
    for kind in ("mkl", "xla"):
        out = jax.jit(lambda q, k, v: attention.causal_attention(kind, q, k, v, scale))(q, k, v)
        grads = jax.jit(jax.grad(lambda q, k, v: loss(kind, q, k, v), argnums=(0, 1, 2)))(q, k, v)
        outs[kind] = (out, *grads)
    for a, b in zip(outs["mkl"], outs["xla"]):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=2e-5)


# Rows not a multiple of the 64-row split, and fewer rows than one part. The rows have a
# mean far from 0 (+2), which LayerNorm's backward must remove.
@pytest.mark.parametrize("n, d", [(300, 48), (5, 7)])
@pytest.mark.parametrize("kind", ["rmsnorm", "layernorm"])
def test_norms_and_their_gradients_match_xla(kind, n, d):
    x, dy = _normal(0, (n, d)) * 3 + 2, _normal(1, (n, d))
    w, b = 1 + 0.1 * _normal(2, (d,)), 0.1 * _normal(3, (d,))

    def ref(x, w, b):  # written out here, not taken from cpu_kernels or model
        if kind == "layernorm":
            x = x - x.mean(-1, keepdims=True)
        y = x * jax.lax.rsqrt((x * x).mean(-1, keepdims=True) + 1e-6) * w
        return y + b if kind == "layernorm" else y

    def kernel(x, w, b):
        if kind == "layernorm":
            return cpu_kernels.layer_norm(x, w, b, 1e-6)
        return cpu_kernels.rms_norm(x, w, 1e-6)

    def loss(norm, x, w, b):
        return (norm(x, w, b) * dy).sum()

    mkl = jax.jit(jax.grad(lambda x, w, b: loss(kernel, x, w, b), argnums=(0, 1, 2)))
    xla = jax.jit(jax.grad(lambda x, w, b: loss(ref, x, w, b), argnums=(0, 1, 2)))
    np.testing.assert_allclose(jax.jit(kernel)(x, w, b), ref(x, w, b), rtol=1e-6, atol=1e-6)
    grads_mkl, grads_xla = mkl(x, w, b), xla(x, w, b)
    if kind == "rmsnorm":  # b is not an input of RMSNorm: both gradients are zero
        assert not np.any(grads_mkl[2]) and not np.any(grads_xla[2])
    for got, want in zip(grads_mkl, grads_xla):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_probabilities_are_saved_only_where_they_cost_no_more_than_q_k_v_o():
    # The reference shapes (L 256, K 64) save them; longer sequences recompute.
    assert cpu_kernels.packed_probs(256) == 64 * (64 + 128 + 192 + 256)
    assert cpu_kernels.packed_probs(100) == 64 * 64 + 36 * 100
    assert cpu_kernels.saves_probs(256, 64) and not cpu_kernels.saves_probs(1024, 64)


def test_mkl_needs_one_cpu_device():
    cfg = config.parse(compose("model.matmul=mkl"))
    mesh = shd.make_mesh((8, 1, 1), jax.devices()[:8])
    with pytest.raises(config.ConfigError, match="model.matmul: mkl: needs a one-device CPU mesh"):
        steplib.check_kernels(cfg, mesh)
    steplib.check_kernels(cfg, shd.make_mesh((1, 1, 1), jax.devices()[:1]))


def test_mkl_is_float32_only():
    with pytest.raises(config.ConfigError, match="model.attention: mkl kernels are float32 only"):
        config.parse(compose("model.attention=mkl", "model.dtype=bfloat16"))


def test_auto_picks_mkl_only_on_a_single_cpu_device():
    # The test process has 8 simulated devices: auto keeps XLA's kernels here.
    assert not cpu_kernels.usable(jnp.float32)
    assert attention.resolve("auto", jnp.float32, 64) == "chunked"


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


def test_keep_awake_spins_one_idle_priority_thread_per_core_inside_the_block_only():
    cores = len(os.sched_getaffinity(0))
    with cpu_kernels.keep_awake():
        with cpu_kernels.keep_awake():  # nested: the same spinners
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
    with cpu_kernels.keep_awake():
        assert _idle_threads().keys() == parked.keys()
        assert {s for s, _ in _states_settle("R").values()} == {"R"}


def test_keep_awake_choices_resolve_and_on_fails_where_it_cannot_run(monkeypatch):
    mesh = shd.make_mesh((1, 1, 1), jax.devices()[:1])
    with pytest.raises(config.ConfigError, match="train.keep_awake: unknown value 'yes'"):
        config.parse(compose("train.keep_awake=yes"))
    on, auto = (config.parse(compose(f"train.keep_awake={k}")) for k in ("on", "auto"))
    steplib.check_kernels(on, mesh)
    assert steplib.keeps_awake(on, mesh) and steplib.keeps_awake(auto, mesh)
    assert not steplib.keeps_awake(config.parse(compose("train.keep_awake=off")), mesh)
    monkeypatch.setattr(cpu_kernels, "unavailable", lambda: "MKL not found (...)")
    with pytest.raises(config.ConfigError, match="train.keep_awake: on: MKL not found"):
        steplib.check_kernels(on, mesh)
    assert not steplib.keeps_awake(auto, mesh)  # auto: trains without them
