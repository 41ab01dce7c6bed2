"""`experiments/vs_torch.py`: our side's worker answers the driver's protocol, runs as the
train loop does (the plan's kernels, the enabled plugins' hooks, with the CPU plugin its
malloc), and bad input stops the driver or the worker with one line. (The PyTorch side needs
torch, which the project does not install: no test here starts it.)"""

import json
import math
import os
import subprocess
import sys

import pytest

from ladder_cpu import hostmem, kernels

SCRIPT = "experiments/vs_torch.py"
XS = "model=xs data.seq_len=32 train.batch_size=8"


@pytest.mark.parametrize("plugin", [False, True], ids=["core", "cpu"])
def test_our_worker_times_the_steps_it_is_asked_for(repo, monkeypatch, plugin):
    for var in ("GLIBC_TUNABLES", "LD_PRELOAD", "MALLOC_CONF"):  # the worker's own choice shows
        monkeypatch.delenv(var, raising=False)
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=1"}
    ours = f"{XS} plugins=[cpu]" if plugin else XS
    proc = subprocess.Popen(
        [sys.executable, SCRIPT, "--serve", "ours", "--ours", ours],
        cwd=repo, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        info = json.loads(proc.stdout.readline())
        # model=xs: 64 wide, 2 layers; 8 x 32 tokens a step.
        assert info["flops_per_step"] > 0 and "model=xs" in info["about"]
        reason = kernels.unavailable()
        if plugin:  # turns run as training does: MKL's kernels, the cores kept awake, the malloc
            cpu = info["plugins"]["cpu"]
            mkl = reason is None
            assert info["kernels"] == ({"attention": "mkl", "matmul": "mkl"} if mkl
                                       else {"attention": "chunked", "matmul": "xla"})
            assert cpu["keep_awake"] is mkl and cpu["kernels_unavailable"] == reason
            kind, why = hostmem.plan()  # the worker restarted itself with what this plans
            assert cpu["host_malloc"] == (kind if kind != "system" else f"system ({why})")
        else:
            assert info["plugins"] == {} and info["kernels"] == {"attention": "chunked", "matmul": "xla"}
        replies = []
        for steps in (3, 1):
            proc.stdin.write(f"{steps}\n")
            proc.stdin.flush()
            replies.append(json.loads(proc.stdout.readline()))
        proc.stdin.close()
        assert proc.wait(timeout=60) == 0, proc.stderr.read()[-2000:]
    finally:
        proc.kill()
    assert [len(r["times"]) for r in replies] == [3, 1]
    assert all(t > 0 for r in replies for t in r["times"])
    assert all(math.isfinite(r["loss"]) for r in replies)


def test_bad_input_is_one_line_and_starts_nothing(repo, tmp_path):
    cases = [([], "--torch-python PATH is required"),
             (["--torch-python", str(tmp_path / "nope")], "no such executable"),
             (["--torch-python", sys.executable, "--rounds", "0"], "--rounds must be at least 1")]
    for args, message in cases:
        proc = subprocess.run([sys.executable, SCRIPT, *args], cwd=repo, capture_output=True, text=True,
                              timeout=60)
        assert proc.returncode != 0
        assert message in proc.stderr and len(proc.stderr.strip().splitlines()) == 1, proc.stderr


@pytest.mark.parametrize("ours, field, detail", [
    ("model.pos=bogus", "model.pos", "rope, learned"),  # the config
    ("model.matmul=mkl", "model.matmul", "unknown value 'mkl'"),  # a plugin's kernel, no plugin
    ("plugins=[cpu] model.attention=mkl model.dtype=bfloat16", "model.attention", "float32 only"),  # the plan
])
def test_a_bad_override_names_the_field(repo, ours, field, detail):
    proc = subprocess.run([sys.executable, SCRIPT, "--serve", "ours", "--ours", ours],
                          cwd=repo, capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)
    assert proc.returncode == 2
    assert proc.stderr.startswith(f"config error: {field}: ") and detail in proc.stderr, proc.stderr
