"""End to end: `python -m research.train` writes a complete run directory."""

import json
import os
import subprocess
import sys

import jax
import pytest

from research import train
from tests.conftest import TINY, compose

METRIC_KEYS = {"step", "loss", "lr", "grad_norm", "tokens", "tokens_per_s", "mfu"}
SUMMARY_KEYS = {
    "status", "final_train_loss", "final_val_loss", "params", "non_embedding_params", "tokens",
    "flops", "steps", "tokens_per_s", "mfu", "wall_s", "python_version", "corpus_hash", "peak_source",
}


def _cli(repo, *args, env_extra=None):
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=1", **(env_extra or {})}
    return subprocess.run([sys.executable, "-m", "research.train", *args], cwd=repo, env=env,
                          capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def cli_run(repo, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("cli_run")
    proc = _cli(repo, *TINY, f"hydra.run.dir={run_dir}")
    assert proc.returncode == 0, proc.stderr[-2000:]
    return run_dir


def test_run_dir_is_complete(cli_run):
    assert (cli_run / ".hydra" / "config.yaml").exists()
    rows = [json.loads(line) for line in (cli_run / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if "loss" in r]
    assert [r["step"] for r in train_rows] == [5, 10, 15, 20]
    for r in train_rows:
        assert METRIC_KEYS <= r.keys()
        assert r["tokens"] == r["step"] * 16 * 32
    assert [r["step"] for r in rows if "val_loss" in r] == [10, 20]
    summary = json.loads((cli_run / "summary.json").read_text())
    assert SUMMARY_KEYS <= summary.keys()
    assert summary["status"] == "completed"
    assert summary["steps"] == 20
    assert summary["final_train_loss"] < train_rows[0]["loss"]
    assert summary["flops"] == pytest.approx(summary["flops_per_token"] * summary["tokens"])
    assert (cli_run / "checkpoints" / "20").is_dir()


def test_tensorboard_reads_the_events(cli_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(cli_run / "tb"))
    acc.Reload()
    loss = acc.Scalars("train/loss")
    assert [e.step for e in loss] == [5, 10, 15, 20]
    assert [e.step for e in acc.Scalars("eval/val_loss")] == [10, 20]


def test_rerun_resumes_from_checkpoint(repo, cli_run):
    before = (cli_run / "metrics.jsonl").read_text()
    summary_before = json.loads((cli_run / "summary.json").read_text())
    proc = _cli(repo, *TINY, f"hydra.run.dir={cli_run}")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "resumed" in proc.stderr
    assert (cli_run / "metrics.jsonl").read_text() == before  # nothing retrained or duplicated
    summary = json.loads((cli_run / "summary.json").read_text())
    for key in ("final_val_loss", "final_train_loss", "tokens_per_s", "mfu", "steps"):
        assert summary[key] == summary_before[key]  # the measured figures survive


def test_refuses_to_overwrite_checkpoints(repo, cli_run):
    proc = _cli(repo, *TINY, f"hydra.run.dir={cli_run}", "checkpoint.resume=false")
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith("config error: checkpoint.resume")


def test_stdlib_corpus_is_recorded(tmp_path):
    cfg = compose(*[o for o in TINY if not o.startswith("data")], "data=stdlib", "data.seq_len=32",
                  f"data.cache_dir={tmp_path / 'cache'}", "train.steps=10", "mesh=single")
    summary = train.run(cfg, tmp_path / "run", devices=jax.devices()[:1])
    import platform

    assert summary["python_version"] == platform.python_version()
    assert len(summary["corpus_hash"]) == 64
    assert summary["corpus"] == "stdlib"
    assert summary["final_val_loss"] < 5.55  # below uniform over 256 bytes (ln 256)


def test_grad_accumulation_and_options_train(tmp_path):
    """The less common knobs run through the real loop and still learn."""
    cfg = compose(*TINY, "optim.accum=2", "model.remat=block", "model.share_layers=1",
                  "model.pos=learned", "model.norm=layernorm", "schedule=wsd", "mesh=single")
    summary = train.run(cfg, tmp_path, devices=jax.devices()[:1])
    assert summary["status"] == "completed"
    assert summary["final_val_loss"] < 5.4


def test_multirun_then_report(repo, tmp_path):
    """The demo's path in miniature: a Hydra multirun, then the analysis report."""
    sweep = tmp_path / "sweep"
    proc = _cli(repo, "-m", *TINY, "model.d_model=16,32,64", f"hydra.sweep.dir={sweep}")
    assert proc.returncode == 0, proc.stderr[-2000:]
    summaries = sorted(sweep.glob("*/summary.json"))
    assert len(summaries) == 3
    for d in (16, 32, 64):  # the run dir names what was overridden
        assert sum(f"model.d_model={d}," in p.parent.name for p in summaries) == 1
    report = subprocess.run([sys.executable, "-m", "research.analyze", "report", str(sweep)],
                            cwd=repo, capture_output=True, text=True, timeout=120)
    assert report.returncode == 0, report.stderr
    assert "alpha =" in report.stdout
    assert (sweep / "loss_vs_params.png").read_bytes()[:4] == b"\x89PNG"
