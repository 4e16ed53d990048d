"""LoRA for Flax NNX models: in-place surgery on `nnx.Linear`, `nnx.LinearGeneral` and `nnx.Einsum`.

`wrap` replaces each selected layer of an NNX module by a `LoRA` layer that
holds the original layer (``base_layer``) and the factors A and B as
`LoRAParam` variables, so NNX's own filters pick them::

  model = jaxlora.nnx.wrap(model, rank=16, targets="all-linear", key=jax.random.key(0))
  optimizer = nnx.Optimizer(model, optax.adamw(1e-4), wrt=jaxlora.nnx.LoRAParam)
  graphdef, lora, rest = nnx.split(model, jaxlora.nnx.LoRAParam, ...)

Only the factors train: the base kernels are `nnx.Param` and the scale a
frozen `LoRAScale`. The selection language, ranks, alphas, rsLoRA and the
initialisations (``kaiming``, ``gaussian``, ``pissa``, ``olora``) are the linen
path's: `wrap` hands the layers' kernels to `jaxlora.wrap` as a param tree
keyed by the NNX module paths (``'blocks/0/attn/q'``) and installs what it
returns, so both paths give the same factors for the same kernels and key.
Checkpoints (`save`/`load`, Orbax, the adapter alone) and PEFT files
(`to_peft`/`from_peft`) go through the same tree.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from jaxlora import _tree
from jaxlora import checkpoint
from jaxlora import forward
from jaxlora import kernel_layout as layout_lib
from jaxlora import peft as peft_lib
from jaxlora import targets as targets_lib
from jaxlora import transform
from jaxlora._tree import A_KEY, B_KEY, KERNEL_KEY, SCALE_KEY
from jaxlora.errors import InputError, InputTypeError

PathT = tuple[Any, ...]


class LoRAParam(nnx.Variable):
  """A LoRA factor (A or B) of a `LoRA` layer: the variables that train.

  Not a subclass of `nnx.Param`, so ``wrt=nnx.Param`` (the base) and
  ``wrt=LoRAParam`` (the adapters) never overlap.
  """


class LoRAScale(nnx.Variable):
  """The frozen ``alpha / r`` (or ``alpha / sqrt(r)``) of a `LoRA` layer."""


_KINDS: dict[Any, str] = {nnx.Linear: layout_lib.DENSE, nnx.LinearGeneral: layout_lib.DENSE_GENERAL,
          nnx.Einsum: layout_lib.EINSUM}


class LoRA(nnx.Module):
  """An NNX layer with a LoRA adapter: ``base_layer(x) + scale * (dropout(x) @ A) @ B``.

  Made by `wrap`; A is ``(*batch, *in, r)`` and B ``(*batch, r, *out)`` for a
  kernel ``(*batch, *in, *out)`` (the linen layout). After `merge` the kernel
  holds ``W + scale * A @ B`` and the layer computes the base layer alone
  until `unmerge`.

  >>> import jax, jax.numpy as jnp
  >>> from flax import nnx
  >>> layer = LoRA(nnx.Linear(3, 2, rngs=nnx.Rngs(0)), jnp.ones((3, 1)), jnp.ones((1, 2)), 0.5)
  >>> x = jnp.ones((1, 3))
  >>> bool(jnp.allclose(layer(x), layer.base_layer(x) + 0.5 * 3.0))
  True
  """

  def __init__(self, base_layer: nnx.Module, lora_a: jax.Array, lora_b: jax.Array,
               lora_scale: Any, *, dropout: float = 0.0, rngs: nnx.Rngs | None = None):
    kind = _KINDS.get(type(base_layer))
    if kind is None:
      raise InputTypeError(f"LoRA wraps nnx.Linear, nnx.LinearGeneral and nnx.Einsum layers, "
                           f"not {type(base_layer).__name__}.")
    self.base_layer: Any = base_layer
    self.kind = kind
    self.lora_a = LoRAParam(jnp.asarray(lora_a))
    self.lora_b = LoRAParam(jnp.asarray(lora_b))
    self.lora_scale = LoRAScale(jnp.asarray(lora_scale, jnp.float32))
    self.dropout = nnx.Dropout(dropout, rngs=rngs) if dropout else None
    self.merged = False

  def __call__(self, inputs: jax.Array, *args: Any, **kwargs: Any) -> jax.Array:
    y = self.base_layer(inputs, *args, **kwargs)
    if self.merged:
      return y
    x = inputs if self.dropout is None else self.dropout(inputs)
    dt = y.dtype
    a, b = self.lora_a[...].astype(dt), self.lora_b[...].astype(dt)
    term = forward.lora_term(self.kind, self.base_layer, (x,) + args, kwargs, x.astype(dt), a, b,
                             self.lora_scale[...].astype(dt))
    return y + term.astype(dt)


def _supported(module: Any) -> bool:
  return type(module) in _KINDS


def _roles(path: str, module: Any) -> tuple[str, tuple[str, ...]]:
  """The layer kind and the axis roles of its kernel (linen's layout vocabulary)."""
  kind = _KINDS[type(module)]
  shape = tuple(module.kernel[...].shape)
  if kind == layout_lib.DENSE:
    return kind, (layout_lib.IN, layout_lib.OUT)
  if kind == layout_lib.DENSE_GENERAL:
    if module.batch_axis:
      raise InputError(f"'{path}': nnx.LinearGeneral with batch_axis {dict(module.batch_axis)} "
                       "is not supported by jaxlora.nnx; leave it out with exclude=...")
    n_in = len(module.in_features)
    return kind, (layout_lib.IN,) * n_in + (layout_lib.OUT,) * (len(shape) - n_in)
  roles = layout_lib.einsum_roles(module.einsum_str)
  if len(roles) != len(shape):
    raise InputError(f"'{path}': einsum {module.einsum_str!r} does not fit its kernel {shape}.")
  return kind, tuple(roles)


def _layers(model: nnx.Module) -> dict[str, tuple[PathT, Any]]:
  """Every adaptable layer (or `LoRA` wrapper) by '/'-joined path: ``(path, module)``."""
  out: dict[str, tuple[PathT, Any]] = {}
  inside: set[PathT] = set()
  for path, module in nnx.iter_modules(model):
    if isinstance(module, LoRA):
      inside.add(tuple(path) + ("base_layer",))
      out[_tree.join(tuple(str(p) for p in path))] = (tuple(path), module)
    elif _supported(module) and tuple(path) not in inside:
      out[_tree.join(tuple(str(p) for p in path))] = (tuple(path), module)
  return out


def _tree_of(model: nnx.Module, *, adapters: bool) -> tuple[dict, layout_lib.Layout]:
  """The kernels (and adapters) of `model` as a linen-style param tree, and their layout."""
  flat: dict[PathT, dict] = {}
  kernels = {}
  for name, (path, module) in _layers(model).items():
    base = module.base_layer if isinstance(module, LoRA) else module
    kind, roles = _roles(name, base)
    head = layout_lib.is_head(name)
    kernels[name] = layout_lib.KernelLayout(kind, roles, head)
    entry = {KERNEL_KEY: base.kernel[...]}
    if adapters and isinstance(module, LoRA):
      if module.merged:
        raise InputError(f"'{name}' is merged; unmerge the model (jaxlora.nnx.unmerge) first.")
      entry.update({A_KEY: module.lora_a[...], B_KEY: module.lora_b[...],
                    SCALE_KEY: module.lora_scale[...]})
    flat[tuple(str(p) for p in path)] = entry
  return _tree.nest(flat), layout_lib.Layout(kernels)


def _set(model: nnx.Module, path: PathT, value: Any) -> None:
  parent: Any = model
  for p in path[:-1]:
    parent = parent[p] if isinstance(p, int) or not hasattr(parent, str(p)) else getattr(parent, p)
  last = path[-1]
  if isinstance(last, int) or not hasattr(parent, str(last)):
    parent[last] = value
  else:
    setattr(parent, last, value)


def _install(model: nnx.Module, tree: Mapping, *, dropout: float = 0.0,
             rngs: nnx.Rngs | None = None) -> nnx.Module:
  """Puts the adapters of a wrapped linen-style tree into `model` (new or existing `LoRA`)."""
  layers = _layers(model)
  for path_t, mod in _tree.adapter_modules(tree):
    name = _tree.join(path_t)
    path, module = layers[name]
    if set(mod) - {KERNEL_KEY, A_KEY, B_KEY, SCALE_KEY}:
      extra = sorted(set(mod) - {KERNEL_KEY, A_KEY, B_KEY, SCALE_KEY})
      raise InputError(f"'{name}': jaxlora.nnx runs plain LoRA adapters; this one also has "
                       f"{extra} (DoRA, PiSSA/OLoRA records, ...), which it does not implement.")
    if isinstance(module, LoRA):
      module.lora_a[...] = mod[A_KEY]
      module.lora_b[...] = mod[B_KEY]
      module.lora_scale[...] = jnp.asarray(mod[SCALE_KEY], jnp.float32)
      module.base_layer.kernel[...] = mod[KERNEL_KEY]
    else:
      module.kernel[...] = mod[KERNEL_KEY]
      layer = LoRA(module, mod[A_KEY], mod[B_KEY], mod[SCALE_KEY], dropout=dropout, rngs=rngs)
      if not path:  # the model is the layer itself: the wrapper replaces it
        return layer
      _set(model, path, layer)
  return model


def wrap(model: nnx.Module, *, rank: int = 16, alpha: float | None = None,
         targets: targets_lib.Selector = "all-linear",
         exclude: targets_lib.Selector | None = None,
         rank_pattern: Mapping[str, int] | None = None,
         alpha_pattern: Mapping[str, float] | None = None, use_rslora: bool = False,
         init: str = "kaiming", dropout: float = 0.0, key: jax.Array | None = None,
         dtype: Any = None) -> nnx.Module:
  """Adds LoRA adapters to the selected layers of an NNX model, in place.

  Args:
    model: any `nnx.Module`; its `nnx.Linear`, `nnx.LinearGeneral` (without
      ``batch_axis``) and `nnx.Einsum` layers can be adapted.
    rank, alpha, targets, exclude, rank_pattern, alpha_pattern, use_rslora, init, dtype:
      as `jaxlora.wrap`; paths are the '/'-joined NNX module paths
      (``'layers/0/attn/q_proj'``). ``'all-linear'`` leaves out output heads
      (``lm_head``, ``head``, ...).
    dropout: dropout rate on the LoRA input (active in ``model.train()`` mode;
      draws from the ``dropout`` stream of the layer's own `nnx.Rngs`).
    key: PRNG key for A (default ``jax.random.key(0)``, as `jaxlora.wrap`).

  Returns:
    `model` itself, its selected layers replaced by `LoRA` layers.

  Raises:
    ValueError: nothing matches `targets` (the message lists the layer paths
      seen), a model that is already wrapped, or unsupported layers.

  >>> import jax, jax.numpy as jnp, optax
  >>> from flax import nnx
  >>> import jaxlora
  >>> class MLP(nnx.Module):
  ...   def __init__(self, rngs):
  ...     self.up = nnx.Linear(4, 8, rngs=rngs)
  ...     self.down = nnx.Linear(8, 4, rngs=rngs)
  ...   def __call__(self, x):
  ...     return self.down(jax.nn.relu(self.up(x)))
  >>> model = MLP(nnx.Rngs(0))
  >>> x = jnp.ones((2, 4))
  >>> before = model(x)
  >>> model = jaxlora.nnx.wrap(model, rank=2, key=jax.random.key(1))
  >>> type(model.up).__name__, bool(jnp.array_equal(model(x), before))  # B starts at zero
  ('LoRA', True)
  >>> opt = nnx.Optimizer(model, optax.sgd(0.1), wrt=jaxlora.nnx.LoRAParam)
  >>> grads = nnx.grad(lambda m: jnp.sum(m(x) ** 2),
  ...                  argnums=nnx.DiffState(0, jaxlora.nnx.LoRAParam))(model)
  >>> _ = opt.update(model, grads)
  >>> trained = bool(jnp.any(model.up.lora_b[...] != 0))
  >>> w0 = MLP(nnx.Rngs(0)).up.kernel[...]
  >>> frozen = bool(jnp.array_equal(model.up.base_layer.kernel[...], w0))
  >>> trained, frozen
  (True, True)
  """
  if not isinstance(model, nnx.Module):
    raise InputTypeError(f"jaxlora.nnx.wrap takes an nnx.Module, got {type(model).__name__}; for "
                         "linen param trees use jaxlora.wrap.")
  layers = _layers(model)
  wrapped_already = sorted(n for n, (_, m) in layers.items() if isinstance(m, LoRA))
  if wrapped_already:
    raise InputError(f"The model already holds LoRA layers ({wrapped_already[:4]}); "
                     "jaxlora.nnx.wrap adds adapters once.")
  if not layers:
    raise InputError(f"{type(model).__name__} has no nnx.Linear, nnx.LinearGeneral or nnx.Einsum "
                     "layer to adapt.")
  tree, layout = _tree_of(model, adapters=False)
  try:
    wrapped = transform.wrap(tree, key=key, rank=rank, alpha=alpha, targets=targets,
                             exclude=exclude, rank_pattern=rank_pattern,
                             alpha_pattern=alpha_pattern, use_rslora=use_rslora, init=init,
                             dtype=dtype, layout=layout)
  except InputError as e:
    if "matched no kernel" in str(e):
      raise InputError(f"targets={targets_lib.describe(targets)!r} (exclude="
                       f"{targets_lib.describe(exclude)!r}) matched none of the layers of "
                       f"{type(model).__name__}: {sorted(layers)}.") from None
    raise
  if init not in ("kaiming", "gaussian"):
    # PiSSA/OLoRA keep their initial factors for checkpoints; the NNX layer keeps the residual
    # kernel itself, so those records are dropped (save the base with the adapter).
    wrapped = _tree.filter_leaves(wrapped, lambda k, m, e: k not in _tree.INIT_KEYS, prune=True)
  rngs = nnx.Rngs(dropout=jax.random.fold_in(key if key is not None else jax.random.key(0), 1))
  return _install(model, wrapped, dropout=dropout, rngs=rngs)


def _lora_layers(model: nnx.Module) -> dict[str, LoRA]:
  return {n: m for n, (_, m) in _layers(model).items() if isinstance(m, LoRA)}


def merge(model: nnx.Module) -> nnx.Module:
  """Folds every adapter into its kernel (``W + scale * A @ B``), in place.

  The `LoRA` layers then compute their base layer alone (zero-latency
  inference) until `unmerge`; the factors are kept.

  >>> import jax, jax.numpy as jnp
  >>> from flax import nnx
  >>> import jaxlora
  >>> model = jaxlora.nnx.wrap(nnx.Linear(3, 2, rngs=nnx.Rngs(0)), rank=1)
  >>> model.lora_b[...] = jnp.ones((1, 2))
  >>> x = jnp.ones((1, 3))
  >>> y = model(x)
  >>> bool(jnp.allclose(jaxlora.nnx.merge(model)(x), y, atol=1e-6)), model.merged
  (True, True)
  """
  for name, layer in _lora_layers(model).items():
    if not layer.merged:
      layer.base_layer.kernel[...] = _folded(name, layer, +1)
      layer.merged = True
  return model


def unmerge(model: nnx.Module) -> nnx.Module:
  """Undoes `merge` (``W = merged - scale * A @ B``), in place.

  >>> import jax.numpy as jnp
  >>> from flax import nnx
  >>> import jaxlora
  >>> base = nnx.Linear(3, 2, rngs=nnx.Rngs(0))
  >>> w = base.kernel[...]
  >>> model = jaxlora.nnx.wrap(base, rank=1)
  >>> model.lora_b[...] = jnp.ones((1, 2))
  >>> model = jaxlora.nnx.unmerge(jaxlora.nnx.merge(model))
  >>> bool(jnp.allclose(model.base_layer.kernel[...], w, atol=1e-6)), model.merged
  (True, False)
  """
  for name, layer in _lora_layers(model).items():
    if layer.merged:
      layer.base_layer.kernel[...] = _folded(name, layer, -1)
      layer.merged = False
  return model


def _folded(name: str, layer: LoRA, sign: int) -> jax.Array:
  """``W + sign * scale * A @ B`` in the kernel's layout, summed in float32 (or wider)."""
  kernel = layer.base_layer.kernel[...]
  _, roles = _roles(name, layer.base_layer)
  letters = [chr(ord("a") + i) for i in range(len(roles))]
  pick = lambda want: "".join(c for c, r in zip(letters, roles) if r in want)
  shared, ins, outs = pick((layout_lib.BATCH,)), pick((layout_lib.IN,)), pick((layout_lib.OUT,))
  wide = _tree.wide_float(kernel.dtype, layer.lora_a[...].dtype)
  delta = jnp.einsum(f"{shared}{ins}z,{shared}z{outs}->{''.join(letters)}",
                     layer.lora_a[...].astype(wide), layer.lora_b[...].astype(wide),
                     precision=jax.lax.Precision.HIGHEST)
  scale = sign * layer.lora_scale[...].astype(wide)
  return (kernel.astype(wide) + scale * delta).astype(kernel.dtype)


def adapter_state(model: nnx.Module) -> nnx.State:
  """The adapter variables alone (`LoRAParam` and `LoRAScale`), as an `nnx.State`.

  >>> from flax import nnx
  >>> import jaxlora
  >>> model = jaxlora.nnx.wrap(nnx.Linear(3, 2, rngs=nnx.Rngs(0)), rank=1)
  >>> sorted(nnx.to_pure_dict(adapter_state(model)))
  ['lora_a', 'lora_b', 'lora_scale']
  """
  return nnx.state(model, nnx.Any(LoRAParam, LoRAScale))


def save(path: str, model: nnx.Module, *, metadata: dict | None = None) -> None:
  """Saves the adapters of a wrapped NNX model (Orbax, as `jaxlora.save`; no base weights).

  >>> import tempfile, os
  >>> from flax import nnx
  >>> import jaxlora
  >>> model = jaxlora.nnx.wrap(nnx.Linear(3, 2, rngs=nnx.Rngs(0)), rank=1)
  >>> d = os.path.join(tempfile.mkdtemp(), "adapter")
  >>> jaxlora.nnx.save(d, model)
  >>> fresh = nnx.Linear(3, 2, rngs=nnx.Rngs(0))
  >>> type(jaxlora.nnx.load(d, fresh)).__name__
  'LoRA'
  """
  tree, _ = _tree_of(model, adapters=True)
  if not _tree.adapter_modules(tree):
    raise InputError("The model holds no adapter; wrap it with jaxlora.nnx.wrap first.")
  checkpoint.save(path, tree, metadata=metadata)


def load(path: str, model: nnx.Module) -> nnx.Module:
  """Loads adapters saved by `save` into `model` (plain or wrapped), in place.

  The layers the checkpoint adapts become `LoRA` layers (or get the saved
  values); a checkpoint that does not fit the model raises with the first
  mismatching path and shapes, as `jaxlora.load` does.

  >>> import tempfile, os
  >>> import jax.numpy as jnp
  >>> from flax import nnx
  >>> import jaxlora
  >>> model = jaxlora.nnx.wrap(nnx.Linear(3, 2, rngs=nnx.Rngs(0)), rank=1)
  >>> model.lora_b[...] = jnp.ones((1, 2))
  >>> d = os.path.join(tempfile.mkdtemp(), "adapter")
  >>> jaxlora.nnx.save(d, model)
  >>> back = jaxlora.nnx.load(d, nnx.Linear(3, 2, rngs=nnx.Rngs(0)))
  >>> bool(jnp.array_equal(back(jnp.ones((1, 3))), model(jnp.ones((1, 3)))))
  True
  >>> jaxlora.nnx.load(d, nnx.Linear(4, 2, rngs=nnx.Rngs(0)))  # doctest: +ELLIPSIS
  Traceback (most recent call last):
  ...
  jaxlora.errors.CheckpointError: ...
  """
  tree, _ = _tree_of(model, adapters=False)
  return _install(model, checkpoint.load(path, tree))


class _Names:
  """`jaxlora.model_api.HubNames` for an NNX model: module path <-> PyTorch module name."""

  fan_in_fan_out = False

  def __init__(self, names: Callable[[str], str] | None):
    self._names = names or (lambda path: path.replace("/", "."))
    self._back: dict[str, tuple[str, ...]] = {}

  def hf_module_name(self, module_path: tuple[str, ...], layer: int | None) -> str:
    name = self._names(_tree.join(module_path))
    self._back[name] = tuple(module_path)
    return name

  def flax_module_path(self, name: str) -> tuple[tuple[str, ...], int | None]:
    return self._back.get(name, tuple(name.split("."))), None


def to_peft(path: str, model: nnx.Module, *, names: Callable[[str], str] | None = None,
            **kwargs: Any) -> None:
  """Writes the adapters of a wrapped NNX model as a PEFT LoRA adapter.

  Args:
    path: output directory.
    model: the wrapped model (2-D `nnx.Linear` adapters; PEFT holds Linear adapters only).
    names: maps an NNX module path (``'model/layers/0/self_attn/q_proj'``) to the
      PyTorch module name (default: the path with ``/`` replaced by ``.``, which
      fits an NNX model whose attribute names follow the PyTorch model's).
    **kwargs: as `jaxlora.peft.save` (``base_model_name_or_path``, ``use_rslora``, ``dtype``).

  >>> import tempfile, os
  >>> from flax import nnx
  >>> import jaxlora
  >>> class Block(nnx.Module):
  ...   def __init__(self):
  ...     self.proj = nnx.Linear(3, 2, rngs=nnx.Rngs(0))
  >>> model = jaxlora.nnx.wrap(Block(), rank=1)
  >>> d = tempfile.mkdtemp()
  >>> jaxlora.nnx.to_peft(d, model, names=lambda p: "model.layers.0." + p)
  >>> sorted(os.listdir(d))
  ['adapter_config.json', 'adapter_model.safetensors']
  """
  tree, _ = _tree_of(model, adapters=True)
  peft_lib.save(path, tree, model=_Names(names), **kwargs)


def from_peft(path: str, model: nnx.Module, *,
              names: Callable[[str], str] | None = None) -> nnx.Module:
  """Loads a PEFT LoRA adapter into an unwrapped NNX model, in place (see `to_peft`).

  The adapter's module names are matched against ``names(path)`` of the
  model's layers; a name the model lacks raises with the name.

  >>> import tempfile
  >>> import jax.numpy as jnp
  >>> from flax import nnx
  >>> import jaxlora
  >>> class Block(nnx.Module):
  ...   def __init__(self):
  ...     self.proj = nnx.Linear(3, 2, rngs=nnx.Rngs(0))
  >>> model = jaxlora.nnx.wrap(Block(), rank=1)
  >>> model.proj.lora_b[...] = jnp.ones((1, 2))
  >>> d = tempfile.mkdtemp()
  >>> jaxlora.nnx.to_peft(d, model)
  >>> back = jaxlora.nnx.from_peft(d, Block())
  >>> bool(jnp.allclose(back.proj(jnp.ones((1, 3))), model.proj(jnp.ones((1, 3)))))
  True
  """
  tree, _ = _tree_of(model, adapters=False)
  naming = _Names(names)
  for path_t, _ in _tree.kernel_modules(tree):
    naming.hf_module_name(tuple(path_t), None)
  return _install(model, peft_lib.load(path, tree, model=naming))


__all__ = ["LoRA", "LoRAParam", "LoRAScale", "adapter_state", "from_peft", "load", "merge",
           "save", "to_peft", "unmerge", "wrap"]
