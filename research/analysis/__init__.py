"""Analysis of finished runs: read run directories, fit scaling laws, plot.

Analysis reads run directories (summary.json, metrics.jsonl, .hydra/) and
never the live process, so it works on runs from any machine. Interpretation
of a trained model lives in `research.analysis.interpret`.

Names below are imported on first use, so the report CLI does not pay for
JAX (only Approach 3 and interpretation need it).
"""

from importlib import import_module

_HOME = {
    "compute_optimal": "chinchilla", "fit_approach3": "chinchilla",
    "fit_loglinear": "fit", "fit_power_law": "fit", "power_law": "fit",
    "envelope": "frontier", "fit_approach1": "frontier", "training_curves": "frontier",
    "fit_approach2": "isoflop",
    "predict_loss": "predict", "predict_runs": "predict",
    "best_val_loss": "runs", "completed": "runs", "load_curves": "runs", "load_runs": "runs",
    "write_report": "report",
}


def __getattr__(name):
    if name in _HOME:
        return getattr(import_module(f"research.analysis.{_HOME[name]}"), name)
    raise AttributeError(f"module 'research.analysis' has no attribute {name!r}")


__all__ = sorted(_HOME)
