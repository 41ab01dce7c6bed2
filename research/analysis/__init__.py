"""Analysis of finished runs: read run directories, fit scaling laws, plot.

Analysis reads run directories (summary.json, metrics.jsonl, .hydra/) and
never the live process, so it works on runs from any machine.
"""

from research.analysis.chinchilla import compute_optimal, fit_approach3
from research.analysis.fit import fit_power_law, power_law
from research.analysis.runs import load_curves, load_runs

__all__ = ["compute_optimal", "fit_approach3", "fit_power_law", "power_law", "load_curves",
           "load_runs"]
