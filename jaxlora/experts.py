"""Stacked expert kernels: a grouped matmul layer for mixture-of-experts blocks.

`ExpertDense` holds one ``(in, out)`` kernel per expert, stacked as
``(num_experts, in, out)``, and multiplies tokens that are already sorted by
expert with their own expert's kernel (`grouped_matmul`, the semantics of
`jax.lax.ragged_dot`). `jaxlora.apply` adds a per-expert LoRA term to it
(``lora_a (E, in, r)``, ``lora_b (E, r, out)``): the expert axis is a shared
(batch) axis of the kernel, like an einsum's per-head axis.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from jaxlora.errors import InputError

# Rows per tile of the CPU grouped matmul. Each tile belongs to one expert, so
# padding costs at most one partial tile per expert; 256 rows keep the per-tile
# matmul large enough for XLA:CPU's GEMM while wasting little.
_CPU_TILE = 256


def _check(x: jax.Array, w: jax.Array, group_sizes: jax.Array) -> None:
  if x.ndim != 2 or w.ndim != 3 or x.shape[1] != w.shape[1]:
    raise InputError(f"grouped_matmul takes x (N, in) and kernels (E, in, out), got x "
                     f"{tuple(x.shape)} and kernels {tuple(w.shape)}; flatten the tokens and "
                     "sort them by expert first.")
  if group_sizes.shape != (w.shape[0],) or not jnp.issubdtype(group_sizes.dtype, jnp.integer):
    raise InputError(f"group_sizes must be an integer array of shape ({w.shape[0]},) (one row "
                     f"count per expert), got {group_sizes.dtype} {tuple(group_sizes.shape)}.")


def _tiled(x: jax.Array, w: jax.Array, group_sizes: jax.Array, precision: Any) -> jax.Array:
  """`ragged_dot` as one dense matmul per tile of rows (for XLA:CPU).

  XLA:CPU has no grouped matmul: `lax.ragged_dot` lowers there to a masked
  product with every expert, E times the work. Here each group is padded to
  whole tiles, every tile is multiplied by its own expert's kernel in a scan
  (one ``(tile, in) @ (in, out)`` product per step) and the rows are gathered
  back; the work is that of the real rows plus at most one tile per expert.
  """
  m, n_in = x.shape
  e, _, n_out = w.shape
  tile = _CPU_TILE
  if m <= tile:  # one tile per expert would cost as much as the masked product
    return lax.ragged_dot(x, w, group_sizes, precision=precision)
  n_tiles = -(-(m + e * (tile - 1)) // tile)  # static bound on the padded tiles
  gs = group_sizes.astype(jnp.int32)
  ends = jnp.cumsum(gs)
  padded = (gs + tile - 1) // tile * tile
  pends = jnp.cumsum(padded)
  rows = jnp.arange(m, dtype=jnp.int32)
  group = jnp.minimum(jnp.searchsorted(ends, rows, side="right"), e - 1)
  valid = rows < ends[-1]  # rows past sum(group_sizes) come out zero, as in ragged_dot
  pos = jnp.where(valid, pends[group] - padded[group] + rows - (ends[group] - gs[group]),
                  n_tiles * tile)  # out of bounds: dropped by the scatter below
  xp = jnp.zeros((n_tiles * tile, n_in), x.dtype).at[pos].set(x, mode="drop")
  tile_expert = jnp.minimum(
      jnp.searchsorted(pends, jnp.arange(n_tiles, dtype=jnp.int32) * tile, side="right"), e - 1)

  def step(_, xs):
    xt, ex = xs
    return None, lax.dot(xt, w[ex], precision=precision)

  _, y = lax.scan(step, None, (xp.reshape(n_tiles, tile, n_in), tile_expert))
  y = y.reshape(n_tiles * tile, n_out)[jnp.minimum(pos, n_tiles * tile - 1)]
  return jnp.where(valid[:, None], y, jnp.zeros_like(y))


def grouped_matmul(x: jax.Array, w: jax.Array, group_sizes: jax.Array,
                   precision: Any = None) -> jax.Array:
  """Rows of `x` sorted by group times their group's matrix: `jax.lax.ragged_dot`.

  Rows ``[sum(gs[:e]), sum(gs[:e+1]))`` are multiplied by ``w[e]``; rows past
  ``sum(group_sizes)`` give zeros. On GPU and TPU this is `lax.ragged_dot`
  (their grouped-matmul kernels); on CPU, where `ragged_dot` does E times the
  work, a tiled scan computes the same values (`jax.lax.platform_dependent`
  picks at lowering time).

  Args:
    x: ``(N, in)`` rows sorted by group.
    w: ``(E, in, out)``, one matrix per group.
    group_sizes: int ``(E,)``, rows per group.
    precision: as for `jax.lax.dot`.

  Returns:
    ``(N, out)`` in the promoted dtype of `x` and `w`.

  Raises:
    InputError: operands of the wrong shapes.

  >>> import jax.numpy as jnp
  >>> x = jnp.ones((3, 2))
  >>> w = jnp.stack([jnp.eye(2), 2 * jnp.eye(2)])
  >>> grouped_matmul(x, w, jnp.array([1, 2])).tolist()
  [[1.0, 1.0], [2.0, 2.0], [2.0, 2.0]]
  """
  x, w, group_sizes = jnp.asarray(x), jnp.asarray(w), jnp.asarray(group_sizes)
  _check(x, w, group_sizes)
  dt = jnp.result_type(x.dtype, w.dtype)
  x, w = x.astype(dt), w.astype(dt)
  if x.shape[0] == 0:
    return jnp.zeros((0, w.shape[2]), dt)
  native: Callable[..., jax.Array] = lambda x, w, g: lax.ragged_dot(x, w, g, precision=precision)
  cpu: Callable[..., jax.Array] = lambda x, w, g: _tiled(x, w, g, precision)
  return lax.platform_dependent(x, w, group_sizes, cpu=cpu, default=native)


class ExpertDense(nn.Module):
  """One dense kernel per expert; tokens sorted by expert go through their own.

  The param ``kernel`` is ``(num_experts, in_features, features)``. The call
  takes ``inputs`` ``(N, in_features)`` already sorted by expert and
  ``group_sizes`` int ``(num_experts,)`` (rows per expert, summing to N) and
  returns ``(N, features)``, computed in ``dtype`` as `nn.Dense` does.

  Under `jaxlora.apply` an adapted ExpertDense (``lora_a`` ``(E, in, r)``,
  ``lora_b`` ``(E, r, out)``) adds ``scale * ((x @ A_e) @ B_e)`` for each row's
  expert ``e``.

  Attributes:
    features: output features per expert.
    num_experts: number of experts (the kernel's leading axis).
    dtype: compute dtype (default: promoted from inputs and kernel).
    param_dtype: dtype of the kernel.
    kernel_init: initializer of the whole ``(E, in, out)`` kernel, e.g.
      ``nn.with_logical_partitioning(init, ("expert", "embed", "mlp"))``.
    precision: as for `jax.lax.dot`.

  >>> import jax, jax.numpy as jnp
  >>> layer = ExpertDense(features=3, num_experts=2)
  >>> x, gs = jnp.ones((5, 4)), jnp.array([2, 3], jnp.int32)
  >>> params = layer.init(jax.random.key(0), x, gs)
  >>> params["params"]["kernel"].shape, layer.apply(params, x, gs).shape
  ((2, 4, 3), (5, 3))
  """
  features: int
  num_experts: int
  dtype: Any = None
  param_dtype: Any = jnp.float32
  kernel_init: Callable[..., Any] = nn.initializers.normal(0.02)
  precision: Any = None

  @nn.compact
  def __call__(self, inputs: jax.Array, group_sizes: jax.Array) -> jax.Array:
    """``(N, in)`` rows sorted by expert -> ``(N, features)``."""
    inputs = jnp.asarray(inputs)
    if inputs.ndim != 2:
      raise InputError(f"ExpertDense '{'/'.join(self.path)}' takes (tokens, features) rows "
                       f"sorted by expert, got shape {tuple(inputs.shape)}; flatten the tokens.")
    kernel = self.param("kernel", self.kernel_init,
                        (self.num_experts, inputs.shape[-1], self.features), self.param_dtype)
    inputs, kernel = nn.dtypes.promote_dtype(inputs, kernel, dtype=self.dtype)
    return grouped_matmul(inputs, kernel, jnp.asarray(group_sizes), self.precision)


def lora_term(module: nn.Module, args: tuple, kwargs: dict, x: jax.Array, a: jax.Array,
              b: jax.Array, scale: jax.Array) -> jax.Array:
  """The LoRA term of an `ExpertDense` call: ``scale * ((x @ A_e) @ B_e)`` per row's expert.

  The `jaxlora.forward` handler for ExpertDense; ``a`` ``(E, in, r)`` and ``b``
  ``(E, r, out)`` are one layer's factors (scanned layer axes sliced off).

  >>> import jax.numpy as jnp
  >>> layer = ExpertDense(features=2, num_experts=2)
  >>> x, gs = jnp.ones((3, 2)), jnp.array([1, 2])
  >>> a = jnp.stack([jnp.ones((2, 1)), 2 * jnp.ones((2, 1))])  # expert 1's A is doubled
  >>> b = jnp.ones((2, 1, 2))
  >>> lora_term(layer, (x, gs), {}, x, a, b, jnp.float32(0.5)).tolist()
  [[1.0, 1.0], [2.0, 2.0], [2.0, 2.0]]
  """
  gs = jnp.asarray(args[1] if len(args) > 1 else kwargs["group_sizes"])
  precision = getattr(module, "precision", None)
  # The scale multiplies the small (N, r) intermediate, as for the other layer kinds.
  h = grouped_matmul(x, a, gs, precision) * scale
  return grouped_matmul(h, b, gs, precision)


__all__ = ["ExpertDense", "grouped_matmul", "lora_term"]
