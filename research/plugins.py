"""The plugin seam: optional packages that add kernels, loop hooks and compiler options.

The core never imports a plugin by name. A run enables plugins explicitly with
`plugins=[NAME, ...]`; each NAME is an entry point in the `ladder.plugins`
group (installed packages declare it in their pyproject.toml) or, failing
that, an importable module path. The module's `setup()` registers its kernels
in the core registries (with `source=NAME`) and returns a `Plugin`, which says
what else it adds to a run. `plugin_options.NAME` holds the plugin's own
settings; it validates them.

Kernels of a plugin that is loaded in this process but not enabled by a run's
config are invisible to that run (`kernels.resolve` only looks at the core's
and the enabled plugins' entries), so Hydra's basic launcher can run jobs
with and without a plugin in one process.
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.metadata
from typing import Any, Callable

from research.config import ConfigError
from research.registry import CORE

GROUP = "ladder.plugins"


@dataclasses.dataclass(frozen=True)
class Plugin:
    """What a plugin adds to a run beyond its registered kernels.

    hooks(cfg, mesh) -> list of loop hooks (hooks.Hook) for this run.
    compiler_options(platform) -> XLA options for the jitted steps on that platform, or None.
    validate(options) raises ConfigError (field `plugin_options.NAME.KEY`) for bad settings.
    describe(cfg, mesh) -> a JSON-able dict recorded under summary.json's `plugins.NAME`.
    """

    name: str
    hooks: Callable[..., list] = lambda cfg, mesh: []
    compiler_options: Callable[[str], dict | None] = lambda platform: None
    validate: Callable[[dict], None] = lambda options: None
    describe: Callable[..., dict] = lambda cfg, mesh: {}


_LOADED: dict[str, Plugin] = {}  # an import cache, like sys.modules: setup() runs once per process


def _module_for(name: str) -> str:
    for ep in importlib.metadata.entry_points(group=GROUP):
        if ep.name == name:
            return ep.value.split(":")[0]
    return name


def available_names() -> list[str]:
    """Plugin names installed as `ladder.plugins` entry points."""
    return sorted(ep.name for ep in importlib.metadata.entry_points(group=GROUP))


def load(name: str) -> Plugin:
    """Import plugin `name` (entry point or module path) and run its setup() once.
    ConfigError naming `plugins` when it cannot be imported or is not a plugin."""
    if name in _LOADED:
        return _LOADED[name]
    module_name = _module_for(name)
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        known = ", ".join(available_names()) or "none installed"
        raise ConfigError("plugins", f"cannot import plugin {name!r} ({err}); installed: {known}") from None
    setup = getattr(module, "setup", None)
    if setup is None:
        raise ConfigError("plugins", f"{module_name} has no setup(): not a Ladder plugin")
    plugin = setup(name)
    if not isinstance(plugin, Plugin):
        raise ConfigError("plugins", f"{module_name}.setup() returned {type(plugin).__name__}, not a Plugin")
    _LOADED[name] = plugin
    return plugin


def load_all(names: list[str], options: dict[str, Any]) -> list[Plugin]:
    """The enabled plugins, loaded, with their options validated."""
    if len(set(names)) != len(names):
        raise ConfigError("plugins", f"lists a plugin twice: {names}")
    if CORE in names:
        raise ConfigError("plugins", f"{CORE!r} is the core, not a plugin")
    for key in options:
        if key not in names:
            raise ConfigError(f"plugin_options.{key}", f"options for a plugin that is not enabled "
                              f"(plugins={names})")
    loaded = [load(name) for name in names]
    for plugin in loaded:
        plugin.validate(dict(options.get(plugin.name) or {}))
    return loaded


def sources(names: list[str]) -> tuple[str, ...]:
    """Registry sources a run with `plugins=names` sees: the core and those plugins."""
    return (CORE, *names)
