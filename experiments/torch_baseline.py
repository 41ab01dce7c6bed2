"""PyTorch nanoGPT-style train step on the bench's reference config, for a side-by-side figure.

    python experiments/torch_baseline.py [--compile] [--steps 10]

Not part of the package and not a dependency: it needs `pip install torch`
(CPU build) in any environment, and nothing from `research`. It prints one
JSON line with the same fields as `python -m research.bench` where they
mean the same thing: model FLOP/s with PaLM accounting (6 N + 12 L H Q T
per token; N counts the block matmuls, the norm scales and the output
projection, as `research/flops.py` does), the sustained fp32 matmul rate
measured in this process before and after the timed steps (median over 2 s
of 1024^3 matmuls, the larger kept), and their ratio.

The model is nanoGPT's GPT (pre-norm LayerNorm without bias, learned
positions, GELU MLP of width 4 D, tied embeddings, no dropout) with
`F.scaled_dot_product_attention(is_causal=True)`, trained by `torch.optim.AdamW`
on random tokens: n_layers=6, n_heads=6, d_model=384, seq_len=256,
batch_size=16, vocab 256, fp32. `--compile` wraps the model in
`torch.compile` (Inductor's C++ backend on CPU).
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import statistics
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

LAYERS, HEADS, D, SEQ, BATCH, VOCAB = 6, 6, 384, 256, 16, 256


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.ln1 = nn.LayerNorm(D, bias=False)
        self.qkv = nn.Linear(D, 3 * D, bias=False)
        self.proj = nn.Linear(D, D, bias=False)
        self.ln2 = nn.LayerNorm(D, bias=False)
        self.fc = nn.Linear(D, 4 * D, bias=False)
        self.out = nn.Linear(4 * D, D, bias=False)

    def forward(self, x):
        b, t, _ = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(D, dim=2)
        q, k, v = (z.view(b, t, HEADS, D // HEADS).transpose(1, 2) for z in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(y.transpose(1, 2).reshape(b, t, D))
        return x + self.out(F.gelu(self.fc(self.ln2(x))))


class GPT(nn.Module):
    def __init__(self):
        super().__init__()
        self.tok = nn.Embedding(VOCAB, D)
        self.pos = nn.Embedding(SEQ, D)
        self.blocks = nn.ModuleList(Block() for _ in range(LAYERS))
        self.ln_f = nn.LayerNorm(D, bias=False)
        self.head = nn.Linear(D, VOCAB, bias=False)
        self.head.weight = self.tok.weight  # tied
        for p in self.parameters():
            if p.dim() == 2:
                nn.init.normal_(p, std=0.02)

    def forward(self, idx, targets):
        x = self.tok(idx) + self.pos(torch.arange(idx.shape[1]))
        for block in self.blocks:
            x = block(x)
        logits = self.head(self.ln_f(x))
        return F.cross_entropy(logits.view(-1, VOCAB), targets.reshape(-1))


def flops_per_token() -> float:
    """PaLM accounting, as research/flops.py: 6 N + 12 L H Q T."""
    n = LAYERS * (12 * D * D + 2 * D) + D + D * VOCAB  # block matmuls + norm scales, final norm, output
    return 6 * n + 12 * LAYERS * HEADS * (D // HEADS) * SEQ


def matmul_rate(seconds: float = 2.0, n: int = 1024) -> float:
    """Median FLOP/s of back-to-back fp32 n^3 matmuls over `seconds`."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    torch.mm(a, b)
    rates, end = [], time.perf_counter() + seconds
    while time.perf_counter() < end:
        t0 = time.perf_counter()
        torch.mm(a, b)
        rates.append(2 * n**3 / (time.perf_counter() - t0))
    return statistics.median(rates)


def make_step(compile: bool = False):
    """step(i) -> loss: one AdamW train step of a fresh GPT (seed 0) on batch i % 2."""
    torch.manual_seed(0)
    model = GPT()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.1)
    fwd = torch.compile(model) if compile else model
    batches = [torch.randint(0, VOCAB, (BATCH, SEQ + 1)) for _ in range(2)]

    def step(i: int) -> float:
        batch = batches[i % 2]
        loss = fwd(batch[:, :-1], batch[:, 1:])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return loss.item()

    return step


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--compile", action="store_true", help="torch.compile the model")
    ap.add_argument("--steps", type=int, default=10, help="timed steps (after 2 warm-up steps)")
    args = ap.parse_args()

    peak_before = matmul_rate()
    step = make_step(args.compile)
    t0 = time.perf_counter()
    step(0)
    first_s = time.perf_counter() - t0
    step(1)
    times = []
    for i in range(args.steps):
        t0 = time.perf_counter()
        loss = step(i)
        times.append(time.perf_counter() - t0)
    peak = max(peak_before, peak_after := matmul_rate())
    step_s = statistics.median(times)
    model_flops = BATCH * SEQ * flops_per_token() / step_s
    print(json.dumps({
        "torch": torch.__version__, "compile": args.compile, "threads": torch.get_num_threads(),
        "model_flops_per_s": model_flops, "peak_flops_per_s": peak,
        "peak_before_after": [peak_before, peak_after], "mfu": model_flops / peak,
        "step_time_s": step_s, "step_time_min_s": min(times), "first_step_s": first_s,
        "peak_memory_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "final_loss": loss, "loss_at_init": math.log(VOCAB),
    }))


if __name__ == "__main__":
    main()
