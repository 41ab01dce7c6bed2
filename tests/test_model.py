"""The Transformer: shapes, causality, every config knob, param counts, axes metadata, and
the scan over stacked blocks (same numbers as a per-layer loop; a program that does not
grow with depth)."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from research import config
from research import sharding as shd
from research.config import ModelConfig, d_ff, d_head
from research.flops import param_counts
from research.model import build, gelu, rope_tables

V = 64  # vocab
L = 16  # sequence length (= max_len)
B = 2
SEED = 0
AXIS_NAMES = {"layers", "vocab", "embed", "heads", "kv_heads", "mlp", None}
BLOCK_MATRICES = ("wq", "wk", "wv", "wo", "w_in", "w_out")


def tiny(**overrides) -> ModelConfig:
    base = dict(d_model=32, n_layers=2, n_heads=4, mlp_ratio=4.0)
    base.update(overrides)
    return ModelConfig(**base)


def tokens(seed: int = 1, batch: int = B, length: int = L) -> jax.Array:
    return jax.random.randint(jax.random.key(seed), (batch, length), 0, V, dtype=jnp.int32)


def n_params(model) -> int:
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(model, nnx.Param)))


def loss_fn(model, toks: jax.Array) -> jax.Array:
    """Mean next-token cross-entropy."""
    logits = model(toks[:, :-1])
    logp = jax.nn.log_softmax(logits, axis=-1)
    return -jnp.take_along_axis(logp, toks[:, 1:, None], axis=-1).mean()


# ---------------------------------------------------------------- forward


@pytest.mark.parametrize(
    "cfg",
    [
        tiny(),
        tiny(norm="layernorm", pos="learned", tie_embeddings=False),
        tiny(norm="layernorm", pos="rope", tie_embeddings=True),
        tiny(norm="rmsnorm", pos="learned", tie_embeddings=False, share_layers=1),
    ],
    ids=["default", "ln-learned-untied", "ln-rope-tied", "rms-learned-untied-shared"],
)
def test_output_shape_dtype_and_finite(cfg):
    model = build(cfg, V, L, SEED)
    logits = model(tokens())
    assert logits.shape == (B, L, V)
    assert logits.dtype == jnp.float32
    assert bool(jnp.isfinite(logits).all())
    # A shorter sequence than max_len works too (learned positions are sliced).
    short = model(tokens(length=L // 2))
    assert short.shape == (B, L // 2, V)


@pytest.mark.parametrize("pos", ["rope", "learned"])
def test_causality(pos):
    # A larger init makes the influence of one token clearly visible downstream.
    model = build(tiny(pos=pos, init_std=0.2), V, L, SEED)
    toks = tokens()
    t = 7
    changed = toks.at[0, t].set((toks[0, t] + 1) % V)
    a, b = model(toks), model(changed)
    # Positions before t cannot see the change.
    np.testing.assert_allclose(np.asarray(a[0, :t]), np.asarray(b[0, :t]), rtol=0, atol=1e-6)
    # Every position from t on can, and does.
    diff = np.abs(np.asarray(a[0, t:]) - np.asarray(b[0, t:])).max(axis=-1)
    assert (diff > 1e-4).all(), diff
    # The other sequence in the batch is untouched.
    np.testing.assert_allclose(np.asarray(a[1]), np.asarray(b[1]), rtol=0, atol=1e-6)


@pytest.mark.parametrize("dtype, tol", [(jnp.float32, 1e-5), (jnp.bfloat16, 1e-2)])
def test_gelu_matches_autodiff(dtype, tol):
    """The GELU whose backward recomputes tanh: forward bitwise jax.nn.gelu's, gradient
    autodiff's within rounding, over the range where its curvature matters. (Near h = -4
    both lose ~4e-6 to the cancellation in 1 + tanh, against a float64 reference.)"""
    h = jnp.linspace(-8.0, 8.0, 4001, dtype=jnp.float32).astype(dtype)
    da = jax.random.normal(jax.random.key(3), h.shape, jnp.float32).astype(dtype)
    np.testing.assert_array_equal(np.asarray(gelu(h), np.float32),
                                  np.asarray(jax.nn.gelu(h, approximate=True), np.float32))
    got = jax.vjp(gelu, h)[1](da)[0]
    ref = jax.vjp(lambda x: jax.nn.gelu(x.astype(jnp.float32)), h)[1](da.astype(jnp.float32))[0]
    assert got.dtype == dtype
    np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(ref), rtol=tol, atol=tol)


# ---------------------------------------------------------------- knobs


@pytest.mark.parametrize("norm", ["rmsnorm", "layernorm"])
def test_norm_kinds(norm):
    model = build(tiny(norm=norm), V, L, SEED)
    assert model(tokens()).shape == (B, L, V)
    has_bias = hasattr(model.final_norm, "bias")
    assert has_bias == (norm == "layernorm")
    # The blocks' norms are stacked over the layers like their matrices.
    assert model.blocks.attn_norm.scale[...].shape == (2, 32)
    assert hasattr(model.blocks.attn_norm, "bias") == (norm == "layernorm")
    if norm == "layernorm":
        assert model.blocks.mlp_norm.bias[...].shape == (2, 32)


def test_norm_kinds_differ():
    """LayerNorm subtracts the mean; RMSNorm does not, so the outputs differ."""
    rms = build(tiny(norm="rmsnorm"), V, L, SEED)
    ln = build(tiny(norm="layernorm"), V, L, SEED)
    x = jnp.arange(32, dtype=jnp.float32)[None] + 5.0
    y_ln = np.asarray(ln.final_norm(x))
    y_rms = np.asarray(rms.final_norm(x))
    np.testing.assert_allclose(y_ln.mean(), 0.0, atol=1e-5)
    np.testing.assert_allclose(y_ln.std(), 1.0, rtol=1e-3)
    np.testing.assert_allclose(np.sqrt((y_rms**2).mean()), 1.0, rtol=1e-3)
    assert y_rms.mean() > 0.5


@pytest.mark.parametrize("pos", ["rope", "learned"])
def test_position_kinds(pos):
    model = build(tiny(pos=pos), V, L, SEED)
    assert hasattr(model, "pos_embed") == (pos == "learned")
    if pos == "learned":
        assert model.pos_embed[...].shape == (L, 32)
    logits = model(tokens())
    assert logits.shape == (B, L, V)
    # Position matters: with no position signal, causal attention at the last
    # position is invariant to reordering the earlier tokens. Swap two of them.
    model = build(tiny(pos=pos, init_std=0.2), V, L, SEED)
    toks = tokens()
    toks = toks.at[0, 2].set(5).at[0, 9].set(11)
    swapped = toks.at[0, 2].set(11).at[0, 9].set(5)
    last_a = np.asarray(model(toks))[0, -1]
    last_b = np.asarray(model(swapped))[0, -1]
    assert np.abs(last_a - last_b).max() > 1e-4


@pytest.mark.parametrize("tie", [True, False])
def test_tie_embeddings(tie):
    model = build(tiny(tie_embeddings=tie), V, L, SEED)
    paths = {path for path, _ in nnx.to_flat_state(nnx.state(model, nnx.Param))}
    assert (("unembed",) in paths) == (not tie)
    assert ("embed",) in paths
    logits = model(tokens())
    assert logits.shape == (B, L, V)
    if tie:
        # Tied: the output projection reads the embedding table, so scaling it changes the logits.
        before = np.asarray(logits)
        model.embed[...] = model.embed[...] * 2.0
        after = np.asarray(model(tokens()))
        assert not np.allclose(before, after)
    else:
        assert model.unembed[...].shape == (32, V)


def _n_blocks(model) -> int:
    """Distinct blocks: the leading (layers) dim, which every stacked block weight shares."""
    sizes = {x.shape[0] for x in jax.tree.leaves(nnx.state(model.blocks, nnx.Param))}
    assert len(sizes) == 1, sizes
    return sizes.pop()


@pytest.mark.parametrize("k", [1, 2])
def test_share_layers_distinct_blocks(k):
    shared = build(tiny(n_layers=4, share_layers=k), V, L, SEED)
    full = build(tiny(n_layers=4, share_layers=0), V, L, SEED)
    assert _n_blocks(shared) == k
    assert _n_blocks(full) == 4
    assert n_params(shared) < n_params(full)
    assert shared(tokens()).shape == (B, L, V)
    # Stacked blocks are drawn independently: no two slices alike.
    wq = np.asarray(full.blocks.wq[...])
    assert all(not np.allclose(wq[i], wq[j]) for i in range(4) for j in range(i))


def test_share_layers_reuses_block_over_depth():
    """share_layers=1 with n_layers=2 equals an unshared 2-layer model whose blocks are copies."""
    shared = build(tiny(n_layers=2, share_layers=1), V, L, SEED)
    full = build(tiny(n_layers=2, share_layers=0), V, L, SEED + 1)
    nnx.update(full, nnx.state(shared))  # embed, final norm (and, for now, the 1-block stack)
    # Both layers of `full` get the shared block: its (1, ...) stack repeated to (2, ...).
    nnx.update(full.blocks, jax.tree.map(lambda w: jnp.concatenate([w, w]), nnx.state(shared.blocks)))
    assert _n_blocks(full) == 2
    toks = tokens()
    np.testing.assert_allclose(np.asarray(shared(toks)), np.asarray(full(toks)), rtol=1e-5, atol=1e-6)
    # And it is not a 1-layer model: applying the block once gives different logits.
    one = build(tiny(n_layers=1), V, L, SEED + 2)
    nnx.update(one, nnx.state(shared))
    assert not np.allclose(np.asarray(shared(toks)), np.asarray(one(toks)), atol=1e-6)


# ---------------------------------------------------------------- the scan over layers
#
# The blocks are one stacked layer run by `jax.lax.scan`. A per-layer Python loop over the
# same weights (below) computes the same function, but not bitwise: XLA fuses the unrolled
# loop's ops across block boundaries, and the scan body's on their own (measured: logits
# ~1e-6 apart, gradients ~1e-7; so are remat's recomputed forwards, in some configs). The
# comparisons are therefore bounded, by Higham's fp32 bound over the chain of roundings.

U = 2.0**-24  # fp32 unit roundoff
ALL_WEIGHTS = dict(norm="layernorm", pos="learned", tie_embeddings=False)  # biases, pos, unembed


def _gamma(k: int) -> float:
    """gamma_k = k u / (1 - k u): the relative error bound of k successive fp32 roundings
    (Higham 2002, 3.1)."""
    return k * U / (1 - k * U)


def _chain(cfg: ModelConfig, length: int) -> int:
    """Rounded operations along the forward's longest dependency chain, through every layer:
    per block two norms (2 D each: the mean of squares, then the scale), the q/k/v projection
    (D), the scores (K), the softmax and the weighted sum over L keys (3 L), the output
    projection (H K = D), the MLP's two matmuls (D, then F) and a few elementwise ops (RoPE,
    GELU, two residual adds: 16); then the final norm (2 D), the unembedding (D) and the
    log-softmax over V (2 V)."""
    D, K, F = cfg.d_model, d_head(cfg), d_ff(cfg)
    block = 2 * D + D + K + 3 * length + D + 2 * D + D + F + 16
    return cfg.n_layers * block + 2 * D + D + 2 * V


def _logits_bound(model, x_BxLxD: jax.Array, k: int) -> np.ndarray:
    """Elementwise bound on two fp32 evaluations of the logits differing: 2 gamma_k times the
    unembedding's magnitude |h| @ |W|, h the final-normed last residual stream. Every earlier
    rounding reaches the logits through h, and each norm on the way keeps a relative error
    relative, so the chain's k roundings count against that one magnitude."""
    Bx, Lx, D = x_BxLxD.shape
    h_NxD = np.asarray(model.final_norm(x_BxLxD.reshape(Bx * Lx, D)) * model.logit_mult, np.float64)
    w = model.embed[...].T if model.cfg.tie_embeddings else model.unembed[...]
    return 2 * _gamma(k) * (np.abs(h_NxD) @ np.abs(np.asarray(w, np.float64))).reshape(Bx, Lx, -1)


def _grad_bound(cfg: ModelConfig, g: np.ndarray, n_tokens: int, k: int) -> float:
    """Bound on two fp32 evaluations of one gradient differing: the backward is as deep again
    as the forward (2 k roundings), and every entry sums products over the tokens and the
    layers that use the weight (at most n_tokens * n_layers terms), each taken to be at most
    the largest entry (the scale test_attention uses). Loose (measured: ~1e-5 of it), but
    a gradient that misses a use or takes the wrong block is off by the entry itself."""
    return 2 * _gamma(2 * k) * np.abs(g).max() * n_tokens * cfg.n_layers


def _per_layer(model, toks_BxL: jax.Array, which=lambda i, S: i % S):
    """The reference forward, written out: embeddings (and positions), then a Python loop over
    the layers in which layer i merges slice `which(i, S)` (i mod S) of the stacked block
    weights into the same Block code and applies it, then the final norm and unembedding.
    Returns (logits_BxLxV, the last residual stream x_BxLxD)."""
    cfg, Lx = model.cfg, toks_BxL.shape[1]
    S = cfg.share_layers or cfg.n_layers
    x_BxLxD = jnp.take(model.embed[...], toks_BxL, axis=0)
    rope = None
    if cfg.pos == "learned":
        x_BxLxD = x_BxLxD + model.pos_embed[...][:Lx][None]
    else:
        rope = rope_tables(Lx, d_head(cfg), cfg.rope_theta)
    graphdef, stacked = nnx.split(model.blocks)
    for i in range(cfg.n_layers):
        block = nnx.merge(graphdef, jax.tree.map(lambda w: w[which(i, S)], stacked))
        x_BxLxD = block(x_BxLxD, rope)
    return model.decode(x_BxLxD), x_BxLxD


def _scanned(model, toks_BxL: jax.Array):
    """The model's own forward (the scan), shaped as `_per_layer`'s: (logits_BxLxV, None)."""
    return model(toks_BxL), None


def _loss_grads(model, forward, toks_BxL1: jax.Array):
    """Jitted (loss, (logits, aux), grads) of the mean next-token cross-entropy of `forward`."""
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    def f(p):
        logits_BxLxV, aux = forward(nnx.merge(graphdef, p, rest), toks_BxL1[:, :-1])
        logp = jax.nn.log_softmax(logits_BxLxV, axis=-1)
        return -jnp.take_along_axis(logp, toks_BxL1[:, 1:, None], axis=-1).mean(), (logits_BxLxV, aux)

    (loss, aux), grads = jax.jit(jax.value_and_grad(f, has_aux=True))(params)
    return float(loss), aux, dict(nnx.to_flat_state(grads))


def _assert_grads_within_bound(cfg, got: dict, want: dict, n_tokens: int, k: int) -> None:
    assert got.keys() == want.keys() and got
    for path in want:
        a, b = np.asarray(got[path][...], np.float64), np.asarray(want[path][...], np.float64)
        assert np.abs(b).max() > 0, f"no gradient reaches {path}"
        bound = _grad_bound(cfg, b, n_tokens, k)
        assert np.abs(a - b).max() <= bound, (path, np.abs(a - b).max(), bound)


@pytest.mark.parametrize("share", [0, 2])
@pytest.mark.parametrize("kind", ["default", "all-weights"])
def test_scan_matches_a_per_layer_loop(share, kind):
    """Logits, loss and every gradient of the scanned model equal a per-layer loop's, to
    within fp32 rounding, at depth 4: its own block per layer, and 2 blocks taken in turn."""
    cfg = tiny(n_layers=4, share_layers=share, init_std=0.2, **(ALL_WEIGHTS if kind != "default" else {}))
    model = build(cfg, V, L, SEED)
    toks = tokens(length=L + 1)
    loss, (logits, _), grads = _loss_grads(model, _scanned, toks)
    ref_loss, (ref_logits, ref_x), ref_grads = _loss_grads(model, _per_layer, toks)
    k = _chain(cfg, L)
    bound = _logits_bound(model, ref_x, k)
    assert np.all(np.abs(np.asarray(logits, np.float64) - np.asarray(ref_logits)) <= bound)
    # The loss moves by at most twice the logits' largest change, plus its own V + N sums.
    assert abs(loss - ref_loss) <= 2 * bound.max() + 2 * _gamma(V + B * L) * abs(ref_loss)
    _assert_grads_within_bound(cfg, grads, ref_grads, B * L, k)
    # The bounds are tight enough to see a wrong block order (layer i running block i+1 mod S).
    _, (wrong, _), wrong_grads = _loss_grads(
        model, lambda m, t: _per_layer(m, t, lambda i, S: (i + 1) % S), toks)
    assert np.any(np.abs(np.asarray(wrong, np.float64) - np.asarray(ref_logits)) > bound)
    with pytest.raises(AssertionError):
        _assert_grads_within_bound(cfg, wrong_grads, ref_grads, B * L, k)


@pytest.mark.parametrize("share", [0, 2])
@pytest.mark.parametrize("remat", [r for r in config.REMATS if r != "none"])
def test_remat_matches_no_remat(share, remat):
    """Rematerialising (each block, or keeping only its matmuls) changes memory, not math:
    the same loss and gradients at depth 4, to within fp32 rounding."""
    cfg = tiny(n_layers=4, share_layers=share, init_std=0.2, remat="none", **ALL_WEIGHTS)
    toks = tokens(length=L + 1)
    plain = build(cfg, V, L, SEED)
    remat_model = build(dataclasses.replace(cfg, remat=remat), V, L, SEED)
    loss0, (logits0, _), g0 = _loss_grads(plain, _scanned, toks)
    loss1, (logits1, _), g1 = _loss_grads(remat_model, _scanned, toks)
    k = _chain(cfg, L)
    x_last = nnx.jit(lambda m, t: m.inspect(t, probs=False).resid[-1])(plain, toks[:, :-1])
    bound = _logits_bound(plain, x_last, k)
    assert np.all(np.abs(np.asarray(logits1, np.float64) - np.asarray(logits0)) <= bound)
    assert abs(loss1 - loss0) <= 2 * bound.max() + 2 * _gamma(V + B * L) * abs(loss0)
    _assert_grads_within_bound(cfg, g1, g0, B * L, k)
    # remat really rematerialises; "none" does not.
    jaxprs = []
    for m in (plain, remat_model):
        graphdef, params, rest = nnx.split(m, nnx.Param, ...)
        jaxprs.append(str(jax.make_jaxpr(jax.grad(lambda p: loss_fn(nnx.merge(graphdef, p, rest), toks)))(params)))
    assert "remat" not in jaxprs[0] and "checkpoint" not in jaxprs[0]
    assert "remat" in jaxprs[1] or "checkpoint" in jaxprs[1]


def _eqns(jaxpr):
    """Every equation of a jaxpr, nested ones (scan bodies, custom_vjp, remat) included."""
    for eqn in jaxpr.eqns:
        yield eqn
        for value in eqn.params.values():
            for sub in value if isinstance(value, (list, tuple)) else [value]:
                if hasattr(sub, "eqns"):
                    yield from _eqns(sub)
                elif hasattr(sub, "jaxpr") and hasattr(sub.jaxpr, "eqns"):
                    yield from _eqns(sub.jaxpr)


def _programs(cfg: ModelConfig) -> tuple[str, int, int]:
    """(the loss-and-gradient jaxpr's text, its number of equations, the random draws of the
    initialiser's jaxpr), traced on abstract values: nothing runs."""
    model = nnx.eval_shape(lambda: build(cfg, V, L, SEED))
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    toks = tokens(length=L + 1)
    step = jax.make_jaxpr(jax.value_and_grad(lambda p: loss_fn(nnx.merge(graphdef, p, rest), toks)))(params)
    init = jax.make_jaxpr(lambda: nnx.split(build(cfg, V, L, SEED)))()
    draws = sum(e.primitive.name in ("random_bits", "threefry2x32") for e in _eqns(init.jaxpr))
    return str(step), sum(1 for _ in _eqns(step.jaxpr)), draws


@pytest.mark.parametrize("share", [0, 2])
def test_program_does_not_grow_with_depth(share):
    """4 or 16 layers: the same traced program (the scan holds one block), and an initialiser
    that draws each stacked weight once, whatever the number of layers."""
    text4, eqns4, draws4 = _programs(tiny(n_layers=4, share_layers=share, **ALL_WEIGHTS))
    text16, eqns16, draws16 = _programs(tiny(n_layers=16, share_layers=share, **ALL_WEIGHTS))
    assert eqns16 == eqns4
    assert abs(len(text16) - len(text4)) <= 0.02 * len(text4)  # only shapes' digits differ
    # embed, pos_embed, unembed and the 6 stacked block matrices (norms start at 1 and 0).
    assert draws4 == draws16 == 3 + len(BLOCK_MATRICES)


def test_taps_and_inspect_cover_every_layer():
    """At depth 4 with 2 shared blocks: the coordinate check's taps name every layer, and
    `inspect` returns every layer's residual stream and attention map, from the same scan."""
    cfg = tiny(n_layers=4, share_layers=2, init_std=0.2)
    model = build(cfg, V, L, SEED)
    toks = tokens()
    taps: dict = {}
    logits = model(toks, taps=taps)
    for i in range(4):
        assert {f"block{i}", f"block{i}.attn", f"block{i}.mlp", f"block{i}.attn_logits"} <= taps.keys()
    assert "block4" not in taps and {"embed", "logits"} <= taps.keys()
    assert len({float(taps[f"block{i}"]) for i in range(4)}) == 4  # layers 0 and 2 share a block, not a value
    ins = model.inspect(toks)
    assert len(ins.resid) == cfg.n_layers + 1 and len(ins.attn) == cfg.n_layers
    assert all(p.shape == (B, 4, L, L) for p in ins.attn)
    np.testing.assert_allclose(np.asarray(ins.attn[3]).sum(-1), 1.0, atol=1e-5)
    bound = _logits_bound(model, ins.resid[-1], _chain(cfg, L))
    assert np.all(np.abs(np.asarray(model.decode(ins.resid[-1]), np.float64) - np.asarray(logits)) <= bound)
    for i in range(4):  # the taps are the same layers' outputs: mean |resid| after block i
        mean_abs = float(jnp.abs(ins.resid[i + 1]).mean())
        assert float(taps[f"block{i}"]) == pytest.approx(mean_abs, rel=2 * _gamma(_chain(cfg, L) + B * L * cfg.d_model))


# ---------------------------------------------------------------- dtype


def _dot_operand_dtypes(model, toks) -> list[tuple]:
    """Operand dtypes of every dot_general in the forward pass (nested jaxprs included)."""

    def subjaxprs(value):
        if hasattr(value, "eqns"):
            yield value
        elif hasattr(value, "jaxpr") and hasattr(value.jaxpr, "eqns"):
            yield value.jaxpr
        elif isinstance(value, (list, tuple)):
            for v in value:
                yield from subjaxprs(v)

    def walk(jaxpr):
        for eqn in jaxpr.eqns:
            if eqn.primitive.name == "dot_general":
                yield tuple(str(v.aval.dtype) for v in eqn.invars)
            for value in eqn.params.values():
                for sub in subjaxprs(value):
                    yield from walk(sub)

    return list(walk(jax.make_jaxpr(lambda t: model(t))(toks).jaxpr))


def test_bfloat16_compute_params_stay_fp32():
    cfg32 = tiny(norm="layernorm", pos="learned", tie_embeddings=False)
    cfg16 = dataclasses.replace(cfg32, dtype="bfloat16")
    m32, m16 = build(cfg32, V, L, SEED), build(cfg16, V, L, SEED)
    leaves = jax.tree.leaves(nnx.state(m16, nnx.Param))
    assert leaves and all(x.dtype == jnp.float32 for x in leaves)
    toks = tokens()
    y16, y32 = m16(toks), m32(toks)
    assert y16.dtype == jnp.float32
    assert bool(jnp.isfinite(y16).all())
    y16, y32 = np.asarray(y16), np.asarray(y32)
    scale = np.abs(y32).max()
    assert np.abs(y16 - y32).max() <= 0.05 * scale + 1e-3
    # ... but not identical: compute really ran in bfloat16.
    assert not np.array_equal(y16, y32)
    # Every matmul (projections, attention, MLP, unembedding) runs on bfloat16 operands.
    # The scanned program holds one block whatever the depth: its 6 projections (and the
    # attention kernel's own matmuls) once, plus the unembedding.
    dots16 = _dot_operand_dtypes(m16, toks)
    assert len(dots16) >= 6 + 1
    assert all(d == ("bfloat16", "bfloat16") for d in dots16), dots16
    assert all(d == ("float32", "float32") for d in _dot_operand_dtypes(m32, toks))
    # Params are still float32 after a forward pass.
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(nnx.state(m16, nnx.Param)))


# ---------------------------------------------------------------- counts & metadata


@pytest.mark.parametrize(
    "cfg",
    [
        tiny(norm="layernorm", pos="learned", tie_embeddings=False),
        tiny(norm="rmsnorm", pos="rope", tie_embeddings=True),
        tiny(n_layers=3, share_layers=1),
        tiny(n_layers=3, share_layers=1, norm="layernorm", pos="learned", tie_embeddings=False),
    ],
    ids=["ln-untied-learned", "rms-tied-rope", "shared1", "shared1-ln-untied-learned"],
)
def test_param_counts_match_model(cfg):
    model = build(cfg, V, L, SEED)
    counts = param_counts(cfg, V, L)
    total = n_params(model)
    assert counts["params"] == total
    embed = int(np.prod(model.embed[...].shape))
    pos = int(np.prod(model.pos_embed[...].shape)) if cfg.pos == "learned" else 0
    unembed = 0 if cfg.tie_embeddings else int(np.prod(model.unembed[...].shape))
    assert counts["non_embedding_params"] == total - embed - pos - unembed


@pytest.mark.parametrize(
    "cfg",
    [tiny(norm="layernorm", pos="learned", tie_embeddings=False), tiny(n_layers=4, share_layers=2),
     tiny(n_layers=4, mlp="swiglu", n_kv_heads=2, qk_norm=True)],
    ids=["all-weights", "shared", "llama-knobs"],
)
def test_weights_carry_logical_axes(cfg):
    model = build(cfg, V, L, SEED)
    S = cfg.share_layers or cfg.n_layers
    matrices = stacked_vectors = 0
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        value = var[...]
        axes = var.get_metadata().get("axes")
        assert axes is not None, path
        assert len(axes) == value.ndim, (path, axes, value.shape)
        assert set(axes) <= AXIS_NAMES, (path, axes)
        if path[0] == "blocks":  # stacked: the leading dim is the layers one, and only that
            assert axes[0] == "layers" and value.shape[0] == S, (path, axes, value.shape)
            assert "layers" not in axes[1:], (path, axes)
            matrices += value.ndim == 3
            stacked_vectors += value.ndim == 2
        else:
            assert "layers" not in axes, (path, axes)
            matrices += value.ndim == 2
    # embed (+ pos, unembed) and one stack of each of the 6 block matrices, however many
    # distinct blocks; the blocks' norm scales (and biases) stacked too.
    expected = (1 + len(BLOCK_MATRICES) + (cfg.mlp == "swiglu") + (cfg.pos == "learned")
                + (not cfg.tie_embeddings))
    assert matrices == expected
    assert stacked_vectors == 2 * (1 + (cfg.norm == "layernorm")) + 2 * cfg.qk_norm
    # The layers dim is never sharded: every device holds every layer's shard of a weight,
    # and the scan slices it locally. A 2x2x2 mesh would divide S = 2 if a rule asked.
    assert shd.RULES["layers"] is None
    abstract = nnx.split(nnx.eval_shape(lambda: build(cfg, V, L, SEED)))[1]
    specs = shd.param_shardings(abstract, shd.make_mesh((2, 2, 2)))
    for path, sharding in jax.tree_util.tree_leaves_with_path(specs["blocks"]):
        assert tuple(sharding.spec)[0] is None, (path, sharding.spec)
