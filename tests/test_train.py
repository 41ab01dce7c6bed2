"""End to end: `python -m research.train` writes a complete run directory."""

import gzip
import json

import jax
import pytest

from research import train
from tests.conftest import TINY, compose, train_cli as _cli

METRIC_KEYS = {"step", "loss", "lr", "grad_norm", "tokens", "tokens_per_s", "mfu"}
SUMMARY_KEYS = {
    "status", "final_train_loss", "final_val_loss", "params", "non_embedding_params", "tokens",
    "flops", "steps", "tokens_per_s", "mfu", "wall_s", "python_version", "corpus_hash", "peak_source",
    "kernels",
}


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
    for r in rows:
        assert r.get("val/synthetic/loss") == r.get("val_loss")  # the primary eval set, by its name
        assert "val/synthetic/bpb" not in r  # synthetic tokens are not text
    # Epochs: 16 rows of 33 tokens per step, windows at stride 32 over the synthetic training stream.
    assert [r["epoch"] for r in train_rows] == pytest.approx([r["step"] * 16 / ((1_000_000 - 1) // 32)
                                                              for r in train_rows])
    summary = json.loads((cli_run / "summary.json").read_text())
    assert SUMMARY_KEYS <= summary.keys()
    assert summary["status"] == "completed"
    assert summary["steps"] == 20
    # One CPU device (train_cli's default), no plugin: auto resolves to the core's CPU choice.
    assert summary["kernels"] == {"matmul": "xla", "attention": "chunked"}
    assert summary["plugins"] == {} and summary["compiler_options"] is None
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
    assert [e.step for e in acc.Scalars("eval/synthetic/loss")] == [10, 20]  # val/<set>/loss


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


def test_less_common_knobs_train_and_the_profiler_traces_its_steps(tmp_path):
    """The less common knobs run through the real loop and still learn; `profile.*` writes
    a trace of the chosen steps that TensorBoard's profile plugin (.xplane.pb) and
    Perfetto (.trace.json.gz) open."""
    cfg = compose(*TINY, "optim.accum=2", "model.remat=block", "model.share_layers=1",
                  "model.pos=learned", "model.norm=layernorm", "schedule=wsd", "mesh=single",
                  "profile.start_step=4", "profile.num_steps=2")
    summary = train.run(cfg, tmp_path, devices=jax.devices()[:1])
    assert summary["status"] == "completed"
    assert summary["final_val_loss"] < 5.4
    [session] = (tmp_path / "profile" / "plugins" / "profile").iterdir()
    assert list(session.glob("*.xplane.pb"))
    [perfetto] = session.glob("perfetto_trace.json.gz")
    events = json.loads(gzip.decompress(perfetto.read_bytes()))
    events = events["traceEvents"] if isinstance(events, dict) else events
    steps = {e["args"]["step_num"] for e in events if e.get("name") == "train" and "step_num" in e.get("args", {})}
    assert steps == {"4", "5"} or steps == {4, 5}, steps  # exactly the chosen steps
