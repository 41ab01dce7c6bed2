"""`python -m research.analyze transfer`: best lr per width/depth per parameterization, on a hand-made sweep."""

from __future__ import annotations

import json
import math
from pathlib import Path

from research import analyze

GRID = [2.0**k for k in range(-10, -3)]  # 7 learning rates


def _run(root: Path, name: str, size_key: str, size: int, lr: float, loss: float | None) -> None:
    run_dir = root / f"{name}-{size}-{lr}"
    run_dir.mkdir(parents=True)
    model = {"d_model": 64, "n_layers": 2, size_key: size}
    summary = {"status": "completed" if loss is not None else "diverged", "final_val_loss": loss,
               "config": {"model": model, "optim": {"lr": lr}, "param": {"name": name}}}
    (run_dir / "summary.json").write_text(json.dumps(summary))


def _sweep(root: Path, optimum_of, size_key="d_model", sizes=(64, 128, 256, 512)) -> Path:
    """Losses are a parabola in log2(lr) around optimum_of(name, size); lr >= 2^-4 diverges for sp."""
    for name in ("sp", "mup"):
        for size in sizes:
            best = optimum_of(name, size)
            for lr in GRID:
                diverged = name == "sp" and lr >= 2.0**-4
                loss = None if diverged else 2.5 + 0.05 * (math.log2(lr) - best) ** 2
                _run(root, name, size_key, size, lr, loss)
    return root


def test_width_sweep_optima_and_shift(tmp_path, capsys):
    # sp: optimum moves one grid step down per doubling of width; mup: stays at 2^-7.
    sizes = (64, 128, 256, 512)
    _sweep(tmp_path, lambda name, size: -7 - (sizes.index(size) if name == "sp" else 0))
    assert analyze.main(["transfer", str(tmp_path)]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["mup"]["max_shift"] == 0 and result["sp"]["max_shift"] == 3
    assert result["sp"]["optimal_lr"] == {"64": 2.0**-7, "128": 2.0**-8, "256": 2.0**-9, "512": 2.0**-10}
    assert set(result["mup"]["optimal_lr"].values()) == {2.0**-7}
    assert result["sp"]["axis"] == "model.d_model"
    assert result["sp"]["edge"] == [512]  # 2^-10 is the smallest lr tried
    assert (tmp_path / "transfer.png").read_bytes()[:4] == b"\x89PNG"
    assert json.loads((tmp_path / "transfer.json").read_text())["sp"]["losses"]["64"][-1] is None  # diverged


def test_depth_sweep_is_detected(tmp_path, capsys):
    _sweep(tmp_path, lambda name, size: -6 - (size == 16), size_key="n_layers", sizes=(2, 4, 8, 16))
    assert analyze.main(["transfer", str(tmp_path), "--out", str(tmp_path / "out")]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["mup"]["axis"] == "model.n_layers" and result["mup"]["max_shift"] == 1
    assert result["mup"]["optimal_lr"]["16"] == 2.0**-7 and result["mup"]["edge"] == []
    assert (tmp_path / "out" / "transfer.png").exists()


def test_bad_input_is_one_line_exit_2(tmp_path, capsys):
    assert analyze.main(["transfer", str(tmp_path / "missing")]) == 2
    _sweep(tmp_path, lambda name, size: -7, sizes=(64,))  # no size varies
    assert analyze.main(["transfer", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and "exactly one of model.d_model, model.n_layers" in err[-1]
