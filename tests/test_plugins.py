"""The plugin seam: a plugin adds kernels, hooks and compiler options to the runs that enable
it and to no other; the core runs, and never imports a plugin, when none is installed."""

import json
import subprocess
import sys
import textwrap

import jax
import pytest

from research import config, kernels, plugins, train
from tests.conftest import REPO, TINY, compose

# A plugin as a user would write one: an attention kernel that `auto` prefers (XLA's,
# renamed), a hook that counts steps, and an option it validates.
TOY = '''
from research import attention, config
from research.hooks import Hook
from research.kernels import ATTENTION
from research.plugins import Plugin

STEPS = []


class Count(Hook):
    def after_step(self, done, state, batch):
        STEPS.append(done)
        return {"toy/done": done}


def _validate(options):
    if set(options) - {"flag"}:
        raise config.ConfigError("plugin_options.toy_plugin.x", "unknown option")


def setup(name):
    ATTENTION.register("toy", attention.xla_attention, source=name, rank=1000, auto=lambda ctx: True)
    return Plugin(name, hooks=lambda cfg, mesh: [Count()], validate=_validate,
                  describe=lambda cfg, mesh: {"steps_seen": len(STEPS)})
'''


@pytest.fixture
def toy(tmp_path, monkeypatch):
    (tmp_path / "toy_plugin.py").write_text(TOY)
    monkeypatch.syspath_prepend(str(tmp_path))
    yield "toy_plugin"
    plugins._LOADED.pop("toy_plugin", None)
    kernels.ATTENTION._entries.pop("toy", None)
    sys.modules.pop("toy_plugin", None)


def test_a_plugin_reaches_only_the_runs_that_enable_it(toy, tmp_path):
    one = jax.devices()[:1]
    summary = train.run(compose(*TINY, f"plugins=[{toy}]"), tmp_path / "with", devices=one)
    assert summary["kernels"]["attention"] == "toy"  # auto: the highest rank that runs here
    assert summary["plugins"] == {toy: {"steps_seen": 20}}  # the hook ran after every step
    rows = [json.loads(line) for line in (tmp_path / "with" / "metrics.jsonl").read_text().splitlines()]
    assert [r["toy/done"] for r in rows if "toy/done" in r] == list(range(1, 21))
    # The same process, a run without it (as Hydra's basic launcher runs a sweep's jobs):
    # the loaded plugin's kernel is invisible to it, and its hook does not run.
    summary = train.run(compose(*TINY), tmp_path / "without", devices=one)
    assert summary["kernels"]["attention"] == "chunked" and summary["plugins"] == {}
    assert sys.modules[toy].STEPS == list(range(1, 21))


def test_plugin_errors_name_the_field(toy):
    with pytest.raises(config.ConfigError, match=r"^plugins: cannot import plugin 'nope'"):
        config.parse(compose(*TINY, "plugins=[nope]"))
    with pytest.raises(config.ConfigError, match=r"^plugins: lists a plugin twice"):
        config.parse(compose(*TINY, f"plugins=[{toy},{toy}]"))
    with pytest.raises(config.ConfigError, match=r"^plugin_options.other: options for a plugin"):
        config.parse(compose(*TINY, "+plugin_options.other.x=1"))
    with pytest.raises(config.ConfigError, match=r"^plugin_options.toy_plugin.x: unknown option"):
        config.parse(compose(*TINY, f"plugins=[{toy}]", f"+plugin_options.{toy}.x=1"))
    with pytest.raises(config.ConfigError, match=r"^model.attention: unknown value 'toy'"):
        config.parse(compose(*TINY, "model.attention=toy"))  # registered, but not enabled here
    assert config.parse(compose(*TINY, f"plugins=[{toy}]", "model.attention=toy")).model.attention == "toy"


HIDE = '''
import importlib.abc, importlib.metadata, sys

class Hidden(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.split(".")[0] == "ladder_cpu":
            raise ModuleNotFoundError(f"No module named {name!r} (hidden by the test)")

sys.meta_path.insert(0, Hidden())
_entry_points = importlib.metadata.entry_points
importlib.metadata.entry_points = lambda **kw: [e for e in _entry_points(**kw) if e.value != "ladder_cpu"]
'''


def test_the_core_runs_and_imports_nothing_of_the_plugin_when_it_is_absent(tmp_path):
    script = HIDE + textwrap.dedent(f'''
        import pkgutil, importlib, research
        for mod in pkgutil.walk_packages(research.__path__, "research."):
            importlib.import_module(mod.name)
        from research import conf, config, train
        overrides = {list(TINY)!r} + ["train.steps=4", "schedule.warmup=1", "train.eval_every=0"]
        summary = train.run(conf.compose(overrides), {str(tmp_path / "run")!r})
        assert summary["status"] == "completed", summary
        try:
            config.parse(conf.compose(overrides + ["plugins=[cpu]"]))
        except config.ConfigError as err:
            print("error:", err)
        print("imported:", sorted(m for m in sys.modules if m.startswith("ladder_cpu")))
    ''')
    proc = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "error: plugins: cannot import plugin 'cpu'" in proc.stdout
    assert "imported: []" in proc.stdout


def test_no_core_file_names_the_plugin():
    core = [p for p in (REPO / "research").rglob("*.py")]
    assert core and not [p for p in core if "ladder_cpu" in p.read_text()]
