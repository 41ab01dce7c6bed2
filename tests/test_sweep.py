"""Sweeps: experiment configs, the sweep index, failures, resume, launchers."""

import itertools
import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import pytest
from hydra.core.override_parser.overrides_parser import OverridesParser

from research import config, flops, sweep, train
from tests.conftest import REPO, TINY, compose, train_cli

EXPERIMENTS = sorted(p.stem for p in (REPO / "conf" / "experiment").glob("*.yaml"))


def test_job_dirname_is_the_overrides_and_fits_a_filesystem():
    assert sweep.job_dirname("model.d_model=64,optim.lr=0.01") == "model.d_model=64,optim.lr=0.01"
    # A path in a value stays in one directory name, and distinct values stay distinct.
    assert sweep.job_dirname("data.path=data/web,x=1") == "data.path=data%2Fweb,x=1"
    assert sweep.job_dirname("data.path=data%2Fweb,x=1") == "data.path=data%252Fweb,x=1"
    long = ",".join(f"model.field_{i}={i}" for i in range(40))
    short = sweep.job_dirname(long)
    assert len(short.encode()) <= sweep.MAX_DIRNAME and short.startswith("model.field_0=0,")
    assert short != sweep.job_dirname(long + ",x=1")  # the hash keeps names distinct
    # Glob metacharacters (a list, a pattern) are encoded too: see the test below.
    assert sweep.job_dirname("train.cooldowns=[0.5,1.0],x=a*?") == "train.cooldowns=%5B0.5,1.0%5D,x=a%2A%3F"


def test_list_override_job_checkpoints_read_back_and_a_bracketed_run_dir_is_refused(repo, tmp_path):
    """Orbax globs for a checkpoint's per-process files below the step's directory: below a
    literal `[` (a list override in the job dir name) it saved checkpoints that could not be
    restored. The job dir encodes the brackets, and a run dir holding one is a config error."""
    import research

    sweep_dir = tmp_path / "sweep"
    proc = train_cli(repo, "-m", *TINY, "train.steps=4", "train.eval_every=0", "schedule=wsd",
                     "schedule.warmup=1", "train.cooldowns=[0.5,1.0]", f"hydra.sweep.dir={sweep_dir}")
    assert proc.returncode == 0, proc.stderr[-2000:]
    (job,) = [e["run_dir"] for e in sweep.read_index(sweep_dir)]
    assert ",train.cooldowns=%5B0.5,1.0%5D," in Path(job).name
    cfg, _, _, step = research.load_run(job)  # restores the final checkpoint's params
    assert step == 4 and cfg.train.cooldowns == [0.5, 1.0]

    bad = tmp_path / "run[1]"
    field = r"hydra.run.dir \(hydra.sweep.dir in a multirun\)"
    with pytest.raises(config.ConfigError, match=field + r": .*run\[1\] contains \[ \]: Orbax"):
        train.run(compose(*TINY, "train.steps=8"), bad)
    assert not bad.exists()  # refused before anything was written


def test_index_keeps_the_latest_record_per_job_and_skips_cut_lines(tmp_path):
    sweep.record(tmp_path, {"job": 1, "run_dir": "b", "status": "running"})
    sweep.record(tmp_path, {"job": 0, "run_dir": "a", "status": "running"})
    sweep.record(tmp_path, {"job": 1, "run_dir": "b", "status": "failed", "error": "x"})
    with open(tmp_path / sweep.INDEX, "a") as f:
        f.write('{"job": 0, "run_dir": "a", "sta')  # a job killed mid-write
    entries = sweep.read_index(tmp_path)
    assert [(e["run_dir"], e["status"]) for e in entries] == [("a", "running"), ("b", "failed")]


def _sweep_points(name: str) -> list[list[str]]:
    """Every job's overrides for experiment `name`, expanded as the basic sweeper does."""
    params = _compose_experiment(name).hydra.sweeper.params
    parser = OverridesParser.create()
    axes = []
    for key, value in params.items():
        override = parser.parse_overrides([f"{key}={value}"])[0]
        if override.is_sweep_override() and not override.is_interval_sweep():
            axes.append([f"{key}={v}" for v in override.sweep_string_iterator()])
    return [list(p) for p in itertools.product(*axes)]


def _compose_experiment(name: str, *overrides: str):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return hydra_compose(config_name="train", overrides=[f"experiment={name}", *overrides],
                             return_hydra_config=True)


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_every_job_of_every_experiment_is_a_valid_config(name):
    """Large ladders are at least composed and validated, job by job, before anyone queues them."""
    hydra_cfg = _compose_experiment(name).hydra
    assert hydra_cfg.sweeper.params, f"{name}: no hydra.sweeper.params"
    from omegaconf import OmegaConf

    sweep_dir = OmegaConf.to_container(hydra_cfg.sweep, resolve=False)["dir"]
    assert "${now:" not in sweep_dir, sweep_dir  # a fixed dir: re-running the command resumes
    points = _sweep_points(name)
    assert len(points) >= (1 if name == "lr_search" else 3)
    for point in points:
        cfg = config.parse(compose(f"experiment={name}", *point))
        vocab = cfg.data.vocab_size or 256  # stdlib and synthetic are byte-level
        cfg = flops.apply_flops_budget(cfg, vocab)
        assert cfg.train.steps > cfg.schedule.warmup
        if name == "isoflop":  # steps come from the budget: equal compute per budget
            per_step = flops.flops_per_token(cfg.model, vocab, cfg.data.seq_len) * cfg.train.batch_size \
                * cfg.data.seq_len
            assert cfg.train.steps * per_step == pytest.approx(cfg.train.flops_budget, rel=0.02)


def test_flops_budget_too_small_is_a_config_error():
    cfg = config.parse(compose(*TINY, "train.flops_budget=1e3"))
    with pytest.raises(config.ConfigError, match="train.flops_budget: 1e\\+03 FLOPs is less than one step"):
        flops.apply_flops_budget(cfg, 256)


def test_multirun_records_failures_resumes_and_runs_jobs_independently(repo, tmp_path):
    """4 jobs in one process (basic launcher) + 1 bad grid point; then the same command again."""
    sweep_dir = tmp_path / "sweep"
    args = ["-m", *TINY, "train.steps=6", "train.eval_every=0", "model.d_model=16,24,30,32,40",
            f"hydra.sweep.dir={sweep_dir}"]
    proc = train_cli(repo, *args)
    assert proc.returncode == 1, proc.stderr[-2000:]  # all jobs ran; one failed
    assert "sweep: 5 jobs: 4 completed, 1 failed" in proc.stderr
    entries = sweep.read_index(sweep_dir)
    assert len(entries) == len((sweep_dir / sweep.INDEX).read_text().splitlines()) == 5  # compacted
    by_width = {[o for o in e["overrides"] if o.startswith("model.d_model=")][-1]: e for e in entries}
    assert by_width["model.d_model=30"]["status"] == "failed"
    assert "model.d_model: 30 is not divisible by model.n_heads=4" in by_width["model.d_model=30"]["error"]

    # Nothing leaks between jobs in one process: each loss equals the job run alone, in its
    # own process (the four at once; their compiles hit the session's XLA cache).
    widths = (16, 24, 32, 40)
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=1"}
    alone = {w: subprocess.Popen(
        [sys.executable, "-m", "research.train", *TINY, "train.steps=6", "train.eval_every=0",
         f"model.d_model={w}", f"hydra.run.dir={tmp_path / f'alone{w}'}"], cwd=repo, env=env,
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True) for w in widths}
    for width in widths:
        e = by_width[f"model.d_model={width}"]
        assert e["status"] == "completed"
        assert f"model.d_model={width}," in Path(e["run_dir"]).name  # the dir names the swept value
        _, err = alone[width].communicate(timeout=300)
        assert alone[width].returncode == 0, err[-2000:]
        solo = json.loads((tmp_path / f"alone{width}" / "summary.json").read_text())
        assert e["final_val_loss"] == pytest.approx(solo["final_val_loss"], rel=1e-6), width

    # The analysis skips the failed job with a warning and fits the rest.
    report = subprocess.run([sys.executable, "-m", "research.analyze", "report", str(sweep_dir)],
                            cwd=repo, capture_output=True, text=True, timeout=120)
    assert report.returncode == 0, report.stderr
    assert "status failed: config error: model.d_model: 30" in report.stderr
    assert "alpha =" in report.stdout

    # The same command again: finished jobs are skipped, an interrupted one resumes.
    (Path(by_width["model.d_model=40"]["run_dir"]) / "summary.json").unlink()
    proc = train_cli(repo, *args)
    assert proc.stderr.count("skipped:") == 3
    assert proc.stderr.count("resumed from") == 1
    assert "sweep: 5 jobs: 4 completed, 1 failed" in proc.stderr


def test_local_parallel_pins_each_job_to_its_cpus(repo, tmp_path):
    proc = train_cli(repo, "-m", "hydra/launcher=local_parallel", "hydra.launcher.n_jobs=2", *TINY,
                     "train.steps=6", "train.eval_every=0", "model.d_model=16,32",
                     f"hydra.sweep.dir={tmp_path}")
    assert proc.returncode == 0, proc.stderr[-2000:]
    cpus = [json.loads(p.read_text())["cpus"] for p in sorted(tmp_path.glob("*/summary.json"))]
    assert len(cpus) == 2
    if len(os.sched_getaffinity(0)) >= 2:  # each job its own share of the cores
        assert not set(cpus[0]) & set(cpus[1])
        assert sorted(cpus[0] + cpus[1]) == sorted(os.sched_getaffinity(0))


def test_slurm_launcher_renders_one_task_per_gpu(repo, tmp_path):
    """The real hydra-submitit launcher, up to the sbatch call (a fake that keeps the script)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "sbatch").write_text('#!/bin/sh\ncp "$1" "$SBATCH_CAPTURE"\necho refused >&2\nexit 1\n')
    (bin_dir / "srun").write_text("#!/bin/sh\nexit 1\n")  # submitit checks that srun exists
    for f in bin_dir.iterdir():
        f.chmod(0o755)
    script = tmp_path / "job.sbatch"
    proc = train_cli(repo, "-m", "experiment=size_grid", "hydra/launcher=slurm_gpu",
                     "hydra.launcher.partition=gpu", "hydra.launcher.nodes=2",
                     f"hydra.sweep.dir={tmp_path / 'sweep'}",
                     env_extra={"PATH": f"{bin_dir}:{os.environ['PATH']}", "SBATCH_CAPTURE": str(script)})
    assert proc.returncode != 0  # the fake refuses the submission
    text = script.read_text()
    for line in ("#SBATCH --array=0-15%16", "#SBATCH --nodes=2", "#SBATCH --gpus-per-node=8",
                 "#SBATCH --ntasks-per-node=8", "#SBATCH --partition=gpu", "#SBATCH --time=720",
                 "export XLA_PYTHON_CLIENT_MEM_FRACTION=0.9"):
        assert line in text, (line, text)
    assert "srun" in text and "submitit.core._submit" in text


def test_optuna_sweeper_minimises_val_loss(repo, tmp_path):
    proc = train_cli(repo, "-m", "experiment=lr_search", *TINY, "train.steps=8", "train.eval_every=0",
                     "hydra.sweeper.n_trials=3", "hydra.sweeper.sampler.n_startup_trials=2",
                     f"hydra.sweep.dir={tmp_path}")
    assert proc.returncode == 0, proc.stderr[-2000:]
    import yaml

    result = yaml.safe_load((tmp_path / "optimization_results.yaml").read_text())
    entries = sweep.read_index(tmp_path)
    assert len(entries) == 3 and all(e["status"] == "completed" for e in entries)
    best = min(entries, key=lambda e: e["final_val_loss"])
    assert result["best_value"] == pytest.approx(best["final_val_loss"])
    assert 1e-4 <= result["best_params"]["optim.lr"] <= 3e-2


def test_flops_budget_run_spends_the_budget(tmp_path):
    budget = 3e9
    summary = train.run(compose(*TINY, f"train.flops_budget={budget}", "train.eval_every=0"), tmp_path,
                        devices=jax.devices()[:1])
    assert summary["status"] == "completed"
    assert summary["steps"] == round(budget / (summary["flops_per_token"] * 16 * 32))
    assert summary["flops"] == pytest.approx(budget, rel=0.05)
    assert summary["config"]["train"]["flops_budget"] == budget
