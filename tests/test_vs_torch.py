"""`experiments/vs_torch.py`: our side's worker answers the driver's protocol, and bad
input stops the driver before any worker starts. (The PyTorch side needs torch, which
the project does not install.)"""

import json
import math
import os
import platform
import subprocess
import sys

SCRIPT = "experiments/vs_torch.py"


def test_our_worker_times_the_steps_it_is_asked_for(repo):
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=1"}
    proc = subprocess.Popen(
        [sys.executable, SCRIPT, "--serve", "ours", "--ours", "model=xs data.seq_len=32 train.batch_size=8"],
        cwd=repo, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        info = json.loads(proc.stdout.readline())
        # model=xs: 64 wide, 2 layers; 8 x 32 tokens a step.
        assert info["flops_per_step"] > 0 and "model=xs" in info["about"]
        if sys.platform == "linux" and platform.machine() == "x86_64":  # turns run as training does
            assert "keep_awake True" in info["about"]
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


def test_a_bad_override_names_the_field(repo):
    proc = subprocess.run([sys.executable, SCRIPT, "--serve", "ours", "--ours", "model.pos=bogus"],
                          cwd=repo, capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)
    assert proc.returncode == 2
    assert "model.pos" in proc.stderr and "rope, learned" in proc.stderr
