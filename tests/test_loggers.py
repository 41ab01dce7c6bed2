"""Run loggers: the files analysis reads, and the same rows in TensorBoard and W&B (offline)."""

import importlib.util
import json
import struct
from pathlib import Path

import jax
import numpy as np
import pytest

from research import loggers
from research.config import Config, ConfigError


@pytest.fixture
def wandb_env(tmp_path, monkeypatch):
    """W&B offline, with everything it writes outside a run dir kept under tmp_path."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    for var in ("WANDB_DIR", "WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_DATA_DIR"):
        monkeypatch.setenv(var, str(tmp_path / "wandb_home" / var.lower()))
    for var in ("WANDB_API_KEY", "WANDB_PROJECT", "WANDB_ENTITY", "WANDB_RUN_ID", "WANDB_RESUME"):
        monkeypatch.delenv(var, raising=False)


def config(*backends: str) -> Config:
    cfg = Config()
    cfg.logging.backends = list(backends)
    cfg.logging.wandb.tags = ["ladder-test"]
    return cfg


def rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def tb_scalars(run_dir: Path, tag: str) -> dict[int, float]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir / "tb"))
    acc.Reload()
    if tag not in acc.Tags()["scalars"]:
        return {}
    return {e.step: e.value for e in acc.Scalars(tag)}


def wandb_records(path: Path) -> list:
    """The protobuf records of a .wandb file (a LevelDB-style log W&B writes; 0.31 ships no reader)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    assert data[:4] == b":W&B", f"{path} is not a W&B run file"
    block, pos, pending, out = 32768, 7, b"", []
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0:  # zero-filled: the rest of the block is padding
            pos += block - pos % block
            continue
        pending += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # FULL or LAST: a record is complete
            record = pb.Record()
            record.ParseFromString(pending)
            out.append(record)
            pending = b""
    return out


def _key(item) -> str:
    return item.key or "/".join(item.nested_key)  # W&B's core fills one or the other


def wandb_history(records) -> dict[int, dict[str, float]]:
    """step -> the row logged at it (W&B's own _step/_runtime/_timestamp left out)."""
    history = {}
    for r in records:
        if r.WhichOneof("record_type") == "history":
            items = {_key(i): json.loads(i.value_json) for i in r.history.item}
            row = {k: v for k, v in items.items() if not k.startswith("_")}
            history[r.history.step.num] = row
    return history


def offline_runs(run_dir: Path) -> list[Path]:
    """The offline run dirs under run_dir, oldest first (W&B names them by start time).

    run.finish() returns once W&B's service has the run's exit, not once its file
    is complete; the service writes everything out when it shuts down, as it does
    when a training process exits.
    """
    import wandb

    wandb.teardown()
    return sorted(p for p in (run_dir / "wandb").glob("offline-run-*") if not p.is_symlink())


def test_rows_reach_files_tensorboard_and_wandb(tmp_path, wandb_env):
    run_dir = tmp_path / "run-a"
    logger = loggers.RunLogger(run_dir, config("tensorboard", "wandb"), total_steps=10, group="sweep-1")
    logger.log(5, {"loss": np.float32(2.5), "tokens": np.int64(640), "grad_norm": float("nan")})
    logger.log(10, {"loss": 2.0, "val_loss": 2.25})
    logger.summary({"status": "completed", "final_val_loss": 2.25, "params": 1234,
                    "mesh": {"data": 8}, "mfu": None})
    logger.close()

    assert rows(run_dir) == [{"step": 5, "loss": 2.5, "tokens": 640, "grad_norm": None},
                             {"step": 10, "loss": 2.0, "val_loss": 2.25}]
    assert json.loads((run_dir / "summary.json").read_text())["mesh"] == {"data": 8}

    assert tb_scalars(run_dir, "train/loss") == {5: 2.5, 10: 2.0}
    assert tb_scalars(run_dir, "eval/val_loss") == {10: 2.25}
    assert tb_scalars(run_dir, "train/grad_norm") == {}  # NaN is null in the jsonl, absent here

    run_id = (run_dir / "wandb_id").read_text().strip()
    [offline] = offline_runs(run_dir)
    assert offline.name.endswith(f"-{run_id}")
    records = wandb_records(offline / f"run-{run_id}.wandb")
    [run] = [r.run for r in records if r.WhichOneof("record_type") == "run"]
    assert (run.run_id, run.display_name, run.project, run.run_group) == (run_id, "run-a", "ladder", "sweep-1")
    assert list(run.tags) == ["ladder-test"]
    run_config = {_key(i): json.loads(i.value_json) for i in run.config.update}
    assert run_config["logging"]["backends"] == ["tensorboard", "wandb"]
    assert wandb_history(records) == {5: {"loss": 2.5, "tokens": 640}, 10: {"loss": 2.0, "val_loss": 2.25}}
    summary = {_key(i): json.loads(i.value_json) for r in records if r.WhichOneof("record_type") == "summary"
               for i in r.summary.update}
    assert summary["status"] == "completed" and summary["final_val_loss"] == 2.25 and summary["params"] == 1234
    assert "mesh" not in summary and "mfu" not in summary  # scalars only


def test_resume_keeps_rows_to_start_step_and_the_wandb_run(tmp_path, wandb_env):
    run_dir = tmp_path / "run-b"
    cfg = config("tensorboard", "wandb")
    first = loggers.RunLogger(run_dir, cfg, total_steps=20)
    for step in (5, 10, 15):
        first.log(step, {"loss": float(step)})
    first.close()
    offline_runs(run_dir)  # W&B's service ends with the process being resumed
    with (run_dir / "metrics.jsonl").open("a") as f:
        f.write('{"step": 3, "lo')  # a kill mid-write
    run_id = (run_dir / "wandb_id").read_text()

    second = loggers.RunLogger(run_dir, cfg, total_steps=20, start_step=10)
    second.log(15, {"loss": 1.5})
    second.close()

    assert [(r["step"], r["loss"]) for r in rows(run_dir)] == [(5, 5.0), (10, 10.0), (15, 1.5)]
    assert tb_scalars(run_dir, "train/loss") == {5: 5.0, 10: 10.0, 15: 1.5}  # purge_step hid the old 15
    assert (run_dir / "wandb_id").read_text() == run_id
    runs = offline_runs(run_dir)
    assert len(runs) == 2 and all(run_id.strip() in p.name for p in runs)
    resumed = wandb_records(runs[1] / f"run-{run_id.strip()}.wandb")
    assert wandb_history(resumed) == {15: {"loss": 1.5}}


def test_check_backends_names_the_field(monkeypatch, tmp_path):
    with pytest.raises(ConfigError, match="unknown backend 'tensorbored'; valid: .*tensorboard.*wandb") as err:
        loggers.check_backends(config("tensorbored").logging)
    assert err.value.field == "logging.backends"

    cfg = config("wandb")
    cfg.logging.wandb.mode = "sometimes"
    with pytest.raises(ConfigError) as err:
        loggers.check_backends(cfg.logging)
    assert err.value.field == "logging.wandb.mode"

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    loggers.check_backends(config("tensorboard").logging)  # the others still run
    with pytest.raises(ConfigError, match=r"pip install 'ladder\[wandb\]'") as err:
        loggers.RunLogger(tmp_path / "run", config("tensorboard", "wandb"), total_steps=10)
    assert err.value.field == "logging.backends" and "\n" not in str(err.value)
    assert not (tmp_path / "run").exists()  # refused before writing anything


def test_no_backends_still_writes_the_run_files(tmp_path, capsys):
    run_dir = tmp_path / "run-c"
    logger = loggers.RunLogger(run_dir, config(), total_steps=10)
    logger.log(10, {"loss": 2.0, "val_loss": float("inf")})
    logger.log(10, {"val_loss": 2.5})
    logger.summary({"status": "completed"})
    logger.close()
    logger.close()  # a second close (train.py's error path) is harmless

    assert rows(run_dir) == [{"step": 10, "loss": 2.0, "val_loss": None}, {"step": 10, "val_loss": 2.5}]
    assert json.loads((run_dir / "summary.json").read_text()) == {"status": "completed"}
    assert sorted(p.name for p in run_dir.iterdir()) == ["metrics.jsonl", "summary.json"]
    # Not a terminal (pytest captures stderr): a line per evaluation instead of a bar.
    assert capsys.readouterr().err.splitlines() == ["step 10: val_loss nan", "step 10: val_loss 2.5000"]


def test_other_processes_write_nothing(tmp_path, monkeypatch, wandb_env):
    monkeypatch.setattr(jax, "process_index", lambda: 1)
    logger = loggers.RunLogger(tmp_path / "run-d", config("tensorboard", "wandb"), total_steps=10)
    logger.log(10, {"loss": 2.0})
    logger.progress(10, 2.0, 1e3)
    logger.summary({"status": "completed"})
    logger.close()
    assert not (tmp_path / "run-d").exists()
