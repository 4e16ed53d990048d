"""Next-token cross-entropy over sequence chunks, so the full float32 logits never exist."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from jaxlora import _tree
from jaxlora import quantization
from jaxlora import tokens
from jaxlora._tree import A_KEY, B_KEY, KERNEL_KEY, SCALE_KEY, TOKEN_IDS_KEY, TOKEN_ROWS_KEY
from jaxlora.models.decoder import Decoder, softcap
from jaxlora.errors import InputError


def _head(model: Decoder, params: Any) -> dict:
  """The leaves the output head reads: the (tied) embedding or lm_head's kernel and adapter."""
  p = _tree.get_params(params)
  if model.config.tie_word_embeddings:
    name = "wte" if model.config.is_gpt2 else "embed_tokens"
    # Trained token rows (jaxlora.tokens) replace those columns of the tied head.
    return {k: v for k, v in p[name].items() if k in ("embedding", TOKEN_IDS_KEY, TOKEN_ROWS_KEY)}
  mod = p["lm_head"]
  return {k: mod[k] for k in (KERNEL_KEY, A_KEY, B_KEY, SCALE_KEY) if k in mod}


def _logits(model: Decoder, head: dict, h: jax.Array) -> jax.Array:
  """The decoder's head on `h`, with its dtype promotion, LoRA term (if adapted) and
  final soft-capping (Gemma 2)."""
  y = _raw_logits(model, head, h)
  cap = model.config.final_softcap
  return y if not cap else softcap(y, cap)


def _raw_logits(model: Decoder, head: dict, h: jax.Array) -> jax.Array:
  dt = model.dtype
  if "embedding" in head:  # nn.Embed.attend
    table = head["embedding"]
    y = jnp.dot(h.astype(dt), table.astype(dt).T)
    if TOKEN_IDS_KEY in head:
      rows = head[TOKEN_ROWS_KEY].astype(table.dtype).astype(dt)  # as jaxlora.merge stores them
      y = tokens.replace_columns(y, h.astype(dt), head[TOKEN_IDS_KEY], rows)
    return y
  kernel = head[KERNEL_KEY]
  if quantization.is_quantized(kernel):
    kernel = quantization.dequantize_array(kernel)
  y = jnp.dot(h.astype(dt), kernel.astype(dt))
  if A_KEY in head:
    z = jnp.dot(h.astype(dt), head[A_KEY].astype(dt)) * jnp.asarray(head[SCALE_KEY]).astype(dt)
    y = y + jnp.dot(z, head[B_KEY].astype(dt))
  return y


def chunked_cross_entropy(model: Decoder, params: Any, hidden: jax.Array, labels: jax.Array,
                          weights: jax.Array | None = None, *,
                          chunk_size: int = 512, reduction: str = "mean") -> jax.Array:
  """Weighted next-token cross-entropy, computing the head one sequence chunk at a time.

  ``hidden`` comes from ``model.apply(..., return_hidden=True)`` (through
  `jaxlora.apply` with ``check_reached=False`` when the head carries an
  adapter). Each chunk's logits are made in the head's compute dtype, taken to
  float32 for the log-softmax and dropped; the backward pass recomputes them
  chunk by chunk (`jax.checkpoint`), so at most one ``(batch, chunk, vocab)``
  block of logits exists at a time instead of ``(batch, seq, vocab)`` float32.
  The loss and its gradients are the full computation's up to float rounding.

  Args:
    model: the `jaxlora.models.Decoder`.
    params: its params (plain, wrapped or quantized; with or without ``{'params': ...}``).
    hidden: ``(batch, seq, hidden)`` final hidden states.
    labels: int ``(batch, seq)`` target token ids (already shifted).
    weights: ``(batch, seq)`` loss weights (0 on padding); default all ones.
    chunk_size: sequence positions per chunk.
    reduction: ``'mean'`` (weighted mean), ``'sum'`` (weighted sum, for callers that
      add up losses and token counts over several batches themselves) or ``'none'``
      (``weights * nll`` per position: minus the targets' log-probabilities where the weight
      is 1, e.g. for sequence log-probs of preference losses).

  Returns:
    ``sum(weights * nll) / max(sum(weights), 1)`` (``'mean'``) or ``sum(weights * nll)``
    (``'sum'``) as a float32 scalar; ``'none'``: float32 ``(batch, seq)``.

  Raises:
    ValueError: shapes that do not match, a chunk size below 1, or an unknown reduction.

  >>> import jax, jax.numpy as jnp, jaxlora
  >>> cfg = jaxlora.models.ModelConfig.tiny("llama")
  >>> model = jaxlora.models.Decoder(cfg)
  >>> params = jaxlora.models.init(model, jax.random.key(0))
  >>> ids = jnp.arange(10).reshape(1, 10) % 32
  >>> h = model.apply({'params': params}, ids[:, :-1], return_hidden=True)
  >>> loss = chunked_cross_entropy(model, params, h, ids[:, 1:], chunk_size=4)
  >>> logits = model.apply({'params': params}, ids[:, :-1])
  >>> full = -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), ids[:, 1:, None], -1))
  >>> bool(jnp.allclose(loss, full, rtol=1e-6))
  True
  >>> total = chunked_cross_entropy(model, params, h, ids[:, 1:], chunk_size=4, reduction="sum")
  >>> bool(jnp.allclose(total, 9 * full, rtol=1e-6))
  True
  >>> per = chunked_cross_entropy(model, params, h, ids[:, 1:], chunk_size=4, reduction="none")
  >>> per.shape, bool(jnp.allclose(per.mean(), full, rtol=1e-6))
  ((1, 9), True)
  """
  if not isinstance(chunk_size, int) or chunk_size < 1:
    raise InputError(f"chunk_size must be a positive integer, got {chunk_size!r}.")
  if reduction not in ("mean", "sum", "none"):
    raise InputError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}.")
  b, t, d = hidden.shape
  if tuple(labels.shape) != (b, t):
    raise InputError(f"labels {tuple(labels.shape)} must be (batch, seq) = {(b, t)} like hidden.")
  w = jnp.ones((b, t), jnp.float32) if weights is None else jnp.asarray(weights, jnp.float32)
  if tuple(w.shape) != (b, t):
    raise InputError(f"weights {tuple(w.shape)} must be (batch, seq) = {(b, t)} like hidden.")
  chunk = min(chunk_size, t)
  n = -(-t // chunk)
  pad = n * chunk - t
  hc = jnp.pad(hidden, ((0, 0), (0, pad), (0, 0))).reshape(b, n, chunk, d).swapaxes(0, 1)
  yc = jnp.pad(labels, ((0, 0), (0, pad))).reshape(b, n, chunk).swapaxes(0, 1)
  wc = jnp.pad(w, ((0, 0), (0, pad))).reshape(b, n, chunk).swapaxes(0, 1)
  head = _head(model, params)

  @jax.checkpoint
  def chunk_nll(head, h, y, wt):
    logits = _logits(model, head, h).astype(jnp.float32)
    gold = jnp.take_along_axis(logits, y[..., None].astype(jnp.int32), axis=-1)[..., 0]
    return (jax.nn.logsumexp(logits, axis=-1) - gold) * wt

  if reduction == "none":
    per_chunk = jax.lax.map(lambda xs: chunk_nll(head, *xs), (hc, yc, wc))  # (n, b, chunk)
    return per_chunk.swapaxes(0, 1).reshape(b, n * chunk)[:, :t]

  def body(total, xs):
    return total + jnp.sum(chunk_nll(head, *xs)), None

  total, _ = jax.lax.scan(body, jnp.zeros((), jnp.float32), (hc, yc, wc))
  if reduction == "sum":
    return total
  return total / jnp.maximum(jnp.sum(w), 1.0)
