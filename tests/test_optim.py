"""Schedules, the weight-decay mask, and the optimizers through the real train step."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from research import config, data, model, optim
from research import sharding as shd
from research import step as steplib
from research.config import OptimConfig, ScheduleConfig
from tests.conftest import TINY, compose

LR = 1e-3
STEPS = 100


def _lrs(name: str, steps: int = STEPS, **kw) -> np.ndarray:
    sched = optim.make_schedule(ScheduleConfig(name=name, **kw), LR, steps)
    return np.asarray(jax.vmap(sched)(jnp.arange(steps)))


# ------------------------------------------------------------ schedules


@pytest.mark.parametrize("name", optim.SCHEDULES.names())
def test_warmup_is_linear_to_lr(name):
    warmup = 10
    lrs = _lrs(name, warmup=warmup)
    expected = LR * np.arange(1, warmup + 1) / warmup
    np.testing.assert_allclose(lrs[:warmup], expected, rtol=1e-6)
    assert lrs[0] > 0  # the first step already moves
    assert lrs[warmup - 1] == pytest.approx(LR, rel=1e-6)
    assert np.all(np.diff(lrs[:warmup]) > 0)


def test_no_warmup_starts_at_lr():
    for name in optim.SCHEDULES.names():
        assert float(_lrs(name, warmup=0)[0]) == pytest.approx(LR, rel=1e-6), name


def test_cosine_ends_at_floor():
    lrs = _lrs("cosine", warmup=10, min_lr_ratio=0.1)
    assert lrs[-1] == pytest.approx(LR * 0.1, rel=1e-5)
    assert np.all(np.diff(lrs[9:]) <= 1e-12)  # non-increasing after warmup
    assert lrs.min() >= LR * 0.1 * (1 - 1e-6)
    # Half-way through the decay it is half-way between lr and the floor.
    mid = 10 + (STEPS - 1 - 10) / 2
    sched = optim.make_schedule(ScheduleConfig(name="cosine", warmup=10, min_lr_ratio=0.1), LR, STEPS)
    assert float(sched(mid)) == pytest.approx(LR * 0.55, rel=1e-5)
    # min_lr_ratio=0 decays to zero.
    assert _lrs("cosine", warmup=10, min_lr_ratio=0.0)[-1] == pytest.approx(0.0, abs=1e-9)


def test_wsd_stable_then_linear_decay():
    lrs = _lrs("wsd", warmup=10, min_lr_ratio=0.1, decay_frac=0.2)
    floor, decay_steps = LR * 0.1, 20
    decay_start = STEPS - decay_steps
    np.testing.assert_allclose(lrs[9:decay_start - 1], LR, rtol=1e-6)  # stable phase
    tail = lrs[decay_start:]
    diffs = np.diff(tail)
    assert np.all(diffs < 0)
    np.testing.assert_allclose(diffs, diffs.mean(), rtol=1e-3)  # linear
    assert diffs.mean() == pytest.approx(-(LR - floor) / decay_steps, rel=0.06)
    # Ends at the floor (to within one decay increment; see the report on wsd's last step).
    assert floor * (1 - 1e-6) <= lrs[-1] <= floor + (LR - floor) / decay_steps * (1 + 1e-4)
    assert lrs.min() >= floor * (1 - 1e-6)


def test_constant_is_flat_after_warmup():
    lrs = _lrs("constant", warmup=10)
    np.testing.assert_allclose(lrs[9:], LR, rtol=1e-7)


def test_rsqrt_decays_as_inverse_sqrt():
    warmup = 10
    sched = optim.make_schedule(ScheduleConfig(name="rsqrt", warmup=warmup), LR, 10_000)
    assert float(sched(warmup - 1)) == pytest.approx(LR, rel=1e-6)  # continuous with warmup
    for k in (10, 25, 100, 1000):
        # step + 1 = k  ->  lr * sqrt(warmup / k); quadrupling the step halves the lr.
        assert float(sched(k - 1)) == pytest.approx(LR * np.sqrt(warmup / k), rel=1e-5)
        assert float(sched(4 * k - 1)) == pytest.approx(float(sched(k - 1)) / 2, rel=1e-5)


def test_schedule_traces_under_jit():
    sched = optim.make_schedule(ScheduleConfig(name="cosine", warmup=10), LR, STEPS)
    assert float(jax.jit(sched)(jnp.int32(50))) == pytest.approx(float(sched(50)), rel=1e-6)


# ------------------------------------------------------------ weight decay


@functools.lru_cache(maxsize=1)
def _tiny_params():
    """Params of the tiny model (built once: eager init is slow; arrays are immutable)."""
    cfg = config.parse(compose(*TINY))
    m = model.build(cfg.model, 64, cfg.data.seq_len, 0)
    return nnx.split(m)[1].to_pure_dict()


def _is_matrix(path, leaf) -> bool:
    """A weight matrix, not a norm scale or bias. Block weights (under `blocks`) carry a
    leading layers dim (model.Block): a stacked matrix is 3-D, a stacked vector 2-D."""
    stacked = getattr(path[0], "key", None) == "blocks"
    return leaf.ndim - stacked >= 2


def test_decay_mask_matrices_only():
    params = {"w": jnp.ones((3, 4)), "b": jnp.ones(4), "scale": jnp.ones(3), "t": jnp.ones((2, 2, 2))}
    assert optim.decay_mask(params) == {"w": True, "b": False, "scale": False, "t": True}
    stacked = {"blocks": {"wq": jnp.ones((4, 3, 3)), "norm": {"scale": jnp.ones((4, 3)), "bias": jnp.ones((4, 3))}}}
    assert optim.decay_mask(stacked) == {"blocks": {"wq": True, "norm": {"scale": False, "bias": False}}}

    real = _tiny_params()
    mask = optim.decay_mask(real)
    flat = dict(jax.tree_util.tree_leaves_with_path(real))
    flat_mask = dict(jax.tree_util.tree_leaves_with_path(mask))
    names = {jax.tree_util.keystr(k): v for k, v in flat_mask.items()}
    assert any(names.values()) and not all(names.values())
    assert any(leaf.ndim == 2 and "blocks" in jax.tree_util.keystr(path) for path, leaf in flat.items())
    for path, leaf in flat.items():
        key = jax.tree_util.keystr(path)
        assert flat_mask[path] == _is_matrix(path, leaf), key
        if "norm" in key:  # the blocks' stacked (layers, D) norm scales too
            assert not flat_mask[path], key
        if "embed" in key or "wq" in key:
            assert flat_mask[path], key


@pytest.mark.parametrize("name", optim.OPTIMIZERS.names())
@pytest.mark.parametrize("clip", [0.0, 1.0])
def test_weight_decay_skips_vectors(name, clip):
    """Zero gradients: only decay moves params, and it moves matrices, never norm scales."""
    params = _tiny_params()
    o = OptimConfig(name=name, weight_decay=0.1, clip=clip)
    opt = optim.make_optimizer(o, optim.make_schedule(ScheduleConfig(warmup=0), 1e-2, 100))
    grads = jax.tree.map(jnp.zeros_like, params)
    updates, _ = jax.jit(opt.update)(grads, opt.init(params), params)
    vectors = 0
    for (path, u), p in zip(jax.tree_util.tree_leaves_with_path(updates), jax.tree.leaves(params)):
        key = jax.tree_util.keystr(path)
        if not _is_matrix(path, p):  # norm scales, in the blocks (stacked, 2-D) and the final one
            vectors += 1
            assert np.all(np.asarray(u) == 0), key
        else:
            assert np.any(np.asarray(u) != 0), key
            if "blocks" in key:  # every layer's slice of a stacked matrix decays
                assert np.all(np.any(np.asarray(u) != 0, axis=(1, 2))), key
            # Decoupled decay shrinks weights towards zero.
            assert float(jnp.sum(u * p)) < 0, key
    assert vectors >= 3  # the blocks' two stacked norm scales and the final norm's, at least


def test_no_weight_decay_means_no_update_on_zero_grads():
    params = _tiny_params()
    for name in optim.OPTIMIZERS.names():
        o = OptimConfig(name=name, weight_decay=0.0)
        opt = optim.make_optimizer(o, optim.make_schedule(ScheduleConfig(warmup=0), 1e-2, 100))
        grads = jax.tree.map(jnp.zeros_like, params)
        updates, _ = jax.jit(opt.update)(grads, opt.init(params), params)
        assert all(np.all(np.asarray(u) == 0) for u in jax.tree.leaves(updates)), name


# ------------------------------------------------------------ the real train step


def _setup(*overrides):
    """State, step functions and data on a 1-device mesh, built as research/train.py does."""
    cfg = config.parse(compose(*TINY, *overrides))
    mesh = shd.make_mesh((1, 1, 1), jax.devices()[:1])
    corpus = data.load(cfg.data)
    vocab, seq_len, seed = corpus.vocab_size, cfg.data.seq_len, cfg.train.seed
    abstract_model = nnx.eval_shape(lambda: model.build(cfg.model, vocab, seq_len, seed))
    graphdef, abstract_params = nnx.split(abstract_model)
    param_shardings = shd.param_shardings(abstract_params, mesh)
    abstract_params = abstract_params.to_pure_dict()
    schedule = optim.make_schedule(cfg.schedule, cfg.optim.lr, cfg.train.steps)
    optimizer = optim.make_optimizer(cfg.optim, schedule)
    state_shardings = steplib.state_shardings(abstract_params, param_shardings, optimizer, mesh)

    def init():
        return steplib.init_state(
            lambda: nnx.split(model.build(cfg.model, vocab, seq_len, seed))[1].to_pure_dict(),
            optimizer, state_shardings, seed,
        )

    loss_fn = steplib.make_loss_fn(graphdef, mesh)
    train_step = steplib.make_train_step(loss_fn, optimizer, schedule, cfg.optim.accum,
                                         state_shardings, mesh)
    eval_step = steplib.make_eval_step(loss_fn, param_shardings, mesh)
    bsh = shd.batch_sharding(mesh)

    def batch(which, step):
        return data.device_batch(corpus, which, cfg.train.seed, step, cfg.train.batch_size, seq_len, bsh)

    return cfg, init, train_step, eval_step, batch


# Small synthetic corpus: data loading is not what these tests time.
FAST = ("data.synthetic_tokens=50000",)


@pytest.mark.parametrize("name", optim.OPTIMIZERS.names())
def test_optimizer_reduces_loss(name):
    cfg, init, train_step, eval_step, batch = _setup(f"optim={name}", *FAST)
    state = init()
    val = [batch(data.VAL, i) for i in range(2)]
    before = float(np.mean([eval_step(state["params"], b) for b in val]))
    losses = []
    for s in range(10):
        state, metrics = train_step(state, batch(data.TRAIN, s))
        losses.append(float(metrics["loss"]))
    after = float(np.mean([eval_step(state["params"], b) for b in val]))
    assert int(state["step"]) == 10
    assert np.all(np.isfinite(losses))
    assert before == pytest.approx(np.log(256), rel=0.05)  # starts near uniform
    # Presets as shipped (lion's lr is 10x below adamw's, so it moves least: ~0.08).
    assert after < before - 0.05, (name, before, after, losses)
    assert np.mean(losses[-3:]) < np.mean(losses[:3]), losses


def _one_step(train_step, state, batch):
    state = jax.tree.map(jnp.copy, state)  # the step donates its state argument
    state, metrics = train_step(state, batch)
    return jax.device_get(state["params"]), jax.device_get(metrics)


@pytest.mark.parametrize(
    "extra",
    [("optim=adamw",), ("optim=sgd", "optim.b1=0", "optim.weight_decay=0")],
    ids=["adamw", "sgd"],
)
def test_grad_accumulation_matches_one_big_batch(extra):
    """accum=4 on batch 16 averages 4 microbatch grads: the same update as accum=1.

    AdamW's first step is nearly sign(g), blind to a wrong grad scale; plain SGD
    is linear in g, so it also checks that the microbatch grads are averaged.
    """
    _, init, step1, _, batch = _setup("optim.accum=1", "optim.clip=0", *FAST, *extra)
    _, _, step4, _, _ = _setup("optim.accum=4", "optim.clip=0", *FAST, *extra)
    state, b = init(), batch(data.TRAIN, 0)  # same init and batch for both
    assert b.shape == (16, 33)
    p1, m1 = _one_step(step1, state, b)
    p4, m4 = _one_step(step4, state, b)
    p0 = jax.device_get(state["params"])
    assert not np.allclose(p1["embed"], p0["embed"])  # the step did move the params
    assert float(m4["loss"]) == pytest.approx(float(m1["loss"]), rel=1e-5)
    assert float(m4["grad_norm"]) == pytest.approx(float(m1["grad_norm"]), rel=1e-4)
    assert float(m4["lr"]) == float(m1["lr"])
    leaves1 = jax.tree_util.tree_leaves_with_path(p1)
    leaves4 = jax.tree.leaves(p4)
    assert len(leaves1) == len(leaves4)
    for (path, a), b in zip(leaves1, leaves4):
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-6, err_msg=jax.tree_util.keystr(path))


def test_weight_decay_is_decoupled_and_lr_scaled_in_every_optimizer():
    """p -= lr * wd * p per step whatever the optimizer, following the schedule."""
    import optax

    schedule = optim.make_schedule(ScheduleConfig(name="constant", warmup=0), 1e-2, 100)
    params = {"w": jnp.ones((4, 4)), "scale": jnp.ones(4)}
    for name in ("adamw", "lion", "adafactor", "sgd"):
        opt = optim.make_optimizer(OptimConfig(name=name, lr=1e-2, weight_decay=0.1, clip=0), schedule)
        state, p = opt.init(params), params
        for _ in range(20):
            updates, state = opt.update(jax.tree.map(jnp.zeros_like, p), state, p)
            p = optax.apply_updates(p, updates)
        np.testing.assert_allclose(p["w"], (1 - 1e-3) ** 20, rtol=1e-6, err_msg=name)
        np.testing.assert_array_equal(p["scale"], 1.0, err_msg=name)
