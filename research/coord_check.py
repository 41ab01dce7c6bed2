"""`python -m research.coord_check param=mup [overrides] [--widths=64,128,...] [--steps=N] [--seeds=N] [--out=DIR]`

The coordinate check of Yang et al. (2022, arXiv:2203.03466, section 6.1 and
appendix D): train the same model at several widths for a few steps at a large
learning rate and watch how big every layer's output is. Under a
parameterization that transfers (muP), the typical size of an activation
coordinate does not depend on width, at init and after updates alike; under
the standard one, outputs grow with width as training starts, the sign that
its best learning rate must shrink as the model grows.

For each width the model sees the same batches (the batch for step s is a
function of the seed and s). At each step t = 1..steps, the forward pass of
the train step records the mean |activation| of: the embedding output, each
block's attention logits (scale * q.k over visible pairs), attention and MLP
branch outputs and residual stream, and the output logits; then the
optimizer updates. Step 1 is the model at init. Each value is the mean over
--seeds inits and data orders (default 3; one compile per width still).

Writes `coord_check.png` (log-log width vs mean |activation|, one line per
layer, one panel per step) and `coord_check.json` (every record) to --out
(default runs/coord_check/<param>_<time>/). Prints, as its last line, one JSON
object: layer -> slope of log(mean |activation|) against log(width) at the
last step (0: width-independent; 1: grows linearly with width).
"""

from __future__ import annotations

import functools
import json
import sys
import time
from pathlib import Path

import jax
import numpy as np
import optax
from flax import nnx

from research import conf, config, data, model
from research import sharding as shd
from research import step as steplib

WIDTHS = (64, 128, 256, 512, 1024)
STEPS = 5
SEEDS = 3  # averaged: with few tokens per step a single run is noisy
# Applied before the user's overrides: a constant and deliberately large lr,
# no clipping or decay to blur the picture, and few tokens per step. muP's
# guarantee is a limit of width at a fixed batch: an Adam update is aligned with
# the layer inputs to about 1/sqrt(tokens), so at widths below the number of
# tokens per step its random part (~ width^-1/2 under muP) still shows. With
# 2 x 32 tokens, widths from 64 up are in the regime the theory describes.
DEFAULTS = (
    "model.n_layers=2",
    "data.seq_len=32",
    "train.batch_size=2",
    "optim.lr=1e-2",
    "optim.clip=0",
    "optim.weight_decay=0",
    "schedule=constant",
    "schedule.warmup=0",
)


def _make_step(plan: steplib.Plan):
    """Jitted (state, batch_BxL1) -> (state, loss, taps): one train step that also reports activations."""

    def loss_and_taps(params, batch_BxL1):
        net = nnx.merge(plan.graphdef, nnx.State(params))
        taps: dict = {}
        logits_BxLxV = net(batch_BxL1[:, :-1], taps=taps)
        loss = optax.softmax_cross_entropy_with_integer_labels(logits_BxLxV, batch_BxL1[:, 1:]).mean()
        return loss, taps

    def train_step(state, batch_BxL1):
        (loss, taps), grads = jax.value_and_grad(loss_and_taps, has_aux=True)(state["params"], batch_BxL1)
        updates, opt_state = plan.optimizer.update(grads, state["opt_state"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        return {**state, "params": params, "opt_state": opt_state, "step": state["step"] + 1}, loss, taps

    return jax.jit(train_step, donate_argnums=0)


def measure(cfg: config.Config, corpus, steps: int, mesh, seeds: int = 1
            ) -> tuple[list[dict[str, float]], list[float]]:
    """Train `cfg` for `steps` steps from `seeds` seeds (init and data: train.seed,
    train.seed + 1, ...); per step, {layer: mean |output|} and the loss, averaged over seeds."""
    plan = steplib.plan(cfg, corpus.vocab_size, mesh)
    train_step = _make_step(plan)

    # The seed is traced: one init compile per width, whatever the number of seeds; and
    # the state comes out with the shardings the step returns, so the step compiles once.
    @functools.partial(jax.jit, out_shardings=plan.state_shardings)
    def init(seed):
        net = model.build(cfg.model, corpus.vocab_size, cfg.data.seq_len, jax.random.key(seed), cfg.param)
        return steplib.new_state(nnx.split(net)[1].to_pure_dict(), plan.optimizer, seed)

    sharding = shd.batch_sharding(mesh)
    records = [{} for _ in range(steps)]
    losses = [0.0] * steps
    for seed in range(cfg.train.seed, cfg.train.seed + seeds):
        state = init(seed)
        for s in range(steps):
            batch = data.device_batch(corpus, data.TRAIN, seed, s, cfg.train.batch_size,
                                      cfg.data.seq_len, sharding)
            state, loss, taps = train_step(state, batch)
            for name, value in jax.device_get(taps).items():
                records[s][name] = records[s].get(name, 0.0) + float(value) / seeds
            losses[s] += float(loss) / seeds
    return records, losses


def slopes(widths: list[int], values: dict[str, list[float]]) -> dict[str, float]:
    """Least-squares slope of log(value) on log(width), per layer (nan if any value is not finite and > 0)."""
    x = np.log(np.asarray(widths, float))
    out = {}
    for name, ys in values.items():
        ys = np.asarray(ys, float)
        ok = np.all(np.isfinite(ys)) and np.all(ys > 0)
        out[name] = float(np.polyfit(x, np.log(ys), 1)[0]) if ok else float("nan")
    return out


def run(overrides: list[str], widths=WIDTHS, steps: int = STEPS, out: str | Path | None = None,
        seeds: int = SEEDS) -> dict:
    """The whole check; returns {'param', 'widths', 'steps', 'seeds', 'records', 'losses', 'slopes', 'plot'}."""
    devices = jax.devices()[:1]  # a diagnostic of small models: one device, no mesh questions
    mesh = shd.make_mesh((1, 1, 1), devices)
    cfgs = [config.parse(conf.compose([*DEFAULTS, *overrides, f"model.d_model={w}", f"train.steps={steps}"]))
            for w in widths]
    corpus = data.load(cfgs[0].data)
    per_width, losses = [], {}
    for width, cfg in zip(widths, cfgs):
        t0 = time.perf_counter()
        records, losses[width] = measure(cfg, corpus, steps, mesh, seeds)
        per_width.append(records)
        print(f"width {width}: loss {losses[width][0]:.3f} -> {losses[width][-1]:.3f} "
              f"({time.perf_counter() - t0:.1f}s)", file=sys.stderr)
    layers = list(per_width[0][0])
    # records[layer][t] = values over widths at step t + 1
    table = {name: [[per_width[w][t][name] for w in range(len(widths))] for t in range(steps)]
             for name in layers}
    result = {"param": cfg.param.name, "widths": list(widths), "steps": steps, "seeds": seeds,
              "lr": cfg.optim.lr, "optim": cfg.optim.name, "records": table,
              "losses": {str(w): v for w, v in losses.items()},
              "slopes": slopes(list(widths), {name: table[name][-1] for name in layers})}
    out_dir = Path(out) if out else Path("runs/coord_check") / f"{cfg.param.name}_{time.strftime('%Y-%m-%d_%H-%M-%S')}"
    out_dir.mkdir(parents=True, exist_ok=True)
    result["plot"] = str(plot(result, out_dir / "coord_check.png"))
    (out_dir / "coord_check.json").write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {out_dir / 'coord_check.png'} and {out_dir / 'coord_check.json'}", file=sys.stderr)
    return result


def plot(result: dict, out: Path) -> Path:
    """One log-log panel per step: width vs mean |activation|, a line per layer."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps, widths, table = result["steps"], result["widths"], result["records"]
    fig, axes = plt.subplots(1, steps, figsize=(2.6 * steps + 1.6, 3.2), sharey=True, squeeze=False)
    cmap = plt.get_cmap("tab20")
    for t, ax in enumerate(axes[0]):
        for i, (name, per_step) in enumerate(table.items()):
            ax.plot(widths, per_step[t], marker=".", color=cmap(i % 20), label=name, lw=1)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_title(f"step {t + 1}", fontsize=9)
        ax.set_xlabel("width (d_model)", fontsize=8)
        ax.grid(True, which="both", alpha=0.25)
        ax.tick_params(labelsize=7)
    axes[0][0].set_ylabel("mean |activation|", fontsize=8)
    axes[0][-1].legend(fontsize=6, loc="center left", bbox_to_anchor=(1.02, 0.5))
    fig.suptitle(f"coordinate check: {result['param']}, {result['optim']} lr {result['lr']:g}", fontsize=10)
    fig.tight_layout()
    fig.savefig(out, dpi=80)
    plt.close(fig)
    return out


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    widths, steps, seeds, out, overrides = WIDTHS, STEPS, SEEDS, None, []
    try:
        for arg in argv:
            flag, _, value = arg.partition("=")
            if flag == "--widths":
                widths = tuple(int(w) for w in value.split(","))
            elif flag == "--steps":
                steps = int(value)
            elif flag == "--seeds":
                seeds = int(value)
            elif flag == "--out":
                out = value
            else:
                overrides.append(arg)
    except ValueError:
        print(f"config error: {arg}: expected --widths=64,128,..., --steps=N or --seeds=N", file=sys.stderr)
        return 2
    try:
        if len(widths) < 2 or min(widths) <= 0 or steps < 1 or seeds < 1:
            raise config.ConfigError("--widths", "need at least two positive widths, --steps >= 1, --seeds >= 1")
        if any(a.startswith(("model.d_model=", "train.steps=")) for a in overrides):
            raise config.ConfigError("model.d_model", "set by the check: use --widths and --steps")
        conf.check_overrides(overrides)
        result = run(overrides, widths, steps, out, seeds)
    except config.ConfigError as err:
        print(f"config error: {err}", file=sys.stderr)
        return 2
    print(json.dumps(result["slopes"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
