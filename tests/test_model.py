"""The Transformer: shapes, causality, every config knob, param counts, axes metadata."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from research.config import ModelConfig
from research.flops import param_counts
from research.model import build, gelu

V = 64  # vocab
L = 16  # sequence length (= max_len)
B = 2
SEED = 0
AXIS_NAMES = {"vocab", "embed", "heads", "mlp", None}


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
    assert hasattr(model.blocks[0].attn_norm, "bias") == (norm == "layernorm")


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


@pytest.mark.parametrize("k", [1, 2])
def test_share_layers_distinct_blocks(k):
    shared = build(tiny(n_layers=4, share_layers=k), V, L, SEED)
    full = build(tiny(n_layers=4, share_layers=0), V, L, SEED)
    assert len(shared.blocks) == k
    assert len(full.blocks) == 4
    assert n_params(shared) < n_params(full)
    assert shared(tokens()).shape == (B, L, V)


def test_share_layers_reuses_block_over_depth():
    """share_layers=1 with n_layers=2 equals an unshared 2-layer model whose blocks are copies."""
    shared = build(tiny(n_layers=2, share_layers=1), V, L, SEED)
    full = build(tiny(n_layers=2, share_layers=0), V, L, SEED + 1)
    nnx.update(full, nnx.state(shared))  # embed, final norm, blocks[0]
    nnx.update(full.blocks[1], nnx.state(shared.blocks[0]))
    toks = tokens()
    np.testing.assert_allclose(np.asarray(shared(toks)), np.asarray(full(toks)), rtol=1e-5, atol=1e-6)
    # And it is not a 1-layer model: applying the block once gives different logits.
    one = build(tiny(n_layers=1), V, L, SEED + 2)
    nnx.update(one, nnx.state(shared))
    assert not np.allclose(np.asarray(shared(toks)), np.asarray(one(toks)), atol=1e-6)


def _loss_and_grads(cfg: ModelConfig):
    model = build(cfg, V, L, SEED)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    toks = tokens(length=L + 1)

    def f(p):
        return loss_fn(nnx.merge(graphdef, p, rest), toks)

    loss, grads = jax.jit(jax.value_and_grad(f))(params)
    jaxpr = str(jax.make_jaxpr(jax.grad(f))(params))
    return loss, grads, jaxpr


def test_remat_block_matches_no_remat():
    # Every kind of weight present: layernorm biases, learned positions, unembed.
    cfg = tiny(norm="layernorm", pos="learned", tie_embeddings=False)
    loss0, g0, jaxpr0 = _loss_and_grads(dataclasses.replace(cfg, remat="none"))
    loss1, g1, jaxpr1 = _loss_and_grads(dataclasses.replace(cfg, remat="block"))
    assert np.isfinite(float(loss0))
    np.testing.assert_allclose(float(loss1), float(loss0), rtol=1e-5)
    flat0 = nnx.to_flat_state(g0)
    flat1 = dict(nnx.to_flat_state(g1))
    assert len(flat0) == len(flat1) > 0
    for path, a in flat0:
        a, b = np.asarray(a[...]), np.asarray(flat1[path][...])
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-7, err_msg=str(path))
        assert np.abs(a).max() > 0, f"no gradient reaches {path}"
    # remat="block" really rematerialises; "none" does not.
    assert "remat" in jaxpr1 or "checkpoint" in jaxpr1
    assert "remat" not in jaxpr0 and "checkpoint" not in jaxpr0


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
    dots16 = _dot_operand_dtypes(m16, toks)
    assert len(dots16) >= 6 * cfg16.n_layers + 1
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
    [tiny(norm="layernorm", pos="learned", tie_embeddings=False), tiny(share_layers=1)],
    ids=["all-weights", "shared"],
)
def test_weights_carry_logical_axes(cfg):
    model = build(cfg, V, L, SEED)
    seen = 0
    for path, var in nnx.to_flat_state(nnx.state(model)):
        value = var[...]
        if value.ndim < 2:
            continue
        seen += 1
        axes = var.get_metadata().get("axes")
        assert axes is not None, path
        assert len(axes) == value.ndim, (path, axes, value.shape)
        assert set(axes) <= AXIS_NAMES, (path, axes)
    # embed (+ pos, unembed) and 6 matrices per distinct block.
    expected = 1 + 6 * len(model.blocks)
    expected += (cfg.pos == "learned") + (not cfg.tie_embeddings)
    assert seen == expected
