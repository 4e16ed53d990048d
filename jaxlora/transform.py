"""The LoRA transform of a param tree: wrap, merge, unmerge, split, combine, inspect."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxlora import _tree
from jaxlora import dora
from jaxlora import extras
from jaxlora import initialisation
from jaxlora import kernel_layout as layout_lib
from jaxlora import model_api
from jaxlora import targets as targets_lib
from jaxlora import tokens
from jaxlora._tree import (A_KEY, B_KEY, INIT_A_KEY, INIT_B_KEY, INIT_SCALE_KEY, KERNEL_KEY,
                           MAGNITUDE_KEY, SCALE_KEY)
from jaxlora.errors import InputError, InputTypeError

PyTree = Any


def _check_rank(value: Any, what: str) -> int:
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value <= 0:
    raise InputError(f"{what} must be a positive integer, got {value!r}. "
                     "Typical LoRA ranks are 4 to 64.")
  return int(value)


def kernel_roles(path: str, kernel: Any, layout: layout_lib.Layout | None) -> tuple[str, ...]:
  """The role of each axis of the kernel at `path` (from `layout`, or 2-D), or a ValueError."""
  shape = tuple(kernel.shape)
  if layout is not None:
    info = layout.kernels.get(path)
    if info is None:
      seen = ", ".join(repr(p) for p in sorted(layout.kernels)[:6]) or "none"
      raise InputError(
          f"Kernel '{path}/kernel' {shape} was not used by any nn.Dense, nn.DenseGeneral "
          f"or nn.Einsum call while the layout was traced (layers seen: {seen}), so "
          "`jaxlora.apply` could never reach an adapter on it. Remove it from `targets` "
          "(or add it to `exclude`), or train it through `jaxlora.merge` on the fly.")
    if len(info.roles) != len(shape):
      raise InputError(
          f"Kernel '{path}/kernel' has shape {shape} but the layout recorded "
          f"{len(info.roles)} axes {info.roles}; was the layout traced on another model?")
    return info.roles
  if len(shape) == 2:
    return (layout_lib.IN, layout_lib.OUT)
  raise InputError(
      f"Kernel '{path}/kernel' has {len(shape)} axes {shape}: whether each is an input, "
      "output or stacked-layer axis (nn.scan, DenseGeneral, Einsum) cannot be read from "
      "the tree. Pass a layout traced from the model: `jaxlora.wrap(params, ..., "
      "layout=jaxlora.trace_layout(model.apply, {'params': params}, *example_inputs))`, "
      "or layout=model for a model that provides one (jaxlora.models.Decoder).")


def wrap(params: PyTree, *, key: jax.Array | None = None, rank: int = 16,
         alpha: float | None = None,
         targets: targets_lib.Selector = "all-linear",
         exclude: targets_lib.Selector | None = None,
         rank_pattern: Mapping[str, int] | None = None,
         alpha_pattern: Mapping[str, float] | None = None,
         use_rslora: bool = False, init: str = "kaiming", dtype: Any = None,
         layout: layout_lib.Layout | model_api.LayoutProvider | None = None,
         train_extra: str | Sequence[str] | None = None, bias: str = "none",
         use_dora: bool = False,
         trainable_tokens: tokens.TokenSelector | None = None) -> PyTree:
  """Adds LoRA factors beside the selected kernels of a Flax param tree.

  Each selected module dict gains ``lora_a`` (``(*stacked, *in_axes, r)``),
  ``lora_b`` (``(*stacked, r, *out_axes)``, zeros, so the wrapped model equals the
  base model) and ``lora_scale`` (``alpha / r``, or ``alpha / sqrt(r)`` with
  rsLoRA; one value per stacked layer). The scale is a frozen leaf: merge, save
  and export read it from the tree, and changing it does not recompile.

  Args:
    params: linen params, with or without the outer ``{'params': ...}``; arrays
      or tracers (works under ``jax.eval_shape``).
    key: PRNG key for the initialisation of A. Defaults to ``jax.random.key(0)``,
      so an unkeyed call is reproducible (PEFT seeds its init the same way); pass
      your own key to draw a different A.
    rank: LoRA rank ``r``.
    alpha: LoRA alpha; defaults to ``rank``.
    targets: which kernels to adapt (see `jaxlora.targets`): a regex searched in
      the '/'-joined module path, a callable ``(path, kernel) -> bool``, a tuple
      of these, or ``'all-linear'`` (every Dense-like kernel but the output head).
    exclude: kernels to leave out, same language as ``targets``.
    rank_pattern: ``{regex: rank}``; the first regex found in a path sets its rank.
    alpha_pattern: ``{regex: alpha}``, likewise (otherwise ``alpha``).
    use_rslora: scale by ``alpha / sqrt(r)`` (rank-stabilised LoRA).
    init: as PEFT's ``init_lora_weights``. ``'kaiming'`` (PEFT's default:
      A ~ U(-1/sqrt(fan_in), 1/sqrt(fan_in)), B = 0) or ``'gaussian'`` (A ~ N(0,
      std 1/r), B = 0) leave the kernel alone. ``'pissa'`` (full SVD),
      ``'pissa_niter_K'`` (randomized SVD with K subspace iterations, drawn
      from `key`, e.g. ``'pissa_niter_4'``) and ``'olora'`` (QR) put a rank-r
      part of each kernel (per stacked layer) into A and B and replace the
      kernel by the residual ``W - scale * A @ B``, so the wrapped model still
      computes the base; a quantized kernel's residual is quantized again
      (host side). The module keeps the initial factors and scale
      (``lora_init_a``, ``lora_init_b``, ``lora_init_scale``, frozen), so an
      adapter checkpoint loads onto the original base (`jaxlora.load` rebuilds
      the residual) and `jaxlora.peft.save` writes an adapter for the original
      base (`jaxlora.peft.convert_to_lora`). See `jaxlora.initialisation`. ``'loftq'`` is not
      implemented.
    dtype: adapter dtype; default float32 for low-precision kernels, else the
      kernel's dtype.
    layout: the kernel layout, needed for kernels with more than two axes
      (N-D and ``nn.scan``-stacked): a `jaxlora.Layout` from
      `jaxlora.trace_layout`, or a model that provides its own
      (`jaxlora.model_api.LayoutProvider`: ``layout=model`` calls
      ``model.lora_layout(params)``; `jaxlora.models.Decoder` and
      `jaxlora.model_api.LinenModel` do). Anything else is an
      `InputTypeError`.
    train_extra: regex (or list of regexes) searched in '/'-joined module
      paths: those whole modules (e.g. ``r'lm_head$'``, a classification head,
      layer norms) train in full beside the adapters, as PEFT's
      ``modules_to_save``. They get a frozen marker leaf (``lora_extra``);
      `split`, `optimizer`, `adapter` and the checkpoints include their leaves.
    bias: ``'none'`` (default), ``'all'`` (every ``bias`` leaf of the model
      trains) or ``'lora_only'`` (the biases of the adapted modules), as PEFT's
      ``bias``; marked with a ``lora_bias`` leaf.
    use_dora: DoRA (weight-decomposed LoRA, as PEFT's ``use_dora``): each
      adapted module also gets ``lora_magnitude``, a trainable magnitude per
      output unit ``(*stacked, *batch, *out_axes)`` in the adapter dtype,
      initialised to the norms of ``W + scale*A@B`` over the input axes
      (see `jaxlora.dora`).
    trainable_tokens: token ids whose embedding rows train on their own, as
      PEFT's ``trainable_token_indices``: a list (the input embedding; a tied
      output head reads the same rows) or ``{module path regex: ids}``. The
      table's module gains ``lora_token_ids`` (frozen) and ``lora_token_rows``
      (``E[ids]`` in the adapter dtype, trained); see `jaxlora.tokens`.

  Returns:
    A new tree of the same form with the adapter leaves added.

  Raises:
    ValueError: bad rank, targets that match nothing, an already wrapped tree,
      or a kernel whose axis layout is unknown.

  >>> import jax, jax.numpy as jnp, flax.linen as nn, jaxlora
  >>> class MLP(nn.Module):
  ...   @nn.compact
  ...   def __call__(self, x):
  ...     return nn.Dense(3, name='out')(nn.relu(nn.Dense(8, name='hidden')(x)))
  >>> params = MLP().init(jax.random.key(0), jnp.ones((1, 4)))['params']
  >>> wrapped = jaxlora.wrap(params, rank=2, targets='hidden', key=jax.random.key(1))
  >>> jax.tree.map(jnp.shape, wrapped['hidden'])
  {'bias': (8,), 'kernel': (4, 8), 'lora_a': (4, 2), 'lora_b': (2, 8), 'lora_scale': ()}
  """
  rank = _check_rank(rank, "`rank`")
  initialisation.check(init)
  extras.check(train_extra, bias)
  if key is None:
    key = jax.random.key(0)
  layout = model_api.resolve_layout(layout, params)
  p = _tree.get_params(params)
  boxed = jax.tree.leaves(p, is_leaf=lambda x: isinstance(x, nn.meta.AxisMetadata))
  if any(isinstance(x, nn.meta.AxisMetadata) for x in boxed):
    raise InputTypeError("The params hold boxed leaves (nn.LogicallyPartitioned from model.init); "
                         "unbox them first: params = flax.linen.unbox(params).")
  wrapped = _tree.adapter_modules(p)
  if wrapped:
    raise InputError(
        f"This tree is already wrapped (adapter leaves at '{_tree.join(wrapped[0][0])}'). "
        "Wrap the base params instead, or use `jaxlora.merge(tree)` first to fold the "
        "current adapter into the kernels.")
  kernels = _tree.kernel_modules(p)
  if not kernels:
    raise InputError("No kernel leaves (dicts holding a 'kernel' with >= 2 axes) found in "
                     "the tree; pass Flax linen params from `model.init(...)`.")
  select = targets_lib.compile_selector(targets, layout=layout, what="targets")
  skip = targets_lib.compile_selector(exclude, layout=layout, what="exclude")
  chosen = []
  for path_t, mod in kernels:
    path = _tree.join(path_t)
    kernel = mod[KERNEL_KEY]
    if select(path, kernel) and not skip(path, kernel):
      chosen.append((path_t, path, mod))
  if not chosen:
    sample = ", ".join(repr(_tree.join(pt)) for pt, _ in kernels[:8])
    more = f" and {len(kernels) - 8} more" if len(kernels) > 8 else ""
    raise InputError(
        f"targets={targets_lib.describe(targets)!r} (exclude="
        f"{targets_lib.describe(exclude)!r}) matched no kernel. Module paths with "
        f"kernels: {sample}{more}. Regexes are searched in these paths, e.g. "
        "targets=r'(q|v)$'.")

  base_alpha = rank if alpha is None else alpha
  keys = jax.random.split(key, len(chosen))
  new_modules = {}
  for k, (path_t, path, mod) in zip(keys, chosen):
    kernel = mod[KERNEL_KEY]
    shape = tuple(kernel.shape)
    roles = kernel_roles(path, kernel, layout)
    if use_dora and layout is not None and layout[path].kind == layout_lib.EXPERT_DENSE:
      raise InputError(f"use_dora=True selects '{path}', an ExpertDense (stacked expert "
                       "kernels), where DoRA is not supported. Leave the experts out with "
                       "exclude='experts', or wrap without use_dora.")
    r = _check_rank(targets_lib.match_pattern(rank_pattern, path, rank), f"rank for '{path}'")
    a = float(targets_lib.match_pattern(alpha_pattern, path, base_alpha))
    n_in = layout_lib.fan_in(shape, roles)
    n_out = math.prod(d for d, role in zip(shape, roles) if role == layout_lib.OUT)
    if r > min(n_in, n_out):
      raise InputError(
          f"rank {r} for '{path}' exceeds the kernel's smallest side: kernel {shape} maps "
          f"{n_in} inputs to {n_out} outputs, so the rank must be at most {min(n_in, n_out)}. "
          "Lower `rank` or set it for this layer with `rank_pattern`.")
    a_shape, b_shape, s_shape = layout_lib.adapter_shapes(shape, roles, r)
    n_stack = sum(role == layout_lib.STACK for role in roles)
    if layout_lib.infer_roles(shape, a_shape, b_shape, n_stack) != [roles]:
      raise InputError(
          f"Kernel '{path}/kernel' {shape} has axes {roles}: its input and output axes "
          "interleave in a way that cannot be told apart from the shapes of A and B, "
          "so merge and export could not place them. Exclude this layer, or reorder the "
          "kernel axes in the model's einsum equation (batch, inputs, then outputs).")
    adt = jnp.dtype(dtype) if dtype is not None else _tree.wide_float(kernel.dtype)
    scale = a / math.sqrt(r) if use_rslora else a / r
    new = dict(mod)
    new[KERNEL_KEY], new[A_KEY], new[B_KEY] = initialisation.factors(
        init, k, path, kernel, roles, r, scale, adt)
    new[SCALE_KEY] = jnp.full(s_shape, scale, jnp.float32)
    if initialisation.mutates_base(init):  # keep what the residual was split off with
      new[INIT_A_KEY], new[INIT_B_KEY] = new[A_KEY], new[B_KEY]
      new[INIT_SCALE_KEY] = new[SCALE_KEY]
    if use_dora:  # from the kernel `factors` returned (an init may have changed it)
      new[MAGNITUDE_KEY] = dora.magnitude(new[KERNEL_KEY], new[A_KEY], new[B_KEY], scale,
                                          roles, adt)
    new_modules[path_t] = new
  out = _tree.replace_modules(p, new_modules)
  out = extras.mark(out, train_extra=train_extra, bias=bias, layout=layout)
  if trainable_tokens is not None:
    out = tokens.add(out, trainable_tokens, dtype=dtype)
  return _tree.with_params(params, out)


def _delta(path: str, kernel: Any, mod: Mapping) -> jax.Array:
  """`scale * A @ B` laid out like the kernel, in float32 or wider."""
  a, b, scale = mod[A_KEY], mod[B_KEY], jnp.asarray(mod[SCALE_KEY])
  roles = layout_lib.roles_from_shapes(path, kernel.shape, a.shape, b.shape, scale.ndim)
  letters = [chr(ord("a") + i) for i in range(len(roles))]
  shared = [c for c, r in zip(letters, roles) if r in (layout_lib.STACK, layout_lib.BATCH)]
  ins = [c for c, r in zip(letters, roles) if r == layout_lib.IN]
  outs = [c for c, r in zip(letters, roles) if r == layout_lib.OUT]
  eq = f"{''.join(shared + ins)}z,{''.join(shared)}z{''.join(outs)}->{''.join(letters)}"
  ct = _tree.wide_float(a.dtype, b.dtype, kernel.dtype)
  d = jnp.einsum(eq, a.astype(ct), b.astype(ct), precision=jax.lax.Precision.HIGHEST)
  return d * scale.astype(ct).reshape(scale.shape + (1,) * (d.ndim - scale.ndim))


def merge(tree: PyTree, *, requantize: bool = False) -> PyTree:
  """Folds each adapter into its kernel: ``W + scale * A @ B``, adapters removed.

  The sum is computed in float32 (or wider) and stored in the kernel's dtype.
  The result is a plain param tree for the base model: zero-latency inference,
  or a differentiable "merge on the fly" path for layers `jaxlora.apply` does
  not reach.

  A quantized base (`jaxlora.quantize`) merges into a FLOAT tree: each
  quantized kernel is dequantized (plus its adapter's product, if it has one),
  so the result runs with plain ``model.apply`` and exports as a float
  checkpoint. With ``requantize=True`` the quantized kernels stay quantized
  instead: adapted ones are quantized again, with their own type, block size
  and double quantization, which adds a second rounding (a merged 4-bit model
  no longer equals the adapter on the 4-bit base). Requantizing runs on the
  host and cannot be traced.

  Args:
    tree: a wrapped tree (params or variables).
    requantize: keep quantized kernels quantized (see above).

  Returns:
    The same form of tree without adapter leaves.

  >>> import jax, jax.numpy as jnp, jaxlora
  >>> params = {'dense': {'kernel': jnp.zeros((2, 2))}}
  >>> t = jaxlora.wrap(params, rank=1, key=jax.random.key(0))
  >>> t['dense']['lora_b'] = jnp.ones((1, 2))
  >>> merged = jaxlora.merge(t)
  >>> sorted(merged['dense']), bool(jnp.allclose(merged['dense']['kernel'], t['dense']['lora_a']))
  (['kernel'], True)
  """
  from jaxlora import quantization  # pylint: disable=import-outside-toplevel
  p = _tree.get_params(tree)
  new = {}
  for path_t, mod in _tree.adapter_modules(p):
    path = _tree.join(path_t)
    kernel = mod[KERNEL_KEY]
    out = _tree.module_base(mod)
    wide = _tree.wide_float(kernel.dtype)
    merged = kernel.astype(wide) + _delta(path, kernel, mod)
    if MAGNITUDE_KEY in mod:  # DoRA: m * (W + sAB) / ||W + sAB|| per output unit
      merged = dora.fold(path, merged, mod)
    merged = merged.astype(kernel.dtype)
    if requantize and quantization.is_quantized(kernel):
      merged = quantization.requantize_like(merged, kernel)
    out[KERNEL_KEY] = merged
    new[path_t] = out
  result = tokens.merge_rows(_tree.replace_modules(p, new))  # trained tokens: rows into tables
  if not requantize:
    result = quantization.dequantize(result)
  # Markers of fully trained modules and biases go; the trained values stay in the base.
  result = _tree.base_leaves(result, prune=False)
  return _tree.with_params(tree, result)


def unmerge(merged: PyTree, adapter_tree: PyTree, *,
            norms: Mapping[str, Any] | None = None) -> PyTree:
  """Inverse of `merge`: subtracts ``scale * A @ B`` and puts the adapter back.

  Args:
    merged: params returned by `merge` (or any base with those kernels).
    adapter_tree: a tree holding the adapter leaves (`adapter(tree)` or a whole
      wrapped tree).
    norms: DoRA adapters only: ``jaxlora.dora.weight_norms(tree)`` of the
      wrapped tree, taken before merging. A merged DoRA kernel
      ``m * (W + s*A@B) / ||W + s*A@B||`` has column norms ``m`` whatever ``W``
      was, so the norms ``||W + s*A@B||`` it divided by cannot be recovered
      from it and the adapter; with them the inverse is exact
      (``W = merged * norms / m - s*A@B``, up to rounding).

  Returns:
    A wrapped tree: restored kernels plus the adapter leaves. In float32 the
    kernels equal the originals up to rounding (not bit for bit).

  Raises:
    ValueError: if an adapter has no kernel in `merged` or does not fit it, or
      a DoRA adapter comes without its ``norms``.

  >>> import jax, jax.numpy as jnp, jaxlora
  >>> params = {'dense': {'kernel': jnp.eye(2)}}
  >>> t = jaxlora.wrap(params, rank=1, key=jax.random.key(0))
  >>> t['dense']['lora_b'] = jnp.ones((1, 2))
  >>> back = jaxlora.unmerge(jaxlora.merge(t), jaxlora.adapter(t))
  >>> bool(jnp.allclose(back['dense']['kernel'], jnp.eye(2), atol=1e-6))
  True
  """
  p = _tree.get_params(merged)
  ad = _tree.get_params(adapter_tree)
  if _tree.adapter_modules(p):
    raise InputError("`merged` already holds adapter leaves; pass the output of "
                     "`jaxlora.merge`, not a wrapped tree.")
  mods = _tree.adapter_modules(ad)
  if not mods:
    raise InputError("`adapter_tree` holds no adapter leaves (lora_a/lora_b/lora_scale).")
  new = {}
  for path_t, amod in mods:
    path = _tree.join(path_t)
    node = _tree.lookup(p, path_t, None)
    if not isinstance(node, Mapping):
      raise InputError(
          f"The adapter has a layer at '{path}' but the merged params have no such "
          "module; the adapter belongs to another model.")
    if KERNEL_KEY not in node:
      raise InputError(f"The merged params have no kernel at '{path}/kernel' for the adapter.")
    kernel = node[KERNEL_KEY]
    missing = [k for k in _tree.LORA_KEYS if k not in amod]
    if missing:
      raise InputError(f"Adapter at '{path}' lacks {missing}.")
    scale = jnp.asarray(amod[SCALE_KEY])
    if tuple(kernel.shape[:scale.ndim]) != tuple(scale.shape):
      raise InputError(
          f"Adapter at '{path}' has lora_scale {tuple(scale.shape)} but the kernel is "
          f"{tuple(kernel.shape)}; the adapter belongs to another model.")
    wide = _tree.wide_float(kernel.dtype)
    out = dict(node)
    restored = kernel.astype(wide)
    if MAGNITUDE_KEY in amod:  # DoRA: back to W + sAB through the norms taken before merging
      restored = dora.unfold(path, restored, amod, norms)
    out[KERNEL_KEY] = (restored - _delta(path, kernel, amod)).astype(kernel.dtype)
    for k in _tree.ADAPTER_KEYS:
      if k in amod:
        out[k] = amod[k]
    new[path_t] = out
  out = tokens.unmerge_rows(_tree.replace_modules(p, new), ad)  # trained tokens, if any
  # Marked modules and biases: `merge` kept their trained values; put the markers back.
  markers = _tree.filter_tree(ad, lambda k: k in _tree.MARKER_KEYS, prune=True)
  return _tree.with_params(merged, _tree.overlay(out, markers))


def split(tree: PyTree) -> tuple[PyTree, PyTree]:
  """Splits a wrapped tree into ``(trainable, frozen)``; `combine` undoes it.

  ``trainable`` holds only the ``lora_a``/``lora_b`` leaves (dicts without any
  are dropped); ``frozen`` holds everything else, ``lora_scale`` included.
  Differentiate with respect to ``trainable`` alone so that neither gradients
  nor optimizer state exist for the base.

  Args:
    tree: a wrapped tree (params or variables).

  Returns:
    ``(trainable, frozen)``, two nested dicts of the same form as ``tree``.

  Raises:
    ValueError: if the tree holds no adapter.

  >>> import jax, jax.numpy as jnp, jaxlora
  >>> t = jaxlora.wrap({'d': {'kernel': jnp.ones((4, 4))}}, rank=2, key=jax.random.key(0))
  >>> trainable, frozen = jaxlora.split(t)
  >>> sorted(trainable['d']), sorted(frozen['d'])
  (['lora_a', 'lora_b'], ['kernel', 'lora_scale'])
  """
  if not isinstance(tree, Mapping):
    raise InputTypeError(f"`split` takes a nested dict, got {type(tree).__name__}.")
  trainable = _tree.trainable_leaves(tree)
  if not trainable:
    raise InputError("The tree holds no adapter (no 'lora_a'/'lora_b' leaves); "
                     "call `jaxlora.wrap(params, ...)` first.")
  frozen = _tree.frozen_leaves(tree)
  return trainable, frozen


def combine(trainable: PyTree, frozen: PyTree) -> PyTree:
  """Joins the two halves returned by `split` back into one tree.

  Args:
    trainable: the first half (possibly updated by an optimizer).
    frozen: the second half.

  Returns:
    The full wrapped tree.

  >>> import jax, jax.numpy as jnp, jaxlora
  >>> t = jaxlora.wrap({'d': {'kernel': jnp.ones((4, 4))}}, rank=2, key=jax.random.key(0))
  >>> back = jaxlora.combine(*jaxlora.split(t))
  >>> jax.tree.structure(back) == jax.tree.structure(t)
  True
  """
  return _tree.merge_trees(frozen, trainable)


def adapter(tree: PyTree) -> PyTree:
  """The adapter leaves alone (``lora_a``, ``lora_b``, ``lora_scale``): what a checkpoint saves.

  Args:
    tree: a wrapped tree.

  Returns:
    A nested dict of the same form holding only adapter leaves.

  >>> import jax, jax.numpy as jnp, jaxlora
  >>> t = jaxlora.wrap({'d': {'kernel': jnp.ones((4, 4))}}, rank=2, key=jax.random.key(0))
  >>> jax.tree.map(jnp.shape, jaxlora.adapter(t))
  {'d': {'lora_a': (4, 2), 'lora_b': (2, 4), 'lora_scale': ()}}
  """
  return _tree.adapter_leaves(tree)


@dataclasses.dataclass(frozen=True)
class LayerSummary:
  """One adapted kernel."""
  path: str
  kernel_shape: tuple[int, ...]
  rank: int
  scale: float | None
  alpha: float | None  # the lora_alpha giving this scale without rsLoRA: scale * rank
  a_shape: tuple[int, ...]
  b_shape: tuple[int, ...]
  params: int


@dataclasses.dataclass(frozen=True)
class Summary:
  """Per-layer adapter report and parameter counts (``str()`` renders a table)."""
  layers: tuple[LayerSummary, ...]
  trainable: int
  total: int

  @property
  def trainable_fraction(self) -> float:
    return self.trainable / self.total if self.total else 0.0

  def __str__(self) -> str:
    rows = [("path", "kernel", "rank", "alpha", "scale", "lora_a", "lora_b", "params")]
    fmt = lambda v: "?" if v is None else f"{v:g}"
    for l in self.layers:
      rows.append((l.path, str(l.kernel_shape), str(l.rank), fmt(l.alpha), fmt(l.scale),
                   str(l.a_shape), str(l.b_shape), f"{l.params:,}"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    lines.append(f"trainable {self.trainable:,} of {self.total:,} parameters "
                 f"({100 * self.trainable_fraction:.3f}%)")
    return "\n".join(lines)


def _concrete_scale(scale: Any) -> float | None:
  if not isinstance(scale, (jax.Array, np.ndarray, float, int)) or isinstance(scale, jax.core.Tracer):
    return None  # abstract (ShapeDtypeStruct or tracer): no value to report
  values = np.unique(np.asarray(scale))
  return float(values[0]) if values.size == 1 else None


def summary(tree: PyTree) -> Summary:
  """Per-layer rank, alpha, scale and shapes, and trainable/total parameter counts.

  ``alpha`` is reported as ``scale * rank``: the PEFT ``lora_alpha`` that gives
  the same scale without rsLoRA. ``total`` counts base and adapter parameters.

  Args:
    tree: a wrapped tree.

  Returns:
    A `Summary`; ``print(summary)`` shows a table.

  >>> import jax, jax.numpy as jnp, jaxlora
  >>> t = jaxlora.wrap({'d': {'kernel': jnp.ones((4, 4))}}, rank=2, key=jax.random.key(0))
  >>> s = jaxlora.summary(t)
  >>> s.trainable, s.total, s.layers[0].alpha
  (16, 32, 2.0)
  """
  p = _tree.get_params(tree)
  layers = []
  for path_t, mod in _tree.adapter_modules(p):
    a, b = mod[A_KEY], mod[B_KEY]
    r = int(a.shape[-1])
    scale = _concrete_scale(mod.get(SCALE_KEY))
    layers.append(LayerSummary(
        _tree.join(path_t), tuple(mod[KERNEL_KEY].shape), r, scale,
        None if scale is None else scale * r, tuple(a.shape), tuple(b.shape),
        int(math.prod(a.shape) + math.prod(b.shape)
            + (math.prod(jnp.shape(mod[MAGNITUDE_KEY])) if MAGNITUDE_KEY in mod else 0))))
  added = sum(l.params for l in layers) + tokens.count(p)
  # Base leaves that train in full (train_extra, bias) count as trainable, and once in total.
  full = sum(int(math.prod(jnp.shape(x))) for x in
             jax.tree.leaves(_tree.filter_leaves(p, _tree.is_trained_base, prune=True)))
  from jaxlora.quantization import is_quantized  # pylint: disable=import-outside-toplevel
  # A quantized kernel counts as the parameters it stands for, not its stored bytes.
  base = sum(int(math.prod(x.shape)) for x in
             jax.tree.leaves(_tree.base_leaves(p, prune=True), is_leaf=is_quantized))
  return Summary(tuple(layers), added + full, base + added)
