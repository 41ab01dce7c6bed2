"""`python -m research.bench` prints one JSON line with the figures it promises."""

import json
import os
import subprocess
import sys

KEYS = {"config", "tokens_per_s", "model_flops_per_s", "peak_flops_per_s", "mfu", "step_time_s",
        "compile_s", "peak_memory_bytes"}


def test_bench_prints_one_json_line(repo):
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=1"}
    proc = subprocess.run(
        [sys.executable, "-m", "research.bench", "model=xs", "data.seq_len=32", "train.batch_size=8",
         "--steps=3"], cwd=repo, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert KEYS <= result.keys()
    assert result["config"]["d_model"] == 64 and result["config"]["seq_len"] == 32
    assert result["tokens_per_s"] > 0 and result["compile_s"] > 0 and result["peak_memory_bytes"] > 0
    # The ratio is what it says: model FLOP/s over the measured peak.
    assert result["mfu"] == result["model_flops_per_s"] / result["peak_flops_per_s"]
    assert result["peak_source"].startswith("measured:cpu")
    # No plugin: the core's kernels, XLA's options, XLA's dot for the peak.
    assert result["kernels"] == {"matmul": "xla", "attention": "chunked"}
    assert result["plugins"] == {} and result["compiler_options"] is None
    assert result["peak_source"] == "measured:cpu fp32 1024^3 matmul (xla), sustained"
    assert result["page_faults_per_step"] >= 0
    # On CPU the step time is the median of steps timed one by one.
    assert result["step_time_s"] == result["step_time_synced_s"] >= result["step_time_min_s"]
    # XLA's account of the step's memory: the state is donated, so its outputs reuse the
    # argument buffers, and the step needs the arguments plus its temporaries.
    mem = result["step_memory_bytes"]
    assert mem["alias"] > 0 and mem["temp"] > 0
    assert mem["total"] == mem["argument"] + mem["output"] - mem["alias"] + mem["temp"]


def test_planned_memory_matches_the_compiled_step_and_grows_with_the_model():
    from research import bench, conf

    small = ["model=xs", "data.seq_len=32", "train.batch_size=8"]
    raw = conf.compose([*bench.REFERENCE, *small])
    planned = bench.planned_memory(raw)  # from shapes alone: nothing allocated
    assert planned == bench.bench(raw, steps=1, warmup=1)["step_memory_bytes"]
    wider = bench.planned_memory(conf.compose([*bench.REFERENCE, *small, "model.d_model=128"]))
    assert wider["argument"] > 3 * planned["argument"]


def test_bench_rejects_cudnn_attention_off_a_gpu(repo):
    proc = subprocess.run([sys.executable, "-m", "research.bench", "model.attention=cudnn"], cwd=repo,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip() == ("config error: model.attention: cudnn: needs an NVIDIA GPU, "
                                   "this is cpu; use auto or xla")


def test_bench_rejects_bad_config(repo):
    proc = subprocess.run([sys.executable, "-m", "research.bench", "optim.name=nope"], cwd=repo,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip() == (
        "config error: optim.name: unknown value 'nope'; valid: adamw, lion, adafactor, sgd")
