"""Shared test set-up.

Sharding tests need 8 devices; on CPU that means simulated ones, which XLA
only creates if the flag is set before jax is first imported. conftest.py is
imported before any test module, so set it here.
"""

import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

# One persistent XLA compilation cache for the session, shared with the
# subprocesses the tests start: dozens of them compile the same tiny
# programs, and a cache hit turns ~8 s of compiling into ~1 s. Fresh per
# session, so it never serves code from before a change.
import atexit  # noqa: E402
import shutil  # noqa: E402
import tempfile  # noqa: E402

if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    _cache = tempfile.mkdtemp(prefix="ladder-test-xla-cache-")
    atexit.register(shutil.rmtree, _cache, ignore_errors=True)
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _cache
    os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
    os.environ["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"

import json  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def repo() -> Path:
    return REPO


def compose(*overrides: str):
    """The config `python -m research.train` would build from these overrides."""
    from research import conf

    return conf.compose(overrides)


# Small, fast settings for end-to-end tests: synthetic data, a tiny model.
TINY = (
    "data=synthetic",
    "data.seq_len=32",
    "model=xs",
    "model.d_model=32",
    "model.n_heads=4",
    "train.batch_size=16",
    "train.steps=20",
    "train.log_every=5",
    "train.eval_every=10",
    "train.eval_batches=2",
    "schedule.warmup=5",
)


def train_steps(*overrides: str, steps: int = 3, sharded: bool = False):
    """Losses (array) and final params of `steps` real train steps of TINY + `overrides`,
    in this process, on one device or data-sharded over all of them."""
    import jax
    import numpy as np

    from research import config, data
    from research import sharding as shd
    from research import step as steplib

    cfg = config.parse(compose(*TINY, *overrides))
    corpus = data.load(cfg.data)
    devices = jax.devices() if sharded else jax.devices()[:1]
    mesh = shd.make_mesh(shd.mesh_shape(cfg.mesh, len(devices)), devices)
    plan = steplib.plan(cfg, corpus.vocab_size, mesh)
    train_step = plan.train_step(mesh, cfg.optim.accum)
    state, losses = plan.fresh_state(), []
    for s in range(steps):
        batch = data.device_batch(corpus, data.TRAIN, cfg.train.seed, s, cfg.train.batch_size,
                                  cfg.data.seq_len, shd.batch_sharding(mesh))
        state, metrics = train_step(state, batch)
        losses.append(float(metrics["loss"]))
    return np.array(losses), jax.device_get(state["params"])


def train_cli(repo: Path, *args: str, env_extra: dict | None = None, devices: int = 1,
              timeout: int = 300) -> subprocess.CompletedProcess:
    """`python -m research.train ARGS` in a subprocess with `devices` CPU devices."""
    env = {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}",
           **(env_extra or {})}
    return subprocess.run([sys.executable, "-m", "research.train", *args], cwd=repo, env=env,
                          capture_output=True, text=True, timeout=timeout)
# A run directory written by hand: the files analysis reads, following a chosen law, in milliseconds.
TOKENS_PER_STEP = 1000


def write_run(root: Path, name: str, d_model: int, n_layers: int, n: int, status: str,
              final: float | None, steps: int = 200, budget: float | None = None, **extra) -> Path:
    """A run dir as training writes it (the fields analysis reads), with a made-up curve ending at `final`."""
    run = root / name
    run.mkdir(parents=True)
    summary = {
        "status": status,
        "final_val_loss": final,
        "params": n + 256 * d_model,
        "non_embedding_params": n,
        "tokens": steps * TOKENS_PER_STEP,
        "flops": 6 * n * steps * TOKENS_PER_STEP,
        "flops_per_token": 6 * n,
        "config": {"model": {"d_model": d_model, "n_layers": n_layers},
                   "train": {"steps": steps, "flops_budget": budget}},
        **extra,
    }
    (run / "summary.json").write_text(json.dumps(summary))
    end = final if final is not None else 5.0
    logged = sorted({max(1, round(steps * f)) for f in (0.005, 0.05, 0.25, 0.5, 1.0)})
    rows = [{"step": s, "loss": end + 3.0 / s, "tokens": s * TOKENS_PER_STEP} for s in logged]
    rows[-1]["val_loss"] = end
    rows[1]["val_loss"] = end + 0.5
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return run


TRUE_E, TRUE_A, TRUE_ALPHA = 2.0, 60.0, 0.3
# (name, d_model, n_layers, non-embedding params)
RUNS = [
    ("r0", 32, 2, 20_000),
    ("r1", 64, 2, 80_000),
    ("r2", 96, 3, 300_000),
    ("r3", 128, 4, 1_000_000),
    ("r4", 192, 4, 4_000_000),
]


def write_law_sweep(root: Path) -> Path:
    """RUNS completed with final loss E + A N^-alpha (TRUE_*), and one diverged run."""
    for name, d_model, n_layers, n in RUNS:
        write_run(root, name, d_model, n_layers, n, "completed", float(TRUE_E + TRUE_A * n**-TRUE_ALPHA))
    write_run(root, "r5_diverged", 256, 4, 8_000_000, "diverged", None)
    return root
