"""The device mesh from `mesh.*`, and the logical-axis rules that shard state on it.

Mesh axes are (data, fsdp, tensor). The batch is split over data and fsdp;
parameter dimensions are split by the table `RULES`, keyed by the logical
names that model.py attaches to each weight. A new parallelism layout is a
new table, not new model code.
"""

from __future__ import annotations

import math

import jax
import numpy as np
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from research.config import ConfigError, MeshConfig, ModelConfig, kv_heads

AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")

# logical dimension name -> mesh axis (None = replicated)
RULES: dict[str, str | None] = {
    "layers": None,  # the stacked blocks' leading dim: each device holds every layer's shard
    "embed": "fsdp",
    "heads": "tensor",
    "kv_heads": "tensor",  # key/value projections (grouped-query attention: fewer heads)
    "mlp": "tensor",
    "vocab": "tensor",
}


def mesh_shape(cfg: MeshConfig, n_devices: int) -> tuple[int, int, int]:
    """Resolve -1 in (data, fsdp, tensor) and check the product is the device count."""
    sizes = [cfg.data, cfg.fsdp, cfg.tensor]
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if n_devices % known:
            raise ConfigError(
                "mesh", f"fixed sizes multiply to {known}, which does not divide the {n_devices} devices"
            )
        sizes[sizes.index(-1)] = n_devices // known
    if math.prod(sizes) != n_devices:
        raise ConfigError(
            "mesh",
            f"data*fsdp*tensor = {'*'.join(map(str, sizes))} = {math.prod(sizes)} "
            f"but there are {n_devices} devices; make the product {n_devices} (or use -1)",
        )
    return tuple(sizes)


def make_mesh(shape: tuple[int, int, int], devices=None) -> Mesh:
    """A (data, fsdp, tensor) mesh with automatic (GSPMD) sharding propagation."""
    devices = list(devices) if devices is not None else jax.devices()
    return jax.make_mesh(shape, AXES, axis_types=(AxisType.Auto,) * 3, devices=devices)


def rules_for(m: ModelConfig, mesh: Mesh) -> dict[str, str | None]:
    """RULES for model `m` on `mesh`: a head dimension (query or key/value) whose head
    count the tensor axis does not divide stays replicated, rather than being split
    inside a head (e.g. multi-query attention's one key/value head under mesh.tensor=2)."""
    rules = dict(RULES)
    tensor = mesh.shape["tensor"]
    for name, heads in (("heads", m.n_heads), ("kv_heads", kv_heads(m))):
        if heads % tensor:
            rules[name] = None
    return rules


def spec_for(axes: tuple, shape: tuple[int, ...], mesh: Mesh, rules: dict | None = None) -> P:
    """PartitionSpec for a weight with logical `axes`, mapped by `rules` (default RULES).

    A dimension that the mesh axis does not divide stays replicated, so a
    small or odd-sized weight never blocks a layout.
    """
    rules = RULES if rules is None else rules
    out = []
    for name, size in zip(axes, shape):
        mesh_axis = rules.get(name) if name else None
        if mesh_axis and size % mesh.shape[mesh_axis] == 0 and mesh.shape[mesh_axis] > 1:
            out.append(mesh_axis)
        else:
            out.append(None)
    return P(*out)


def param_shardings(abstract_state: nnx.State, mesh: Mesh, rules: dict | None = None) -> dict:
    """Pure-dict pytree of NamedSharding matching `abstract_state.to_pure_dict()`, with
    `rules` (default RULES; `rules_for` gives a model's)."""

    def one(var):
        value = var.get_value() if hasattr(var, "get_value") else var.value
        axes = getattr(var, "axes", None) or (None,) * len(value.shape)
        return NamedSharding(mesh, spec_for(axes, value.shape, mesh, rules))

    shardings = jax.tree.map(one, abstract_state, is_leaf=lambda x: isinstance(x, nnx.Variable))
    return nnx.State(shardings).to_pure_dict() if not isinstance(shardings, dict) else shardings


def abstract_with_shardings(shapes, shardings):
    """ShapeDtypeStructs carrying `shardings`: a restore target for the current mesh."""
    return jax.tree.map(
        lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, shardings
    )


def batch_sharding(mesh: Mesh, ndim: int = 2) -> NamedSharding:
    """Sequences split over (data, fsdp); the rest of each example stays whole."""
    return NamedSharding(mesh, P(BATCH_AXES, *([None] * (ndim - 1))))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def dp_size(mesh: Mesh) -> int:
    return int(np.prod([mesh.shape[a] for a in BATCH_AXES]))
