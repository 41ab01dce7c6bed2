"""Hydra entry point: `python -m research.train [overrides]`.

`run(cfg, run_dir)` is the whole run, top to bottom, in named sections:
config -> mesh -> corpus -> model and shardings -> resume, warm start or
init -> compile -> loop (step, log, eval, checkpoint, stop) -> summary.
Invalid configs stop in the first sections, before any compile, with one
line and exit code 2. See docs/runs.md for resume and exit codes.
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import sys
import time
from pathlib import Path

import hydra
import jax
import numpy as np
from omegaconf import DictConfig

from research import checkpoint as ckpt
from research import cluster, conf, config, cooldown, data, flops, hooks, job, kernels, param, preemption, sweep
from research import sharding as shd
from research import step as steplib
from research.config import ConfigError
from research.loggers import RunLogger
from research.stats import StatsStep


def evaluate(eval_step, params, sets: dict[str, data.Corpus], cfg: config.Config, batch_sharding) -> dict:
    """{"val/<name>/loss", "val/<name>/bpb"} of every eval set: mean loss over the same
    `train.eval_batches` validation batches every time, and bits per byte where the set is text."""
    t, row = cfg.train, {}
    for name, corpus in sets.items():
        losses = [eval_step(params, data.device_batch(corpus, data.VAL, t.seed, i, t.batch_size,
                                                      cfg.data.seq_len, batch_sharding))
                  for i in range(t.eval_batches)]
        row[f"val/{name}/loss"] = loss = float(np.mean(jax.device_get(losses)))
        if (bpb := corpus.bpb(data.VAL, loss)) is not None:
            row[f"val/{name}/bpb"] = bpb
    return row


def run(raw_cfg: DictConfig | dict, run_dir: str | Path, devices=None, skip_completed: bool = False,
        sweep_group: str | None = None) -> dict:
    """Train one model as configured; write the run directory; return the summary.

    `devices`: the devices to use (default: all, after joining a multi-process
    job if the config or environment says so). `skip_completed`: return the
    existing summary, marked "skipped", if the run dir already completed
    this exact config (how a re-run sweep skips finished jobs). `sweep_group`:
    the sweep this run belongs to (logger backends group runs by it).
    """
    wall0 = time.perf_counter()
    run_dir = Path(run_dir)

    # -- Config, processes, mesh and corpus: every check before anything is compiled.
    cfg = config.parse(raw_cfg)
    ckpt.check_directory(run_dir, "hydra.run.dir (hydra.sweep.dir in a multirun)")
    if devices is None:
        cluster.initialize(cfg.distributed)
    devices = list(devices) if devices is not None else jax.devices()
    t = cfg.train
    mesh = shd.make_mesh(shd.mesh_shape(cfg.mesh, len(devices)), devices)
    micro_batch = t.batch_size // cfg.optim.accum
    if micro_batch % shd.dp_size(mesh):
        raise ConfigError(
            "train.batch_size",
            f"{t.batch_size} / optim.accum={cfg.optim.accum} = {micro_batch} sequences is "
            f"not divisible by the data-parallel size mesh.data*mesh.fsdp={shd.dp_size(mesh)}",
        )
    mixture = data.load_mixture(cfg.data, t.batch_size)
    eval_sets = data.eval_sets(cfg.data, mixture)
    primary_loss = f"val/{next(iter(eval_sets))}/loss"
    corpus = mixture.primary
    vocab = corpus.vocab_size
    cfg = flops.apply_flops_budget(cfg, vocab)
    t, seq_len = cfg.train, cfg.data.seq_len
    cooldown.branches(t.cooldowns, t.steps, cfg.schedule)  # ConfigError now, not at the branch point
    as_json = json.loads(json.dumps(dataclasses.asdict(cfg)))  # as summary.json holds it
    if skip_completed and (done := sweep.completed_summary(run_dir, as_json)):
        if jax.process_index() == 0:
            print(f"skipped: {run_dir} already completed this config", file=sys.stderr)
        return {**done, "skipped": True}
    c = cfg.checkpoint
    checkpointer = ckpt.Checkpointer(run_dir / "checkpoints", c.every, c.keep, c.keep_every)
    if checkpointer.steps() and not c.resume:
        raise ConfigError(
            "checkpoint.resume",
            f"false, but {checkpointer.directory} already holds checkpoints (newest step "
            f"{checkpointer.steps()[-1]}); use another run dir or checkpoint.resume=true")
    if c.init_from:
        try:
            init_dir, init_step = ckpt.find_checkpoint(c.init_from)
        except FileNotFoundError as err:
            raise ConfigError("checkpoint.init_from", str(err)) from None
        ckpt.check_compatible(ckpt.Checkpointer(init_dir).meta(init_step), cfg, vocab,
                         f"{init_dir / str(init_step)}", "checkpoint.init_from")

    # -- Model, optimizer, kernels, plugins and the shardings of the whole train state.
    plan = steplib.plan(cfg, vocab, mesh)
    plugin_hooks = hooks.plugin_hooks(plan.plugins, cfg, mesh)
    meta = {"config": dataclasses.asdict(cfg), "vocab_size": vocab, "param_layout": ckpt.PARAM_LAYOUT,
            "python_version": platform.python_version(), "corpus": corpus.name,
            "corpus_hash": corpus.info.get("corpus_hash")}

    # -- Resume (newest good checkpoint, any mesh), warm start, or fresh init.
    def check_resume(saved: dict) -> None:
        ckpt.check_compatible(saved, cfg, vocab, f"{checkpointer.directory}", "checkpoint.resume")

    init_t0 = time.perf_counter()
    resumed_step, state, saved_meta = checkpointer.restore_latest(plan.abstract_state(), check_resume)
    if resumed_step is not None:
        print(f"resumed from {checkpointer.directory / str(resumed_step)} at step {resumed_step}",
              file=sys.stderr)
        if saved_meta["config"]["train"]["steps"] != t.steps:
            print(f"train.steps changed from {saved_meta['config']['train']['steps']} to {t.steps}: "
                  f"the lr schedule is now the one for {t.steps} steps", file=sys.stderr)
        if resumed_step >= t.steps:
            print(f"nothing to train: the checkpoint is at step {resumed_step} >= train.steps={t.steps}; "
                  "evaluating it", file=sys.stderr)
    elif c.init_from:
        params, from_step, _ = ckpt.restore_params(c.init_from, shd.abstract_with_shardings(
            plan.abstract_params, plan.param_shardings))
        state = steplib.state_from_params(params, plan.optimizer, plan.state_shardings, t.seed)
        print(f"initialised params from {c.init_from} (step {from_step}); fresh optimizer", file=sys.stderr)
    else:
        state = plan.fresh_state()
    start = int(jax.device_get(state["step"]))
    init_s = time.perf_counter() - init_t0  # the initialiser's compile and run, or the restore

    # -- Compile (timed separately from training throughput).
    batch_sharding = shd.batch_sharding(mesh)

    def batch_for(step: int) -> jax.Array:
        return data.device_batch(mixture, data.TRAIN, t.seed, step, t.batch_size, seq_len, batch_sharding)

    t0 = time.perf_counter()
    train_step = plan.train_step(mesh, cfg.optim.accum).lower(state, batch_for(start)).compile()
    eval_step = plan.eval_step(mesh)
    stats_step = (StatsStep(plan.graphdef, plan.param_shardings, mesh, state["params"], batch_for(start))
                  if t.stats_every else None)
    compile_s = time.perf_counter() - t0
    loop_hooks = [*hooks.core_hooks(cfg, run_dir, stats_step, start), *plugin_hooks]

    # -- Accounting: params, FLOPs per token, the peak MFU divides by.
    counts = flops.param_counts(cfg.model, vocab, seq_len)
    per_token = flops.flops_per_token(cfg.model, vocab, seq_len)
    matmul = plan.kernels["matmul"]
    with hooks.running(plugin_hooks, start):  # a measured peak runs as the steps will (e.g. cores kept awake)
        peak, peak_source = flops.peak_flops(devices[0], {matmul: kernels.matmul(matmul)}, plan.compiler_options)
    if devices[0].platform != "cpu":  # simulated CPU devices share one host's cores
        peak *= len(devices)
    tokens_per_step = t.batch_size * seq_len
    if jax.process_index() == 0:
        mesh_desc = " ".join(f"{a}={n}" for a, n in zip(shd.AXES, mesh.devices.shape))
        print(f"model: {counts['params']:,} params ({counts['non_embedding_params']:,} non-embedding), "
              f"{per_token / 1e6:.2f} MFLOP/token; mesh {mesh_desc} on {len(devices)} "
              f"{devices[0].platform} device(s); compiled in {compile_s:.1f}s", file=sys.stderr)
        print(param.describe(cfg, plan.abstract_params), file=sys.stderr)

    # -- Cooldown branches (train.cooldowns): each runs to its end at its branch point (cooldown.py).
    def branch_eval(params) -> tuple[float, dict]:
        row = evaluate(eval_step, params, eval_sets, cfg, batch_sharding)
        return row[primary_loss], row

    cooldowns = cooldown.Cooldowns(
        cfg, run_dir, vocab, mesh, batch_for, branch_eval,
        {**counts, "flops_per_token": per_token, "corpus": corpus.name, "corpus_hash": corpus.info.get("corpus_hash"),
         "platform": devices[0].platform, "devices": len(devices)}, start)

    # -- The loop. Each step's loss is checked before anything is saved.
    logger = RunLogger(run_dir, cfg, t.steps, start, group=sweep_group)
    status, train_loss, val_loss, message = "completed", None, None, None
    val_row = {}  # the last evaluation of every eval set
    train_time, interval_t0, interval_start = 0.0, time.perf_counter(), start
    next_batch = batch_for(start) if start < t.steps else None
    diverged_at = None

    def finite_loss(done: int, metrics: dict) -> float | None:
        """Step `done`'s loss; None (and the metrics logged, the message set) if it diverged."""
        nonlocal message
        loss, grad_norm = (float(x) for x in jax.device_get((metrics["loss"], metrics["grad_norm"])))
        if np.isfinite(loss) and np.isfinite(grad_norm):
            return loss
        logger.log(done, jax.device_get(metrics))
        message = (f"diverged: non-finite {'loss' if not np.isfinite(loss) else 'grad norm'} at step "
                   f"{done}; last checkpoint: step {(checkpointer.steps() or ['none'])[-1]}")
        return None

    try:
        with preemption.StopRequest() as stop, hooks.running(loop_hooks, start):
            unchecked = None  # (step, metrics) of the step before, its loss not yet read
            for step in range(start, t.steps):
                if cooldowns.due(step):  # the state after `step` steps is on disk (saved below, or restored)
                    branch_t0 = time.perf_counter()
                    finished = cooldowns.run(step, state, stop)
                    interval_t0 += time.perf_counter() - branch_t0  # not the main run's training time
                    if not finished:
                        status = "preempted"
                        message = (f"preempted by {stop.name} in a cooldown branch from step {step}: "
                                   "checkpoints saved; run again to continue")
                        break
                batch = next_batch
                for hook in loop_hooks:
                    hook.before_step(step, state)
                state, metrics = train_step(state, batch)
                if step + 1 < t.steps:
                    next_batch = batch_for(step + 1)  # built while the device runs this step
                done = step + 1
                hook_t0 = time.perf_counter()
                hook_row = {k: v for hook in loop_hooks for k, v in hook.after_step(done, state, batch).items()}
                hook_s = time.perf_counter() - hook_t0
                # The step before is checked while this one runs. Reading a loss waits for its
                # step; waiting on this one would leave the device idle while the host
                # dispatches the next (docs/performance-log.md).
                if unchecked is not None and finite_loss(*unchecked) is None:
                    diverged_at = unchecked[0]
                    break
                unchecked = (done, metrics)
                preempted = stop.requested()
                log_now = done % t.log_every == 0 or done == t.steps
                eval_now = bool(t.eval_every and done % t.eval_every == 0) or done == t.steps
                branch_now = cooldowns.due(done)
                if not (hook_row or log_now or eval_now or checkpointer.due(done) or preempted or branch_now):
                    interval_t0 += hook_s
                    continue
                # This step logs, evaluates or saves: its loss is checked first.
                unchecked = None
                if (loss := finite_loss(done, metrics)) is None:
                    diverged_at = done
                    break
                # The hooks' time (and their metrics' wait) is not training time: keep it out of tokens/s.
                fetch_t0 = time.perf_counter()
                hook_row = jax.device_get(hook_row)
                interval_t0 += hook_s + time.perf_counter() - fetch_t0
                row = {}
                if log_now:
                    elapsed = time.perf_counter() - interval_t0
                    train_time += elapsed
                    tps = (done - interval_start) * tokens_per_step / elapsed
                    train_loss = loss
                    row = {**jax.device_get(metrics), "tokens": done * tokens_per_step,
                           "tokens_per_s": tps, "mfu": tps * per_token / peak, **_epochs(mixture, done, seq_len)}
                    logger.progress(done, loss, tps)
                if eval_now:
                    val_row = evaluate(eval_step, state["params"], eval_sets, cfg, batch_sharding)
                    row.update(val_row, val_loss=val_row[primary_loss])
                    val_loss = row["val_loss"]
                if row or hook_row:
                    logger.log(done, {**row, **hook_row})
                if row:
                    interval_t0, interval_start = time.perf_counter(), done
                checkpointer.maybe_save(done, state, meta, force=done == t.steps or preempted or branch_now)
                if preempted:
                    status, train_loss = "preempted", loss
                    message = f"preempted by {stop.name} at step {done}: checkpoint saved; run again to continue"
                    break
        if start >= t.steps:  # already finished: report the restored model
            val_row = evaluate(eval_step, state["params"], eval_sets, cfg, batch_sharding)
            val_loss = val_row[primary_loss]
        checkpointer.close()  # waits for the last save: a preempted job exits only once it is on disk
    except ckpt.CheckpointError:  # main() exits at once on it: write out the logs first
        logger.close()
        raise

    # -- Summary: everything analysis needs about this run, in one file.
    if diverged_at is not None:
        status = "diverged"
    final_step = diverged_at if diverged_at is not None else int(jax.device_get(state["step"]))
    tps = (final_step - start) * tokens_per_step / train_time if train_time else None
    mfu = tps * per_token / peak if tps else None
    previous = run_dir / "summary.json"
    if tps is None and previous.exists():  # nothing trained now: keep the figures measured before
        old = json.loads(previous.read_text())
        tps, mfu = old.get("tokens_per_s"), old.get("mfu")
        train_loss = train_loss or old.get("final_train_loss")
    summary = {
        "status": status,
        "final_train_loss": train_loss,
        "final_val_loss": val_loss if status == "completed" else None,
        **(val_row if status == "completed" else {}),
        **counts,
        "tokens": final_step * tokens_per_step,
        "flops": per_token * final_step * tokens_per_step,
        "flops_per_token": per_token,
        "steps": final_step,
        "tokens_per_s": tps,
        "mfu": mfu,
        "peak_flops": peak,
        "peak_source": peak_source,
        "kernels": plan.kernels,
        "compiler_options": plan.compiler_options,
        "plugins": {p.name: p.describe(cfg, mesh) for p in plan.plugins},
        "init_s": init_s,
        "compile_s": compile_s,
        "wall_s": time.perf_counter() - wall0,
        "devices": len(devices),
        "processes": jax.process_count(),
        "platform": devices[0].platform,
        "cpus": sorted(os.sched_getaffinity(0)),
        "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
        "mesh": dict(zip(shd.AXES, mesh.devices.shape)),
        "python_version": platform.python_version(),
        "corpus": corpus.name,
        "corpus_hash": corpus.info.get("corpus_hash"),
        "corpus_info": corpus.info,
        "eval_sets": {n: c.info.get("corpus_hash") for n, c in eval_sets.items()},  # primary first
        "source_hashes": {n: c.info.get("corpus_hash") for n, c in zip(mixture.names, mixture.corpora)},
        "tokens_per_source": {n: final_step * r * seq_len for n, r in zip(mixture.names, mixture.rows)},
        "resumed_from": resumed_step,
        "stop_signal": stop.name if status == "preempted" and stop.signum else None,
        "config": meta["config"],
    }
    if t.cooldowns:
        summary.update(cooldowns.summary(summary["flops"]))
    logger.summary(summary)
    logger.close()
    if message and jax.process_index() == 0:
        print(message, file=sys.stderr)
    return summary


@hydra.main(version_base="1.3", config_path="../conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    """One job (research/job.py): exit codes, the sweep index, failures, preemption."""
    return job.run_job(cfg, run)


def _epochs(mixture: data.Mixture, step: int, seq_len: int) -> dict[str, float]:
    """metrics.jsonl's epoch fields: `epoch` of the (first) source; `epoch/<name>` of each in a mixture."""
    epochs = mixture.epochs(step, seq_len)
    row = {"epoch": epochs[mixture.names[0]]}
    if len(epochs) > 1:
        row.update({f"epoch/{n}": e for n, e in epochs.items()})
    return row


if __name__ == "__main__":
    try:  # a misspelt preset (optim=adamww) fails here in one line, not in Hydra's many
        conf.check_overrides(sys.argv[1:])
    except ConfigError as err:
        print(f"config error: {err}", file=sys.stderr)
        sys.exit(job.EXIT_CONFIG_ERROR)
    main()
