"""GPU throughput and memory study for issue 7, in one call of a lent GPU machine.

    python experiments/gpu_perf.py gpt2 [VARIANT...]  # GPT-2 small: attention kernels, batch, flags
    python experiments/gpu_perf.py numerics           # cuDNN and XLA bf16 attention against fp32
    python experiments/gpu_perf.py loop               # the training loop against the bench
    python experiments/gpu_perf.py largest            # largest model that trains, FSDP + remat

Every measurement runs `python -m research.bench` (or `research.train`) in its
own process, so one that fails or runs out of memory does not end the study,
and this driver never touches the GPU itself (JAX would reserve 75% of its
memory). Each result is one JSON line appended to $GPU_PERF_OUT/gpu_perf.jsonl
(default runs/gpu_perf) as soon as it is measured; a table is printed last.
Figures are recorded in docs/performance-log.md. On the H100 of session 5 each
run spent over 100 s compiling the state initialiser (see that log): the time
limits below leave room for that.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# GPT-2 small as the issue states it: 12 x 768, 12 heads, seq 1024, vocab 50304, bf16
# compute with fp32 params and optimizer state (conf/model/gpt2s.yaml), AdamW.
GPT2 = ["model=gpt2s", "data.seq_len=1024", "data.vocab_size=50304"]
CUBLAS = "--xla_gpu_enable_triton_gemm=false"  # every GEMM on cuBLAS, none on Triton

GPT2_VARIANTS = {  # name: (overrides, extra XLA_FLAGS)
    "xla-attn b16": ([*GPT2, "model.attention=xla", "train.batch_size=16"], ""),
    "cudnn b16": ([*GPT2, "model.attention=cudnn", "train.batch_size=16"], ""),
    "cudnn b16 cublas": ([*GPT2, "model.attention=cudnn", "train.batch_size=16"], CUBLAS),
    "cudnn b32": ([*GPT2, "model.attention=cudnn", "train.batch_size=32"], ""),
    "cudnn b64": ([*GPT2, "model.attention=cudnn", "train.batch_size=64"], ""),
}

# Largest-model candidates, largest first: (d_model, n_heads, n_layers). Head dim 128.
LARGEST = [(3072, 24, 28), (3072, 24, 24), (2048, 16, 24)]
LARGEST_BASE = [*GPT2, "mesh=fsdp", "model.remat=block", "train.batch_size=8"]
MEM_FRACTION = "0.95"  # of the GPU's memory for JAX's allocator (its default is 0.75)


def _run(cmd: list[str], env_extra: dict[str, str], timeout: float) -> tuple[int, str, str, float]:
    env = {**os.environ, **env_extra}
    t0 = time.perf_counter()
    try:
        p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
        rc, out, err = p.returncode, p.stdout, p.stderr
    except subprocess.TimeoutExpired:
        rc, out, err = 124, "", f"timeout after {timeout:.0f}s"
    return rc, out, err, time.perf_counter() - t0


def _record(out_dir: Path, row: dict) -> None:
    with open(out_dir / "gpu_perf.jsonl", "a") as f:
        f.write(json.dumps(row) + "\n")


def bench(name: str, overrides: list[str], xla_flags: str, out_dir: Path, steps: int = 20,
          env_extra: dict | None = None, timeout: float = 300) -> dict:
    env = dict(env_extra or {})
    if xla_flags:
        env["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + xla_flags).strip()
    cmd = [sys.executable, "-m", "research.bench", *overrides, f"--steps={steps}"]
    rc, out, err, wall = _run(cmd, env, timeout)
    lines = [ln for ln in out.splitlines() if ln.startswith("{")]
    row = {"stage": "bench", "name": name, "overrides": overrides, "xla_flags": xla_flags,
           "rc": rc, "wall_s": wall}
    if rc == 0 and lines:
        row["result"] = json.loads(lines[-1])
    else:
        row["error"] = err[-3000:]
    _record(out_dir, row)
    return row


def _gb(x) -> str:
    return f"{x / 1e9:.1f}" if x is not None else "-"


def _table(rows: list[dict]) -> None:
    print(f"{'variant':28s} {'rc':>3s} {'tok/s':>9s} {'TFLOP/s':>8s} {'MFU':>6s} {'step ms':>8s} "
          f"{'synced':>7s} {'mem GB':>7s} {'compile':>7s} {'attn':>6s} {'loss':>7s}")
    for row in rows:
        r = row.get("result")
        if not r:
            err = row.get("error", "").strip().splitlines()
            print(f"{row['name']:28s} {row['rc']:3d} failed: {err[-1][:90] if err else ''}")
            continue
        print(f"{row['name']:28s} {row['rc']:3d} {r['tokens_per_s']:9.0f} {r['model_flops_per_s'] / 1e12:8.1f} "
              f"{r['mfu']:6.3f} {r['step_time_s'] * 1e3:8.1f} {r['step_time_synced_s'] * 1e3:7.1f} "
              f"{_gb(r['peak_memory_bytes']):>7s} {r['compile_s']:7.1f} {r['kernels']['attention']:>6s} "
              f"{r['final_loss']:7.4f}")


def stage_gpt2(out_dir: Path, names: list[str]) -> None:
    rows = []
    for name in names or GPT2_VARIANTS:
        overrides, flags = GPT2_VARIANTS[name]
        rows.append(bench(name, overrides, flags, out_dir, timeout=300))
        _table(rows[-1:])
        print(f"  ({rows[-1]['wall_s']:.0f}s)", flush=True)
    print("\nGPT-2 small on", (rows[0].get("result") or {}).get("device", "?"))
    _table(rows)


NUMERICS_CODE = """
import json
import jax, jax.numpy as jnp
from research import kernels
B, L, H, K = 4, 1024, 12, 64
keys = jax.random.split(jax.random.key(7), 4)
q, k, v, g = (jax.random.normal(kk, (B, L, H, K), jnp.float32) for kk in keys)
def run(impl, dtype):  # the registered kernel, as the model calls it
    attn = kernels.attention(impl)
    f = lambda q, k, v: attn(q.astype(dtype), k.astype(dtype), v.astype(dtype)).astype(jnp.float32)
    out, vjp = jax.vjp(f, q, k, v)
    return [out, *vjp(g)]
ref = run("xla", jnp.float32)
rel = lambda a, b: float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b))
res = {}
for impl in ("xla", "cudnn"):
    got = run(impl, jnp.bfloat16)
    res[impl] = {n: rel(a, b) for n, a, b in zip(("out", "dq", "dk", "dv"), got, ref)}
print(json.dumps(res))
"""


def stage_numerics(out_dir: Path) -> None:
    """cuDNN's and XLA's bf16 attention against XLA's in float32, forward and gradients:
    relative errors ||x - ref|| / ||ref|| on random inputs at GPT-2 small's shapes."""
    rc, out, err, wall = _run([sys.executable, "-c", NUMERICS_CODE], {}, 120)
    row = {"stage": "numerics", "rc": rc, "wall_s": wall,
           **({"result": json.loads(out.splitlines()[-1])} if rc == 0 else {"error": err[-2000:]})}
    _record(out_dir, row)
    print(json.dumps(row))


def stage_loop(out_dir: Path) -> None:
    """The training loop (logging, loss checks, the last checkpoint) against the bench."""
    run_dir = Path(tempfile.mkdtemp(prefix="gpu_perf_loop_")) / "run"  # fresh: nothing to resume
    overrides = [*GPT2, "model.attention=cudnn", "train.batch_size=16", "train.steps=80",
                 "train.log_every=20", "train.eval_every=0", "schedule.warmup=10",
                 f"hydra.run.dir={run_dir}"]
    rc, out, err, wall = _run([sys.executable, "-m", "research.train", *overrides], {}, 400)
    summary = run_dir / "summary.json"
    row = {"stage": "loop", "overrides": overrides, "rc": rc, "wall_s": wall}
    if rc == 0 and summary.exists():
        s = json.loads(summary.read_text())
        row["result"] = {k: s.get(k) for k in ("tokens_per_s", "mfu", "compile_s", "final_train_loss",
                                               "kernels", "wall_s")}
        metrics = [json.loads(ln) for ln in (run_dir / "metrics.jsonl").read_text().splitlines()]
        row["intervals_tokens_per_s"] = [m["tokens_per_s"] for m in metrics if "tokens_per_s" in m]
    else:
        row["error"] = err[-3000:]
    _record(out_dir, row)
    print(json.dumps(row, indent=1))


def stage_largest(out_dir: Path) -> None:
    """Train candidates for a few steps, largest first, until one runs: the largest
    model that trains on this device with FSDP sharding and per-block remat."""
    env = {"XLA_PYTHON_CLIENT_MEM_FRACTION": MEM_FRACTION}
    for d, h, n in LARGEST:
        overrides = [*LARGEST_BASE, f"model.d_model={d}", f"model.n_heads={h}", f"model.n_layers={n}"]
        row = bench(f"largest d{d} h{h} L{n}", overrides, "", out_dir, steps=3, env_extra=env, timeout=400)
        _table([row])
        print(f"  ({row['wall_s']:.0f}s)", flush=True)
        if "result" in row:
            break


def main() -> int:
    stages = {"numerics": stage_numerics, "loop": stage_loop, "largest": stage_largest}
    if len(sys.argv) < 2 or sys.argv[1] not in ("gpt2", *stages):
        print("usage: python experiments/gpu_perf.py gpt2 [VARIANT...]|numerics|loop|largest "
              "(OUT_DIR from $GPU_PERF_OUT, default runs/gpu_perf)", file=sys.stderr)
        return 2
    out_dir = Path(os.environ.get("GPU_PERF_OUT", ROOT / "runs" / "gpu_perf"))
    out_dir.mkdir(parents=True, exist_ok=True)
    if sys.argv[1] == "gpt2":
        stage_gpt2(out_dir, sys.argv[2:])
    else:
        stages[sys.argv[1]](out_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
