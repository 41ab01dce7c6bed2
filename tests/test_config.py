"""Bad configs fail fast: one line naming the field, exit code 2, no traceback.

The end-to-end cases run `python -m research.train` in a subprocess, the way a
user does, with 8 simulated CPU devices. Each stops before any compile (the
defaults would otherwise train model=s for 1000 steps, far past the timeout).
"""

import os
import subprocess
import sys

import pytest

from research import config, optim
from research.config import ConfigError
from tests.conftest import TINY, compose

MARKER = "marker.txt"
MARKER_TEXT = "written before the run; a failed config must not touch it\n"


def _env() -> dict:
    env = dict(os.environ)
    env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
    env["JAX_PLATFORMS"] = "cpu"
    return env


# (id, overrides, field named in the message)
CASES = [
    ("d_model_not_divisible", ["model.d_model=30", "model.n_heads=4"], "model.d_model"),
    ("mesh_product", ["mesh.data=3"], "mesh"),
    ("batch_vs_dp", ["train.batch_size=12"], "train.batch_size"),
    # synthetic val split is max(n // 10, 4096) = 4096 tokens; seq_len + 2 must fit.
    ("seq_len_too_long",
     ["data=synthetic", "data.synthetic_tokens=5000", "data.seq_len=4095"], "data.seq_len"),
    ("unknown_optimizer", ["optim.name=foo"], "optim.name"),
    ("unknown_schedule", ["schedule.name=bar"], "schedule.name"),
    ("unknown_dataset", ["data.name=baz"], "data.name"),
    ("tokens_missing_dir", ["data=tokens", "data.path={missing}", "data.vocab_size=512"], "data.path"),
    ("tokens_no_path", ["data=tokens"], "data.path"),
    ("mixture_zero_weight", ["data=tokens", "+data.mixture={{a:{{path:{missing},weight:0}}}}"], "data.mixture.a.weight"),
    ("eval_set_not_prepared", ["+data.eval.code={missing}"], "data.eval.code"),
    ("wrong_type", ["model.d_model=abc"], "model.d_model"),
    ("unknown_preset", ["optim=adamww"], "optim"),
    ("unknown_preset_in_sweep", ["-m", "model=xs,nope"], "model"),
    ("unknown_plugin", ["plugins=[nope]"], "plugins"),
    ("plugin_kernel_without_plugin", ["model.attention=mkl"], "model.attention"),
    ("unknown_logger", ["logging.backends=[tensorboard,nope]"], "logging.backends"),
    ("profile_past_the_end", ["train.steps=10", "schedule.warmup=1", "profile.num_steps=9"],
     "profile.num_steps"),
]


@pytest.mark.parametrize("overrides, field", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_config_exits_2_with_one_line(overrides, field, repo, tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    marker = run_dir / MARKER
    marker.write_text(MARKER_TEXT)
    missing = tmp_path / "no_such_dir"
    overrides = [o.format(missing=missing) for o in overrides]

    proc = subprocess.run(
        [sys.executable, "-m", "research.train", *overrides, f"hydra.run.dir={run_dir}"],
        cwd=repo, env=_env(), capture_output=True, text=True, timeout=120,
    )

    stderr = proc.stderr.strip()
    assert proc.returncode == 2, f"rc={proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    assert "Traceback" not in proc.stderr
    assert len(stderr.splitlines()) == 1, stderr
    assert stderr.startswith("config error: "), stderr
    assert field in stderr, stderr
    # The field leads the message: 'config error: <field>: <problem>'.
    assert stderr.split(": ")[1] == field, stderr
    # Nothing was trained, and what was already in the run dir is untouched.
    assert marker.read_text() == MARKER_TEXT
    assert not (run_dir / "checkpoints").exists() or not any((run_dir / "checkpoints").iterdir())
    assert not (run_dir / "summary.json").exists()
    assert not (run_dir / "metrics.jsonl").exists()


# ------------------------------------------------------------ in process


def _parse(*overrides):
    return config.parse(compose(*TINY, *overrides))


def test_tiny_config_parses():
    cfg = _parse()
    assert isinstance(cfg, config.Config)
    assert cfg.data.name == "synthetic"
    assert cfg.model.d_model == 32


@pytest.mark.parametrize(
    "overrides, field",
    [
        (["model.share_layers=3"], "model.share_layers"),  # xs has 2 layers
        (["schedule.warmup=20"], "schedule.warmup"),  # == train.steps
        (["schedule.warmup=25"], "schedule.warmup"),
        (["optim.accum=3"], "train.batch_size"),  # 16 % 3
        (["optim.b2=1.0"], "optim.b2"),
        (["data.vocab_size=1"], "data.vocab_size"),
        (["mesh.data=-1", "mesh.fsdp=-1"], "mesh"),
        (["model.n_heads=0"], "model.n_heads"),
        (["model.d_model=36", "model.n_heads=4"], "model.pos"),  # odd head dim with rope
        (["+model.nonsense=1"], "model.nonsense"),  # unknown key
    ],
)
def test_parse_raises_config_error(overrides, field):
    with pytest.raises(ConfigError) as info:
        _parse(*overrides)
    assert info.value.field == field
    msg = str(info.value)
    assert msg.startswith(f"{field}: ")
    assert "\n" not in msg


def test_parse_accepts_boundaries():
    cfg = _parse("model.share_layers=2", "schedule.warmup=19", "optim.accum=4")
    assert cfg.model.share_layers == 2 and cfg.optim.accum == 4 and cfg.schedule.warmup == 19
    assert _parse("schedule.warmup=0").schedule.warmup == 0


# ------------------------------------------------------------ registries


def test_names_come_from_the_registries():
    """A name registered once is valid in the config, listed in its error, and builds."""
    with pytest.raises(config.ConfigError, match=r"optim.name: unknown value 'adamww'; valid: adamw, lion"):
        _parse("optim.name=adamww")
    for name in optim.SCHEDULES.names():
        sched = optim.make_schedule(config.ScheduleConfig(name=name, warmup=10), 1e-3, 100)
        assert 0 < float(sched(50)) <= 1e-3 * (1 + 1e-6), name
    optim.SCHEDULES.register("test_half", lambda s, lr, steps: lambda step: 0.5 * lr + 0 * step)
    try:
        cfg = _parse("schedule.name=test_half", "schedule.warmup=0")
        assert float(optim.make_schedule(cfg.schedule, 1e-3, 100)(7)) == pytest.approx(5e-4)
    finally:
        optim.SCHEDULES._entries.pop("test_half")
    with pytest.raises(config.ConfigError, match="schedule.name: unknown value 'test_half'"):
        _parse("schedule.name=test_half")


def test_every_registered_optimizer_builds():
    for name in optim.OPTIMIZERS.names():
        sched = optim.make_schedule(config.ScheduleConfig(), 1e-3, 1000)
        opt = optim.make_optimizer(config.OptimConfig(name=name), sched)
        assert hasattr(opt, "init") and hasattr(opt, "update")


def test_every_config_preset_parses():
    """Each file in conf/<group>/ composes and validates (machine-independent rules)."""
    from tests.conftest import REPO

    for group in ("optim", "schedule", "model", "mesh", "data"):
        for path in sorted((REPO / "conf" / group).glob("*.yaml")):
            extra = ["data.path=/x", "data.vocab_size=512"] if path.stem == "tokens" else []
            cfg = config.parse(compose(f"{group}={path.stem}", *extra))
            assert getattr(cfg, group) is not None
