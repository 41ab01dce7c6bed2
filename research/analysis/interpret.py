"""Looking inside a trained model: attention maps, attributions, the logit lens, RMS stats.

Every function takes a `research.model.Transformer`, usually the one
`research.load_run(run_dir)` restores, and the token ids of one text as a
1-D array (L,). `encode` makes those ids from a string for the byte-level
corpora (stdlib, synthetic: vocab 256); for `data=tokens` pass your own
tokenizer's ids. All intermediates come from `Transformer.inspect`, a second
forward pass beside the training one, so looking costs the trained path nothing.

- `attention_maps`: softmax attention of every layer and head.
- `integrated_gradients`: attribution of one next-token log-probability to
  the input tokens' embeddings (Sundararajan, Taly and Yan 2017, "Axiomatic
  attribution for deep networks"), with its completeness error.
- `logit_lens`: every layer's residual stream read through the final norm and
  the unembedding, as if it were the last layer (nostalgebraist 2020,
  "interpreting GPT: the logit lens").
- `activation_stats`, `update_stats`: per-layer RMS of the residual stream and
  of the change of the weights between two checkpoints (`research/stats.py`;
  training logs the same numbers every `train.stats_every` steps).
"""

from __future__ import annotations

import warnings
from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from research import stats
from research.model import Transformer


def encode(text: str, vocab_size: int = 256) -> np.ndarray:
    """A string -> its UTF-8 bytes as token ids, int32 (L,), for byte-level vocabularies."""
    ids = np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int32)
    if len(ids) == 0:
        raise ValueError("empty text")
    if ids.max() >= vocab_size:
        raise ValueError(f"byte {ids.max()} is outside the vocabulary of {vocab_size}; "
                         "pass token ids from the corpus's own tokenizer instead")
    return ids


def token_labels(tokens_L) -> list[str]:
    """Printable labels for byte tokens (L,) -> [str] x L: 'a', '␣' for space, '\\n', or '<id>'."""
    special = {32: "␣", 10: "\\n", 9: "\\t"}
    return [special.get(int(t), chr(int(t)) if 33 <= int(t) < 127 else f"<{int(t)}>") for t in tokens_L]


def _tokens(tokens_L) -> jax.Array:
    tokens = jnp.asarray(tokens_L, jnp.int32)
    if tokens.ndim != 1 or tokens.shape[0] == 0:
        raise ValueError(f"expected token ids of shape (L,), got {tuple(tokens.shape)}")
    return tokens


# ---------------------------------------------------------------- attention


@nnx.jit
def _attention(net, tokens_1xL):
    return jnp.stack(net.inspect(tokens_1xL).attn)[:, 0]


def attention_maps(net: Transformer, tokens_L) -> np.ndarray:
    """Attention probabilities (n_layers, H, L, L), query x key; each row sums to 1."""
    return np.asarray(_attention(net, _tokens(tokens_L)[None]))


# ---------------------------------------------------------------- integrated gradients


class Attribution(NamedTuple):
    """Integrated gradients of log p(target | tokens[:position + 1]).

    per_token: (L,) attribution of each input token (per_dim summed over D).
    per_dim: (L, D) attribution of each embedding coordinate.
    value, baseline_value: the log-probability at the input and at the baseline.
    gap: |sum(per_token) - (value - baseline_value)| / |value - baseline_value|,
      the completeness error (0 for the exact integral).
    steps: path points used.
    """

    per_token: np.ndarray
    per_dim: np.ndarray
    value: float
    baseline_value: float
    gap: float
    position: int
    target: int
    steps: int


@nnx.jit
def _logprob_and_grads(net, tokens_BxL, embeds_BxLxD, position, target):
    """Next-token log-probabilities (B, V) at `position`, and d logp[:, target] / d embeds (B, L, D)."""
    def total(embeds):
        logits_BxLxV = net.inspect(tokens_BxL, token_embeds_BxLxD=embeds, probs=False).logits_BxLxV
        logp_BxV = jax.nn.log_softmax(logits_BxLxV[:, position])
        return logp_BxV[:, target].sum(), logp_BxV  # sequences are independent: d(sum)/d(embeds[b]) = d(logp[b])

    (_, logp_BxV), grads_BxLxD = jax.value_and_grad(total, has_aux=True)(embeds_BxLxD)
    return logp_BxV, grads_BxLxD


def _batched(net, tokens_L, embeds_BxLxD, position, target, chunk):
    """`_logprob_and_grads` on B <= chunk rows, padded to `chunk` so that one compile serves all calls."""
    B = embeds_BxLxD.shape[0]
    padded = jnp.concatenate([embeds_BxLxD, jnp.zeros((chunk - B, *embeds_BxLxD.shape[1:]), embeds_BxLxD.dtype)])
    tokens_CxL = jnp.broadcast_to(tokens_L, (chunk, tokens_L.shape[0]))
    logp_CxV, grads_CxLxD = _logprob_and_grads(net, tokens_CxL, padded, position, target)
    return logp_CxV[:B], grads_CxLxD[:B]


def integrated_gradients(net: Transformer, tokens_L, position: int = -1, target: int | None = None,
                         steps: int = 32, baseline_token: int = 32, baseline_LxD=None,
                         tol: float | None = 0.01, max_steps: int = 1024, warp: float = 1.0,
                         chunk: int = 32) -> Attribution:
    """Attribute log p(target at position + 1 | tokens[:position + 1]) to the input tokens.

    tokens_L: (L,) ids. position: where the prediction is read (default the last).
    target: the token whose log-probability is explained (default the model's top choice).
    The path is the straight line baseline -> input in token-embedding space (positions
    stay as they are). Returns an `Attribution`.

    Baseline: `baseline_LxD` (L, D) if given, else the embedding of `baseline_token` at every
    position (default 32, a space in byte vocabularies: the text with its content blanked;
    a token equal to it gets no attribution). Not the zero embedding, the usual choice for
    images: a pre-norm network is degenerate there. Each RMSNorm amplifies a tiny input
    up to 1/sqrt(eps) = 1000x, so along a path from zero the output swings over alpha ~
    1e-20..1e-3 (measured on the demo's 4-layer model) and no practical grid integrates it.
    From a token embedding the path keeps its norm, and 32 steps give gaps of ~1e-4.

    steps: points of the midpoint rule. With `tol`, steps double (up to max_steps) until
    the completeness gap is below tol, with a warning if it never is; tol=None: no check.
    warp > 1 places the points at alpha = u^warp (weights warp u^(warp-1) / steps), dense
    near the baseline, for baselines close to zero. chunk: path points per batch (memory).
    """
    tokens = _tokens(tokens_L)
    position = position % tokens.shape[0]
    table_VxD = net.embed[...].astype(jnp.float32)
    x_LxD = jnp.take(table_VxD, tokens, axis=0)
    if baseline_LxD is not None:
        base_LxD = jnp.asarray(baseline_LxD, jnp.float32)
    elif not 0 <= baseline_token < table_VxD.shape[0]:
        raise ValueError(f"baseline_token {baseline_token} is outside the vocabulary of {table_VxD.shape[0]}")
    else:
        base_LxD = jnp.broadcast_to(table_VxD[baseline_token], x_LxD.shape)
    logp_2xV, _ = _batched(net, tokens, jnp.stack([x_LxD, base_LxD]), position, 0 if target is None else target,
                           chunk)
    target = int(jnp.argmax(logp_2xV[0])) if target is None else target
    value, baseline_value = (float(v) for v in logp_2xV[:, target])
    delta = value - baseline_value
    while True:
        per_dim = np.asarray(_path_integral(net, tokens, x_LxD, base_LxD, position, target, steps, warp, chunk))
        gap = abs(float(per_dim.sum()) - delta) / max(abs(delta), 1e-12)
        if tol is None or gap <= tol or steps >= max_steps:
            break
        steps *= 2
    if tol is not None and gap > tol:
        warnings.warn(f"integrated gradients: completeness gap {gap:.2%} > {tol:.0%} after {steps} steps; "
                      "raise max_steps, or use a baseline farther from zero", stacklevel=2)
    return Attribution(per_dim.sum(-1), per_dim, value, baseline_value, gap, position, int(target), steps)


def _path_integral(net, tokens, x_LxD, base_LxD, position, target, steps, warp, chunk):
    """(x - baseline) * the integral of the gradient along the path: (L, D)."""
    u = (np.arange(steps) + 0.5) / steps
    alphas, weights = u**warp, warp * u ** (warp - 1) / steps
    grad_sum_LxD = jnp.zeros_like(x_LxD)
    for lo in range(0, steps, chunk):
        a_B = jnp.asarray(alphas[lo:lo + chunk], jnp.float32)[:, None, None]
        path_BxLxD = base_LxD[None] + a_B * (x_LxD - base_LxD)[None]
        _, grads_BxLxD = _batched(net, tokens, path_BxLxD, position, target, chunk)
        w_B = jnp.asarray(weights[lo:lo + chunk], jnp.float32)[:, None, None]
        grad_sum_LxD = grad_sum_LxD + (w_B * grads_BxLxD).sum(0)
    return (x_LxD - base_LxD) * grad_sum_LxD


# ---------------------------------------------------------------- logit lens


class LogitLens(NamedTuple):
    """Every residual stream read as if it were the last, for one text.

    top_ids, top_probs: (n_layers + 1, L, k): the k likeliest next tokens per layer and position
      (layer 0 is the embeddings; layer n_layers is the model's own output).
    next_logprob: (n_layers + 1, L - 1): log-probability of the token that actually comes next.
    """

    top_ids: np.ndarray
    top_probs: np.ndarray
    next_logprob: np.ndarray


@partial(nnx.jit, static_argnums=2)
def _lens(net, tokens_1xL, k):
    resid = net.inspect(tokens_1xL, probs=False).resid
    logp_SxLxV = jnp.stack([jax.nn.log_softmax(net.decode(x)[0]) for x in resid])
    top_p, top_ids = jax.lax.top_k(jnp.exp(logp_SxLxV), k)
    nxt = jnp.take_along_axis(logp_SxLxV[:, :-1], tokens_1xL[0, 1:][None, :, None], axis=-1)[..., 0]
    return top_ids, top_p, nxt


def logit_lens(net: Transformer, tokens_L, k: int = 5) -> LogitLens:
    """The logit lens of tokens (L,) with the top `k` tokens per layer; see `LogitLens`."""
    return LogitLens(*(np.asarray(a) for a in _lens(net, _tokens(tokens_L)[None], k)))


# ---------------------------------------------------------------- RMS statistics


@nnx.jit
def _activations(net, tokens_BxL):
    return stats.activation_rms(net.inspect(tokens_BxL, probs=False).resid)


def activation_stats(net: Transformer, tokens_BxL) -> dict[str, float]:
    """Tokens (B, L) or (L,) -> {"act_rms/resid{i}": RMS of the residual stream after layer i}.

    resid0 is the embedding output; the same keys training logs every `train.stats_every` steps.
    """
    tokens = jnp.asarray(tokens_BxL, jnp.int32)
    tokens = tokens[None] if tokens.ndim == 1 else tokens
    return {k: float(v) for k, v in _activations(net, tokens).items()}


def update_stats(before: Transformer, after: Transformer) -> dict[str, float]:
    """Two models of one shape (e.g. two checkpoints) -> {"update_rms/{layer}": RMS of the change}."""
    pure = [nnx.split(m)[1].to_pure_dict() for m in (before, after)]
    return {k: float(v) for k, v in stats.update_rms(*pure).items()}
