"""Multi-process start-up and job pinning (research/cluster.py)."""

import json
import os
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest

from research import cluster, config, train
from research.config import DistributedConfig
from research.load import load_run
from tests.conftest import TINY, compose

SLURM_ENV = {"SLURM_JOB_ID": "42", "SLURM_STEP_NODELIST": "node[1-2]", "SLURM_NTASKS": "16",
             "SLURM_PROCID": "9", "SLURM_LOCALID": "1"}


def test_explicit_values_start_one_process_of_n():
    dist = DistributedConfig(coordinator="host:1234", num_processes=4, process_id=2)
    assert cluster.init_args(dist, env={}) == {"coordinator_address": "host:1234", "num_processes": 4,
                                               "process_id": 2}
    assert cluster.process_id_hint(dist, env={}) == 2


def test_cluster_environment_is_detected_and_can_be_switched_off():
    assert cluster.init_args(DistributedConfig(), env={}) is None  # plain machine: one process
    assert cluster.detected_cluster(SLURM_ENV) == "slurm"
    assert cluster.init_args(DistributedConfig(), env=SLURM_ENV) == {}  # JAX reads SLURM's variables
    assert cluster.process_id_hint(DistributedConfig(), env=SLURM_ENV) == 9
    assert cluster.init_args(DistributedConfig(auto=False), env=SLURM_ENV) is None
    assert cluster.init_args(DistributedConfig(), env={**SLURM_ENV, "SLURM_NTASKS": "1"}) is None
    tpu = {"TPU_WORKER_HOSTNAMES": "t0,t1,t2,t3", "TPU_WORKER_ID": "3"}
    assert cluster.detected_cluster(tpu) == "tpu"
    assert cluster.process_id_hint(DistributedConfig(), env=tpu) == 3


@pytest.mark.parametrize("overrides,message", [
    (["distributed.coordinator=h:1"], "distributed.num_processes: required when any of"),
    (["distributed.coordinator=h", "distributed.num_processes=2", "distributed.process_id=0"],
     "distributed.coordinator: must be HOST:PORT, got 'h'"),
    (["distributed.coordinator=h:1", "distributed.num_processes=2", "distributed.process_id=2"],
     "distributed.process_id: must be in 0..1"),
])
def test_bad_distributed_values_are_one_line_errors(overrides, message):
    with pytest.raises(config.ConfigError, match=message):
        config.parse(compose(*TINY, *overrides))


def test_share_splits_cores_and_shares_when_short():
    assert cluster.share(list(range(8)), 1, 2) == [4, 5, 6, 7]
    assert cluster.share([0, 1], 3, 4) == [1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def test_two_processes_train_like_one(repo, tmp_path):
    """2 processes x 4 CPU devices (jax.distributed over localhost) = 1 process x 8 devices."""
    args = [*TINY, "train.eval_every=10", "checkpoint.every=10"]
    port = _free_port()
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4"}
    procs = [subprocess.Popen(
        [sys.executable, "-m", "research.train", *args, f"hydra.run.dir={tmp_path / 'two'}",
         f"distributed.coordinator=localhost:{port}", "distributed.num_processes=2",
         f"distributed.process_id={i}"], cwd=repo, env=env, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True) for i in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    for p, (_, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
    assert "step 20" in outs[0][1] and "step 20" not in outs[1][1]  # process 0 reports

    one = train.run(compose(*args), tmp_path / "one")  # this process: 8 devices
    rows = lambda d: [json.loads(line) for line in (d / "metrics.jsonl").read_text().splitlines()]
    two_rows, one_rows = rows(tmp_path / "two"), rows(tmp_path / "one")
    assert [r["step"] for r in two_rows] == [r["step"] for r in one_rows]  # written once, by process 0
    for a, b in zip(two_rows, one_rows):
        for key in ("loss", "val_loss"):
            if key in b:
                assert a[key] == pytest.approx(b[key], rel=1e-4), (a["step"], key)
    summary = json.loads((tmp_path / "two" / "summary.json").read_text())
    assert summary["processes"] == 2 and summary["devices"] == 8
    assert summary["final_val_loss"] == pytest.approx(one["final_val_loss"], rel=1e-4)

    # Checkpoints written by 2 processes restore in 1.
    restored, reference = load_run(tmp_path / "two"), load_run(tmp_path / "one")
    assert restored.step == reference.step == 20
    from flax import nnx

    a, b = nnx.state(restored.model, nnx.Param), nnx.state(reference.model, nnx.Param)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-4, atol=1e-6)
