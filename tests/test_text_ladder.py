"""From a folder of text files to a fitted law on bits per byte, in the three commands
docs/data.md shows; and a mixture of two domains with an eval set per domain."""

import json
import math
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from research import prepare, train
from research.config import ConfigError
from tests.conftest import compose

TINY_TEXT = ("data=tokens", "data.seq_len=32", "model=xs", "model.n_heads=2", "train.batch_size=8",
             "train.steps=12", "train.log_every=6", "train.eval_every=6", "train.eval_batches=2",
             "schedule.warmup=4", "mesh=single", "logging.backends=[]")


def write_domain(root: Path, kind: str, n_docs: int, seed: int) -> None:
    """Text files of one made-up domain: prose sentences, or Python-like lines."""
    rng = np.random.default_rng(seed)
    words = ("the model learns data from text and every scale of loss falls with more compute "
             "tokens bytes law fit").split()
    root.mkdir(parents=True)
    for i in range(n_docs):
        if kind == "prose":
            text = ". ".join(" ".join(rng.choice(words, rng.integers(4, 10))).capitalize() for _ in range(12))
        else:
            text = "\n".join(f"def f{j}(x):\n    return x * {rng.integers(100)} + {rng.integers(9)}" for j in range(10))
        (root / f"{i:03d}.txt").write_text(text + "\n")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("text")
    write_domain(root / "texts" / "prose", "prose", 60, 0)
    write_domain(root / "texts" / "code", "code", 60, 1)
    return root


def _run(repo: Path, module: str, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", module, *args], cwd=cwd, capture_output=True, text=True,
                          timeout=300, env={**__import__("os").environ, "PYTHONPATH": str(repo),
                                            "XLA_FLAGS": "--xla_force_host_platform_device_count=1"})
    assert proc.returncode == 0, f"{module}: {proc.stderr[-3000:]}"
    return proc


def test_three_commands_from_text_files_to_a_law_on_bits_per_byte(repo, corpus):
    # 1. text -> tokens (a BPE trained on the folder)
    _run(repo, "research.prepare", "texts", "--out", "data/all", "--tokenizer", "bpe:400", cwd=corpus)
    # 2. a ladder of three widths on it
    _run(repo, "research.train", "-m", *TINY_TEXT, "data.path=data/all", "model.d_model=16,32,64",
         "hydra.sweep.dir=runs/ladder", cwd=corpus)
    # 3. the law on bits per byte of the held-out split
    proc = _run(repo, "research.analyze", "report", "runs/ladder", "--metric", "val/all/bpb", cwd=corpus)

    meta = json.loads((corpus / "data/all/meta.json").read_text())
    val = meta["splits"]["val"]
    fit = json.loads((corpus / "runs/ladder/fit.json").read_text())
    assert fit["metric"] == "val/all/bpb" and fit["fit"]["n"] == 3
    assert "of val/all/bpb over N" in proc.stdout
    for run in fit["runs"]:
        summary = json.loads((Path(corpus / run["run_dir"]) / "summary.json").read_text())
        loss, bpb = summary["val/all/loss"], summary["val/all/bpb"]
        assert summary["final_val_loss"] == loss  # the primary set is the training corpus's val split
        # bpb = mean loss (nats/token) x tokens / (bytes x ln 2), from the split's own counts
        assert bpb == pytest.approx(loss * val["tokens"] / (val["bytes"] * math.log(2)), rel=1e-12)
        assert run["val/all/bpb"] == bpb
        assert summary["config"]["data"]["vocab_size"] is None and summary["corpus_hash"] == meta["content_hash"]
        rows = [json.loads(r) for r in (Path(corpus / run["run_dir"]) / "metrics.jsonl").read_text().splitlines()]
        train_rows = [r for r in rows if "epoch" in r]
        windows = (meta["splits"]["train"]["tokens"] - 1) // 32
        assert [r["epoch"] for r in train_rows] == pytest.approx([6 * 8 / windows, 12 * 8 / windows])
        assert [r["step"] for r in rows if "val/all/bpb" in r] == [6, 12]


def test_mixture_of_two_domains_with_an_eval_set_each(repo, corpus, tmp_path):
    # One BPE, trained on both domains, for both (a mixture needs one tokenizer).
    prepare.prepare([str(corpus / "texts" / "prose")], tmp_path / "prose", "bpe:400", val_fraction=0.2,
                    train_tokenizer_on=[str(corpus / "texts")])
    prepare.prepare([str(corpus / "texts" / "code")], tmp_path / "code", str(tmp_path / "prose" / "tokenizer.json"),
                    val_fraction=0.2)
    cfg = compose(*TINY_TEXT, f"+data.mixture={{prose:{{path:{tmp_path / 'prose'},weight:3}},"
                  f"code:{{path:{tmp_path / 'code'},weight:1}}}}", f"+data.eval={{again:{tmp_path / 'code'}}}")
    summary = train.run(cfg, tmp_path / "run", devices=jax.devices()[:1])
    assert list(summary["eval_sets"]) == ["prose", "code", "again"]
    hashes = {n: json.loads((tmp_path / n / "meta.json").read_text())["content_hash"] for n in ("prose", "code")}
    assert summary["eval_sets"] == {**hashes, "again": hashes["code"]}
    assert summary["source_hashes"] == hashes
    assert summary["tokens_per_source"] == {"prose": 12 * 6 * 32, "code": 12 * 2 * 32}
    assert summary["final_val_loss"] == summary["val/prose/loss"]
    assert summary["val/again/loss"] == summary["val/code/loss"]  # the same split, the same batches
    for name in ("prose", "code"):
        val = json.loads((tmp_path / name / "meta.json").read_text())["splits"]["val"]
        assert summary[f"val/{name}/bpb"] == pytest.approx(
            summary[f"val/{name}/loss"] * val["tokens"] / (val["bytes"] * math.log(2)), rel=1e-12)
    last = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[-1])
    assert {"epoch", "epoch/prose", "epoch/code", "val/code/bpb"} <= last.keys()


def test_tokens_config_errors_name_the_field(corpus, tmp_path):
    with pytest.raises(ConfigError) as info:  # neither meta.json nor train.bin
        train.run(compose(*TINY_TEXT, f"data.path={tmp_path}"), tmp_path / "run", devices=jax.devices()[:1])
    assert info.value.field == "data.path"
    prepare.prepare([str(corpus / "texts" / "code")], tmp_path / "code")
    with pytest.raises(ConfigError) as info:
        train.run(compose(*TINY_TEXT, f"data.path={tmp_path / 'code'}", "data.vocab_size=300"), tmp_path / "run",
                  devices=jax.devices()[:1])
    assert info.value.field == "data.vocab_size" and "300, but" in str(info.value)
    with pytest.raises(ConfigError) as info:
        train.run(compose(*TINY_TEXT, "data.path=x", f"+data.mixture={{a:{{path:{tmp_path / 'code'}}}}}"),
                  tmp_path / "run", devices=jax.devices()[:1])
    assert info.value.field == "data.mixture"
    assert not (tmp_path / "run").exists()  # config errors stop before anything is written
