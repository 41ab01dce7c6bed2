"""FLOPs per token (PaLM accounting), parameter counts from the config, and peak FLOP/s."""

from __future__ import annotations

import dataclasses
from types import SimpleNamespace

import jax
import pytest

from research.config import ModelConfig
from research.flops import PEAK_FLOPS, flops_per_token, param_counts, peak_flops

# A concrete config, the arithmetic written out by hand below.
CFG = ModelConfig(
    d_model=384, n_layers=6, n_heads=6, mlp_ratio=4.0,
    norm="rmsnorm", pos="rope", tie_embeddings=True,
)
VOCAB, SEQ = 256, 256


def test_flops_per_token_by_hand():
    D, n_layers, H, V, T = 384, 6, 6, 256, 256
    Q = D // H  # 64, head dim
    F = 4 * D  # 1536, MLP width
    # Per block: q, k, v, o (4 D x D), MLP in/out (2 D x F), two RMSNorm scales (2 D).
    block = 4 * D * D + 2 * D * F + 2 * D
    assert block == 589_824 + 1_179_648 + 768 == 1_770_240
    # Output projection (tied: it reads the embedding table, but it is a matmul).
    matmul_params = n_layers * block + D * V
    assert matmul_params == 10_621_440 + 98_304 == 10_719_744
    attention = 12 * n_layers * H * Q * T
    assert attention == 7_077_888
    expected = 6 * matmul_params + attention
    assert expected == 71_396_352

    assert param_counts(CFG, VOCAB, SEQ)["matmul_params"] == matmul_params
    assert flops_per_token(CFG, VOCAB, SEQ) == pytest.approx(expected, rel=0, abs=0.5)


def test_param_counts_by_hand():
    D, n_layers, V = 384, 6, 256
    block = 4 * D * D + 2 * D * 4 * D + 2 * D
    non_embedding = n_layers * block + D  # + final norm scale
    counts = param_counts(CFG, VOCAB, SEQ)
    assert counts["non_embedding_params"] == non_embedding == 10_621_824
    assert counts["params"] == non_embedding + V * D  # tied: one table

    # layernorm (scale + bias), learned positions (T x D) and an untied unembedding.
    cfg = dataclasses.replace(CFG, norm="layernorm", pos="learned", tie_embeddings=False)
    block_ln = 4 * D * D + 2 * D * 4 * D + 2 * (2 * D)
    counts = param_counts(cfg, VOCAB, SEQ)
    assert counts["non_embedding_params"] == n_layers * block_ln + 2 * D
    assert counts["params"] == n_layers * block_ln + 2 * D + V * D + SEQ * D + D * V


def test_flops_ignore_lookup_tables():
    """Tying and learned positions change params, not FLOPs (lookups are free; the output
    projection is a matmul either way)."""
    base = flops_per_token(CFG, VOCAB, SEQ)
    untied = dataclasses.replace(CFG, tie_embeddings=False)
    learned = dataclasses.replace(CFG, pos="learned")
    assert flops_per_token(untied, VOCAB, SEQ) == base
    assert flops_per_token(learned, VOCAB, SEQ) == base
    assert param_counts(untied, VOCAB, SEQ)["params"] > param_counts(CFG, VOCAB, SEQ)["params"]
    assert param_counts(learned, VOCAB, SEQ)["params"] > param_counts(CFG, VOCAB, SEQ)["params"]


def test_flops_scale_with_sequence_length_through_attention_only():
    T1, T2 = 256, 512
    delta = flops_per_token(CFG, VOCAB, T2) - flops_per_token(CFG, VOCAB, T1)
    assert delta == pytest.approx(12 * 6 * 6 * 64 * (T2 - T1), rel=0, abs=0.5)


@pytest.mark.parametrize("k", [1, 2, 3])
def test_share_layers_keeps_flops_reduces_params(k):
    shared = dataclasses.replace(CFG, share_layers=k)
    assert flops_per_token(shared, VOCAB, SEQ) == flops_per_token(CFG, VOCAB, SEQ)
    assert param_counts(shared, VOCAB, SEQ)["matmul_params"] == param_counts(CFG, VOCAB, SEQ)["matmul_params"]
    full = param_counts(CFG, VOCAB, SEQ)
    counts = param_counts(shared, VOCAB, SEQ)
    assert counts["params"] < full["params"]
    assert counts["non_embedding_params"] < full["non_embedding_params"]
    # Exactly (n_layers - k) blocks fewer.
    block = 4 * 384 * 384 + 2 * 384 * 1536 + 2 * 384
    assert full["params"] - counts["params"] == (6 - k) * block


def test_peak_flops_cpu_is_measured():
    device = jax.devices("cpu")[0]
    flops, source = peak_flops(device)
    assert source.startswith("measured:")
    assert "cpu" in source
    assert flops > 0 and flops < 1e15  # a CPU is nowhere near a petaflop
    # The default device (CPU in the tests) gives the same, cached, measurement.
    flops_default, source_default = peak_flops()
    assert source_default.startswith("measured:")
    assert flops_default == flops


@pytest.mark.parametrize(
    "kind, expected, name",
    [
        ("NVIDIA H100 80GB HBM3", 989e12, "H100"),
        ("H100", 989e12, "H100"),
        ("nvidia h100 nvl", 989e12, "H100"),  # case-insensitive
        ("NVIDIA A100-SXM4-40GB", 312e12, "A100"),
        ("TPU v5 lite", 197e12, "TPU v5 lite"),
        # Whole-word matches: an L40S is not an L4, a PCIe H100 is not an SXM one.
        ("NVIDIA L40S", 362e12, "L40S"),
        ("NVIDIA L4", 121e12, "L4"),
        ("NVIDIA H100 PCIe", 756e12, "H100 PCIe"),
    ],
)
def test_peak_flops_table(kind, expected, name):
    stand_in = SimpleNamespace(device_kind=kind, platform="gpu")
    flops, source = peak_flops(stand_in)
    assert flops == expected
    assert source == f"table:{name}"
    assert PEAK_FLOPS[name] == expected
