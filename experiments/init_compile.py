"""Why the jitted state initialiser compiles slowly: three ways to build the same params.

    python experiments/init_compile.py [OVERRIDES...]
    python experiments/init_compile.py model=gpt2s data.seq_len=1024 data.vocab_size=50304
    python experiments/init_compile.py --variant batched [OVERRIDES...]  # one way only

On the H100 of session 5, compiling `step.init_state` for GPT-2 small took more
than 100 s, against 13-17 s for the train step (docs/performance-log.md). Each
variant below builds the step-0 state of the bench's config (plus OVERRIDES)
on one device, in its own process, and prints one JSON line: the kernels the
run's plan resolved (which the params do not depend on), trace and lower,
compile and run times, the compiled program's fusions and HLO lines, and a
digest of the params' bytes. `weights` and `key_arg` give bitwise the same
params; `batched` makes the same draws, but XLA rounds their product by the
init std differently when it fuses it, so its params differ by up to 1 ulp
(built eagerly, all three are bitwise equal).

  weights   as `step.init_state` does it: one random draw per weight, the seed
            a constant of the jitted function
  key_arg   the same, with the seed's key an argument instead of a constant
            (suspect 1: XLA folding the whole random init as a constant)
  batched   one draw per distinct weight shape, vmapped over the weights'
            keys, and the keys' fold_ins vmapped too (suspect 2: one threefry
            generator, and its fusions, per weight)
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
VARIANTS = ("weights", "key_arg", "batched")


@contextlib.contextmanager
def _batched_draws():
    """Inside: `model._param` defers its draws; on exit they are made one per shape."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from research import model

    pending, original = [], model._param

    def deferred(rngs, shape, axes, std):
        # What rngs.params() does (key = fold_in(stream key, count); count += 1), deferred.
        stream = rngs.params
        p = nnx.Param(jax.ShapeDtypeStruct(shape, jnp.float32), axes=axes)
        pending.append((p, stream.key[...], stream.count[...], std))
        stream.count[...] += 1
        return p

    model._param = deferred
    try:
        yield
    finally:
        model._param = original
    _, stream_keys, counts, _ = zip(*pending)
    keys = jax.vmap(jax.random.fold_in)(jnp.stack(stream_keys), jnp.stack(counts))
    groups: dict[tuple, list[int]] = {}
    for i, (p, *_) in enumerate(pending):
        groups.setdefault(p.shape, []).append(i)
    for shape, idx in groups.items():
        draw = jax.vmap(lambda k, shape=shape: jax.random.normal(k, shape, jnp.float32))
        values = draw(keys[jnp.array(idx)])
        for j, i in enumerate(idx):
            pending[i][0].value = pending[i][3] * values[j]


def measure(variant: str, overrides: list[str]) -> dict:
    import dataclasses

    import jax
    from flax import nnx

    from research import conf, config, data, model
    from research import sharding as shd
    from research import step as steplib
    from research.bench import REFERENCE

    cfg = config.parse(conf.compose([*REFERENCE, *overrides]))
    mesh = shd.make_mesh((1, 1, 1), jax.devices()[:1])
    vocab = data.load(cfg.data).vocab_size
    plan = steplib.plan(cfg, vocab, mesh)
    model_cfg = dataclasses.replace(cfg.model, **plan.kernels)  # as the plan builds it

    def params(seed):
        args = (model_cfg, vocab, cfg.data.seq_len, seed, cfg.param)
        if variant == "batched":
            with _batched_draws():
                net = model.build(*args)
        else:
            net = model.build(*args)
        return nnx.split(net)[1].to_pure_dict()

    def init(*key):
        seed = key[0] if key else cfg.train.seed
        return steplib.new_state(params(seed), plan.optimizer, cfg.train.seed)

    fn = jax.jit(init, out_shardings=plan.state_shardings)
    args = (jax.random.key(cfg.train.seed),) if variant == "key_arg" else ()
    t0 = time.perf_counter()
    lowered = fn.lower(*args)
    t1 = time.perf_counter()
    compiled = lowered.compile()
    t2 = time.perf_counter()
    state = jax.block_until_ready(compiled(*args))
    t3 = time.perf_counter()
    digest = hashlib.sha256()
    for leaf in jax.tree.leaves(state["params"]):
        digest.update(jax.device_get(leaf).tobytes())
    hlo = compiled.as_text()
    return {"variant": variant, "device": str(jax.devices()[0].device_kind), "kernels": plan.kernels,
            "lower_s": round(t1 - t0, 2), "compile_s": round(t2 - t1, 2), "run_s": round(t3 - t2, 2),
            "fusions": hlo.count(" fusion("), "hlo_lines": hlo.count("\n"),
            "params_digest": digest.hexdigest()[:16]}


def main() -> int:
    if len(sys.argv) > 2 and sys.argv[1] == "--variant":
        print(json.dumps(measure(sys.argv[2], sys.argv[3:])))
        return 0
    # Each way in its own process: no compile cache shared between them, and this driver never
    # imports JAX (on a GPU it would take the card's memory).
    overrides, failed = sys.argv[1:], 0
    for variant in VARIANTS:
        proc = subprocess.run([sys.executable, __file__, "--variant", variant, *overrides],
                              cwd=ROOT, capture_output=True, text=True, check=False)
        lines = proc.stdout.strip().splitlines()
        if proc.returncode != 0 or not lines:
            failed += 1
            print(json.dumps({"variant": variant, "rc": proc.returncode,
                              "error": proc.stderr.strip().splitlines()[-1:]}))
        else:
            print(lines[-1])
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
