"""The CPU plugin as a run sees it: `plugins=[cpu]` resolves the kernels to MKL where they
run, keeps the cores awake while the loop trains, records both in summary.json and trains
as the core does; its options and kernels are checked with errors that name the field;
`python -m ladder_cpu.launch` starts a module with the plugin's malloc."""

import json
import os
import subprocess
import sys

import jax
import pytest

from ladder_cpu import awake, hostmem, kernels, launch
from research import config, data, hooks, plugins, train
from research import sharding as shd
from research import step as steplib
from tests.conftest import TINY, compose

# Three steps, each logged, then one eval: a loss per step to compare.
SHORT = (*TINY, "train.steps=3", "train.log_every=1", "train.eval_every=0", "schedule.warmup=1")
CORE_KERNELS = {"attention": "chunked", "matmul": "xla"}  # the core's auto on one CPU device


def _mesh(n: int):
    return shd.make_mesh((n, 1, 1), jax.devices()[:n])


def _losses(run_dir) -> list[float]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if "loss" in r]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """{"core": ..., "cpu": ...}: (summary, losses, keep_awake entries) of SHORT on one
    device, without and with the plugin."""
    out = {}
    original = awake.keep_awake
    for name, extra in (("core", ()), ("cpu", ("plugins=[cpu]",))):
        entered = []

        def recording(required=True, entered=entered):
            entered.append(required)
            return original(required)

        run_dir = tmp_path_factory.mktemp(f"run_{name}")
        awake.keep_awake = recording  # the loop hook looks it up here, as it starts
        try:
            summary = train.run(compose(*SHORT, *extra), run_dir, devices=jax.devices()[:1])
        finally:
            awake.keep_awake = original
        out[name] = (summary, _losses(run_dir), entered)
    return out


def test_the_plugin_resolves_mkl_and_keeps_the_cores_awake_while_the_loop_runs(runs):
    summary, _, entered = runs["cpu"]
    reason = kernels.unavailable()
    assert summary["status"] == "completed"
    assert summary["kernels"] == (CORE_KERNELS if reason else {"attention": "mkl", "matmul": "mkl"})
    cpu = summary["plugins"]["cpu"]
    assert cpu["kernels_unavailable"] == reason
    assert cpu["keep_awake"] is (reason is None)
    # auto: not required; entered around the measured peak, then around the loop.
    assert entered == ([False, False] if reason is None else [])
    assert awake._state["depth"] == 0  # the loop's end stopped them
    assert cpu["compiler_options"] == summary["compiler_options"]
    assert cpu["host_malloc"] == hostmem.status()  # this process was not launched with it
    core, _, core_entered = runs["core"]
    assert core["kernels"] == CORE_KERNELS and core["plugins"] == {} and core_entered == []


def test_the_plugin_trains_as_the_core_does(runs):
    # The two runs are the same arithmetic in fp32, summed in other orders by other kernels
    # (MKL's SGEMM and fused attention, XLA with other compiler options): their losses differ
    # by rounding only. The step-1 loss is a mean of cross-entropies, each 2-Lipschitz in its
    # logits (max norm); the logits come through ~10 chained sums of this 2-layer, 32-wide
    # model (of at most 256 terms: the matmuls sum 32 or 128, the softmax the 256-token vocab),
    # each off by at most gamma_256 = 1.5e-5 of its sum of |terms|, which the norms keep O(1):
    # ~3e-4 absolute, 5.5e-5 of ln(256) = 5.5; the mean over 512 tokens adds gamma_512 = 3e-5
    # relative. AdamW's first steps move each weight by lr m/sqrt(v) ~ lr sign(g), which a
    # relative error in g leaves unchanged, so steps 2-3 carry that difference rather than
    # grow it: 1e-4 relative.
    # This checks the wiring (the plugin's kernels in the step, its hooks, its compiler
    # options) and catches gross errors, e.g. attention that sees later tokens; a model this
    # small, near its initial loss, hides subtle ones: test_ladder_cpu_kernels.py bounds those.
    (core, core_losses, _), (cpu, cpu_losses, _) = runs["core"], runs["cpu"]
    assert len(core_losses) == len(cpu_losses) == 3
    assert cpu_losses == pytest.approx(core_losses, rel=1e-4)
    assert cpu["final_val_loss"] == pytest.approx(core["final_val_loss"], rel=1e-4)
    assert core_losses[-1] < core_losses[0]  # it trained: the comparison is not of two constants


def _config_error(*overrides) -> config.ConfigError:
    with pytest.raises(config.ConfigError) as info:
        config.parse(compose(*TINY, *overrides))
    return info.value


def test_bad_plugin_options_name_their_field():
    err = _config_error("plugins=[cpu]", "+plugin_options.cpu.keep_awake=bogus")
    assert err.field == "plugin_options.cpu.keep_awake" and "auto, on, off" in str(err)
    err = _config_error("plugins=[cpu]", "+plugin_options.cpu.spin=yes")
    assert err.field == "plugin_options.cpu.spin" and "valid: keep_awake" in str(err)
    err = _config_error("+plugin_options.cpu.keep_awake=off")  # options, but no plugin
    assert err.field == "plugin_options.cpu"


@pytest.mark.parametrize("choice", ["auto", "on", "off"])
def test_keep_awake_choices_give_the_loop_its_hook(choice):
    cfg = config.parse(compose(*TINY, "plugins=[cpu]", f"+plugin_options.cpu.keep_awake={choice}"))
    mesh = _mesh(1)
    plan = steplib.plan(cfg, data.load(cfg.data).vocab_size, mesh)
    loop_hooks = hooks.plugin_hooks(plan.plugins, cfg, mesh)
    if choice == "off" or kernels.unavailable() is not None:
        assert loop_hooks == []
    else:
        (hook,) = loop_hooks
        assert isinstance(hook, awake.KeepAwakeHook) and hook.required is (choice == "on")


def test_keep_awake_on_fails_where_the_kernels_cannot_load(tmp_path, monkeypatch):
    monkeypatch.setattr(kernels, "unavailable", lambda: "MKL not found (test)")
    on = compose(*SHORT, "plugins=[cpu]", "+plugin_options.cpu.keep_awake=on")
    with pytest.raises(config.ConfigError, match="MKL not found") as info:
        train.run(on, tmp_path / "on", devices=jax.devices()[:1])  # before anything compiles
    assert info.value.field == "plugin_options.cpu.keep_awake"
    auto = config.parse(compose(*TINY, "plugins=[cpu]"))  # auto: trains without, on the core's kernels
    plan = steplib.plan(auto, data.load(auto.data).vocab_size, _mesh(1))
    assert plan.kernels == CORE_KERNELS and hooks.plugin_hooks(plan.plugins, auto, _mesh(1)) == []


def test_mkl_kernels_need_the_plugin():
    plugins.load("cpu")  # registered in this process, yet invisible to a run without the plugin
    for op in ("attention", "matmul"):
        err = _config_error(f"model.{op}=mkl")
        assert err.field == f"model.{op}" and "unknown value 'mkl'" in str(err)


def test_mkl_kernels_run_on_one_float32_cpu_device_only():
    cfg = config.parse(compose(*TINY, "plugins=[cpu]", "model.matmul=mkl"))
    vocab = data.load(cfg.data).vocab_size
    with pytest.raises(config.ConfigError, match="needs a one-device CPU mesh, got 8") as info:
        steplib.plan(cfg, vocab, _mesh(8))
    assert info.value.field == "model.matmul"
    bf16 = config.parse(compose(*TINY, "plugins=[cpu]", "model.attention=mkl", "model.dtype=bfloat16"))
    with pytest.raises(config.ConfigError, match="float32 only") as info:
        steplib.plan(bf16, vocab, _mesh(1))
    assert info.value.field == "model.attention"
    auto = config.parse(compose(*TINY, "plugins=[cpu]"))
    assert steplib.plan(auto, vocab, _mesh(8)).kernels == {"attention": "chunked", "matmul": "xla"}
    if kernels.unavailable() is None:
        assert steplib.plan(cfg, vocab, _mesh(1)).kernels["matmul"] == "mkl"


@pytest.mark.parametrize("args", [[], ["--help"]])
def test_launch_without_a_module_prints_its_usage(repo, args):
    proc = subprocess.run([sys.executable, "-m", "ladder_cpu.launch", *args], cwd=repo,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.strip() == launch.USAGE


SHOW_ENV = """
import json, os, sys
from ladder_cpu import hostmem
print(json.dumps({"argv": sys.argv[1:], "status": hostmem.status(),
                  **{k: os.environ.get(k) for k in ("LD_PRELOAD", "MALLOC_CONF", "GLIBC_TUNABLES")}}))
"""


@pytest.mark.parametrize("choice", ["auto", "jemalloc", "thp", "system"])
def test_launch_runs_the_module_with_the_planned_malloc(repo, tmp_path, monkeypatch, choice):
    (tmp_path / "show_env.py").write_text(SHOW_ENV)
    for var in ("GLIBC_TUNABLES", "LD_PRELOAD", "MALLOC_CONF"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv(hostmem.ENV, choice)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(tmp_path), str(repo)]))
    want, (kind, why) = hostmem.environment(), hostmem.plan()  # what this environment plans
    proc = subprocess.run([sys.executable, "-m", "ladder_cpu.launch", "show_env", "a", "x=1", "--b"],
                          cwd=repo, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr[-2000:]
    got = json.loads(proc.stdout)
    assert got["argv"] == ["a", "x=1", "--b"]
    assert {k: got[k] for k in ("LD_PRELOAD", "MALLOC_CONF", "GLIBC_TUNABLES")} == {
        k: want.get(k) for k in ("LD_PRELOAD", "MALLOC_CONF", "GLIBC_TUNABLES")}
    assert got["status"] == (kind if kind != "system" else f"system ({why})")
