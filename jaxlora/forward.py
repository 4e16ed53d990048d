"""The factored LoRA forward pass: ``y = base(x) + scale * (dropout(x) @ A) @ B``.

`apply` runs a linen apply function inside `flax.linen.intercept_methods`.
The interceptor is the single place that knows how each layer kind contracts
its input; new layer kinds (quantized kernels, DoRA, stacked adapters) add an
entry to `_HANDLERS` rather than flags in the interceptor.
"""

from __future__ import annotations

import functools
import math
import string
from collections.abc import Callable, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from jaxlora import _tree
from jaxlora import dora
from jaxlora import experts
from jaxlora import kernel_layout as layout_lib
from jaxlora import quantization
from jaxlora import tokens
from jaxlora._tree import A_KEY, B_KEY, KERNEL_KEY, MAGNITUDE_KEY, SCALE_KEY
from jaxlora.errors import InputError, InputTypeError


# Performance note (measured on XLA:CPU, GPT-2-small shapes, rank 16): the rank-r
# matmuls must be written as plain 2-D (or batch-leading 3-D) products over a flat
# token axis. Contracting the LoRA input over several leading axes, e.g. (B, T, D)
# with A over D, is correct but its backward contracts the weight gradients
# dA = x^T (g B^T) and dB = (x A)^T g over (B, T); XLA then materialises a
# transposed, feature-major copy of each activation (re-running its producer
# fusion with strided reads), which made a LoRA training step ~1.5x slower than
# the input-gradient-only floor. Flattened, those contractions read the
# activations in place and the step is within ~10% of the floor. Reshaping a
# contiguous (B, T, D) to (B*T, D) is free; the scale multiplies the small
# (N, r) intermediate.


def _lowrank(x, a, b, scale, precision):
  """``scale * (x @ a) @ b`` for 2-D ``(N, I) (I, r) (r, O)`` or batch-leading 3-D operands."""
  if x.ndim == 2:
    h = lax.dot(x, a, precision=precision) * scale
    return lax.dot(h, b, precision=precision)
  dims = lambda lc, rc: ((lc, rc), ((0,), (0,)))
  h = lax.dot_general(x, a, dims((2,), (1,)), precision=precision) * scale
  return lax.dot_general(h, b, dims((2,), (1,)), precision=precision)


def _contract_trailing(x, lead_axes, in_axes, a, b, scale, precision):
  """LoRA term for `x` contracted over `in_axes` (in A's order), result ``(*lead, *out)``."""
  perm = tuple(lead_axes) + tuple(in_axes)
  if perm != tuple(range(x.ndim)):
    x = jnp.transpose(x, perm)
  lead = x.shape[:len(lead_axes)]
  n_in = math.prod(x.shape[len(lead_axes):])
  r = a.shape[-1]
  y = _lowrank(x.reshape(-1, n_in), a.reshape(n_in, r), b.reshape(r, -1), scale, precision)
  return y.reshape(lead + b.shape[1:])


def _dense_axes(module, x):
  """(leading axes, input axes) of a Dense layer's input."""
  return list(range(x.ndim - 1)), [x.ndim - 1]


def _dense_general_axes(module, x):
  axis = module.axis if isinstance(module.axis, (tuple, list)) else (module.axis,)
  axis = sorted(ax % x.ndim for ax in axis)  # the kernel's input axes, as flax orders them
  return [i for i in range(x.ndim) if i not in axis], axis


def _dense(module, args, kwargs, x, a, b, scale):
  return _contract_trailing(x, *_dense_axes(module, x), a, b, scale, module.precision)


def _dense_general(module, args, kwargs, x, a, b, scale):
  return _contract_trailing(x, *_dense_general_axes(module, x), a, b, scale, module.precision)


def _einsum_naive(x, a, b, scale, lhs, rhs, out, roles, precision):
  free = [c for c in string.ascii_letters if c not in lhs + rhs + out]
  r = free[0]
  shared = "".join(c for c, role in zip(rhs, roles) if role == layout_lib.BATCH)
  ins = "".join(c for c, role in zip(rhs, roles) if role == layout_lib.IN)
  outs = "".join(c for c, role in zip(rhs, roles) if role == layout_lib.OUT)
  mid = "".join(c for c in lhs if c not in ins) + r
  h = jnp.einsum(f"{lhs},{shared}{ins}{r}->{mid}", x, a, precision=precision) * scale
  return jnp.einsum(f"{mid},{shared}{r}{outs}->{out}", h, b, precision=precision)


def _einsum(module, args, kwargs, x, a, b, scale):
  eq = kwargs.get("einsum_str", args[1] if len(args) > 1 else None) or module.einsum_str
  lhs, rhs, out = layout_lib.einsum_parts(eq)
  roles = layout_lib.einsum_roles(eq)
  shared = [c for c, role in zip(rhs, roles) if role == layout_lib.BATCH]
  ins = [c for c, role in zip(rhs, roles) if role == layout_lib.IN]
  outs = [c for c, role in zip(rhs, roles) if role == layout_lib.OUT]
  free = [c for c in lhs if c not in rhs]
  if ("." in lhs + out or len(set(lhs)) != len(lhs) or len(set(out)) != len(out)
      or sorted(out) != sorted(shared + free + outs)):
    # Ellipses, repeated or summed-out letters: the general (slower) einsum form.
    return _einsum_naive(x, a, b, scale, lhs, rhs, out, roles, module.precision)
  size = dict(zip(lhs, x.shape))
  if not shared:
    y = _contract_trailing(x, [lhs.index(c) for c in free], [lhs.index(c) for c in ins],
                           a, b, scale, module.precision)
  else:
    # Per-group kernels (e.g. per head): a batch-leading 3-D product per group.
    perm = [lhs.index(c) for c in shared + free + ins]
    xt = jnp.transpose(x, perm) if perm != list(range(x.ndim)) else x
    n_s = math.prod(size[c] for c in shared)
    n_in = math.prod(size[c] for c in ins)
    r = a.shape[-1]
    y = _lowrank(xt.reshape(n_s, -1, n_in), a.reshape(n_s, n_in, r),
                 b.reshape(n_s, r, -1), scale, module.precision)
    y = y.reshape(tuple(size[c] for c in shared + free) + b.shape[len(shared) + 1:])
  have = shared + free + outs  # the axis order of `y`
  perm = [have.index(c) for c in out]
  return jnp.transpose(y, perm) if perm != list(range(y.ndim)) else y


def lora_term(kind: str, module: Any, args: tuple, kwargs: Mapping, x: jax.Array, a: jax.Array,
              b: jax.Array, scale: jax.Array) -> jax.Array:
  """``scale * (x @ A) @ B`` laid out like the output of a layer of `kind`.

  For layers that are not linen modules but contract like one (`jaxlora.nnx`'s
  `nnx.Linear`, `nnx.LinearGeneral` and `nnx.Einsum` have the same ``axis``,
  ``einsum_str`` and ``precision`` attributes).

  >>> import jax.numpy as jnp
  >>> class Dense: precision = None
  >>> lora_term("Dense", Dense(), (), {}, jnp.ones((1, 2)), jnp.ones((2, 1)), jnp.ones((1, 3)),
  ...           jnp.float32(0.5)).tolist()
  [[1.0, 1.0, 1.0]]
  """
  fn = {layout_lib.DENSE: _dense, layout_lib.DENSE_GENERAL: _dense_general,
        layout_lib.EINSUM: _einsum}.get(kind)
  if fn is None:
    raise InputError(f"No LoRA term for layer kind {kind!r}; kinds: Dense, DenseGeneral, Einsum.")
  return fn(module, args, kwargs, x, a, b, scale)


# Layer kind -> function computing the LoRA term from the layer's input.
_HANDLERS: dict[type, Callable[..., jax.Array]] = {
    nn.Dense: _dense,
    nn.DenseGeneral: _dense_general,
    nn.Einsum: _einsum,
    experts.ExpertDense: experts.lora_term,  # per-expert factors on tokens sorted by expert
}


def _handler(module):
  for cls in type(module).__mro__:
    if cls in _HANDLERS:
      return _HANDLERS[cls]
  return None


# (layer kind, method) -> function computing the whole call, for adapters that replace part of
# a layer's result instead of adding a term: trained token rows of an nn.Embed table, read by
# its lookup and by a tied output head (`attend`).
_METHOD_HANDLERS: dict[tuple[type, str], Callable[..., jax.Array]] = {
    (nn.Embed, "__call__"): tokens.lookup,
    (nn.Embed, "attend"): tokens.attend,
}


def _method_handler(module, method_name):
  for cls in type(module).__mro__:
    if (cls, method_name) in _METHOD_HANDLERS:
      return _METHOD_HANDLERS[cls, method_name]
  return None


def _quantized_call(module, args, kwargs):
  """The layer computed by its own linen code on the dequantized kernel.

  An unbound clone of the module runs on a float copy of its params, so bias,
  dtype promotion, precision and the DenseGeneral/Einsum contractions are
  exactly the float layer's. The dequantization sits under `jax.checkpoint`:
  the backward pass dequantizes again instead of keeping a float kernel per
  layer alive, so no float copy of the quantized kernels outlives its layer.
  """
  own = module.variables["params"]
  rest = {k: v for k, v in _tree.module_base(own).items() if k != KERNEL_KEY}
  clone = module.clone(parent=None)
  if args:
    x, other = args[0], args[1:]
  else:
    kwargs = dict(kwargs)
    x, other = kwargs.pop("inputs"), ()

  @jax.checkpoint
  def run(kernel, rest, x):
    params = dict(rest)
    params[KERNEL_KEY] = quantization.dequantize_array(kernel)
    return clone.apply({"params": params}, x, *other, **kwargs)

  return run(own[KERNEL_KEY], rest, x)


# Layer kind -> (batch-leading axes, input axes) of its input, for per-row adapters.
_ROW_AXES = {nn.Dense: _dense_axes, nn.DenseGeneral: _dense_general_axes}


def _row_term(module, x, a, b, scale, ids):
  """Per-row LoRA terms: row i uses adapter ``ids[i]`` of the bank (``-1``: none).

  The factors are gathered per row and contracted as batched products (one
  gather per layer, no loop over adapters); the gather's transpose sends each
  row's gradient to its own adapter.
  """
  path = _tree.join(module.path)
  axes_fn = next((_ROW_AXES[c] for c in type(module).__mro__ if c in _ROW_AXES), None)
  if axes_fn is None:
    raise InputError(f"'{path}' ({type(module).__name__}) holds an adapter bank, but per-row "
                     "adapters run on nn.Dense and nn.DenseGeneral layers only; leave this "
                     "layer out of the bank's adapters.")
  lead, ins = axes_fn(module, x)
  n = scale.shape[0]
  if not lead or lead[0] != 0 or x.shape[0] != ids.shape[0]:
    raise InputError(f"'{path}': adapter_ids has {ids.shape[0]} rows but the layer's input is "
                     f"{tuple(x.shape)}; per-row adapters need the batch axis first, one id "
                     "per row.")
  if not isinstance(ids, jax.core.Tracer):
    bad = [int(i) for i in jax.device_get(ids) if not -1 <= int(i) < n]
    if bad:
      raise InputError(f"adapter_ids holds {bad[0]}, out of range for a bank of {n} adapters "
                       "(-1 is the base alone).")
  rows = x.shape[0]
  xt = jnp.transpose(x, lead + ins) if lead + ins != list(range(x.ndim)) else x
  rest = xt.shape[1:len(lead)]
  n_in = math.prod(xt.shape[len(lead):])
  r = a.shape[-1]
  safe = jnp.clip(ids, 0, n - 1)
  # Rows of the base alone get scale 0; ids out of range (under jit) come out NaN.
  s = jnp.where(ids < 0, 0, jnp.where(ids < n, scale[safe], jnp.nan)).astype(x.dtype)
  y = _lowrank(xt.reshape(rows, -1, n_in), a[safe].reshape(rows, n_in, r),
               b[safe].reshape(rows, r, -1), s[:, None, None], module.precision)
  return y.reshape((rows,) + rest + b.shape[2:])


def _make_interceptor(dropout: float, reached: set[str], adapter_ids=None,
                      wants_dropout: bool = False):
  def interceptor(next_fun, args, kwargs, context):
    module = context.module
    whole = _method_handler(module, context.method_name)
    if whole is not None:
      return whole(module, next_fun, args, kwargs, reached)
    handler = _handler(module) if context.method_name == "__call__" else None
    if handler is None:
      return next_fun(*args, **kwargs)
    if module.has_variable("params", KERNEL_KEY) and quantization.is_quantized(
        module.get_variable("params", KERNEL_KEY)):
      y = _quantized_call(module, args, kwargs)
    else:
      y = next_fun(*args, **kwargs)
    if not module.has_variable("params", A_KEY):
      return y
    reached.add(_tree.join(module.path))
    x = args[0] if args else kwargs["inputs"]
    dt = y.dtype  # the layer's compute dtype
    a = module.get_variable("params", A_KEY).astype(dt)
    b = module.get_variable("params", B_KEY).astype(dt)
    scale = jnp.asarray(module.get_variable("params", SCALE_KEY)).astype(dt)
    x = jnp.asarray(x).astype(dt)
    dropped = dropout > 0.0 and module.scope.has_rng("dropout")
    if wants_dropout and not dropped:
      # A lifted transform (nn.scan, nn.vmap) that does not pass the stream on would turn
      # dropout off for these layers without a word.
      raise InputError(f"LoRA dropout: the call passed a 'dropout' rng, but layer "
                       f"'{_tree.join(module.path)}' does not see it; the nn.scan/nn.vmap "
                       "around it must pass it on: split_rngs={'params': True, "
                       "'dropout': True}.")
    if dropped:
      keep = jax.random.bernoulli(module.make_rng("dropout"), 1.0 - dropout, x.shape)
      x = jnp.where(keep, x / (1.0 - dropout), jnp.zeros_like(x))
    if module.has_variable("params", MAGNITUDE_KEY):  # DoRA (jaxlora/dora.py)
      return dora.output(module, args, kwargs, y, x, a, b, scale,
                         lambda xd: handler(module, args, kwargs, xd, a, b, scale),
                         dropped=dropped, adapter_ids=adapter_ids)
    if scale.ndim == 1:  # a bank: one scale per adapter (stacked layer axes are sliced off)
      if adapter_ids is None:
        raise InputError(f"'{_tree.join(module.path)}' holds an adapter bank of "
                         f"{scale.shape[0]} adapters: call with adapter_ids= (one id per row; "
                         "Bank.ids(names) makes them).")
      return y + _row_term(module, x, a, b, scale, jnp.asarray(adapter_ids)).astype(dt)
    return y + handler(module, args, kwargs, x, a, b, scale).astype(dt)
  return interceptor


def apply(apply_fn: Callable[..., Any], *, dropout: float = 0.0,
          check_reached: bool = True) -> Callable[..., Any]:
  """Makes a linen apply function compute the factored LoRA path.

  Every ``nn.Dense``, ``nn.DenseGeneral`` and ``nn.Einsum`` call whose params
  hold an adapter returns ``base(x) + scale * (dropout(x) @ A) @ B``, computed in
  the layer's compute dtype, also inside ``nn.scan`` and ``nn.remat``. The full
  ``W + scale * A @ B`` is never formed, so the backward pass computes no
  kernel-sized gradient.

  Dropout on the LoRA input is active when the call provides a ``'dropout'``
  rng (``rngs={'dropout': key}``), as in training; without it (evaluation) the
  LoRA input is used as is. Layers inside ``nn.scan``/``nn.vmap`` see the rng
  only if the transform passes it on (``split_rngs={'params': True, 'dropout':
  True}``); otherwise the call raises rather than train without dropout.

  On an adapter bank (`jaxlora.stack`) the returned function takes
  ``adapter_ids=``, an int array ``(batch,)``: row ``i`` is computed with
  adapter ``adapter_ids[i]`` (``-1``: the base alone), all rows in one pass.

  Args:
    apply_fn: usually ``model.apply``; its first argument is the variables.
    dropout: LoRA dropout rate in ``[0, 1)``.
    check_reached: raise if an adapter in the variables was never used by a
      call (a custom layer the interceptor cannot see). Skipped for calls with
      ``method=``, which may run only part of the model.

  Returns:
    A function with ``apply_fn``'s signature.

  Raises:
    ValueError: on a bad dropout rate, or (when called) an adapter that no
      layer reached.

  >>> import jax, jax.numpy as jnp, flax.linen as nn, jaxlora
  >>> model = nn.Dense(3)
  >>> x = jnp.ones((2, 4))
  >>> params = model.init(jax.random.key(0), x)['params']
  >>> wrapped = jaxlora.wrap(params, rank=2, targets='.*', key=jax.random.key(1))
  >>> y = jaxlora.apply(model.apply)({'params': wrapped}, x)
  >>> bool(jnp.array_equal(y, model.apply({'params': params}, x)))  # B starts at zero
  True
  """
  if not callable(apply_fn):
    raise InputTypeError(f"`apply_fn` must be callable (e.g. model.apply), got {apply_fn!r}.")
  if not 0.0 <= dropout < 1.0:
    raise InputError(f"`dropout` must be in [0, 1), got {dropout!r}.")

  @functools.wraps(apply_fn)
  def lora_apply(*args: Any, adapter_ids: Any = None, **kwargs: Any) -> Any:
    reached: set[str] = set()
    if adapter_ids is not None:
      adapter_ids = jnp.asarray(adapter_ids)
      if adapter_ids.ndim != 1 or not jnp.issubdtype(adapter_ids.dtype, jnp.integer):
        raise InputError(f"adapter_ids must be an integer array of shape (batch,), got "
                         f"{adapter_ids.dtype} {tuple(adapter_ids.shape)}.")
    rngs = kwargs.get("rngs")
    wants = dropout > 0.0 and isinstance(rngs, Mapping) and rngs.get("dropout") is not None
    with nn.intercept_methods(_make_interceptor(dropout, reached, adapter_ids, wants)):
      out = apply_fn(*args, **kwargs)
    variables = args[0] if args else kwargs.get("variables")
    if check_reached and "method" not in kwargs and isinstance(variables, Mapping):
      params = variables.get("params", {})
      mods = _tree.adapter_modules(params) + tokens.token_modules(params)
      have = {_tree.join(p) for p, _ in mods}
      missed = sorted(have - reached)
      if missed:
        raise InputError(
            f"Adapters at {missed[:5]} were never reached: no nn.Dense, nn.DenseGeneral or "
            "nn.Einsum call (nn.Embed, for trained tokens) used them (a custom layer doing its "
            "own matmul or lookup?). Exclude them "
            "when wrapping, or run the model on `jaxlora.merge(tree)` (merge on the fly), "
            "which works for any layer. Pass check_reached=False to skip this check.")
    return out

  return lora_apply
