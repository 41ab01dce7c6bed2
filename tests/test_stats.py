"""Per-layer RMS statistics (`train.stats_every`): right values, and training untouched by them."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from research import config, data, train, step as steplib
from research import sharding as shd
from research.stats import StatsStep, param_groups, update_rms
from tests.conftest import TINY, compose


def test_stats_every_is_validated():
    assert config.parse(compose(*TINY)).train.stats_every == 0  # off unless asked
    with pytest.raises(config.ConfigError, match="train.stats_every"):
        config.parse(compose(*TINY, "train.stats_every=-1"))


def test_stats_leave_training_bitwise_unchanged_and_measure_the_update():
    """The loop's order: snapshot, donated train step, stats. Params must match a run without stats."""
    cfg = config.parse(compose(*TINY))
    mesh = shd.make_mesh((1, 1, 1), jax.devices()[:1])
    corpus = data.load(cfg.data)
    plan = steplib.plan(cfg, corpus.vocab_size, mesh)
    loss_fn = steplib.make_loss_fn(plan.graphdef, mesh)
    train_step = steplib.make_train_step(loss_fn, plan.optimizer, plan.schedule, 1, plan.state_shardings, mesh)
    batches = [data.device_batch(corpus, data.TRAIN, 0, s, 16, cfg.data.seq_len, shd.batch_sharding(mesh))
               for s in range(3)]

    state = plan.fresh_state()
    plain = jax.tree.map(jnp.copy, state)  # a second state, without a second init compile
    for batch in batches:
        plain, _ = train_step(plain, batch)

    stats_step = StatsStep(plan.graphdef, plan.param_shardings, mesh, state["params"], batches[0])
    for batch in batches:
        snapshot = stats_step.snapshot(state["params"])
        before = jax.device_get(state["params"])
        state, _ = train_step(state, batch)  # donates the params the snapshot copied
        stats = jax.device_get(stats_step.stats(snapshot, state["params"], batch))
        after = jax.device_get(state["params"])
        for name, arrays in param_groups(after).items():
            olds = param_groups(before)[name]
            sq = sum(float(np.sum((np.asarray(a, np.float64) - b) ** 2)) for a, b in zip(arrays, olds))
            assert stats[f"update_rms/{name}"] == pytest.approx(np.sqrt(sq / sum(a.size for a in arrays)), rel=1e-4)
        keys = sorted(k for k in stats if k.startswith("act_rms/"))
        assert keys == [f"act_rms/resid{i}" for i in range(cfg.model.n_layers + 1)]
        assert all(np.isfinite(v) and v > 0 for v in stats.values())
    # Same code and numerics as a run without stats: bitwise equal params.
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(plain["params"]), jax.device_get(state["params"]))
    assert set(param_groups(jax.device_get(state["params"]))) == {"embed", "block0", "block1", "final_norm"}


def test_update_rms_is_zero_for_no_change():
    # Block weights are stacked (model.Block): block{i} is slice i of every one of them.
    params = {"embed": jnp.ones((4, 2)), "blocks": {"w": jnp.ones((2, 3)), "norm": {"scale": jnp.ones((2, 3))}}}
    moved = {"embed": jnp.ones((4, 2)),
             "blocks": {"w": jnp.array([[1.0, 1.0, 1.0], [1.0, 1.0, 4.0]]), "norm": {"scale": jnp.ones((2, 3))}}}
    assert set(update_rms(params, params)) == {"update_rms/embed", "update_rms/block0", "update_rms/block1"}
    assert float(update_rms(params, params)["update_rms/block1"]) == 0.0
    rms = update_rms(params, moved)
    assert float(rms["update_rms/embed"]) == 0.0
    assert float(rms["update_rms/block0"]) == 0.0  # only block 1 moved
    assert float(rms["update_rms/block1"]) == pytest.approx(np.sqrt(9 / 6))  # over both its weights


def test_training_logs_stats_of_every_distinct_block_and_layer(tmp_path):
    """Depth 4 with 2 shared blocks: update RMS per distinct block (slices of the stack),
    activation RMS after every layer (the scan's residual streams)."""
    train.run(compose(*TINY, "model.n_layers=4", "model.share_layers=2", "train.stats_every=10",
                      "mesh=single"), tmp_path, devices=jax.devices()[:1])
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    stats = [r for r in rows if any(k.startswith("update_rms/") for k in r)]
    assert [r["step"] for r in stats] == [10, 20]
    for r in stats:
        assert sorted(k for k in r if k.startswith("update_rms/block")) == ["update_rms/block0", "update_rms/block1"]
        assert sorted(k for k in r if k.startswith("act_rms/")) == [f"act_rms/resid{i}" for i in range(5)]
        assert r["update_rms/block0"] > 0 and r["update_rms/block1"] > 0
        assert r["update_rms/block0"] != r["update_rms/block1"]  # two blocks, two updates
        assert all(r[f"act_rms/resid{i}"] > 0 for i in range(5))
        assert len({r[f"act_rms/resid{i}"] for i in range(5)}) == 5  # layers 0 and 2 share a block, not a stream
