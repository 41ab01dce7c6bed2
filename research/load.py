"""`research.load_run(run_dir, step=None)`: a finished (or running) run, for notebooks."""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

import jax
import pandas as pd
from flax import nnx

from research import checkpoint as ckpt
from research import sharding as shd
from research import config, model
from research.analysis.runs import load_curves


# Fields older runs recorded that no longer exist (train.keep_awake moved to the CPU plugin).
RETIRED = (("train", "keep_awake"),)


def portable(saved: dict) -> dict:
    """A saved run config made loadable here: no plugins, `auto` kernels, retired fields dropped."""
    saved = {**saved, "plugins": [], "plugin_options": {},
             "model": {**saved["model"], "attention": "auto", "matmul": "auto"}}
    for section, key in RETIRED:
        saved[section] = {k: v for k, v in saved.get(section, {}).items() if k != key}
    return saved


class LoadedRun(NamedTuple):
    config: config.Config
    model: model.Transformer
    metrics: pd.DataFrame
    step: int


def load_run(run_dir: str | Path, step: int | None = None) -> LoadedRun:
    """Config, a Transformer with the params of checkpoint `step` (default: newest), metrics.

    Params land on the default device, whatever mesh wrote them, and the model runs the
    core's kernels for it (`auto`), whatever kernels or plugins trained it: the params
    are the same. `cfg, net, metrics, step = load_run("runs/...")`; `net(tokens_BxL)`
    gives logits.
    """
    run_dir = Path(run_dir)
    directory, newest = ckpt.find_checkpoint(run_dir)
    step = newest if step is None else step
    meta = ckpt.Checkpointer(directory).meta(step)
    ckpt.check_layout(meta, f"{directory / str(step)}", "run_dir")
    cfg = config.parse(portable(meta["config"]))
    abstract = nnx.eval_shape(
        lambda: model.build(cfg.model, meta["vocab_size"], cfg.data.seq_len, cfg.train.seed,
                            cfg.param))
    graphdef, abstract_state = nnx.split(abstract)
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    target = shd.abstract_with_shardings(
        abstract_state.to_pure_dict(),
        jax.tree.map(lambda _: device, abstract_state.to_pure_dict()))
    params, _, _ = ckpt.restore_params(directory / str(step), target)
    nnx.replace_by_pure_dict(abstract_state, params)
    net = nnx.merge(graphdef, abstract_state)
    metrics_path = run_dir / "metrics.jsonl"
    metrics = load_curves(run_dir) if metrics_path.exists() else pd.DataFrame()
    return LoadedRun(cfg, net, metrics, step)
