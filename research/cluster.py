"""Where this process runs: joining a multi-process JAX job, and pinning a job.

Multi-process. A job of N processes (one per host, or one per GPU) calls
`jax.distributed.initialize` once per process, before any JAX computation,
and then sees every process's devices in `jax.devices()`. The values come
from, in order:
  1. the config: `distributed.coordinator=HOST:PORT distributed.num_processes=N
     distributed.process_id=I` (start each process by hand, e.g. over ssh);
  2. the environment, when `distributed.auto` (the default): SLURM tasks
     (srun / hydra-submitit with several tasks) and Cloud TPU pod hosts, for
     which JAX's own cluster detection fills in the values;
  3. neither: a single process, no initialisation.
On CPU the processes exchange data through Gloo collectives (JAX's default).

Pinning. Local-parallel sweeps (hydra-joblib-launcher) run several jobs at
once on one machine. Each worker process claims a slot (a lock file in the
sweep dir, held for the worker's lifetime) and pins itself to that slot's
share of the CPU cores and GPUs before JAX starts, so jobs do not fight over
threads or devices.
"""

from __future__ import annotations

import fcntl
import os
from collections.abc import Mapping
from pathlib import Path

import jax

from research.config import ConfigError, DistributedConfig

_SLURM_VARS = ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_PROCID", "SLURM_LOCALID")


def detected_cluster(env: Mapping[str, str] = os.environ) -> str | None:
    """'slurm' or 'tpu' when the environment is one process of a multi-process job."""
    if all(v in env for v in _SLURM_VARS) and int(env["SLURM_NTASKS"]) > 1:
        return "slurm"
    hosts = env.get("TPU_WORKER_HOSTNAMES", "")
    if "," in hosts or env.get("MEGASCALE_COORDINATOR_ADDRESS"):
        return "tpu"
    return None


def init_args(dist: DistributedConfig, env: Mapping[str, str] = os.environ) -> dict | None:
    """Keyword args for `jax.distributed.initialize`, or None for a single process.

    Explicit config wins; `{}` means "let JAX read the cluster's environment".
    """
    if dist.coordinator is not None:
        if dist.num_processes == 1:
            return None
        args = {"coordinator_address": dist.coordinator, "num_processes": dist.num_processes,
                "process_id": dist.process_id}
        if dist.local_device_ids is not None:
            args["local_device_ids"] = list(dist.local_device_ids)
        return args
    if dist.auto and detected_cluster(env):
        return {} if dist.local_device_ids is None else {"local_device_ids": list(dist.local_device_ids)}
    return None


def process_id_hint(dist: DistributedConfig, env: Mapping[str, str] = os.environ) -> int:
    """This process's index, known before JAX starts (for writes that precede it)."""
    if dist.process_id is not None:
        return dist.process_id
    if dist.auto and detected_cluster(env) == "slurm":
        return int(env["SLURM_PROCID"])
    if dist.auto and detected_cluster(env) == "tpu":
        return int(env.get("TPU_WORKER_ID", env.get("CLOUD_TPU_TASK_ID", 0)))
    return 0


def initialize(dist: DistributedConfig) -> int:
    """Join the multi-process job `dist` describes (once per process); return its size."""
    args = init_args(dist)
    if args is None:
        return 1
    if jax.distributed.is_initialized():  # a later job of a multirun in the same process
        return jax.process_count()
    try:
        jax.distributed.initialize(**args)
    except RuntimeError as err:  # e.g. JAX already ran a computation in this process
        where = "distributed.coordinator" if dist.coordinator else "distributed.auto"
        raise ConfigError(where, f"jax.distributed.initialize failed: {str(err).splitlines()[0]}") from None
    return jax.process_count()


# -- local-parallel pinning

def _claim_slot(lock_dir: Path, n_slots: int) -> tuple[int, int]:
    """(slot, fd): the first free slot in 0..n_slots-1, locked until this process exits."""
    lock_dir.mkdir(parents=True, exist_ok=True)
    for slot in range(n_slots):
        fd = os.open(lock_dir / f"slot-{slot}.lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return slot, fd
        except BlockingIOError:
            os.close(fd)
    raise RuntimeError(f"all {n_slots} job slots in {lock_dir} are taken")


def share(items: list, slot: int, n_slots: int) -> list:
    """Slot `slot`'s contiguous share of `items`; slots share items when there are fewer."""
    if not items:
        return []
    if n_slots >= len(items):
        return [items[slot % len(items)]]
    lo, hi = slot * len(items) // n_slots, (slot + 1) * len(items) // n_slots
    return items[lo:hi]


def _gpu_ids() -> list[str]:
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return [g for g in visible.split(",") if g.strip()]
    return sorted((p.name[len("nvidia"):] for p in Path("/dev").glob("nvidia[0-9]*")), key=int)


def pin_local_job(lock_dir: Path, n_slots: int) -> dict:
    """Pin this worker process to its slot's share of CPUs and GPUs; describe the pin.

    The first call claims a slot and pins; later jobs in the same worker keep
    it (the slot number lives in this process's environment, the lock in an
    open file descriptor that is deliberately never closed).
    """
    if "LADDER_JOB_SLOT" not in os.environ:
        all_cpus, all_gpus = sorted(os.sched_getaffinity(0)), _gpu_ids()
        slot, _fd = _claim_slot(lock_dir, n_slots)
        os.sched_setaffinity(0, share(all_cpus, slot, n_slots))  # XLA sizes its thread pool from this
        if all_gpus:  # read by JAX when its GPU backend starts, after this
            os.environ["CUDA_VISIBLE_DEVICES"] = ",".join(share(all_gpus, slot, n_slots))
        os.environ["LADDER_JOB_SLOT"] = str(slot)
    return {"slot": int(os.environ["LADDER_JOB_SLOT"]), "cpus": sorted(os.sched_getaffinity(0)),
            "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES")}


def local_parallel_slots(launcher_cfg) -> int | None:
    """How many jobs a joblib launcher config runs at once, or None for other launchers."""
    if launcher_cfg is None or "JoblibLauncher" not in str(launcher_cfg.get("_target_", "")):
        return None
    n_jobs = launcher_cfg.get("n_jobs") or -1
    return len(os.sched_getaffinity(0)) if n_jobs < 0 else n_jobs
