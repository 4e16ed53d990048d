"""A sparse mixture-of-experts MLP block (Mixtral, Qwen2-MoE, Qwen3-MoE).

Param names follow transformers 5's modules: ``gate`` (the router),
``experts/gate_up_proj`` and ``experts/down_proj`` (stacked expert kernels,
`jaxlora.experts.ExpertDense`, stored ``(E, in, out)``: transformers'
``(E, out, in)`` transposed per expert) and, for Qwen2-MoE,
``shared_expert/{gate,up,down}_proj`` and ``shared_expert_gate``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxlora.errors import InputError
from jaxlora.experts import ExpertDense

IMPLEMENTATIONS = ("ragged", "dense")


def _init(axes: tuple[str | None, ...], std: float):
  return nn.with_logical_partitioning(nn.initializers.normal(std), axes)


def route(logits: jax.Array, top_k: int, norm_topk_prob: bool) -> tuple[jax.Array, jax.Array]:
  """Top-k routing as transformers computes it: ``(weights, experts)``, each ``(N, top_k)``.

  Softmax in float32, the top-k probabilities (renormalised to sum to one if
  `norm_topk_prob`), cast back to the logits' dtype.

  Args:
    logits: router logits ``(N, E)``.
    top_k: experts per token.
    norm_topk_prob: renormalise the top-k probabilities (Mixtral always does;
      Qwen models as their config says).

  Returns:
    ``(weights, experts)``: the routing weights in ``logits.dtype`` and int32
    expert ids, highest probability first.

  >>> import jax.numpy as jnp
  >>> w, e = route(jnp.log(jnp.array([[0.1, 0.6, 0.3]])), 2, True)
  >>> [round(v, 4) for v in w[0].tolist()], e.tolist()
  ([0.6667, 0.3333], [[1, 2]])
  """
  probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
  weights, experts = jax.lax.top_k(probs, top_k)
  if norm_topk_prob:
    weights = weights / jnp.sum(weights, axis=-1, keepdims=True)
  return weights.astype(logits.dtype), experts.astype(jnp.int32)


class MoE(nn.Module):
  """Sparse MoE block: router, top-k experts (SwiGLU each), optional gated shared expert.

  ``__call__(h)`` takes ``(batch, seq, hidden_size)`` and returns the same
  shape. The router logits ``(batch*seq, num_experts)`` are sown as
  ``intermediates/router_logits`` for `load_balancing_loss`.

  ``implementation='ragged'`` sorts the ``N * top_k`` (token, expert) pairs by
  expert and runs each expert on its own tokens only (`ExpertDense`, a
  grouped matmul); ``'dense'`` runs every token through every expert and
  weights the results with zeros off the top-k (the reference: same params,
  same result up to float rounding, ``num_experts / top_k`` times the work).

  Attributes:
    hidden_size: model width.
    intermediate_size: each expert's SwiGLU width ``I``.
    num_experts: routed experts ``E``.
    top_k: experts per token.
    norm_topk_prob: renormalise the top-k routing weights (True for Mixtral).
    shared_intermediate_size: width of the always-on shared expert
      (Qwen2-MoE), gated by ``sigmoid(shared_expert_gate(h))``; None for none.
    dtype: compute dtype.
    param_dtype: dtype of the params.
    implementation: ``'ragged'`` or ``'dense'``.
    init_std: standard deviation of the normal initializer.

  >>> import jax, jax.numpy as jnp
  >>> block = MoE(hidden_size=8, intermediate_size=4, num_experts=4, top_k=2,
  ...             norm_topk_prob=True)
  >>> h = jnp.ones((2, 3, 8))
  >>> params = nn.unbox(block.init(jax.random.key(0), h))["params"]
  >>> params["experts"]["gate_up_proj"]["kernel"].shape, block.apply({"params": params}, h).shape
  ((4, 8, 8), (2, 3, 8))
  """
  hidden_size: int
  intermediate_size: int
  num_experts: int
  top_k: int
  norm_topk_prob: bool = True
  shared_intermediate_size: int | None = None
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  implementation: str = "ragged"
  init_std: float = 0.02

  def _dense(self, features: int, axes: tuple[str | None, ...], name: str) -> nn.Dense:
    return nn.Dense(features, use_bias=False, dtype=self.dtype, param_dtype=self.param_dtype,
                    kernel_init=_init(axes, self.init_std), name=name)

  def _check(self, h: jax.Array) -> None:
    if self.implementation not in IMPLEMENTATIONS:
      raise InputError(f"MoE implementation={self.implementation!r}: use one of "
                       f"{IMPLEMENTATIONS} ('ragged' runs each token through its top-k "
                       "experts only, 'dense' through all of them).")
    if not 1 <= self.top_k <= self.num_experts:
      raise InputError(f"MoE top_k={self.top_k} with num_experts={self.num_experts}: top_k "
                       "must be between 1 and num_experts.")
    if h.ndim != 3 or h.shape[-1] != self.hidden_size:
      raise InputError(f"MoE takes (batch, seq, {self.hidden_size}) hidden states, got shape "
                       f"{tuple(h.shape)}.")

  @nn.compact
  def __call__(self, h: jax.Array) -> jax.Array:
    """``(batch, seq, hidden)`` -> ``(batch, seq, hidden)``."""
    self._check(h)
    b, t, d = h.shape
    x = h.reshape(b * t, d)
    logits = self._dense(self.num_experts, ("embed", None), "gate")(x)
    self.sow("intermediates", "router_logits", logits)
    weights, experts = route(logits, self.top_k, self.norm_topk_prob)
    out = _Experts(self.num_experts, self.intermediate_size, self.implementation, self.dtype,
                   self.param_dtype, self.init_std, name="experts")(x, weights, experts)
    if self.shared_intermediate_size is not None:
      shared = _SharedExpert(self.shared_intermediate_size, self.dtype, self.param_dtype,
                             self.init_std, name="shared_expert")(x)
      gate = self._dense(1, ("embed", None), "shared_expert_gate")(x)
      out = out + jax.nn.sigmoid(gate) * shared
    return out.reshape(b, t, d).astype(self.dtype)


class _SharedExpert(nn.Module):
  """SwiGLU MLP without biases (Qwen2MoeMLP)."""
  intermediate_size: int
  dtype: Any
  param_dtype: Any
  init_std: float

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    dense = lambda f, axes, name: nn.Dense(f, use_bias=False, dtype=self.dtype,
                                           param_dtype=self.param_dtype,
                                           kernel_init=_init(axes, self.init_std), name=name)
    i, d = self.intermediate_size, x.shape[-1]
    g = dense(i, ("embed", "mlp"), "gate_proj")(x)
    u = dense(i, ("embed", "mlp"), "up_proj")(x)
    return dense(d, ("mlp", "embed"), "down_proj")(jax.nn.silu(g) * u)


class _Experts(nn.Module):
  """The routed experts: ``gate_up_proj`` ``(E, hidden, 2I)`` and ``down_proj`` ``(E, I, hidden)``."""
  num_experts: int
  intermediate_size: int
  implementation: str
  dtype: Any
  param_dtype: Any
  init_std: float

  @nn.compact
  def __call__(self, x: jax.Array, weights: jax.Array, experts: jax.Array) -> jax.Array:
    n, k = experts.shape
    e, i, d = self.num_experts, self.intermediate_size, x.shape[-1]
    gate_up_proj = ExpertDense(2 * i, e, dtype=self.dtype, param_dtype=self.param_dtype,
                               kernel_init=_init(("expert", "embed", "mlp"), self.init_std),
                               name="gate_up_proj")
    down_proj = ExpertDense(d, e, dtype=self.dtype, param_dtype=self.param_dtype,
                            kernel_init=_init(("expert", "mlp", "embed"), self.init_std),
                            name="down_proj")

    def swiglu(rows, groups):  # columns [:I] are the gate, [I:] the up projection
      hu = gate_up_proj(rows, groups)
      return down_proj(jax.nn.silu(hu[:, :i]) * hu[:, i:], groups)

    if self.implementation == "dense":
      # Every token through every expert, as E groups of N rows: the same layers (and
      # adapters) as the ragged path; weights off the top-k are zero.
      groups = jnp.full((e,), n, jnp.int32)
      xs = jnp.broadcast_to(x[None], (e, n, d)).reshape(e * n, d)
      y = swiglu(xs, groups).reshape(e, n, d)
      dense_w = jnp.zeros((n, e), weights.dtype).at[jnp.arange(n)[:, None], experts].set(
          weights)
      return jnp.einsum("enh,ne->nh", y, dense_w.astype(y.dtype))
    flat = experts.reshape(n * k)
    # Stable: a token's k copies keep their order within an expert's group.
    order = jnp.argsort(flat, stable=True)
    groups = jnp.zeros((e,), jnp.int32).at[flat].add(1)
    y = swiglu(x[order // k], groups)
    y = y * weights.reshape(n * k)[order][:, None].astype(y.dtype)
    # Back to (token, k) order, then sum each token's k contributions (no scatter-add).
    inverse = jnp.zeros_like(order).at[order].set(jnp.arange(n * k, dtype=order.dtype))
    return jnp.sum(y[inverse].reshape(n, k, d), axis=1)


def load_balancing_loss(router_logits: jax.Array | Sequence[jax.Array], num_experts: int,
                        top_k: int, attention_mask: jax.Array | None = None) -> jax.Array:
  """The Switch-Transformer auxiliary loss, as transformers' ``load_balancing_loss_func``.

  ``num_experts * sum_e f_e * P_e`` where, over all layers' rows, ``f_e`` is
  the fraction of top-k assignments that go to expert ``e`` (summing to
  ``top_k``) and ``P_e`` the mean router probability of ``e``. With an
  attention mask, padded rows count for neither.

  Args:
    router_logits: per-layer logits ``(batch*seq, E)`` (a sequence, or an
      array ``(layers, batch*seq, E)`` as a scanned model sows them).
    num_experts: ``E``.
    top_k: experts per token.
    attention_mask: ``(batch, seq)``, 1 for real tokens; None for all.

  Returns:
    A float32 scalar.

  >>> import jax.numpy as jnp
  >>> float(load_balancing_loss([jnp.zeros((4, 2))], num_experts=2, top_k=1))
  1.0
  """
  if isinstance(router_logits, (list, tuple)):
    if not router_logits:
      raise InputError("load_balancing_loss got no router logits; pass the sown "
                       "'router_logits' of at least one layer.")
    stacked = jnp.stack([jnp.asarray(g) for g in router_logits])
  else:
    stacked = jnp.asarray(router_logits)
    stacked = stacked[None] if stacked.ndim == 2 else stacked
  if stacked.ndim != 3 or stacked.shape[-1] != num_experts:
    raise InputError(f"router_logits must be (batch*seq, {num_experts}) per layer, got "
                     f"{tuple(stacked.shape)}.")
  layers, rows, _ = stacked.shape
  probs = jax.nn.softmax(stacked.astype(jnp.float32), axis=-1)
  _, chosen = jax.lax.top_k(probs, top_k)
  hits = jnp.sum(jax.nn.one_hot(chosen, num_experts, dtype=jnp.float32), axis=2)  # (L, rows, E)
  if attention_mask is None:
    mask = jnp.ones((rows,), jnp.float32)
  else:
    mask = jnp.asarray(attention_mask).reshape(-1).astype(jnp.float32)
    if mask.shape[0] != rows:
      raise InputError(f"attention_mask has {mask.shape[0]} entries but the router logits "
                       f"have {rows} rows per layer; pass the (batch, seq) mask of the call.")
  total = layers * jnp.sum(mask)
  tokens_per_expert = jnp.einsum("lre,r->e", hits, mask) / total
  prob_per_expert = jnp.einsum("lre,r->e", probs, mask) / total
  return jnp.sum(tokens_per_expert * prob_per_expert) * num_experts


__all__ = ["IMPLEMENTATIONS", "MoE", "load_balancing_loss", "route"]
