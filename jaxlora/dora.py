"""DoRA (weight-decomposed LoRA): the magnitude leaf, its forward pass, merge and unmerge.

DoRA trains, beside A and B, one magnitude ``m`` per output unit of a kernel and
computes the layer with the direction of ``W + s*A@B`` rescaled to that
magnitude. As PEFT (0.21) computes it, a layer's output is::

  base(x) + (g - 1) * (x @ W) + g * s * (dropout(x) @ A) @ B,
  g = m / stop_gradient(||W + s*A@B||)            (one value per output unit)

where the norm runs over the kernel's input axes and ``x @ W`` is the base
product without the bias. With dropout active, PEFT computes both products on
the dropped-out input instead: ``base(x) + (g - 1) * (dropout(x) @ W) + g * ...``
(so each dropout draw costs one more base matmul); `jaxlora.apply` does the same.

The column norms are computed factored, never through the full-size
``W + s*A@B``::

  ||W_j + s (AB)_j||^2 = ||W_j||^2 + 2s <W_j, (AB)_j> + s^2 B_j^T (A^T A) B_j

from ``W^T A`` (out x r) and ``A^T A`` (r x r). The norm is detached (the DoRA
paper's section 4.3, and PEFT), so it costs no backward pass.

Layout: the magnitude of a kernel ``(*stacked, *batch, *in, *out)`` is
``(*stacked, *batch, *out)`` (kernel axis order kept), stored as ``lora_magnitude``
beside ``lora_a``/``lora_b``. Quantized kernels (`jaxlora.QuantizedArray`) are
dequantized one layer at a time for their norms (QDoRA).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jaxlora import _tree
from jaxlora import kernel_layout as layout_lib
from jaxlora import quantization
from jaxlora._tree import A_KEY, B_KEY, KERNEL_KEY, MAGNITUDE_KEY, SCALE_KEY
from jaxlora.errors import InputError

PyTree = Any
_HIGHEST = lax.Precision.HIGHEST
_SHARED = (layout_lib.STACK, layout_lib.BATCH)


def _geometry(shape: tuple[int, ...], roles: tuple[str, ...]):
  """(perm to (shared, in, out) order, shared dims, in dims, out dims) of a kernel."""
  order = lambda want: [i for i, r in enumerate(roles) if r in want]
  perm = order(_SHARED) + order((layout_lib.IN,)) + order((layout_lib.OUT,))
  pick = lambda want: tuple(shape[i] for i in order(want))
  return perm, pick(_SHARED), pick((layout_lib.IN,)), pick((layout_lib.OUT,))


def _group_scale(scale: Any, shape: tuple[int, ...], roles: tuple[str, ...],
                 dtype: Any) -> jax.Array:
  """The LoRA scale per group ``(groups,)`` (one value per stacked layer, shared by batch axes)."""
  _, shared, _, _ = _geometry(shape, roles)
  stack = tuple(d for d, r in zip(shape, roles) if r == layout_lib.STACK)
  s = jnp.broadcast_to(jnp.asarray(scale, dtype), stack)
  s = s.reshape(stack + (1,) * (len(shared) - len(stack)))
  return jnp.broadcast_to(s, shared).reshape(-1)


def _factored_norm(w: jax.Array, a: jax.Array, b: jax.Array, s: jax.Array) -> jax.Array:
  """``||W + s*A@B||`` over the input axis, per group and output unit ``(G, O)``.

  ``w (G, I, O)``, ``a (G, I, r)``, ``b (G, r, O)``, ``s (G,)``, all one float dtype.
  Only ``(G, O, r)`` and ``(G, r, r)`` intermediates: the sum itself is never formed.
  """
  w_sq = jnp.sum(w * w, axis=1)
  wt_a = jnp.einsum("gio,gir->gor", w, a, precision=_HIGHEST)
  cross = jnp.sum(wt_a * jnp.swapaxes(b, 1, 2), axis=-1)
  gram = jnp.einsum("gir,gis->grs", a, a, precision=_HIGHEST)
  quad = jnp.sum(b * jnp.einsum("grs,gso->gro", gram, b, precision=_HIGHEST), axis=1)
  s = s[:, None]
  # Rounding may take a (near-)zero column slightly below zero: clamp before the root.
  return jnp.sqrt(jnp.maximum(w_sq + 2 * s * cross + s * s * quad, 0))


def _float_kernel(kernel: Any) -> jax.Array:
  return quantization.dequantize_array(kernel) if quantization.is_quantized(kernel) else kernel


def _norm_one(kernel: Any, a: jax.Array, b: jax.Array, scale: Any,
              roles: tuple[str, ...]) -> jax.Array:
  shape = tuple(kernel.shape)
  w = _float_kernel(kernel)
  wide = _tree.wide_float(w.dtype, a.dtype, b.dtype)
  _, shared, _, outs = _geometry(shape, roles)
  g = math.prod(shared)
  w3, _ = layout_lib.as_matrices(lax.stop_gradient(w).astype(wide), roles)
  a3 = lax.stop_gradient(a).astype(wide).reshape(g, w3.shape[1], -1)
  b3 = lax.stop_gradient(b).astype(wide).reshape(g, -1, w3.shape[2])
  n = _factored_norm(w3, a3, b3, _group_scale(lax.stop_gradient(scale), shape, roles, wide))
  return n.reshape(shared + outs)


def column_norm(kernel: Any, a: jax.Array, b: jax.Array, scale: Any,
                roles: tuple[str, ...]) -> jax.Array:
  """``||W + scale * A @ B||`` per output unit, computed factored (see the module docstring).

  Args:
    kernel: ``(*stacked, *batch, *in, *out)`` in any axis order `roles` names; a
      `jaxlora.QuantizedArray` is dequantized one stacked layer at a time.
    a: ``(*stacked, *batch, *in, r)``.
    b: ``(*stacked, *batch, r, *out)``.
    scale: a number or one per stacked layer.
    roles: the role of each kernel axis (``'stack'``, ``'batch'``, ``'in'``, ``'out'``).

  Returns:
    ``(*stacked, *batch, *out)`` in float32 (float64 if an input is), detached
    from the gradient.

  >>> import jax.numpy as jnp, numpy as np
  >>> w, a, b = jnp.ones((3, 2)), jnp.ones((3, 1)), jnp.ones((1, 2))
  >>> np.asarray(column_norm(w, a, b, 1.0, ("in", "out")))  # ||(2, 2, 2)||
  array([3.4641016, 3.4641016], dtype=float32)
  """
  n_stack = sum(r == layout_lib.STACK for r in roles)
  if quantization.is_quantized(kernel) and n_stack:
    # One layer at a time, so that no float copy of the whole stack exists.
    s = jnp.broadcast_to(jnp.asarray(scale), tuple(kernel.shape[:n_stack]))
    return lax.map(lambda xs: column_norm(xs[0], xs[1], xs[2], xs[3], roles[1:]),
                   (kernel, a, b, s))
  return _norm_one(kernel, a, b, scale, roles)


def magnitude(kernel: Any, a: jax.Array, b: jax.Array, scale: Any, roles: tuple[str, ...],
              dtype: Any) -> jax.Array:
  """DoRA's initial magnitude: the column norms of ``W + scale*A@B``, in ``dtype``.

  >>> import jax.numpy as jnp
  >>> magnitude(jnp.eye(2) * 3, jnp.zeros((2, 1)), jnp.zeros((1, 2)), 1.0, ("in", "out"),
  ...           jnp.float32).tolist()
  [3.0, 3.0]
  """
  return _column_norm_jit(kernel, a, b, jnp.asarray(scale), tuple(roles)).astype(dtype)


# Compiled once per kernel shape: op by op, each product would leave a kernel-sized temporary.
_column_norm_jit = jax.jit(column_norm, static_argnums=4)


def _module_roles(path: str, kernel: Any, mod: Mapping) -> tuple[str, ...]:
  return layout_lib.roles_from_shapes(path, tuple(kernel.shape), tuple(mod[A_KEY].shape),
                                      tuple(mod[B_KEY].shape), jnp.ndim(mod[SCALE_KEY]))


def weight_norms(tree: PyTree) -> dict[str, jax.Array]:
  """``||W + s*A@B||`` of every DoRA layer of a wrapped tree: what `jaxlora.unmerge` needs.

  A merged DoRA kernel ``m * (W + s*A@B) / ||W + s*A@B||`` has column norms
  ``m`` whatever the base was, so the base cannot be recovered from it and the
  adapter alone. Take these norms from the wrapped tree before merging and pass
  them to ``jaxlora.unmerge(merged, adapter, norms=...)``.

  Args:
    tree: a wrapped tree (params or variables).

  Returns:
    ``{module path: norms}``, one ``(*stacked, *batch, *out)`` float array per
    layer that holds a ``lora_magnitude``.

  >>> import jax, jax.numpy as jnp, jaxlora
  >>> t = jaxlora.wrap({'d': {'kernel': jnp.eye(2) * 2}}, rank=1, use_dora=True)
  >>> jaxlora.dora.weight_norms(t)['d'].tolist()
  [2.0, 2.0]
  """
  out = {}
  for path_t, mod in _tree.adapter_modules(_tree.get_params(tree)):
    if MAGNITUDE_KEY in mod:
      path = _tree.join(path_t)
      kernel = mod[KERNEL_KEY]
      out[path] = column_norm(kernel, mod[A_KEY], mod[B_KEY], mod[SCALE_KEY],
                              _module_roles(path, kernel, mod))
  return out


def _unit_factor(path: str, kernel_shape: tuple[int, ...], mod: Mapping,
                 vec: jax.Array) -> tuple[jax.Array, tuple[str, ...]]:
  """`vec` ``(*stacked, *batch, *out)`` shaped to broadcast against ``(G, I, O)``, and the
  kernel's axis roles."""
  roles = _module_roles(path, jax.ShapeDtypeStruct(kernel_shape, jnp.float32), mod)
  _, shared, _, outs = _geometry(kernel_shape, roles)
  if tuple(jnp.shape(vec)) != shared + outs:
    raise InputError(f"'{path}': lora_magnitude {tuple(jnp.shape(vec))} does not fit the kernel "
                     f"{kernel_shape}; DoRA needs one value per output unit, "
                     f"{shared + outs}.")
  return jnp.reshape(vec, (math.prod(shared), 1, math.prod(outs))), roles


def fold(path: str, combined: jax.Array, mod: Mapping) -> jax.Array:
  """`jaxlora.merge`'s DoRA step: ``m * V / ||V||`` per output unit, ``V = W + s*A@B``.

  Args:
    path: the module path (for errors).
    combined: ``W + s*A@B`` in the kernel's layout, float.
    mod: the module dict (``lora_a``, ``lora_b``, ``lora_scale``, ``lora_magnitude``).

  Returns:
    The merged kernel, in `combined`'s layout and dtype.

  >>> import jax.numpy as jnp
  >>> mod = {'lora_a': jnp.zeros((2, 1)), 'lora_b': jnp.zeros((1, 2)), 'lora_scale': 1.0,
  ...        'lora_magnitude': jnp.array([1.0, 4.0])}
  >>> fold('d', jnp.eye(2) * 2, mod).tolist()
  [[1.0, 0.0], [0.0, 4.0]]
  """
  shape = tuple(combined.shape)
  m, roles = _unit_factor(path, shape, mod, mod[MAGNITUDE_KEY])
  v, back = layout_lib.as_matrices(combined, roles)
  norm = jnp.sqrt(jnp.sum(v * v, axis=1, keepdims=True))
  return back(v * (m.astype(v.dtype) / norm))


def unfold(path: str, merged: jax.Array, mod: Mapping,
           norms: Mapping[str, Any] | None) -> jax.Array:
  """`jaxlora.unmerge`'s DoRA step: ``W + s*A@B = merged * ||W + s*A@B|| / m`` per output unit.

  Args:
    path: the module path.
    merged: the merged kernel, float.
    mod: the adapter's module dict.
    norms: `weight_norms` of the wrapped tree, taken before merging.

  Returns:
    ``W + s*A@B`` in `merged`'s layout and dtype.

  Raises:
    InputError: without the norms of this layer.

  >>> import jax.numpy as jnp
  >>> mod = {'lora_a': jnp.zeros((2, 1)), 'lora_b': jnp.zeros((1, 2)), 'lora_scale': 1.0,
  ...        'lora_magnitude': jnp.array([1.0, 4.0])}
  >>> unfold('d', jnp.array([[1.0, 0.0], [0.0, 4.0]]), mod, {'d': jnp.array([2.0, 2.0])}).tolist()
  [[2.0, 0.0], [0.0, 2.0]]
  """
  if norms is None or path not in norms:
    raise InputError(
        f"The adapter at '{path}' is a DoRA adapter (it has a lora_magnitude): its merged kernel "
        "m * (W + s*A@B) / ||W + s*A@B|| no longer tells the norms ||W + s*A@B||, so unmerge "
        "cannot recover W from it and the adapter alone. Take the norms before merging, "
        "norms = jaxlora.dora.weight_norms(tree), and call jaxlora.unmerge(merged, adapter, "
        "norms=norms).")
  shape = tuple(merged.shape)
  m, roles = _unit_factor(path, shape, mod, mod[MAGNITUDE_KEY])
  n, _ = _unit_factor(path, shape, mod, norms[path])
  v, back = layout_lib.as_matrices(merged, roles)
  return back(v * (n.astype(v.dtype) / m.astype(v.dtype)))


# ------------------------------------------------------------------------------ forward pass


def _trailing(y: jax.Array, v: jax.Array) -> jax.Array:
  """Dense, DenseGeneral: the output units are the trailing axes of ``y`` in kernel order."""
  return v.reshape((1,) * (y.ndim - v.ndim) + tuple(v.shape))


def _einsum_units(module, args, kwargs):
  eq = kwargs.get("einsum_str", args[1] if len(args) > 1 else None) or module.einsum_str
  lhs, rhs, out = layout_lib.einsum_parts(eq)
  return eq, lhs, rhs, out


def _broadcast(module, args, kwargs, y: jax.Array, v: jax.Array,
               letters: str | None) -> jax.Array:
  """`v` (one value per output unit) shaped to broadcast against the layer output ``y``.

  `letters` name `v`'s axes for an Einsum (None: in the kernel's order).
  """
  if not isinstance(module, nn.Einsum):
    return _trailing(y, v)
  eq, _, rhs, out = _einsum_units(module, args, kwargs)
  if letters is None:
    roles = layout_lib.einsum_roles(eq)
    letters = "".join(c for c, r in zip(rhs, roles) if r in _SHARED + (layout_lib.OUT,))
  want = [c for c in out if c in letters]
  perm = [letters.index(c) for c in want]
  if perm != list(range(v.ndim)):
    v = jnp.transpose(v, perm)
  sizes = dict(zip(want, v.shape))
  return v.reshape(tuple(sizes.get(c, 1) for c in out))


def _bias(module, args, kwargs, y: jax.Array) -> jax.Array | None:
  """The layer's bias as it was added to ``y``, or None."""
  if not getattr(module, "use_bias", False) or not module.has_variable("params", "bias"):
    return None
  bias = jnp.asarray(module.get_variable("params", "bias")).astype(y.dtype)
  if isinstance(module, nn.Einsum):
    _, _, rhs, out = _einsum_units(module, args, kwargs)
    return _broadcast(module, args, kwargs, y, bias, "".join(c for c in out if c in rhs))
  return _trailing(y, bias)


def _base_product(module, args, kwargs, x: jax.Array) -> jax.Array:
  """``x @ W`` without the bias, computed by the layer's own code (its contraction,
  dtypes and precision); a quantized kernel is dequantized for it, as in the base call."""
  kernel = module.get_variable("params", KERNEL_KEY)
  clone = module.clone(parent=None, use_bias=False)
  other = args[1:]
  kwargs = {k: v for k, v in kwargs.items() if k != "inputs"}

  def run(kernel, x):
    return clone.apply({"params": {KERNEL_KEY: _float_kernel(kernel)}}, x, *other, **kwargs)

  # Dequantize again in the backward pass rather than keep a float kernel per layer.
  return jax.checkpoint(run)(kernel, x) if quantization.is_quantized(kernel) else run(kernel, x)


def _check_layer(module, args, kwargs, scale, adapter_ids) -> tuple[str, ...]:
  path = _tree.join(module.path)
  if jnp.ndim(scale) != 0 or adapter_ids is not None:
    raise InputError(
        f"'{path}' holds a DoRA adapter (lora_magnitude), which does not run as an adapter bank "
        "or with per-row adapter_ids: each row would need its own column norms. Call without "
        "adapter_ids, or merge the DoRA adapter (jaxlora.merge) and bank plain LoRA adapters.")
  found = layout_lib.local_roles(module, args, kwargs)
  if found is None:
    raise InputError(f"'{path}' ({type(module).__name__}): DoRA runs on nn.Dense, nn.DenseGeneral "
                     "(without batch_dims) and nn.Einsum layers; wrap this layer without "
                     "use_dora.")
  if found[0] == layout_lib.EXPERT_DENSE:
    raise InputError(f"'{path}' (ExpertDense) holds a DoRA adapter: DoRA's per-output-unit "
                     "factor would differ per expert, which jaxlora does not implement for "
                     "grouped expert kernels. Wrap the expert layers without use_dora, or "
                     "exclude them (e.g. exclude='experts').")
  if isinstance(module, nn.Einsum) and "." in _einsum_units(module, args, kwargs)[0]:
    raise InputError(f"'{path}': DoRA cannot place its per-unit factor in the output of the "
                     f"einsum {_einsum_units(module, args, kwargs)[0]!r} (an ellipsis). Write "
                     "the equation with letters only, or wrap this layer without use_dora.")
  return found[1]


def output(module: nn.Module, args: tuple, kwargs: Mapping, y: jax.Array, x: jax.Array,
           a: jax.Array, b: jax.Array, scale: jax.Array, lowrank: Callable[..., jax.Array], *,
           dropped: bool, adapter_ids: Any = None) -> jax.Array:
  """The DoRA layer output, given the base output ``y = base(x)``.

  Args:
    module: the bound linen layer (its params hold ``lora_magnitude``).
    args, kwargs: the layer call's arguments.
    y: the base layer's output (bias included).
    x: the LoRA input in the compute dtype, dropped out when ``dropped``.
    a, b, scale: the factors and scale in the compute dtype (one layer's slice).
    lowrank: ``lowrank(x) -> s * (x @ A) @ B`` laid out like ``y``.
    dropped: whether dropout was applied to `x` (then ``x @ W`` is recomputed
      on it, as PEFT does).
    adapter_ids: per-row adapter ids of the call, refused (DoRA has no bank).

  Returns:
    ``y + (g - 1) * (x @ W) + g * s * (x @ A) @ B``.
  """
  roles = _check_layer(module, args, kwargs, scale, adapter_ids)
  dt = y.dtype
  kernel: Any = module.get_variable("params", KERNEL_KEY)
  norm = column_norm(kernel, module.get_variable("params", A_KEY),
                     module.get_variable("params", B_KEY),
                     module.get_variable("params", SCALE_KEY), roles)
  mag: Any = module.get_variable("params", MAGNITUDE_KEY)
  if tuple(jnp.shape(mag)) != tuple(norm.shape):
    raise InputError(f"'{_tree.join(module.path)}': lora_magnitude {tuple(jnp.shape(mag))} does "
                     f"not fit the kernel {tuple(kernel.shape)}: DoRA needs one value per output "
                     f"unit, {tuple(norm.shape)}.")
  g = (jnp.asarray(mag).astype(norm.dtype) / norm).astype(dt)
  g = _broadcast(module, args, kwargs, y, g, None)
  lora = lowrank(x).astype(dt)
  if dropped:
    return y + (g - 1) * _base_product(module, args, kwargs, x).astype(dt) + g * lora
  # Without dropout the base product is y less its bias (PEFT subtracts it too).
  return _rescale(y, lora, g, _bias(module, args, kwargs, y))


def _sum_to(x: jax.Array, shape: tuple[int, ...]) -> jax.Array:
  """Sums `x` over the axes where `shape` (same rank, broadcast against it) has size 1."""
  axes = tuple(i for i, (a, b) in enumerate(zip(x.shape, shape)) if b == 1 and a != 1)
  return jnp.sum(x, axis=axes, keepdims=True) if axes else x


# ``bias + g * ((y - bias) + lora)``: the DoRA output from the base output ``y`` (bias
# included), the LoRA term and the per-unit factor ``g``. The gradient of ``g`` needs
# ``(y - bias) + lora`` for every token, an output-sized buffer per layer. Here the backward
# pass rebuilds it from the output itself, ``(out - bias) / g``, so the buffer it keeps is the
# layer's output, which the next op often keeps anyway (an activation function's input): then
# DoRA keeps nothing output-sized beyond LoRA. (A unit whose magnitude is exactly 0 gets a NaN
# gradient for it, rather than a silently wrong one.)
@jax.custom_vjp
def _rescale(y: jax.Array, lora: jax.Array, g: jax.Array, bias: jax.Array | None) -> jax.Array:
  return _rescale_fwd(y, lora, g, bias)[0]


def _rescale_fwd(y, lora, g, bias):
  out = g * (y + lora) if bias is None else bias + g * ((y - bias) + lora)
  return out, (out, g, bias)


def _rescale_bwd(res, dout):
  out, g, bias = res
  gd = g * dout
  t = out if bias is None else out - bias  # g * ((y - bias) + lora)
  dg = _sum_to(dout * t, g.shape) / g
  return gd, gd, dg, None if bias is None else _sum_to(dout - gd, bias.shape)


_rescale.defvjp(_rescale_fwd, _rescale_bwd)


def refuse(mods: Any, what: str) -> None:
  """Raises an `InputError` naming the first DoRA layer among ``(path, module)`` pairs.

  >>> refuse([(("d",), {"lora_a": 0})], "jaxlora.stack")
  """
  for path_t, mod in mods:
    if MAGNITUDE_KEY in mod:
      raise InputError(
          f"'{_tree.join(path_t)}' holds a DoRA adapter (lora_magnitude); {what} takes plain "
          "LoRA adapters only (DoRA rescales each output unit by a norm of its own base and "
          "factors, which does not combine). Merge the DoRA adapter into its base "
          "(jaxlora.merge) instead.")
