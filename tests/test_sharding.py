"""The sharded step: data, FSDP and tensor parallelism are configuration only.

Runs on 8 simulated CPU devices (see conftest.py). A sharding bug (a
missing all-reduce, a wrong split) moves the loss far more than fp32
reassociation does, so equal losses within 1e-4 relative mean equal math.
"""

import json

import jax
import numpy as np
import pytest

from research import sharding as shd
from research import train
from research.config import ConfigError, MeshConfig
from tests.conftest import TINY, compose

MESHES = [(8, 1, 1), (1, 8, 1), (2, 2, 2), (2, 1, 4)]
# 4 layers, each its own block (the scan over stacked weights; test_checkpoint's mesh
# restore runs shared blocks).
OVERRIDES = (*TINY, "train.log_every=1", "model.tie_embeddings=false", "model.d_model=64",
             "model.n_layers=4")


def _losses(run_dir) -> np.ndarray:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return np.array([r["loss"] for r in rows if "loss" in r])


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("mesh_1x1x1")
    cfg = compose(*OVERRIDES, "mesh.data=1", "mesh.fsdp=1", "mesh.tensor=1")
    summary = train.run(cfg, run_dir, devices=jax.devices()[:1])
    assert summary["devices"] == 1
    return _losses(run_dir)


@pytest.mark.parametrize("shape", MESHES, ids=lambda s: "x".join(map(str, s)))
def test_meshes_give_the_same_losses(shape, reference, tmp_path):
    assert jax.device_count() == 8
    data, fsdp, tensor = shape
    cfg = compose(*OVERRIDES, f"mesh.data={data}", f"mesh.fsdp={fsdp}", f"mesh.tensor={tensor}")
    summary = train.run(cfg, tmp_path)
    assert summary["mesh"] == {"data": data, "fsdp": fsdp, "tensor": tensor}
    losses = _losses(tmp_path)
    assert len(losses) == len(reference) == 20
    # Not a derived rounding bound (see the module docstring): a worst-case fp32 bound through
    # 20 AdamW steps is useless, as its sign-like update may flip any weight whose gradient is
    # within rounding of zero. 1e-4 is a margin between reassociation and a sharding bug.
    np.testing.assert_allclose(losses, reference, rtol=1e-4)
    assert losses[-1] < losses[0]  # it trained


def test_params_are_actually_sharded():
    """Each rule puts the named dimension on its mesh axis, so memory really is split."""
    from flax import nnx

    from research import model
    from research.config import ModelConfig

    # Two layers: a mesh axis of 2 would divide the stacked blocks' layers dim, were it split.
    cfg = ModelConfig(d_model=64, n_layers=2, n_heads=4, tie_embeddings=False)
    abstract = nnx.split(nnx.eval_shape(lambda: model.build(cfg, 256, 32, 0)))[1]
    mesh = shd.make_mesh((2, 2, 2))
    shardings = shd.param_shardings(abstract, mesh)
    specs = jax.tree.map(lambda s: tuple(s.spec), shardings)
    # Stacked block weights: the layers dim whole on every device, the others split.
    assert specs["blocks"]["wq"] == (None, "fsdp", "tensor")
    assert specs["blocks"]["w_in"] == (None, "fsdp", "tensor")
    assert specs["blocks"]["wo"] == (None, "tensor", "fsdp")
    assert specs["blocks"]["w_out"] == (None, "tensor", "fsdp")
    assert specs["unembed"] == ("fsdp", "tensor")
    assert specs["blocks"]["attn_norm"]["scale"] == (None, None)
    # What each device holds: both layers' quarter of w_in (D/2 x F/2), and the whole norm stack.
    assert shardings["blocks"]["w_in"].shard_shape((2, 64, 256)) == (2, 32, 128)
    assert shardings["blocks"]["wo"].shard_shape((2, 64, 64)) == (2, 32, 32)
    assert shardings["blocks"]["attn_norm"]["scale"].shard_shape((2, 64)) == (2, 64)


def test_mesh_shape_resolves_and_rejects():
    assert shd.mesh_shape(MeshConfig(data=-1, fsdp=2, tensor=1), 8) == (4, 2, 1)
    assert shd.mesh_shape(MeshConfig(data=2, fsdp=2, tensor=2), 8) == (2, 2, 2)
    with pytest.raises(ConfigError, match="mesh"):
        shd.mesh_shape(MeshConfig(data=2, fsdp=2, tensor=1), 8)
    with pytest.raises(ConfigError, match="mesh"):
        shd.mesh_shape(MeshConfig(data=-1, fsdp=3, tensor=1), 8)
