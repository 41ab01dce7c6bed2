"""Hydra entry point: `python -m research.train [overrides]`.

`run(cfg, run_dir)` is the whole run, top to bottom, in named sections:
config -> mesh -> corpus -> model and shardings -> init or restore ->
compile -> loop (step, log, eval, checkpoint) -> summary.
Invalid configs stop in the first section with one line and exit code 2.
"""

from __future__ import annotations

import dataclasses
import platform
import sys
import time
from pathlib import Path

import hydra
import jax
import numpy as np
from flax import nnx
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from research import checkpoint as ckpt
from research import config, data, flops, model, optim
from research import sharding as shd
from research import step as steplib
from research.logging import RunLogger

EXIT_CONFIG_ERROR = 2
EXIT_DIVERGED = 3


def evaluate(eval_step, params, corpus, cfg: config.Config, batch_sharding) -> float:
    """Mean loss over the same `train.eval_batches` validation batches every time."""
    t = cfg.train
    losses = [
        eval_step(params, data.device_batch(corpus, data.VAL, t.seed, i, t.batch_size,
                                            cfg.data.seq_len, batch_sharding))
        for i in range(t.eval_batches)
    ]
    return float(np.mean(jax.device_get(losses)))


def run(raw_cfg: DictConfig | dict, run_dir: str | Path, devices=None) -> dict:
    """Train one model as configured; write the run directory; return the summary."""
    wall0 = time.perf_counter()
    run_dir = Path(run_dir)

    # -- Config, mesh and corpus: every check before anything is compiled.
    cfg = config.parse(raw_cfg)
    devices = list(devices) if devices is not None else jax.devices()
    mesh = shd.make_mesh(shd.mesh_shape(cfg.mesh, len(devices)), devices)
    micro_batch = cfg.train.batch_size // cfg.optim.accum
    if micro_batch % shd.dp_size(mesh):
        raise config.ConfigError(
            "train.batch_size",
            f"{cfg.train.batch_size} / optim.accum={cfg.optim.accum} = {micro_batch} sequences is "
            f"not divisible by the data-parallel size mesh.data*mesh.fsdp={shd.dp_size(mesh)}",
        )
    corpus = data.load(cfg.data)
    checkpointer = ckpt.Checkpointer(run_dir / "checkpoints", cfg.checkpoint.every, cfg.checkpoint.keep)
    latest = checkpointer.latest_step()
    if latest is not None and not cfg.checkpoint.resume:
        raise config.ConfigError(
            "checkpoint.resume",
            f"false, but {checkpointer.directory} already holds checkpoints (newest step {latest}); "
            "use another run dir or checkpoint.resume=true",
        )

    # -- Model, optimizer and the shardings of the whole train state.
    vocab, seq_len, seed = corpus.vocab_size, cfg.data.seq_len, cfg.train.seed
    abstract_model = nnx.eval_shape(lambda: model.build(cfg.model, vocab, seq_len, seed))
    graphdef, abstract_params = nnx.split(abstract_model)
    param_shardings = shd.param_shardings(abstract_params, mesh)
    abstract_params = abstract_params.to_pure_dict()
    schedule = optim.make_schedule(cfg.schedule, cfg.optim.lr, cfg.train.steps)
    optimizer = optim.make_optimizer(cfg.optim, schedule)
    state_shardings = steplib.state_shardings(abstract_params, param_shardings, optimizer, mesh)

    # -- Init, or restore the newest checkpoint onto the current mesh.
    if latest is None:
        state = steplib.init_state(
            lambda: nnx.split(model.build(cfg.model, vocab, seq_len, seed))[1].to_pure_dict(),
            optimizer, state_shardings,
        )
    else:
        shapes = jax.eval_shape(
            lambda: {"params": abstract_params, "opt_state": optimizer.init(abstract_params),
                     "step": np.int32(0)})
        state = checkpointer.restore(latest, ckpt.abstract_with_shardings(shapes, state_shardings))
        print(f"resumed from {checkpointer.directory / str(latest)} at step {latest}", file=sys.stderr)
    start = int(jax.device_get(state["step"]))

    # -- Compile (timed separately from training throughput).
    loss_fn = steplib.make_loss_fn(graphdef, mesh)
    batch_sharding = shd.batch_sharding(mesh)
    t = cfg.train

    def batch_for(step: int) -> jax.Array:
        return data.device_batch(corpus, data.TRAIN, t.seed, step, t.batch_size, seq_len, batch_sharding)

    t0 = time.perf_counter()
    train_step = steplib.make_train_step(
        loss_fn, optimizer, schedule, cfg.optim.accum, state_shardings, mesh
    ).lower(state, batch_for(start)).compile()
    eval_step = steplib.make_eval_step(loss_fn, param_shardings, mesh)
    compile_s = time.perf_counter() - t0

    # -- Accounting: params, FLOPs per token, the peak MFU divides by.
    counts = flops.param_counts(cfg.model, vocab, seq_len)
    per_token = flops.flops_per_token(cfg.model, vocab, seq_len)
    peak, peak_source = flops.peak_flops(devices[0])
    if devices[0].platform != "cpu":  # simulated CPU devices share one host's cores
        peak *= len(devices)
    tokens_per_step = t.batch_size * seq_len
    if jax.process_index() == 0:
        mesh_desc = " ".join(f"{a}={n}" for a, n in zip(shd.AXES, mesh.devices.shape))
        print(f"model: {counts['params']:,} params ({counts['non_embedding_params']:,} non-embedding), "
              f"{per_token / 1e6:.2f} MFLOP/token; mesh {mesh_desc} on {len(devices)} "
              f"{devices[0].platform} device(s); compiled in {compile_s:.1f}s", file=sys.stderr)

    # -- The loop.
    logger = RunLogger(run_dir, t.steps, start)
    config_json = dataclasses.asdict(cfg)
    status, train_loss, val_loss = "completed", None, None
    train_time, interval_t0, interval_start = 0.0, time.perf_counter(), start
    next_batch = batch_for(start) if start < t.steps else None
    for step in range(start, t.steps):
        state, metrics = train_step(state, next_batch)
        if step + 1 < t.steps:
            next_batch = batch_for(step + 1)  # built while the device runs this step
        done = step + 1
        row = {}
        if done % t.log_every == 0 or done == t.steps:
            metrics = jax.device_get(metrics)
            elapsed = time.perf_counter() - interval_t0
            train_time += elapsed
            tps = (done - interval_start) * tokens_per_step / elapsed
            train_loss = float(metrics["loss"])
            row = {**metrics, "tokens": done * tokens_per_step, "tokens_per_s": tps,
                   "mfu": tps * per_token / peak}
            logger.progress(done, train_loss, tps)
            if not (np.isfinite(train_loss) and np.isfinite(metrics["grad_norm"])):
                logger.log(done, row)
                status = "diverged"
                print(f"diverged: non-finite loss or grad norm at step {done}", file=sys.stderr)
                break
        if (t.eval_every and done % t.eval_every == 0) or done == t.steps:
            val_loss = evaluate(eval_step, state["params"], corpus, cfg, batch_sharding)
            row["val_loss"] = val_loss
        if row:
            logger.log(done, row)
            interval_t0, interval_start = time.perf_counter(), done
        checkpointer.maybe_save(done, state, config_json, force=done == t.steps)
    if start >= t.steps:  # already finished: report the restored model
        val_loss = evaluate(eval_step, state["params"], corpus, cfg, batch_sharding)
    checkpointer.close()

    # -- Summary: everything analysis needs about this run, in one file.
    steps_run = max(int(jax.device_get(state["step"])) - start, 0)
    tps = steps_run * tokens_per_step / train_time if train_time else None
    summary = {
        "status": status,
        "final_train_loss": train_loss,
        "final_val_loss": val_loss,
        **counts,
        "tokens": int(jax.device_get(state["step"])) * tokens_per_step,
        "flops": per_token * int(jax.device_get(state["step"])) * tokens_per_step,
        "flops_per_token": per_token,
        "steps": int(jax.device_get(state["step"])),
        "tokens_per_s": tps,
        "mfu": tps * per_token / peak if tps else None,
        "peak_flops": peak,
        "peak_source": peak_source,
        "compile_s": compile_s,
        "wall_s": time.perf_counter() - wall0,
        "devices": len(devices),
        "platform": devices[0].platform,
        "mesh": dict(zip(shd.AXES, mesh.devices.shape)),
        "python_version": platform.python_version(),
        "corpus": corpus.name,
        "corpus_hash": corpus.info.get("corpus_hash"),
        "corpus_info": corpus.info,
        "config": config_json,
    }
    logger.summary(summary)
    logger.close()
    return summary


@hydra.main(version_base="1.3", config_path="../conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    run_dir = HydraConfig.get().runtime.output_dir
    try:
        summary = run(cfg, run_dir)
    except config.ConfigError as err:
        print(f"config error: {err}", file=sys.stderr)
        sys.exit(EXIT_CONFIG_ERROR)
    if summary["status"] == "diverged":
        sys.exit(EXIT_DIVERGED)
    return summary["final_val_loss"]


if __name__ == "__main__":
    main()
