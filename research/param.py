"""Parameterizations: how init, forward multipliers and per-parameter learning
rates change with width and depth, so that hyperparameters tuned on a small
model stay good on a large one.

  sp         standard parameterization: nothing changes with size.
  mup        Maximal Update Parameterization (Yang et al. 2022, "Tensor Programs
             V", arXiv:2203.03466): Table 3's rules for Adam, written with an
             output multiplier (their Table 8 form) so embeddings and readout
             keep a constant init and learning rate.
  completep  muP plus depth scaling (Dey et al. 2025, "Don't be lazy: CompleteP
             enables compute-efficient deep transformers", arXiv:2505.01618,
             Table 1): residual branches x m_L^-alpha with the matching lr and
             Adam-epsilon corrections. alpha = 1 is CompleteP, 0.5 depth-muP.

With m_N = d_model / base_width, m_L = n_layers / base_depth, s = init_std,
K = head dim and K_b its value at base width:

  rule                                  sp            mup                 completep
  init std q, k, v, w_in, w_gate        s             s m_N^-1/2          s m_N^-1/2
  init std wo, w_out                    s/sqrt(2L)    s/sqrt(2L) m_N^-1/2 s/sqrt(2 L_base) m_N^-1/2
  attention logits                      q.k/sqrt(K)   q.k sqrt(K_b)/K     q.k sqrt(K_b)/K
  output logits                         h W           h W / m_N           h W / m_N
  residual branch                       x + f(x)      x + f(x)            x + m_L^-alpha f(x)
  lr: matrices inside blocks (Adam)     1             1/m_N               m_N^-1 m_L^(alpha-1)
  lr: norm gains inside blocks (Adam)   1             1                   m_L^(alpha-1)
      (the QK-norm gains too)
  lr: embeddings, readout, final norm   1             1                   1
  Adam eps (optim.eps, adamw)           1             1                   m_N^-1 m_L^-alpha

Every factor is anchored to be exactly 1.0 at base width and depth, so there
mup and completep compute bit for bit what sp computes. Embeddings keep a
constant init (their fan-in, the vocabulary, does not grow); the readout's
1/m_N multiplier is applied to the final hidden state, which also covers a
tied embedding. Sign-like and RMS-normalised optimizers (Lion, Adafactor)
follow Adam's column; plain SGD gets its own (TP5 Table 3 with the output
multiplier folded in): lr x m_N for vector-like weights (embeddings, readout,
norm gains), x 1 for matrices inside blocks, and x m_L^(2 alpha - 1) inside
blocks under completep (the exponent that gives each block a 1/L share of
the update, as alpha - 1 does for Adam).

Weight decay is decoupled and multiplied by the lr (optim.py). Here the
width part of a weight's lr scale does not reach its decay: the shrink per
step, lr * wd, and so the decay's timescale, stay the same at every width
(the CompleteP reference code divides wd by the width lr factor for this).
The depth part does reach it, as in that code.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax

from research.config import Config, ModelConfig, ParamConfig, d_head
from research.registry import Registry

ROLES = ("hidden", "block_vector", "embedding", "readout", "vector")
IN_BLOCK = ("hidden", "block_vector")
# Exponent of m_N in the lr scale, per optimizer family and role.
WIDTH_LR_EXPONENT = {
    "adaptive": {"hidden": -1, "block_vector": 0, "embedding": 0, "readout": 0, "vector": 0},
    "sgd": {"hidden": 0, "block_vector": 1, "embedding": 1, "readout": 1, "vector": 1},
}


@dataclasses.dataclass(frozen=True)
class Multipliers:
    """What the model needs from the parameterization: init stds and forward multipliers."""

    hidden_std: float  # init std of q, k, v and the MLP input
    out_std: float  # init std of the attention and MLP output projections
    residual: float  # multiplies every residual branch
    logits: float  # multiplies the final hidden state before the readout
    attn_scale: float | None  # multiplies q.k; None = 1/sqrt(head dim)


@dataclasses.dataclass(frozen=True)
class OptimScales:
    """Per-parameter optimizer factors; `lr` and `decay` are pytrees of floats shaped like the params."""

    lr: Any  # multiplies each weight's update (before the schedule's lr)
    decay: Any  # multiplies weight_decay for each weight that decays
    eps: float  # multiplies optim.eps


def width_mult(m: ModelConfig, p: ParamConfig) -> float:
    return m.d_model / p.base_width


def depth_mult(m: ModelConfig, p: ParamConfig) -> float:
    return m.n_layers / p.base_depth


def base_head_dim(m: ModelConfig, p: ParamConfig) -> int:
    return p.base_head_dim or p.base_width // m.n_heads


PARAMETERIZATIONS = Registry("parameterization")  # name -> (ModelConfig, ParamConfig) -> Multipliers


@PARAMETERIZATIONS.register("sp")
def _sp(m: ModelConfig, p: ParamConfig) -> Multipliers:
    """Standard parameterization: init, lr and multipliers do not change with size."""
    sp_out_std = m.init_std / math.sqrt(2 * m.n_layers)  # GPT-2's depth-scaled output init
    return Multipliers(m.init_std, sp_out_std, 1.0, 1.0, None)


def _width_rules(m: ModelConfig, p: ParamConfig, out_std: float, residual: float) -> Multipliers:
    m_n = width_mult(m, p)
    fan_in = math.sqrt(1.0 / m_n)  # init variance ~ 1 / fan_in, equal to sp's at base width
    k, k_base = d_head(m), base_head_dim(m, p)
    attn_scale = k_base**-0.5 * (k_base / k)  # ~ 1/K, and 1/sqrt(K) at base width
    return Multipliers(m.init_std * fan_in, out_std * fan_in, residual, 1.0 / m_n, attn_scale)


@PARAMETERIZATIONS.register("mup")
def _mup(m: ModelConfig, p: ParamConfig) -> Multipliers:
    """Maximal Update Parameterization (Yang et al. 2022): hyperparameters transfer across width."""
    return _width_rules(m, p, m.init_std / math.sqrt(2 * m.n_layers), 1.0)


@PARAMETERIZATIONS.register("completep")
def _completep(m: ModelConfig, p: ParamConfig) -> Multipliers:
    """CompleteP (Dey et al. 2025): muP plus depth scaling of the residual branches."""
    # Depth enters through the branch multiplier, so the init no longer does.
    return _width_rules(m, p, m.init_std / math.sqrt(2 * p.base_depth), depth_mult(m, p) ** -p.alpha)


def multipliers(m: ModelConfig, p: ParamConfig) -> Multipliers:
    """Init stds and forward multipliers of `m` under parameterization `p`."""
    return PARAMETERIZATIONS.get(p.name).impl(m, p)


def role(path: tuple[str, ...], ndim: int) -> str:
    """The muP role of the weight at `path` (pure-dict keys), e.g. ('blocks', 'wq'). Block
    weights are stacked over the layers (model.Block): a leading dim on each."""
    top = path[0]
    if top == "blocks":
        return "hidden" if ndim >= 3 else "block_vector"
    if top in ("embed", "pos_embed"):
        return "embedding"
    if top == "unembed":
        return "readout"
    if top == "final_norm":
        return "vector"
    raise ValueError(f"no parameterization rule for weight {'.'.join(path)}; add it to param.role")


def _factors(cfg: Config, weight_role: str) -> tuple[float, float]:
    """(lr scale, decay scale) of one weight."""
    p, m = cfg.param, cfg.model
    if p.name == "sp":
        return 1.0, 1.0
    from research import optim  # noqa: PLC0415 (optim imports this module)

    family = optim.OPTIMIZERS.get(cfg.optim.name).impl.family
    width = width_mult(m, p) ** WIDTH_LR_EXPONENT[family][weight_role]
    depth = 1.0
    if p.name == "completep" and weight_role in IN_BLOCK:
        exponent = p.alpha - 1 if family == "adaptive" else 2 * p.alpha - 1
        depth = depth_mult(m, p) ** exponent
    return width * depth, depth


def _path(keys) -> tuple[str, ...]:
    return tuple(str(getattr(k, "key", getattr(k, "idx", k))) for k in keys)


def optim_scales(cfg: Config, params) -> OptimScales | None:
    """Per-parameter lr and decay factors for `params` (any pytree of arrays or
    ShapeDtypeStructs, as `nnx.State.to_pure_dict()` gives); None under sp."""
    if cfg.param.name == "sp":
        return None

    def factor(i: int):
        return lambda keys, leaf: _factors(cfg, role(_path(keys), len(leaf.shape)))[i]

    return OptimScales(jax.tree_util.tree_map_with_path(factor(0), params),
                       jax.tree_util.tree_map_with_path(factor(1), params), eps_scale(cfg))


def eps_scale(cfg: Config) -> float:
    """Factor on optim.eps: completep shrinks it with the gradients it is added to."""
    m, p = cfg.model, cfg.param
    if p.name != "completep":
        return 1.0
    return width_mult(m, p) ** -1 * depth_mult(m, p) ** -p.alpha


def describe(cfg: Config, params) -> str:
    """A table of the parameterization of `params`: multipliers, then lr and decay scale per weight."""
    m, p = cfg.model, cfg.param
    mult = multipliers(m, p)
    if p.name == "sp":
        return "param sp: standard parameterization (every lr scale 1, no multipliers)"
    eps = eps_scale(cfg)
    head = [
        f"param {p.name}: width {m.d_model} = {width_mult(m, p):g} x base {p.base_width}"
        + (f", depth {m.n_layers} = {depth_mult(m, p):g} x base {p.base_depth}, alpha {p.alpha:g}"
           if p.name == "completep" else ""),
        f"  init std {mult.hidden_std:.4g} (q, k, v, w_in, w_gate), {mult.out_std:.4g} (wo, w_out); "
        f"attention logits x {mult.attn_scale:.4g}; output logits x {mult.logits:.4g}; "
        f"residual branches x {mult.residual:.4g}; optim.eps x {eps:.4g}",
    ]
    rows, seen = [], set()
    for keys, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        path = _path(keys)
        name = ".".join(path)
        if name in seen:
            continue
        seen.add(name)
        weight_role = role(path, len(leaf.shape))
        lr, decay = _factors(cfg, weight_role)
        decays = weight_role in ("hidden", "embedding", "readout") and cfg.optim.weight_decay > 0  # optim.decay_mask
        rows.append((name, str(tuple(leaf.shape)), weight_role, f"{lr:.4g}", f"{decay:.4g}" if decays else "-"))
    header = ("weight", "shape", "role", "lr scale", "decay scale")
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    fmt = "  " + "  ".join(f"{{:<{w}}}" for w in widths)
    return "\n".join([*head, *(fmt.format(*r).rstrip() for r in [header, *rows])])
