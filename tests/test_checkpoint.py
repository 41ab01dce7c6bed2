"""Checkpoints that survive SIGKILL, preemption signals, damage and a change of mesh.

Real subprocesses are killed and restarted; the result must be bitwise the
same as a run that was never interrupted (CPU, fp32).
"""

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from research import job, train
from tests.bounds import assert_bound_catches, assert_close_to_bound, lr_bound
from tests.conftest import TINY, compose

STEPS = 30
ARGS = (*TINY, f"train.steps={STEPS}", "train.log_every=1", "train.eval_every=10",
        "checkpoint.every=5", "checkpoint.keep=2", "checkpoint.keep_every=10")
TIMING = {"tokens_per_s", "mfu"}  # wall-clock figures differ between attempts


def _env():
    return {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=1"}


def _cmd(run_dir, *extra):
    return [sys.executable, "-m", "research.train", *ARGS, *extra, f"hydra.run.dir={run_dir}"]


def _run(repo, run_dir, *extra, timeout=300):
    return subprocess.run(_cmd(run_dir, *extra), cwd=repo, env=_env(), capture_output=True,
                          text=True, timeout=timeout)


def _popen(repo, run_dir, *extra):
    return subprocess.Popen(_cmd(run_dir, *extra), cwd=repo, env=_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def _rows(run_dir):
    lines = (Path(run_dir) / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(line).items() if k not in TIMING} for line in lines]


def _wait_rows(run_dir, n, proc, timeout=120):
    path = Path(run_dir) / "metrics.jsonl"
    deadline = time.time() + timeout
    while time.time() < deadline:
        if path.exists() and len(path.read_text().splitlines()) >= n:
            return
        assert proc.poll() is None, "run ended before it could be interrupted"
        time.sleep(0.05)
    raise TimeoutError(f"{path} did not reach {n} rows")


def _params(run_dir, step=STEPS):
    import orbax.checkpoint as ocp

    state = ocp.StandardCheckpointer().restore(Path(run_dir) / "checkpoints" / str(step) / "state")
    return jax.tree.map(np.asarray, state["params"])


def _assert_same_run(run_dir, reference):
    ref_dir, ref_params, ref_rows = reference
    rows = _rows(run_dir)
    steps = [r["step"] for r in rows]
    assert steps == [r["step"] for r in ref_rows]  # no gaps, no repeats
    assert rows == ref_rows
    got = _params(run_dir)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(ref_params), strict=True):
        np.testing.assert_array_equal(a, b)  # bitwise
    assert json.loads((Path(run_dir) / "summary.json").read_text())["status"] == "completed"


@pytest.fixture(scope="module")
def reference(repo, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("reference")
    proc = _run(repo, run_dir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run_dir, _params(run_dir), _rows(run_dir)


def _copy(reference, tmp_path):
    dst = tmp_path / "run"
    shutil.copytree(reference[0], dst)
    return dst


def test_checkpoint_killed_mid_write_is_invisible(repo, reference, tmp_path):
    """Orbax writes into a temporary dir and renames on commit: a half-written step is ignored."""
    run_dir = _copy(reference, tmp_path)
    partial = run_dir / "checkpoints" / "35.orbax-checkpoint-tmp-1234"
    shutil.copytree(run_dir / "checkpoints" / "30", partial)
    next(p for p in partial.rglob("*") if p.is_file() and p.stat().st_size > 0).write_bytes(b"")
    proc = _run(repo, run_dir, "train.steps=35")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resumed from" in proc.stderr and "at step 30" in proc.stderr
    assert "damaged" not in proc.stderr
    assert (run_dir / "checkpoints" / "35" / "state").is_dir()


def test_keep_policy(reference):
    """Newest `keep` plus every `keep_every`-th step; metrics one row per step."""
    steps = sorted(int(p.name) for p in (reference[0] / "checkpoints").iterdir() if p.name.isdigit())
    assert steps == [10, 20, 25, 30]
    meta = json.loads((reference[0] / "checkpoints" / "30" / "meta" / "metadata").read_text())
    assert meta["config"]["train"]["steps"] == STEPS and meta["vocab_size"] == 256


def test_sigkill_at_random_moments_then_resume_is_exact(repo, reference, tmp_path):
    rng = random.Random(0)
    run_dir = tmp_path / "killed"
    proc = _popen(repo, run_dir)
    _wait_rows(run_dir, rng.randint(3, 12), proc)
    proc.kill()
    proc.wait()
    proc = _popen(repo, run_dir)  # second kill: at a random time, maybe mid-save
    _wait_rows(run_dir, 14, proc)
    time.sleep(rng.uniform(0.0, 1.0))
    proc.kill()
    proc.wait()
    final = _run(repo, run_dir)
    assert final.returncode == 0, final.stderr[-3000:]
    assert "resumed from" in final.stderr
    _assert_same_run(run_dir, reference)


def _with_earlier_handler(marker: Path, ckpt_dir: Path) -> str:
    """Python code: install a SIGUSR2 handler (as submitit does, to requeue), then run train."""
    return (
        "import runpy, signal\nfrom pathlib import Path\n"
        "def requeue(signum, frame):  # records which checkpoints existed when it was called\n"
        f"    Path({str(marker)!r}).write_text(' '.join(p.name for p in Path({str(ckpt_dir)!r}).iterdir()))\n"
        "signal.signal(signal.SIGUSR2, requeue)\n"
        "runpy.run_module('research.train', run_name='__main__')\n")


def test_stop_request_catches_every_cluster_signal():
    from research import preemption

    for sig in preemption.SIGNALS:
        with preemption.StopRequest() as stop:
            os.kill(os.getpid(), sig)
            assert stop.requested() and stop.name == sig.name


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGUSR2], ids=["SIGTERM", "SIGUSR2-submitit"])
def test_preemption_signal_checkpoints_and_exits(repo, reference, tmp_path, signum):
    run_dir = tmp_path / "preempted"
    handed = tmp_path / "handed-over.txt"
    if signum == signal.SIGUSR2:  # under submitit: its handler must run after our save
        code = _with_earlier_handler(handed, run_dir / "checkpoints")
        proc = subprocess.Popen([sys.executable, "-c", code, *_cmd(run_dir)[3:]], cwd=repo, env=_env(),
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    else:
        proc = _popen(repo, run_dir)
    _wait_rows(run_dir, 7, proc)
    proc.send_signal(signum)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == job.EXIT_PREEMPTED, err[-3000:]
    last = err.strip().splitlines()[-1]
    assert last.startswith(f"preempted by {signal.Signals(signum).name} at step ")
    step = int(last.split("at step ")[1].split(":")[0])
    assert (run_dir / "checkpoints" / str(step) / "state").is_dir()  # waited for the save
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "preempted" and summary["steps"] == step
    if signum == signal.SIGUSR2:  # the earlier handler ran, after the checkpoint was on disk
        assert str(step) in handed.read_text().split()
    final = _run(repo, run_dir)
    assert final.returncode == 0, final.stderr[-3000:]
    _assert_same_run(run_dir, reference)


@pytest.mark.parametrize("damage", ["truncate", "delete"])
def test_damaged_newest_checkpoint_is_skipped(repo, reference, tmp_path, damage):
    run_dir = _copy(reference, tmp_path)
    state_dir = run_dir / "checkpoints" / "30" / "state"
    victim = max((p for p in state_dir.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
    if damage == "truncate":
        victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])
    else:
        victim.unlink()
    proc = _run(repo, run_dir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "checkpoints/30 is damaged" in proc.stderr
    assert "resumed from" in proc.stderr and "at step 25" in proc.stderr
    assert list((run_dir / "checkpoints").glob("damaged-30-*"))  # kept aside, not deleted
    _assert_same_run(run_dir, reference)


@pytest.mark.parametrize("override, error", [
    ("model.d_model=64", "config error: model.d_model: 64, but"),
    # No named field differs, but the optimizer state's tree does (no clip state):
    ("optim.clip=0", "config error: checkpoint.resume: "),
])
def test_changed_config_refuses_to_resume(repo, reference, tmp_path, override, error):
    """Another config's checkpoint is refused, not mistaken for damage and moved aside."""
    run_dir = _copy(reference, tmp_path)
    before = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    proc = _run(repo, run_dir, override)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert proc.stderr.strip().splitlines()[-1].startswith(error)
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == before


def test_non_finite_loss_stops_without_saving_it(repo, tmp_path):
    run_dir = tmp_path / "diverged"
    proc = _run(repo, run_dir, "optim.lr=1e6", "optim.clip=0", "checkpoint.every=1")
    assert proc.returncode == job.EXIT_DIVERGED, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("diverged: non-finite") and "at step" in last
    bad_step = int(last.split("at step ")[1].split(";")[0])
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "diverged"
    saved = sorted(int(p.name) for p in (run_dir / "checkpoints").iterdir() if p.name.isdigit())
    assert saved and max(saved) < bad_step
    for step in saved:
        assert all(np.isfinite(x).all() for x in jax.tree.leaves(_params(run_dir, step)))


def test_divergence_between_synced_steps_names_the_same_step(repo, tmp_path):
    """Steps that neither log nor save are checked one step late, while the next runs:
    the divergence is still pinned on the step that produced it."""
    bad = ("optim.lr=1e6", "optim.clip=0", "checkpoint.every=0")
    synced = _run(repo, tmp_path / "synced", *bad)  # train.log_every=1: every step is waited on
    lagged = _run(repo, tmp_path / "lagged", *bad, "train.log_every=1000", "train.eval_every=0")
    for proc in (synced, lagged):
        assert proc.returncode == job.EXIT_DIVERGED, proc.stderr[-3000:]
    last = synced.stderr.strip().splitlines()[-1]
    assert last.startswith("diverged: non-finite")
    assert lagged.stderr.strip().splitlines()[-1] == last
    bad_step = int(last.split("at step ")[1].split(";")[0])
    assert bad_step < STEPS  # found by the one-step-late check, not at the final step
    for name in ("synced", "lagged"):
        summary = json.loads((tmp_path / name / "summary.json").read_text())
        assert summary["status"] == "diverged" and summary["steps"] == bad_step
    assert _rows(tmp_path / "lagged")[-1] == _rows(tmp_path / "synced")[-1]  # the same diverged row


def _mount_tmpfs(path: Path, size: str) -> bool:
    path.mkdir(parents=True, exist_ok=True)
    ok = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                        capture_output=True).returncode == 0
    return ok


@pytest.mark.parametrize("fault", ["full", "read-only"])
def test_unwritable_disk_gives_a_clear_error(repo, tmp_path, fault):
    run_dir = tmp_path / "run"
    ckpt_dir = run_dir / "checkpoints"
    if not _mount_tmpfs(ckpt_dir, "64k"):
        pytest.skip("needs permission to mount a tmpfs (root); not available here")
    try:
        if fault == "read-only":
            subprocess.run(["mount", "-o", "remount,ro", str(ckpt_dir)], check=True)
        proc = _run(repo, run_dir, "train.steps=10", timeout=180)  # a hang would time out
        assert proc.returncode == job.EXIT_CHECKPOINT_FAILED, proc.stderr[-3000:]
        last = proc.stderr.strip().splitlines()[-1]
        assert last.startswith(f"error: checkpoint save to {ckpt_dir} failed")
    finally:
        subprocess.run(["umount", "-l", str(ckpt_dir)], capture_output=True)


def test_resume_with_more_steps_uses_the_new_schedule(repo, reference, tmp_path):
    from research import optim
    from research.config import parse

    run_dir = _copy(reference, tmp_path)
    proc = _run(repo, run_dir, "train.steps=40")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"train.steps changed from {STEPS} to 40" in proc.stderr
    rows = _rows(run_dir)
    assert [r["step"] for r in rows if "loss" in r] == list(range(1, 41))
    cfg = parse(compose(*ARGS, "train.steps=40"))
    schedule = optim.make_schedule(cfg.schedule, cfg.optim.lr, 40)
    # The lr the jitted step logged (exact in JSON) and the eager schedule's: each within
    # lr_bound of the exact lr (not bitwise: XLA compiles the formula inside the step). The old
    # 30-step schedule's lrs fall outside.
    steps = np.array([r["step"] - 1 for r in rows[STEPS:] if "lr" in r])
    assert len(steps) == 10
    logged = np.array([r["lr"] for r in rows[STEPS:] if "lr" in r])
    bound = 2 * lr_bound(cfg.schedule, cfg.optim.lr, 40, steps)[1]
    assert_close_to_bound(logged, [float(schedule(s)) for s in steps], bound)
    old = optim.make_schedule(cfg.schedule, cfg.optim.lr, STEPS)
    assert_bound_catches(logged, [float(old(s)) for s in steps], bound)


def test_init_from_starts_from_params_with_a_fresh_optimizer(repo, reference, tmp_path):
    run_dir = tmp_path / "warm"
    proc = _run(repo, run_dir, f"checkpoint.init_from={reference[0]}", "optim=lion")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "initialised params from" in proc.stderr
    rows = _rows(run_dir)
    assert rows[0]["step"] == 1
    assert rows[0]["loss"] < reference[2][0]["loss"] - 0.1  # starts where the other ended
    missing = _run(repo, tmp_path / "x", f"checkpoint.init_from={tmp_path / 'nothing'}")
    assert missing.returncode == 2
    assert missing.stderr.strip().startswith("config error: checkpoint.init_from")


def test_restore_onto_other_meshes_continues_the_curve(tmp_path):
    """Written on 8 devices as (2,2,2); resumed on 1 device and on (1,8,1). 4 layers that
    share 2 blocks (test_sharding runs unshared ones)."""
    args = (*TINY, "train.steps=20", "train.log_every=1", "checkpoint.every=10", "checkpoint.keep=5",
            "model.d_model=64", "model.n_layers=4", "model.share_layers=2")
    source = tmp_path / "source"
    train.run(compose(*args, "mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2"), source)
    full = {r["step"]: r["loss"] for r in _rows(source) if "loss" in r}
    for name, mesh, devices in [("one", ("1", "1", "1"), jax.devices()[:1]),
                                ("fsdp8", ("1", "8", "1"), None)]:
        run_dir = tmp_path / name
        shutil.copytree(source, run_dir)
        shutil.rmtree(run_dir / "checkpoints" / "20")
        overrides = [f"mesh.{a}={n}" for a, n in zip(("data", "fsdp", "tensor"), mesh)]
        summary = train.run(compose(*args, *overrides), run_dir, devices=devices)
        assert summary["resumed_from"] == 10
        resumed = {r["step"]: r["loss"] for r in _rows(run_dir) if "loss" in r}
        assert sorted(resumed) == list(range(1, 21))
        # Not a derived rounding bound (as test_sharding's): 10 AdamW steps on another mesh,
        # whose reassociated sums the sign-like update can amplify without a useful worst-case
        # limit; a restore that lost state moves the curve far more than 1e-4.
        np.testing.assert_allclose([resumed[s] for s in range(11, 21)],
                                   [full[s] for s in range(11, 21)], rtol=1e-4)


def test_load_run_and_plain_orbax(reference):
    """`research.load_run` for notebooks, and the project-free read of docs/runs.md."""
    import jax.numpy as jnp

    import research

    cfg, net, metrics, step = research.load_run(reference[0])
    assert step == STEPS and cfg.model.d_model == 32
    assert net(jnp.zeros((1, 8), jnp.int32)).shape == (1, 8, 256)
    assert metrics["step"].max() == STEPS

    # docs/runs.md, "Opening a checkpoint", without this project:
    import orbax.checkpoint as ocp

    state = ocp.StandardCheckpointer().restore(f"{reference[0]}/checkpoints/{STEPS}/state")
    embed = np.asarray(state["params"]["embed"])
    wq = np.asarray(state["params"]["blocks"]["wq"][0])  # block 0's query projection
    assert embed.shape == (256, 32) and wq.shape == (32, 32) and int(state["step"]) == STEPS
    # Block weights stacked over the layers (TINY: 2), norms too; layer i is slice i.
    assert state["params"]["blocks"]["wq"].shape == (cfg.model.n_layers, 32, 32) == (2, 32, 32)
    assert state["params"]["blocks"]["attn_norm"]["scale"].shape == (2, 32)
    np.testing.assert_array_equal(embed, reference[1]["embed"])
    np.testing.assert_array_equal(np.asarray(net.blocks.wq[...])[1], reference[1]["blocks"]["wq"][1])
    meta = json.loads((reference[0] / "checkpoints" / str(STEPS) / "meta" / "metadata").read_text())
    assert meta["param_layout"] == "stacked-blocks"


def _tree_bytes(path: Path) -> dict:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def test_checkpoint_from_before_stacked_blocks_is_refused_and_kept(tmp_path):
    """A checkpoint written before the blocks were stacked (its meta has no `param_layout`,
    its blocks are subtrees params/blocks/0/...) is refused with one line naming the field,
    by resume, by checkpoint.init_from and by load_run; nothing in it is moved or deleted."""
    import dataclasses

    import jax.numpy as jnp

    import research
    from research import checkpoint as ckpt
    from research.config import ConfigError, parse

    old = tmp_path / "old"
    meta = {"config": dataclasses.asdict(parse(compose(*ARGS))), "vocab_size": 256,
            "python_version": "3.11.0", "corpus": "synthetic", "corpus_hash": None}  # no param_layout
    state = {"params": {"blocks": {"0": {"wq": jnp.ones((32, 32))}, "1": {"wq": jnp.ones((32, 32))}},
                        "embed": jnp.ones((256, 32))}, "step": jnp.int32(5)}
    saver = ckpt.Checkpointer(old / "checkpoints")
    saver.maybe_save(5, state, meta, force=True)
    saver.close()
    before = _tree_bytes(old / "checkpoints")
    assert "5/meta/metadata" in before

    cases = [("checkpoint.resume", lambda: train.run(compose(*ARGS), old)),
             ("checkpoint.init_from", lambda: train.run(compose(*ARGS, f"checkpoint.init_from={old}"),
                                                        tmp_path / "warm")),
             ("run_dir", lambda: research.load_run(old))]
    for field, attempt in cases:
        with pytest.raises(ConfigError) as err:
            attempt()
        assert err.value.field == field
        text = str(err.value)
        assert "\n" not in text and text.startswith(f"{field}: ") and "stacked" in text, text
        assert _tree_bytes(old / "checkpoints") == before  # refused, not quarantined as damage
    assert not (tmp_path / "warm" / "checkpoints").exists()


def test_half_written_metrics_line_is_dropped_on_resume(repo, reference, tmp_path):
    """SIGKILL can cut metrics.jsonl mid-line; resume must still give the clean rows."""
    run_dir = _copy(reference, tmp_path)
    shutil.rmtree(run_dir / "checkpoints" / "30")
    with open(run_dir / "metrics.jsonl", "a") as f:
        f.write('{"step": 31, "loss": 1.2')  # what a kill mid-write leaves
    proc = _run(repo, run_dir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    _assert_same_run(run_dir, reference)
