"""Interpretation on small random models: inspect = forward, IG completeness, logit lens, RMS stats.

A random model with a large init scale is a non-trivial function of its
input, which is all these properties need; no training.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from research import config, model
from research.analysis import interpret

TEXT = "def f(x):\n  return"


def _net(**over) -> model.Transformer:
    cfg = config.ModelConfig(d_model=32, n_layers=2, n_heads=4, init_std=0.1, attention="chunked")
    for key, value in over.items():
        setattr(cfg, key, value)
    return model.build(cfg, 256, 64, seed=0)


def test_inspect_is_the_forward_pass():
    # The default config is checked through the model's own outputs in the tests below.
    net = _net(pos="learned", tie_embeddings=False, norm="layernorm", share_layers=1, n_layers=3)
    tokens = jnp.asarray(interpret.encode(TEXT))[None]
    # Jitted, as users would: op-by-op dispatch of a whole model is slow to compile.
    ins, logits, fast = nnx.jit(lambda m, t: (m.inspect(t), m(t), m.inspect(t, probs=False)))(net, tokens)
    np.testing.assert_allclose(ins.logits_BxLxV, logits, atol=2e-5, rtol=2e-5)
    assert len(ins.resid) == net.cfg.n_layers + 1 and len(ins.attn) == net.cfg.n_layers
    np.testing.assert_allclose(nnx.jit(lambda m, x: m.decode(x))(net, ins.resid[-1]), logits, atol=2e-5)
    # probs=False keeps the training kernel: same streams, no matrices.
    assert fast.attn == []
    np.testing.assert_allclose(fast.resid[-1], ins.resid[-1], atol=2e-5, rtol=2e-5)


LLAMA = dict(mlp="swiglu", n_kv_heads=2, qk_norm=True, tie_embeddings=False)  # GQA: 4 query, 2 kv heads


@pytest.mark.parametrize("over", [{}, LLAMA], ids=["default", "llama"])
def test_attention_maps_are_causal_distributions(over):
    net = _net(**over)
    tokens = interpret.encode(TEXT)
    maps = interpret.attention_maps(net, tokens)
    L = len(tokens)
    assert maps.shape == (2, 4, L, L)
    np.testing.assert_allclose(maps.sum(-1), 1.0, atol=1e-5)
    assert np.all(maps[..., np.triu_indices(L, 1)[0], np.triu_indices(L, 1)[1]] == 0)  # no peeking ahead
    assert maps[:, :, 0, 0] == pytest.approx(1.0)


def test_integrated_gradients_completeness_and_causality():
    net = _net()
    tokens = interpret.encode(TEXT)
    position = 9
    attr = interpret.integrated_gradients(net, tokens, position=position)
    delta = attr.value - attr.baseline_value
    assert abs(delta) > 0.5  # a real difference to explain
    # Completeness (Sundararajan et al. 2017): attributions sum to f(input) - f(baseline).
    assert attr.gap < 0.01
    assert attr.per_token.sum() == pytest.approx(delta, rel=0.01)
    # The check is real: from a zero baseline (degenerate for pre-norm nets) a coarse
    # uniform grid misses most of the difference, and says so when asked.
    zeros = np.zeros((len(tokens), 32), np.float32)
    coarse = interpret.integrated_gradients(net, tokens, position=position, steps=16, tol=None, baseline_LxD=zeros)
    assert coarse.gap > 0.01 and coarse.steps == 16
    with pytest.warns(UserWarning, match="completeness gap"):
        interpret.integrated_gradients(net, tokens, position=position, steps=16, max_steps=16, baseline_LxD=zeros)
    # Dense points near that baseline (warp) recover completeness there too.
    assert interpret.integrated_gradients(net, tokens, position=position, steps=128, warp=8.0,
                                          baseline_LxD=zeros).gap < 0.01
    # Tokens after the position cannot move the prediction, nor can one equal to the baseline token.
    assert np.all(attr.per_token[position + 1:] == 0)
    assert np.all(attr.per_token[tokens == 32] == 0)
    # The value explained is the model's log-probability of that target.
    logp = jax.nn.log_softmax(nnx.jit(lambda m, t: m(t))(net, jnp.asarray(tokens)[None])[0, position])
    assert attr.value == pytest.approx(float(logp[attr.target]), abs=1e-4)
    assert attr.target == int(jnp.argmax(logp))
    # With the input as its own baseline there is nothing to attribute.
    same = interpret.integrated_gradients(net, tokens, position=position, steps=8,
                                          baseline_LxD=np.asarray(net.embed[...])[tokens])
    assert np.abs(same.per_token).max() == 0.0 and same.value == same.baseline_value


@pytest.mark.parametrize("over", [{}, LLAMA], ids=["default", "llama"])
def test_logit_lens_last_layer_is_the_model(over):
    net = _net(**over)
    tokens = interpret.encode(TEXT)
    lens = interpret.logit_lens(net, tokens, k=3)
    L = len(tokens)
    assert lens.top_ids.shape == (3, L, 3) and lens.next_logprob.shape == (3, L - 1)
    logp_LxV = jax.nn.log_softmax(nnx.jit(lambda m, t: m(t))(net, jnp.asarray(tokens)[None])[0])
    np.testing.assert_array_equal(lens.top_ids[-1, :, 0], np.argmax(logp_LxV, -1))
    np.testing.assert_allclose(lens.next_logprob[-1], logp_LxV[np.arange(L - 1), tokens[1:]], atol=1e-4)
    assert np.all(np.diff(lens.top_probs, axis=-1) <= 0)  # sorted, best first


def test_activation_and_update_stats():
    net = _net()
    tokens = interpret.encode(TEXT)
    stats = interpret.activation_stats(net, tokens)
    resid = nnx.jit(lambda m, t: m.inspect(t, probs=False).resid)(net, jnp.asarray(tokens)[None])
    assert list(stats) == [f"act_rms/resid{i}" for i in range(3)]
    for i, x in enumerate(resid):
        assert stats[f"act_rms/resid{i}"] == pytest.approx(float(jnp.sqrt(jnp.mean(x**2))), rel=1e-5)
    other = _net()
    assert set(interpret.update_stats(net, other).values()) == {0.0}
    state = nnx.state(other)
    wq = state["blocks"]["wq"]  # stacked (layers, D, H*K): move block 1's slice only
    wq[...] = wq[...].at[1].add(1.0)
    nnx.update(other, state)
    moved = interpret.update_stats(net, other)
    assert moved["update_rms/block1"] > 0 and moved["update_rms/block0"] == 0.0


def test_encode_and_labels():
    assert interpret.encode("a b\n").tolist() == [97, 32, 98, 10]
    assert interpret.token_labels([97, 32, 10, 200]) == ["a", "␣", "\\n", "<200>"]
    with pytest.raises(ValueError, match="outside the vocabulary"):
        interpret.encode("é", vocab_size=128)
    with pytest.raises(ValueError, match="empty"):
        interpret.encode("")
