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
from tests.bounds import E_COS, U, assert_bound_catches, assert_close_to_bound, gamma, lr_bound
from tests.conftest import TINY, compose

LR = 1e-3
STEPS = 100


def _lrs(name: str, steps: int = STEPS, **kw) -> np.ndarray:
    sched = optim.make_schedule(ScheduleConfig(name=name, **kw), LR, steps)
    return np.asarray(jax.vmap(sched)(jnp.arange(steps)))


def _lr_bound(name: str, step, steps: int = STEPS, **kw) -> np.ndarray:
    """The fp32 error bound (tests/bounds.lr_bound) on the lr `_lrs` computes at `step`."""
    return lr_bound(ScheduleConfig(name=name, **kw), LR, steps, step)[1]


# ------------------------------------------------------------ schedules


@pytest.mark.parametrize("name", optim.SCHEDULES.names())
def test_warmup_is_linear_to_lr(name):
    warmup = 10
    lrs = _lrs(name, warmup=warmup)
    expected = LR * np.arange(1, warmup + 1) / warmup
    bound = _lr_bound(name, np.arange(warmup), warmup=warmup)
    assert_close_to_bound(lrs[:warmup], expected, bound)
    assert_bound_catches(lrs[1:warmup + 1], expected, bound)  # one step ahead: (step + 2) / warmup
    assert lrs[0] > 0  # the first step already moves
    assert_close_to_bound(lrs[warmup - 1], LR, bound[-1])
    assert np.all(np.diff(lrs[:warmup]) > 0)


def test_no_warmup_starts_at_lr():
    for name in optim.SCHEDULES.names():
        assert_close_to_bound(_lrs(name, warmup=0)[0], LR, _lr_bound(name, 0, warmup=0), err_msg=name)


def test_cosine_ends_at_floor():
    kw = dict(warmup=10, min_lr_ratio=0.1)
    lrs, floor = _lrs("cosine", **kw), LR * 0.1
    exact, bound = lr_bound(ScheduleConfig(name="cosine", **kw), LR, STEPS, np.arange(STEPS))
    assert_close_to_bound(lrs[-1], floor, bound[-1])
    # Non-increasing after warmup, exactly: from step 10 on each exact decrement exceeds the two
    # values' bounds, so the fp32 values decrease too; steps 9 and 10 both have t = 0, the
    # same operations on the same numbers.
    assert np.all(-np.diff(exact[10:]) > bound[10:-1] + bound[11:])
    assert np.all(np.diff(lrs[9:]) <= 0)
    assert np.all(lrs >= floor - bound)
    # Half-way through the decay it is half-way between lr and the floor.
    mid = 10 + (STEPS - 1 - 10) / 2
    sched = optim.make_schedule(ScheduleConfig(name="cosine", **kw), LR, STEPS)
    assert_close_to_bound(sched(mid), LR * 0.55, _lr_bound("cosine", mid, **kw))
    assert_bound_catches(sched(mid + 1), LR * 0.55, _lr_bound("cosine", mid, **kw))  # a step late
    # min_lr_ratio=0 decays to zero.
    zero = dict(warmup=10, min_lr_ratio=0.0)
    assert_close_to_bound(_lrs("cosine", **zero)[-1], 0.0, _lr_bound("cosine", STEPS - 1, **zero))
    assert_bound_catches(_lrs("cosine", **zero)[-2], 0.0, _lr_bound("cosine", STEPS - 1, **zero))
    # The accuracy of XLA's cos that lr_bound assumes (E_COS), eagerly and under jit.
    x = np.linspace(0, np.pi, 4097, dtype=np.float32)
    for cos in (jnp.cos, jax.jit(jnp.cos)):
        assert_close_to_bound(cos(x), np.cos(x.astype(np.float64)), E_COS)


def test_wsd_stable_then_linear_decay():
    kw = dict(warmup=10, min_lr_ratio=0.1, decay_frac=0.2)
    lrs, bound = _lrs("wsd", **kw), _lr_bound("wsd", np.arange(STEPS), **kw)
    floor, decay_steps = LR * 0.1, 20
    decay_start = STEPS - decay_steps
    # Stable phase, exactly fl(lr): the warmup factor is exactly 1 from step 9 on (10 / 10; then
    # quotients >= 1.1, clipped), t clips to exactly 0, and fl(lr) - fl(lr - floor) * 0 = fl(lr).
    np.testing.assert_array_equal(lrs[9:decay_start - 1], np.float32(LR))
    diffs = np.diff(lrs[decay_start:].astype(np.float64))  # exact: fp32 differences fit in float64
    assert np.all(diffs < 0)
    # Linear: the exact decrements are all equal, so each fp32 one is within its two values'
    # bounds of them, and their mean within the mean of those.
    e = bound[decay_start:-1] + bound[decay_start + 1:]
    assert_close_to_bound(diffs, diffs.mean(), e + e.mean())
    # Not a rounding bound: 6% admits a slope of (lr - floor) / (decay_steps - 1), the floor
    # reached at the last step run, as well as / decay_steps (see the report on wsd's last step).
    assert diffs.mean() == pytest.approx(-(LR - floor) / decay_steps, rel=0.06)
    # Ends at the floor (to within one decay increment, as above; then lr_bound's rounding).
    assert floor - bound[-1] <= lrs[-1] <= floor + (LR - floor) / decay_steps + bound[-1]
    assert np.all(lrs >= floor - bound)


def test_constant_is_flat_after_warmup():
    # Exactly fl(lr): the warmup factor is exactly 1 from step 9 on (10 / 10, or 10 * fl(1/10),
    # which rounds to 1; later quotients are >= 1.1 and clipped), and 1 * fl(lr) = fl(lr).
    lrs = _lrs("constant", warmup=10)
    np.testing.assert_array_equal(lrs[9:], np.float32(LR))


def test_rsqrt_decays_as_inverse_sqrt():
    warmup, steps = 10, 10_000
    sched = optim.make_schedule(ScheduleConfig(name="rsqrt", warmup=warmup), LR, steps)

    def bound(step):
        return _lr_bound("rsqrt", step, steps, warmup=warmup)

    assert_close_to_bound(sched(warmup - 1), LR, bound(warmup - 1))  # continuous with warmup
    for k in (10, 25, 100, 1000):
        # step + 1 = k  ->  lr * sqrt(warmup / k); quadrupling the step halves the lr.
        assert_close_to_bound(sched(k - 1), LR * np.sqrt(warmup / k), bound(k - 1))
        # (halving an fp32 number is exact)
        assert_close_to_bound(sched(4 * k - 1), float(sched(k - 1)) / 2, bound(4 * k - 1) + bound(k - 1) / 2)
    assert_bound_catches(sched(1000), LR * np.sqrt(warmup / 1000), bound(999))  # a step late


def test_schedule_traces_under_jit():
    # Not bitwise: XLA compiles the jitted formula as a whole (a division by a constant may become
    # a product with its reciprocal), and at some steps the last bit differs from the eager
    # evaluation. Both are within lr_bound of the exact value.
    s = ScheduleConfig(name="cosine", warmup=10)
    sched = optim.make_schedule(s, LR, STEPS)
    bound = 2 * lr_bound(s, LR, STEPS, 50)[1]
    assert_close_to_bound(jax.jit(sched)(jnp.int32(50)), sched(50), bound)
    assert_bound_catches(jax.jit(sched)(jnp.int32(51)), sched(50), bound)  # a step late


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
    """State, step functions, data and the loss on a 1-device mesh, built as research/train.py does."""
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

    return cfg, init, train_step, eval_step, batch, loss_fn


# Small synthetic corpus: data loading is not what these tests time.
FAST = ("data.synthetic_tokens=50000",)


@pytest.mark.parametrize("name", optim.OPTIMIZERS.names())
def test_optimizer_reduces_loss(name):
    cfg, init, train_step, eval_step, batch, _ = _setup(f"optim={name}", *FAST)
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
    # Starts near uniform: a modelling check (small init), not a rounding bound.
    assert before == pytest.approx(np.log(256), rel=0.05)
    # Presets as shipped (lion's lr is 10x below adamw's, so it moves least: ~0.08).
    assert after < before - 0.05, (name, before, after, losses)
    assert np.mean(losses[-3:]) < np.mean(losses[:3]), losses


def _one_step(train_step, state, batch):
    state = jax.tree.map(jnp.copy, state)  # the step donates its state argument
    state, metrics = train_step(state, batch)
    return jax.device_get(state["params"]), jax.device_get(metrics)


# The batch's predicted tokens, and the microbatches test_grad_accumulation splits them into.
N_TOKENS, ACCUM = 16 * 32, 4


def _accum_grad_bound(g: dict) -> dict:
    """Per leaf, a bound on two fp32 evaluations of the batch gradient differing: one summing it
    over the N = 512 tokens at once (accum=1), one in ACCUM sums of N / ACCUM added in turn.

    Both run the same loss_fn on the same rows, and every op before the loss acts row by row
    (measured: the forward's rows are bitwise the same at 4 and at 16 rows), so the two
    differ in how the gradient's sums over tokens are grouped; the scalings 1/N, 1/(N/ACCUM),
    1/ACCUM are powers of two, exact. Each grouping is within gamma_k of the exact sum times
    its sum of |terms|, k = N + ACCUM + 1 additions (+ 1: the tied embedding adds its lookup's
    and its unembedding's parts). The terms are bounded as test_model's _grad_bound bounds
    them, each by the leaf's largest entry, N of them: 2 gamma_k N max|g| for the pair, 3% of
    max|g|. Loose (~1e4 x the differences measured), but a microbatch dropped and another
    counted twice moves the largest entries by about half of max|g|."""
    k = N_TOKENS + ACCUM + 1
    return jax.tree.map(lambda x: 2 * gamma(k) * N_TOKENS * float(np.abs(x).max()), g)


def _sgd_step_bound(lr: float, g, beta, p1):
    """Plain SGD, p - fl(lr g) rounded to p': the two gradients differ by at most beta, so the
    steps by lr beta; each product rounds (u lr |g|, |g| <= |g_ref| + beta) and each sum
    (u |p'|, |p'| <= |p1| + lr beta)."""
    g, p1 = np.abs(np.asarray(g, np.float64)), np.abs(np.asarray(p1, np.float64))
    return lr * beta + 2 * U * (lr * (g + beta) + p1 + lr * beta)


def _adamw_step_bound(o: OptimConfig, lr: float, g, beta, p1):
    """AdamW's first step moves p by -lr (d(g) + wd p), d(g) = g / (|g| + eps) exactly (the
    bias-corrected moments are g and g^2).

    Each evaluated gradient is within beta / 2 of the exact one, as the reference g is, so
    within beta of g: where |g| > beta both share its sign and |d(g1) - d(g4)| <= eps beta /
    (m + eps)^2, m = |g| - beta; elsewhere d may flip, by up to 2. The moment and bias-correction
    constants are rounded once and the same on both sides; the rest of each side's update is
    10 roundings relative (the two moments 1 and 2, their bias corrections 2 each, as a
    division may become a product with a reciprocal; sqrt, + eps, the quotient, + decay, x lr;
    sqrt halves what it is given), and p + update rounds by u |p'|, |p'| <= |p1| + 2 lr."""
    g, p1 = np.abs(np.asarray(g, np.float64)), np.abs(np.asarray(p1, np.float64))
    m = np.maximum(g - beta, 0.0)
    flip = np.where(g > beta, np.minimum(2.0, o.eps * beta / (m + o.eps) ** 2), 2.0)
    return lr * flip + 2 * gamma(10) * lr * (1 + o.weight_decay * p1) + 2 * U * (p1 + 2 * lr)


@pytest.mark.parametrize(
    "extra",
    [("optim=adamw",), ("optim=sgd", "optim.b1=0", "optim.weight_decay=0")],
    ids=["adamw", "sgd"],
)
def test_grad_accumulation_matches_one_big_batch(extra):
    """accum=4 on batch 16 averages 4 microbatch grads: the same update as accum=1, to within
    the fp32 bounds above, which a microbatch dropped (another counted twice) falls outside.

    AdamW's first step is nearly sign(g), blind to a wrong grad scale; plain SGD
    is linear in g, so it also checks that the microbatch grads are averaged.
    """
    cfg, init, step1, _, batch, loss_fn = _setup("optim.accum=1", "optim.clip=0", *FAST, *extra)
    _, _, step4, _, _, _ = _setup(f"optim.accum={ACCUM}", "optim.clip=0", *FAST, *extra)
    state, b = init(), batch(data.TRAIN, 0)  # same init and batch for both
    assert b.shape == (16, 33) and N_TOKENS == 16 * 32
    p1, m1 = _one_step(step1, state, b)
    p4, m4 = _one_step(step4, state, b)
    p0 = jax.device_get(state["params"])
    assert not np.allclose(p1["embed"], p0["embed"])  # the step did move the params
    assert float(m4["lr"]) == float(m1["lr"])  # the same schedule on the same step: bitwise
    # Wrong: microbatch 3 (rows 3, 7, 11, 15) dropped, and microbatch 0 counted in its place.
    pw, mw = _one_step(step4, state, b.at[3::ACCUM].set(b[0::ACCUM]))

    # The loss: the mean of N positive per-token losses (the same numbers on both sides), one
    # sum of N or sums of N / ACCUM then ACCUM: each within gamma_N of the exact mean.
    loss_bound = 2 * gamma(N_TOKENS) * float(m1["loss"])
    assert_close_to_bound(m4["loss"], m1["loss"], loss_bound)
    assert_bound_catches(mw["loss"], m1["loss"], loss_bound)

    g = jax.device_get(jax.jit(jax.grad(lambda p, b: loss_fn(p, b)[0]))(state["params"], b))
    beta = _accum_grad_bound(g)
    # The global norm sqrt(sum over leaves of sum g^2): on one g, within gamma_n / 2 + u relative
    # (positive terms, n = the largest leaf + the leaves + 1 for the squares; sqrt halves); the
    # two g differ by at most beta elementwise, which moves the norm by at most ||beta||.
    leaves = jax.tree.leaves(g)
    n = max(x.size for x in leaves) + len(leaves) + 1
    norm_bound = (np.sqrt(sum(x.size * bt**2 for x, bt in zip(leaves, jax.tree.leaves(beta))))
                  + 2 * (gamma(n) / 2 + U) * float(m1["grad_norm"]))
    # 17% of the norm here: it sees grads summed rather than averaged, not the wrong microbatch
    # (12%), which the loss above and the params below do see.
    assert_close_to_bound(m4["grad_norm"], m1["grad_norm"], norm_bound)
    assert_bound_catches(ACCUM * m1["grad_norm"], m1["grad_norm"], norm_bound)  # summed, not averaged

    lr, o = float(m1["lr"]), cfg.optim
    step_bound = functools.partial(_adamw_step_bound, o) if o.name == "adamw" else _sgd_step_bound
    assert o.name in ("adamw", "sgd") and (o.name == "adamw" or (o.b1 == 0 and o.weight_decay == 0))
    bounds = jax.tree.map(lambda g, bt, p: step_bound(lr, g, bt, p), g, beta, p1)
    leaves1 = jax.tree_util.tree_leaves_with_path(p1)
    assert len(leaves1) == len(jax.tree.leaves(p4)) == len(jax.tree.leaves(bounds))
    for (path, a), c, bound in zip(leaves1, jax.tree.leaves(p4), jax.tree.leaves(bounds)):
        assert_close_to_bound(c, a, bound, err_msg=jax.tree_util.keystr(path))
    flat = [np.concatenate([np.ravel(x) for x in jax.tree.leaves(t)]) for t in (pw, p1, bounds)]
    assert_bound_catches(*flat)


def test_weight_decay_is_decoupled_and_lr_scaled_in_every_optimizer():
    """p -= lr * wd * p per step whatever the optimizer, following the schedule."""
    import optax

    lr, wd, steps = 1e-2, 0.1, 20
    schedule = optim.make_schedule(ScheduleConfig(name="constant", warmup=0), lr, 100)
    params = {"w": jnp.ones((4, 4)), "scale": jnp.ones(4)}
    # Zero gradients: every direction is exactly 0, and a step is p - fl(fl(lr) fl(fl(wd) p)).
    # The decrement is off by 4 u of lr wd p (two conversions, two products), the subtraction
    # rounds to a value in [0.5, 1) by at most half an ulp there (u / 2), and the exact step
    # p -> (1 - lr wd) p shrinks earlier errors: after n steps at most n (u / 2 + 4 u lr wd).
    expected, bound = (1 - lr * wd) ** steps, steps * (U / 2 + 4 * U * lr * wd)
    assert_bound_catches(expected * (1 - lr * wd), expected, bound)  # one decay step too many
    for name in ("adamw", "lion", "adafactor", "sgd"):
        opt = optim.make_optimizer(OptimConfig(name=name, lr=lr, weight_decay=wd, clip=0), schedule)
        state, p = opt.init(params), params
        for _ in range(steps):
            updates, state = opt.update(jax.tree.map(jnp.zeros_like, p), state, p)
            p = optax.apply_updates(p, updates)
        assert_close_to_bound(p["w"], expected, bound, err_msg=name)
        np.testing.assert_array_equal(p["scale"], 1.0, err_msg=name)
