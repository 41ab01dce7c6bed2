"""The block knobs of today's ladders: SwiGLU, grouped-query attention, QK-norm, z-loss.

Each is checked against a reference written out here (not the model's code), for shapes,
parameter and FLOP counts, numerics, muP roles, sharding and resume.
"""

from __future__ import annotations

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from research import coord_check, flops, param, train
from research import sharding as shd
from research import step as steplib
from research.attention import attention_probs, chunked_attention, xla_attention
from research.config import ConfigError, ModelConfig, d_ff, d_head, kv_heads
from research.model import build, rope_tables
from tests.conftest import TINY, compose, train_steps
from tests.test_attention import _bound
from tests.test_model import B, L, SEED, V, _chain, _gamma, _logits_bound, tiny, tokens

LLAMA = dict(mlp="swiglu", n_kv_heads=2, qk_norm=True, tie_embeddings=False)
# (mlp, n_kv_heads, qk_norm): each knob alone, all together, multi-query.
KNOBS = [("swiglu", None, False), ("gelu", 2, False), ("gelu", None, True), ("swiglu", 2, True),
         ("gelu", 1, False)]
IDS = ["swiglu", "gqa2", "qknorm", "llama", "mqa"]


def _cfg(mlp, kv, qk, **over) -> ModelConfig:
    return tiny(mlp=mlp, n_kv_heads=kv, qk_norm=qk, **over)


# ----------------------------------------------------------------------------- shapes & counts


def test_swiglu_width_and_config_errors():
    # 2/3 of 4 d_model, to the nearest multiple of 64: d 384 -> 1024, as many params as GELU's 1536.
    m = ModelConfig(d_model=384, n_heads=6, mlp="swiglu")
    assert d_ff(m) == 1024 and 3 * 384 * d_ff(m) == 2 * 384 * d_ff(dataclasses.replace(m, mlp="gelu"))
    assert d_ff(ModelConfig(d_model=32, mlp="swiglu")) == 64  # at least one multiple
    assert d_ff(ModelConfig(mlp="swiglu", mlp_hidden=100)) == 100 == d_ff(ModelConfig(mlp_hidden=100))
    from research import config

    for override, field in [("model.n_kv_heads=3", "model.n_kv_heads"), ("model.n_kv_heads=0", "model.n_kv_heads"),
                            ("model.mlp=relu", "model.mlp"), ("model.mlp_hidden=0", "model.mlp_hidden"),
                            ("optim.z_loss=-1", "optim.z_loss")]:
        with pytest.raises(ConfigError) as err:
            config.parse(compose(*TINY, override))
        assert err.value.field == field


@pytest.mark.parametrize("mlp, kv, qk", KNOBS, ids=IDS)
def test_shapes_and_param_counts(mlp, kv, qk):
    cfg = _cfg(mlp, kv, qk, tie_embeddings=False)
    model = build(cfg, V, L, SEED)
    D, H, G, K, F, S = cfg.d_model, cfg.n_heads, kv_heads(cfg), d_head(cfg), d_ff(cfg), cfg.n_layers
    blocks = model.blocks
    assert blocks.wq[...].shape == (S, D, H * K)
    assert blocks.wk[...].shape == blocks.wv[...].shape == (S, D, G * K)
    assert blocks.w_in[...].shape == (S, D, F) and blocks.w_out[...].shape == (S, F, D)
    assert hasattr(blocks, "w_gate") == (mlp == "swiglu")
    if qk:
        assert blocks.q_norm.scale[...].shape == blocks.k_norm.scale[...].shape == (S, K)
    leaves = jax.tree.leaves(nnx.state(model, nnx.Param))
    counts = flops.param_counts(cfg, V, L)
    assert counts["params"] == sum(x.size for x in leaves)
    assert counts["non_embedding_params"] == counts["params"] - 2 * V * D
    assert model(tokens()).shape == (B, L, V)


def _dot_flops(jaxpr) -> int:
    """FLOPs of every dot_general in a jaxpr (2 x output size x contracted size), nested
    programs included, a scan's body once per iteration."""
    total = 0
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "dot_general":
            (lhs_contract, _), _ = eqn.params["dimension_numbers"]
            lhs = eqn.invars[0].aval.shape
            total += 2 * int(np.prod(eqn.outvars[0].aval.shape)) * int(np.prod([lhs[d] for d in lhs_contract]))
        times = eqn.params.get("length", 1) if eqn.primitive.name == "scan" else 1
        for value in eqn.params.values():
            for sub in value if isinstance(value, (list, tuple)) else [value]:
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    total += times * _dot_flops(inner)
    return total


@pytest.mark.parametrize("mlp, kv, qk", KNOBS, ids=IDS)
def test_flops_per_token_match_the_matmul_shapes(mlp, kv, qk):
    """PaLM's 6 N + 12 L H Q T against the forward's actual dots: with XLA's attention (all
    L x L scores, as the formula counts) the forward's dot FLOPs per token are a third of the
    formula, less the blocks' norm gains the formula counts in N (6 x per application)."""
    cfg = _cfg(mlp, kv, qk, n_layers=3, attention="xla", matmul="xla")
    model = build(cfg, V, L, SEED)
    graphdef, state = nnx.split(model)
    jaxpr = jax.make_jaxpr(lambda s, t: nnx.merge(graphdef, s)(t))(state, tokens(batch=1))
    per_token = flops.flops_per_token(cfg, V, L)
    D, K = cfg.d_model, d_head(cfg)
    gains = (2 * D + (2 * K if qk else 0)) * cfg.n_layers  # the blocks' norm gains, at every layer
    assert 3 * _dot_flops(jaxpr.jaxpr) / L == per_token - 6 * gains


# ------------------------------------------------------------------------------------ numerics


def _rms(x, g):
    x = x.astype(jnp.float32)
    return x * jax.lax.rsqrt((x * x).mean(-1, keepdims=True) + 1e-6) * g


def _direct(model, toks_BxL):
    """The forward written out from the weights, layer by layer: RMSNorm, q/k/v, per-head
    QK-norm, RoPE on (first half, second half) pairs, k and v repeated to every query head,
    a full masked softmax, SwiGLU or GELU. Returns (logits_BxLxV, last residual stream)."""
    cfg = model.cfg
    S, H, G, K = cfg.share_layers or cfg.n_layers, cfg.n_heads, kv_heads(cfg), d_head(cfg)
    Bx, Lx = toks_BxL.shape
    cos, sin = (c[None, :, None, :] for c in rope_tables(Lx, K, cfg.rope_theta))
    w = {k: v for k, v in nnx.to_flat_state(nnx.state(model.blocks, nnx.Param))}

    def p(name, i):
        return w[tuple(name.split("."))][...][i]

    def rotate(x):
        x1, x2 = x[..., : K // 2], x[..., K // 2:]
        return jnp.concatenate([x1 * cos - x2 * sin, x1 * sin + x2 * cos], -1)

    x = jnp.take(model.embed[...], toks_BxL, axis=0)
    for layer in range(cfg.n_layers):
        i = layer % S
        h = _rms(x, p("attn_norm.scale", i))
        q = (h @ p("wq", i)).reshape(Bx, Lx, H, K)
        k = (h @ p("wk", i)).reshape(Bx, Lx, G, K)
        v = (h @ p("wv", i)).reshape(Bx, Lx, G, K)
        if cfg.qk_norm:
            q, k = _rms(q, p("q_norm.scale", i)), _rms(k, p("k_norm.scale", i))
        q, k = rotate(q), rotate(k)
        k, v = jnp.repeat(k, H // G, axis=2), jnp.repeat(v, H // G, axis=2)
        s = jnp.einsum("bqhk,bshk->bhqs", q, k) / np.sqrt(K)
        s = jnp.where(jnp.tril(jnp.ones((Lx, Lx), bool)), s, -jnp.inf)
        o = jnp.einsum("bhqs,bshk->bqhk", jax.nn.softmax(s, -1), v).reshape(Bx, Lx, H * K)
        x = x + o @ p("wo", i)
        h = _rms(x, p("mlp_norm.scale", i))
        if cfg.mlp == "swiglu":
            a = jax.nn.silu(h @ p("w_gate", i)) * (h @ p("w_in", i))
        else:
            a = jax.nn.gelu(h @ p("w_in", i), approximate=True)
        x = x + a @ p("w_out", i)
    out = _rms(x, model.final_norm.scale[...])
    unembed = model.embed[...].T if cfg.tie_embeddings else model.unembed[...]
    return out @ unembed, x


@pytest.mark.parametrize("share", [0, 2])
@pytest.mark.parametrize("attention", ["chunked", "xla"])
@pytest.mark.parametrize("mlp, kv, qk", KNOBS, ids=IDS)
def test_model_matches_the_direct_forward(mlp, kv, qk, attention, share):
    """At depth 4, each block its own and 2 blocks taken in turn, on both core kernels."""
    cfg = _cfg(mlp, kv, qk, n_layers=4, share_layers=share, init_std=0.2, attention=attention,
               tie_embeddings=False)
    model = build(cfg, V, L, SEED)
    toks = tokens()
    logits = np.asarray(nnx.jit(lambda m, t: m(t))(model, toks), np.float64)
    ref, ref_x = nnx.jit(_direct)(model, toks)
    # The chain of `test_model._chain`, plus QK-norm (2 K per head) and SwiGLU's gate (D + 2).
    k = _chain(cfg, L) + cfg.n_layers * (2 * d_head(cfg) + cfg.d_model + 2)
    bound = _logits_bound(model, ref_x, k)
    assert np.all(np.abs(logits - np.asarray(ref, np.float64)) <= bound)
    # The bound sees a wrong grouping: query head h on kv head h mod G instead of h // (H/G).
    if (kv or cfg.n_heads) not in (1, cfg.n_heads):
        wk = model.blocks.wk[...]
        S, D, GK = wk.shape
        G, K = kv, d_head(cfg)
        model.blocks.wk[...] = wk.reshape(S, D, G, K)[:, :, ::-1].reshape(S, D, GK)
        model.blocks.wv[...] = model.blocks.wv[...].reshape(S, D, G, K)[:, :, ::-1].reshape(S, D, GK)
        swapped = np.asarray(nnx.jit(lambda m, t: m(t))(model, toks), np.float64)
        assert np.any(np.abs(swapped - np.asarray(ref, np.float64)) > bound)


@pytest.mark.parametrize("groups", [1, 2, 4])
def test_grouped_attention_kernels_match_repeated_heads(groups):
    """Every core kernel and the interpretation path, with G key/value heads, equal full
    multi-head attention on k and v repeated to H heads (values and gradients)."""
    q = jax.random.normal(jax.random.key(0), (2, 40, 4, 8))
    k, v = jax.random.normal(jax.random.key(1), (2, 2, 40, groups, 8))
    K, Lx = 8, 40
    rep = (lambda x: jnp.repeat(x, 4 // groups, axis=2))
    ref = np.asarray(jax.jit(xla_attention)(q, rep(k), rep(v)), np.float64)
    bound = _bound(K + 3 * Lx, np.abs(np.asarray(v)).max())
    for out in (jax.jit(chunked_attention, static_argnums=3)(q, k, v, 16), jax.jit(xla_attention)(q, k, v)):
        assert np.all(np.abs(np.asarray(out, np.float64) - ref) <= bound)
    probs = np.asarray(jax.jit(attention_probs)(q, k), np.float64)
    np.testing.assert_allclose(probs.sum(-1), 1.0, atol=_bound(3 * Lx, 1.0).max())
    ref_probs = np.asarray(jax.jit(attention_probs)(q, rep(k)), np.float64)
    assert np.all(np.abs(probs - ref_probs) <= _bound(K + 3 * Lx, 1.0))

    def loss(fn, q, k, v):
        return (fn(q, k, v) ** 2).sum()

    g = jax.jit(jax.grad(lambda *a: loss(lambda *b: chunked_attention(*b, 16), *a), (0, 1, 2)))(q, k, v)
    g_ref = jax.jit(jax.grad(lambda q, k, v: loss(xla_attention, q, rep(k), rep(v)), (0, 1, 2)))(q, k, v)
    for a, b in zip(g, g_ref):
        a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
        # The k and v gradients also sum over the 4 / groups query heads that share them.
        assert np.all(np.abs(a - b) <= _bound(2 * (K + 3 * Lx) + 4, np.abs(b).max() * Lx * 4))


def test_z_loss_is_logged_beside_the_cross_entropy(tmp_path):
    """loss stays the cross-entropy; the objective adds c log(Z)^2 (written out here), so the
    gradients differ from the cross-entropy's alone; train.run logs z_loss."""
    from research import config, data

    c = 1e-2
    cfg = config.parse(compose(*TINY, "mesh=single"))
    mesh = shd.make_mesh((1, 1, 1), jax.devices()[:1])
    plan = steplib.plan(cfg, 256, mesh)
    params = plan.fresh_state()["params"]
    batch = data.device_batch(data.load(cfg.data), data.TRAIN, 0, 0, 4, cfg.data.seq_len,
                              shd.batch_sharding(mesh))
    objective, parts = steplib.make_loss_fn(plan.graphdef, mesh, c)(params, batch)
    plain, plain_parts = steplib.make_loss_fn(plan.graphdef, mesh)(params, batch)
    logits = nnx.merge(plan.graphdef, nnx.State(params))(batch[:, :-1])
    lse = np.asarray(jax.nn.logsumexp(logits, -1), np.float64)
    z_sq = float((lse ** 2).mean())
    n = lse.size
    assert set(parts) == {"loss", "z_loss"} and set(plain_parts) == {"loss"}
    assert float(parts["loss"]) == float(plain) == float(plain_parts["loss"])
    assert abs(float(parts["z_loss"]) - z_sq) <= 2 * _gamma(V + n + 4) * z_sq
    assert abs(float(objective) - (float(plain) + c * z_sq)) <= 4 * _gamma(V + n + 4) * float(objective)
    g = jax.grad(lambda p: steplib.make_loss_fn(plan.graphdef, mesh, c)(p, batch)[0])(params)
    g0 = jax.grad(lambda p: steplib.make_loss_fn(plan.graphdef, mesh)(p, batch)[0])(params)
    assert not np.allclose(np.asarray(g["embed"]), np.asarray(g0["embed"]))
    train.run(compose(*TINY, "mesh=single", "train.steps=6", "train.log_every=3", f"optim.z_loss={c}"),
              tmp_path, devices=jax.devices()[:1])
    rows = [json.loads(r) for r in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    logged = [r for r in rows if "loss" in r]
    assert logged and all(r["z_loss"] > 0 and np.isfinite(r["z_loss"]) for r in logged)


# --------------------------------------------------------------------- muP, sharding, resume

BASE = ("param.base_width=32", "param.base_depth=1")
LLAMA_ARGS = ("model=llama", "model.d_model=32", "model.n_layers=1", "optim.weight_decay=0.1",
              "schedule.warmup=0", "mesh=single")


def test_llama_roles_and_mup_exact_at_base_size():
    cfg = tiny(**LLAMA)
    model = build(cfg, V, L, SEED)
    params = nnx.state(model, nnx.Param).to_pure_dict()
    roles = {path: param.role(path, leaf.ndim) for path, leaf in
             ((tuple(str(getattr(k, "key", k)) for k in keys), leaf)
              for keys, leaf in jax.tree_util.tree_flatten_with_path(params)[0])}
    for name in ("wq", "wk", "wv", "wo", "w_in", "w_gate", "w_out"):
        assert roles[("blocks", name)] == "hidden"
    for name in ("q_norm", "k_norm", "attn_norm", "mlp_norm"):
        assert roles[("blocks", name, "scale")] == "block_vector"
    sp_losses, sp_params = train_steps("param=sp", *LLAMA_ARGS)
    assert sp_losses[-1] < sp_losses[0]
    for name in ("mup", "completep"):
        losses, trained = train_steps(f"param={name}", *BASE, *LLAMA_ARGS)
        np.testing.assert_array_equal(losses, sp_losses)
        jax.tree.map(np.testing.assert_array_equal, trained, sp_params)


def test_llama_coordinate_check_is_flat_under_mup(tmp_path):
    """As test_coord_check's mup case (same widths, steps, seeds and limits), with the llama
    block: the gate projection and the QK-norm gains follow their roles."""
    result = coord_check.run(["param=mup", "model=llama", "data=synthetic", "model.n_layers=1",
                              "param.base_width=32"], [32, 128], 3, tmp_path, seeds=3)
    slopes = result["slopes"]
    assert {"block0", "block0.attn", "block0.mlp", "logits"} <= set(slopes)
    assert all(v < 0.15 for v in slopes.values()), slopes
    assert all(v > -0.45 for k, v in slopes.items() if k != "block0.attn_logits"), slopes


def test_kv_heads_the_tensor_axis_does_not_divide_stay_whole():
    cfg = ModelConfig(d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, mlp="swiglu", qk_norm=True)
    abstract = nnx.split(nnx.eval_shape(lambda: build(cfg, 256, 32, 0)))[1]
    for tensor, kv_spec in [(2, "tensor"), (4, None)]:
        mesh = shd.make_mesh((8 // tensor, 1, tensor))
        specs = jax.tree.map(lambda s: tuple(s.spec), shd.param_shardings(abstract, mesh, shd.rules_for(cfg, mesh)))
        assert specs["blocks"]["wq"] == (None, None, "tensor")  # 4 query heads split 2 or 4 ways
        assert specs["blocks"]["wk"] == specs["blocks"]["wv"] == (None, None, kv_spec)
        assert specs["blocks"]["w_gate"] == (None, None, "tensor")
    mqa = dataclasses.replace(cfg, n_kv_heads=1)
    assert shd.rules_for(mqa, shd.make_mesh((4, 1, 2)))["kv_heads"] is None  # one head: never split


def _losses(run_dir):
    return np.array([json.loads(r)["loss"] for r in (run_dir / "metrics.jsonl").read_text().splitlines()
                     if "loss" in json.loads(r)])


LLAMA_RUN = (*TINY, "model=llama", "model.d_model=64", "model.n_heads=4", "model.n_kv_heads=2",
             "model.n_layers=4", "train.log_every=1", "optim.z_loss=1e-4")


def test_llama_trains_alike_on_every_mesh(tmp_path):
    """model=llama (4 layers, GQA 4:2, QK-norm, SwiGLU, z-loss) gives the losses of one device
    on data, FSDP and tensor meshes, one of which (tensor 4) keeps the kv heads whole.
    Equal within 1e-4 relative, as test_sharding's meshes (a sharding bug moves far more)."""
    ref_dir = tmp_path / "one"
    train.run(compose(*LLAMA_RUN, "mesh.data=1", "mesh.fsdp=1", "mesh.tensor=1"), ref_dir,
              devices=jax.devices()[:1])
    ref = _losses(ref_dir)
    assert ref[-1] < ref[0]
    for data_, fsdp, tensor in [(2, 2, 2), (2, 1, 4)]:
        run_dir = tmp_path / f"{data_}{fsdp}{tensor}"
        train.run(compose(*LLAMA_RUN, f"mesh.data={data_}", f"mesh.fsdp={fsdp}", f"mesh.tensor={tensor}"),
                  run_dir)
        np.testing.assert_allclose(_losses(run_dir), ref, rtol=1e-4)


@pytest.mark.parametrize("override", ["model.mlp=swiglu", "model.mlp_hidden=96", "model.n_kv_heads=2",
                                      "model.qk_norm=true"])
def test_resume_and_init_from_check_the_block_fields(override):
    """A checkpoint's params only fit a run with the same blocks: each knob is part of what
    resume and checkpoint.init_from check. A checkpoint from before the knobs existed reads
    them as their defaults (today's block), so it still fits a default run."""
    from research import config
    from research.checkpoint import PARAM_LAYOUT, check_compatible

    written = config.parse(compose(*TINY))
    meta = {"config": dataclasses.asdict(written), "vocab_size": 256, "param_layout": PARAM_LAYOUT}
    changed = config.parse(compose(*TINY, override))
    field = override.split("=")[0]
    for where in ("checkpoint.resume", "checkpoint.init_from"):
        with pytest.raises(ConfigError) as err:
            check_compatible(meta, changed, 256, "RUN/checkpoints/3", where)
        assert err.value.field == field
    older = json.loads(json.dumps(meta))
    for name in ("mlp", "mlp_hidden", "n_kv_heads", "qk_norm"):
        del older["config"]["model"][name]
    check_compatible(older, written, 256, "RUN/checkpoints/3", "checkpoint.resume")
