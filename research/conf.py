"""Hydra's side of the config: `conf/` composed with command-line overrides onto the schema.

The dataclasses of config.py are registered as Hydra's schema (`ladder_schema`,
the first entry of `conf/train.yaml`'s defaults list) when this module is
imported, so every field has its default from there and the presets in
`conf/` list only what differs. `check_overrides` turns the overrides Hydra
would reject in many lines into one-line ConfigErrors; `compose` gives the
config `python -m research.train OVERRIDES` composes, for the tools beside it.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from research.config import Config, ConfigError

CONF_DIR = Path(__file__).resolve().parents[1] / "conf"


def compose(overrides: list[str] | tuple[str, ...] = ()) -> DictConfig:
    """The root config `python -m research.train OVERRIDES` composes (for tools beside train)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.errors import ConfigCompositionException

    check_overrides(list(overrides))
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        try:
            return hydra_compose(config_name="train", overrides=list(overrides))
        except ConfigCompositionException as err:  # e.g. an override of a key the schema lacks
            raise ConfigError("overrides", str(err).splitlines()[0]) from None


def check_overrides(argv: list[str], conf_dir: Path = CONF_DIR) -> None:
    """ConfigError for a command line's overrides that Hydra would reject in many lines:
    `group=name` naming a preset that `conf/group/` lacks, and `field=value` whose value
    has the wrong type for the schema. Says it in one line, naming the group or field.
    Handles `a,b` sweeps and `+`/`~` prefixes; leaves Hydra's own keys and sweeper
    expressions (`interval(...)`, `${...}`) to Hydra."""
    fields = {f.name for f in dataclasses.fields(Config)}
    for arg in argv:
        if arg.startswith("-"):
            continue
        key, sep, value = arg.lstrip("+~").partition("=")
        if not sep:
            continue
        group_dir = conf_dir / key
        if "." not in key and "/" not in key and group_dir.is_dir():
            valid = sorted(p.stem for p in group_dir.glob("*.yaml"))
            for choice in value.split(","):
                if choice and choice != "null" and choice not in valid:
                    raise ConfigError(key, f"no preset {choice!r} in {group_dir}; valid: {', '.join(valid)}")
            continue
        if key.split(".")[0] not in fields or any(c in value for c in "()${}"):
            continue
        choices = [value] if "[" in value else value.split(",")
        for choice in choices:
            try:
                OmegaConf.merge(OmegaConf.structured(Config), OmegaConf.from_dotlist([f"{key}={choice}"]))
            except OmegaConfBaseException as err:
                raise ConfigError(getattr(err, "full_key", None) or key, str(err).splitlines()[0]) from None


def register_schema() -> None:
    """Make the dataclasses above the base of `conf/train.yaml` (its defaults list starts
    with `ladder_schema`): every field has its default from here, so the presets in conf/
    list only what differs, and Hydra checks types as it composes."""
    from hydra.core.config_store import ConfigStore

    ConfigStore.instance().store(name="ladder_schema", node=Config)


register_schema()
