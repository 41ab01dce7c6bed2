"""Typed schema of the training config, and its validation.

Hydra composes `conf/train.yaml`; `parse` checks that result against the
dataclasses below (types, unknown keys) and against the rules a run relies
on, so a bad value fails here with one line naming the field, before any
mesh, corpus read or compile. Checks that need the machine (device count) or
the corpus (its length) live next to that knowledge, in sharding.py and
data.py, and raise the same `ConfigError`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

# Choices that are part of the model's code. Names with an implementation behind them
# (optimizers, schedules, corpora, parameterizations, kernels, logger backends) come
# from their registries instead (`registered_names`).
NORMS = ("rmsnorm", "layernorm")
POSITIONS = ("rope", "learned")
DTYPES = ("float32", "bfloat16", "float16")
REMATS = ("none", "block", "dots")
MLPS = ("gelu", "swiglu")
SWIGLU_MULTIPLE = 64  # swiglu's default hidden width is rounded to a multiple of this (d_ff)


class ConfigError(ValueError):
    """A config value is invalid. `str(err)` is one line: 'field: problem'."""

    def __init__(self, field_name: str, message: str):
        super().__init__(f"{field_name}: {message}")
        self.field = field_name


@dataclass
class ModelConfig:
    d_model: int = 128
    n_layers: int = 2
    n_heads: int = 4
    mlp_ratio: float = 4.0
    mlp: str = "gelu"  # gelu, or swiglu (gate and up projections, SiLU, down projection)
    mlp_hidden: int | None = None  # the MLP's hidden width exactly; null = from mlp_ratio (d_ff)
    n_kv_heads: int | None = None  # key/value heads (grouped-query attention); null = n_heads, 1 = multi-query
    qk_norm: bool = False  # RMSNorm on each head's queries and keys, before RoPE
    norm: str = "rmsnorm"
    pos: str = "rope"
    tie_embeddings: bool = True
    share_layers: int = 0  # distinct blocks reused cyclically over depth; 0 = none
    dtype: str = "float32"  # compute dtype; params stay float32
    remat: str = "dots"
    scan_unroll: int = 1  # blocks per iteration of the scan over layers (model.py); n_layers = a plain loop
    attention: str = "auto"  # a name in kernels.ATTENTION, or auto (resolved from the mesh)
    matmul: str = "auto"  # a name in kernels.MATMUL (the 2-D matmuls and the norms), or auto
    init_std: float = 0.02
    rope_theta: float = 10000.0


@dataclass
class MixtureSource:
    path: str  # a prepared directory (python -m research.prepare)
    weight: float = 1.0  # share of each step's rows, relative to the other sources' weights


@dataclass
class DataConfig:
    name: str = "stdlib"
    seq_len: int = 128
    path: str | None = None  # tokens: a prepared dir (meta.json), or a dir with train.bin / val.bin
    vocab_size: int | None = None  # tokens: from meta.json, else required; synthetic: default 256; stdlib: 256
    mixture: dict[str, MixtureSource] = field(default_factory=dict)  # tokens: name -> source, instead of path
    eval: dict[str, str] = field(default_factory=dict)  # more eval sets: name -> prepared dir (its val split)
    val_fraction: float = 0.05  # stdlib: share of files held out for validation
    cache_dir: str | None = None  # stdlib: where the memmap cache lives (default ~/.cache/ladder)
    synthetic_tokens: int = 1_000_000  # synthetic: corpus length


@dataclass
class OptimConfig:
    name: str = "adamw"
    lr: float = 3e-3
    weight_decay: float = 0.1
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    clip: float = 1.0  # global-norm clip; 0 = off
    accum: int = 1  # microbatches per step
    z_loss: float = 0.0  # coefficient of the auxiliary log(Z)^2 loss on the output logits; 0 = off


@dataclass
class ScheduleConfig:
    name: str = "cosine"
    warmup: int = 100
    min_lr_ratio: float = 0.1  # cosine / wsd floor as a fraction of optim.lr
    decay_frac: float = 0.2  # wsd: fraction of steps spent in the final decay


@dataclass
class TrainConfig:
    steps: int = 1000
    batch_size: int = 32  # global, in sequences
    seed: int = 0
    eval_every: int = 100  # 0 = only at the end
    eval_batches: int = 8
    log_every: int = 10
    # Compute budget C in FLOPs (IsoFLOP sweeps): when set, `steps` is derived
    # so that the run spends C model FLOPs (flops.steps_for_budget).
    flops_budget: float | None = None
    stats_every: int = 0  # per-layer activation / update RMS every N steps; 0 = off
    # schedule=wsd: fractions of `steps` at which a cooldown branch gives a budget of its own (cooldown.py)
    cooldowns: list[float] = field(default_factory=list)


@dataclass
class ProfileConfig:
    # A jax.profiler trace of steps [start_step, start_step + num_steps) under <run_dir>/profile/.
    start_step: int = 3  # 0-based index of the first traced step (after the first steps' warm-up)
    num_steps: int = 0  # 0 = off


@dataclass
class MeshConfig:
    data: int = -1  # -1 = all remaining devices
    fsdp: int = 1
    tensor: int = 1


@dataclass
class CheckpointConfig:
    every: int = 0  # save every N steps; 0 = only at the end (and on preemption)
    keep: int = 3  # newest checkpoints kept
    keep_every: int = 0  # also keep every step that is a multiple of this; 0 = none
    resume: bool = True  # resume from the newest checkpoint in the run dir
    init_from: str | None = None  # run dir / checkpoint to take params from (fresh optimizer)


@dataclass
class DistributedConfig:
    # One process of an N-process job, started by hand (cluster.py). On SLURM
    # and TPU pods the same values come from the environment when `auto`.
    coordinator: str | None = None  # HOST:PORT of process 0
    num_processes: int | None = None
    process_id: int | None = None
    local_device_ids: list[int] | None = None  # this process's accelerators; null = all
    auto: bool = True  # detect SLURM (srun tasks) and TPU pods from the environment


@dataclass
class ParamConfig:
    """How init, forward multipliers and per-parameter lr scale with size (see param.py)."""

    name: str = "sp"  # sp | mup | completep
    base_width: int = 128  # d_model at which mup and completep equal sp
    base_depth: int = 2  # n_layers at which completep equals mup (completep only)
    base_head_dim: int | None = None  # head dim at base width; None = base_width / model.n_heads
    alpha: float = 1.0  # completep: residual branches x (base_depth / n_layers)^alpha


@dataclass
class WandbConfig:
    """Weights & Biases run fields (logging.backends contains wandb); see loggers.py."""

    project: str = "ladder"
    entity: str | None = None  # team or user; None = your W&B default
    name: str | None = None  # run name; None = the run dir's name
    group: str | None = None  # None = the sweep dir's name in a multirun, else no group
    tags: list[str] = field(default_factory=list)
    mode: str | None = None  # online | offline | disabled; None = $WANDB_MODE, else online


@dataclass
class LoggingConfig:
    # metrics.jsonl and summary.json are always written; these backends get the same rows.
    backends: list[str] = field(default_factory=lambda: ["tensorboard"])
    wandb: WandbConfig = field(default_factory=WandbConfig)


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    mesh: MeshConfig = field(default_factory=MeshConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    param: ParamConfig = field(default_factory=ParamConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    profile: ProfileConfig = field(default_factory=ProfileConfig)
    # Optional packages that add kernels, loop hooks and compiler options (plugins.py),
    # by entry-point name (e.g. cpu) or module path; their settings under plugin_options.NAME.
    plugins: list[str] = field(default_factory=list)
    plugin_options: dict[str, Any] = field(default_factory=dict)


def _typed(raw: DictConfig | dict) -> Config:
    """Merge `raw` onto the schema: wrong types and unknown keys become ConfigError."""
    schema = OmegaConf.structured(Config)
    try:
        merged = OmegaConf.merge(schema, raw)
        return OmegaConf.to_object(merged)
    except OmegaConfBaseException as err:
        key = getattr(err, "full_key", None) or "config"
        msg = str(err).splitlines()[0]
        raise ConfigError(key, msg) from None


def _one_of(name: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ConfigError(name, f"unknown value {value!r}; valid: {', '.join(allowed)}")


def _positive(name: str, value: float, zero_ok: bool = False) -> None:
    if value < 0 or (value == 0 and not zero_ok):
        raise ConfigError(name, f"must be {'>= 0' if zero_ok else '> 0'}, got {value}")


def validate(cfg: Config) -> None:
    """Raise ConfigError for the first rule `cfg` breaks (machine-independent rules)."""
    m, d, o, s, t = cfg.model, cfg.data, cfg.optim, cfg.schedule, cfg.train
    _one_of("model.norm", m.norm, NORMS)
    _one_of("model.pos", m.pos, POSITIONS)
    _one_of("model.dtype", m.dtype, DTYPES)
    _one_of("model.remat", m.remat, REMATS)
    _one_of("model.mlp", m.mlp, MLPS)
    names = registered_names(cfg.plugins, cfg.plugin_options)
    _one_of("model.attention", m.attention, ("auto", *names["attention"]))
    _one_of("model.matmul", m.matmul, ("auto", *names["matmul"]))
    _one_of("optim.name", o.name, names["optimizer"])
    _one_of("schedule.name", s.name, names["schedule"])
    _one_of("data.name", d.name, names["dataset"])
    _one_of("param.name", cfg.param.name, names["param"])
    from research import loggers  # noqa: PLC0415 (imports jax: not at config import time)

    loggers.check_backends(cfg.logging)
    for name in ("d_model", "n_layers", "n_heads"):
        _positive(f"model.{name}", getattr(m, name))
    if m.d_model % m.n_heads:
        raise ConfigError(
            "model.d_model", f"{m.d_model} is not divisible by model.n_heads={m.n_heads}"
        )
    if m.pos == "rope" and (m.d_model // m.n_heads) % 2:
        raise ConfigError(
            "model.pos", f"rope needs an even head dim, got d_model/n_heads={m.d_model // m.n_heads}"
        )
    _positive("model.mlp_ratio", m.mlp_ratio)
    if m.mlp_hidden is not None:
        _positive("model.mlp_hidden", m.mlp_hidden)
    if m.n_kv_heads is not None:
        _positive("model.n_kv_heads", m.n_kv_heads)
        if m.n_heads % m.n_kv_heads:
            raise ConfigError("model.n_kv_heads", f"{m.n_kv_heads} does not divide model.n_heads={m.n_heads}; "
                              "use a divisor of it (1 = multi-query, null = n_heads)")
    _positive("model.scan_unroll", m.scan_unroll)
    if not 0 <= m.share_layers <= m.n_layers:
        raise ConfigError(
            "model.share_layers", f"must be in 0..model.n_layers={m.n_layers}, got {m.share_layers}"
        )
    _positive("data.seq_len", d.seq_len)
    if d.name == "tokens" and not d.path and not d.mixture:
        raise ConfigError("data.path", "required for data.name=tokens (a prepared dir), or set data.mixture")
    if d.mixture and (d.name != "tokens" or d.path):
        raise ConfigError("data.mixture", "needs data.name=tokens and no data.path (the mixture names the dirs)")
    for name, src in d.mixture.items():
        _positive(f"data.mixture.{name}.weight", src.weight)
    if d.vocab_size is not None and not 2 <= d.vocab_size <= 65536:
        raise ConfigError("data.vocab_size", f"must be in 2..65536, got {d.vocab_size}")
    if not 0 < d.val_fraction < 1:
        raise ConfigError("data.val_fraction", f"must be in (0, 1), got {d.val_fraction}")
    _positive("optim.lr", o.lr)
    _positive("optim.weight_decay", o.weight_decay, zero_ok=True)
    _positive("optim.clip", o.clip, zero_ok=True)
    _positive("optim.z_loss", o.z_loss, zero_ok=True)
    _positive("optim.accum", o.accum)
    for name in ("b1", "b2"):
        if not 0 <= getattr(o, name) < 1:
            raise ConfigError(f"optim.{name}", f"must be in [0, 1), got {getattr(o, name)}")
    _positive("schedule.warmup", s.warmup, zero_ok=True)
    if s.warmup >= t.steps and t.flops_budget is None:  # else checked once steps are derived
        raise ConfigError("schedule.warmup", f"{s.warmup} must be < train.steps={t.steps}")
    if not 0 <= s.min_lr_ratio <= 1:
        raise ConfigError("schedule.min_lr_ratio", f"must be in [0, 1], got {s.min_lr_ratio}")
    if not 0 < s.decay_frac <= 1:
        raise ConfigError("schedule.decay_frac", f"must be in (0, 1], got {s.decay_frac}")
    for name in ("steps", "batch_size", "eval_batches", "log_every"):
        _positive(f"train.{name}", getattr(t, name))
    _positive("train.eval_every", t.eval_every, zero_ok=True)
    _positive("train.stats_every", t.stats_every, zero_ok=True)
    if t.batch_size % o.accum:
        raise ConfigError(
            "train.batch_size", f"{t.batch_size} is not divisible by optim.accum={o.accum}"
        )
    for name in ("data", "fsdp", "tensor"):
        value = getattr(cfg.mesh, name)
        if value == 0 or value < -1:
            raise ConfigError(f"mesh.{name}", f"must be a positive size or -1, got {value}")
    if [cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor].count(-1) > 1:
        raise ConfigError("mesh", "at most one of mesh.data, mesh.fsdp, mesh.tensor may be -1")
    if t.flops_budget is not None:
        _positive("train.flops_budget", t.flops_budget)
    if t.cooldowns and t.flops_budget is None:  # else checked once steps are derived
        from research import cooldown  # noqa: PLC0415 (it imports this module)

        cooldown.branches(t.cooldowns, t.steps, s)
    _positive("profile.start_step", cfg.profile.start_step, zero_ok=True)
    _positive("profile.num_steps", cfg.profile.num_steps, zero_ok=True)
    if cfg.profile.num_steps and cfg.profile.start_step + cfg.profile.num_steps > t.steps \
            and t.flops_budget is None:
        raise ConfigError("profile.num_steps", f"steps {cfg.profile.start_step}.."
                          f"{cfg.profile.start_step + cfg.profile.num_steps - 1} reach past train.steps={t.steps}")
    _validate_distributed(cfg.distributed)
    _validate_param(cfg.param, m)
    _positive("checkpoint.every", cfg.checkpoint.every, zero_ok=True)
    _positive("checkpoint.keep", cfg.checkpoint.keep)
    _positive("checkpoint.keep_every", cfg.checkpoint.keep_every, zero_ok=True)


def _validate_distributed(dist: DistributedConfig) -> None:
    given = {"coordinator": dist.coordinator, "num_processes": dist.num_processes,
             "process_id": dist.process_id}
    missing = [k for k, v in given.items() if v is None]
    if len(missing) == len(given):
        return
    if missing:
        raise ConfigError(f"distributed.{missing[0]}", "required when any of distributed.coordinator, "
                          "num_processes, process_id is set (all three start one process by hand)")
    host, _, port = dist.coordinator.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError("distributed.coordinator", f"must be HOST:PORT, got {dist.coordinator!r}")
    _positive("distributed.num_processes", dist.num_processes)
    if not 0 <= dist.process_id < dist.num_processes:
        raise ConfigError("distributed.process_id",
                          f"must be in 0..{dist.num_processes - 1} (distributed.num_processes="
                          f"{dist.num_processes}), got {dist.process_id}")


def _validate_param(p: ParamConfig, m: ModelConfig) -> None:
    _positive("param.base_width", p.base_width)
    _positive("param.base_depth", p.base_depth)
    if p.base_head_dim is not None:
        _positive("param.base_head_dim", p.base_head_dim)
    elif p.name != "sp" and p.base_width % m.n_heads:
        raise ConfigError("param.base_width", f"{p.base_width} is not divisible by model.n_heads="
                          f"{m.n_heads}; set param.base_head_dim")
    # Dey et al. (2025) study alpha in [0.5, 1]: 0.5 is depth-muP, 1 is CompleteP.
    if not 0.5 <= p.alpha <= 1:
        raise ConfigError("param.alpha", f"must be in [0.5, 1], got {p.alpha}")


def registered_names(plugins: list[str] = (), plugin_options: dict | None = None) -> dict[str, tuple]:
    """{kind: names a config may use}: the registries of the core and of `plugins` (loaded
    here, their options validated: ConfigError naming `plugins` or `plugin_options`)."""
    # The registries live beside their implementations, which import this module.
    from research import data, kernels, optim, param, plugins as plugin_seam  # noqa: PLC0415

    sources = plugin_seam.sources(list(plugins))
    plugin_seam.load_all(list(plugins), dict(plugin_options or {}))
    return {"attention": kernels.ATTENTION.names(sources), "matmul": kernels.MATMUL.names(sources),
            "optimizer": optim.OPTIMIZERS.names(), "schedule": optim.SCHEDULES.names(),
            "dataset": data.DATASETS.names(), "param": param.PARAMETERIZATIONS.names()}


def parse(raw: DictConfig | dict) -> Config:
    """Hydra's config -> a validated `Config`. Raises ConfigError (one line)."""
    if isinstance(raw, DictConfig):
        # Drop keys that belong to Hydra or to experiment bookkeeping, not to a run.
        raw = OmegaConf.to_container(raw, resolve=True)
        raw = {k: v for k, v in raw.items() if k in {f.name for f in dataclasses.fields(Config)}}
    cfg = _typed(raw)
    validate(cfg)
    return cfg


def d_head(m: ModelConfig) -> int:
    return m.d_model // m.n_heads


def kv_heads(m: ModelConfig) -> int:
    """Key/value heads: `n_kv_heads`, or one per query head."""
    return m.n_kv_heads or m.n_heads


def d_ff(m: ModelConfig) -> int:
    """The MLP's hidden width: `mlp_hidden` when set; else d_model x mlp_ratio for gelu, and
    for swiglu 2/3 of that (its three matrices then hold as many params as gelu's two),
    rounded to the nearest multiple of SWIGLU_MULTIPLE, at least one multiple."""
    if m.mlp_hidden is not None:
        return m.mlp_hidden
    width = m.d_model * m.mlp_ratio
    if m.mlp == "swiglu":
        return max(SWIGLU_MULTIPLE, SWIGLU_MULTIPLE * int(round(2 * width / 3 / SWIGLU_MULTIPLE)))
    return int(round(width))
