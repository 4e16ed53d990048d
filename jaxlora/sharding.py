"""Meshes, logical-axis rules and shardings for base params, adapters and optimizer state."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import AbstractMesh, AxisType, Mesh, NamedSharding, PartitionSpec

from jaxlora import _tree
from jaxlora import kernel_layout as layout_lib
from jaxlora import model_api
from jaxlora import tokens
from jaxlora._tree import A_KEY, B_KEY, KERNEL_KEY, MAGNITUDE_KEY, SCALE_KEY
from jaxlora.errors import InputError


def _spec_for(kernel_spec: PartitionSpec | tuple, roles: tuple[str, ...],
              which: str) -> PartitionSpec:
  spec = tuple(kernel_spec) + (None,) * (len(roles) - len(kernel_spec))
  shared = [s for s, r in zip(spec, roles) if r in (layout_lib.STACK, layout_lib.BATCH)]
  if which == A_KEY:
    return PartitionSpec(*shared, *[s for s, r in zip(spec, roles) if r == layout_lib.IN], None)
  if which == B_KEY:
    return PartitionSpec(*shared, None, *[s for s, r in zip(spec, roles) if r == layout_lib.OUT])
  if which == MAGNITUDE_KEY:  # DoRA: one value per output unit, sharded like them
    return PartitionSpec(*shared, *[s for s, r in zip(spec, roles) if r == layout_lib.OUT])
  return PartitionSpec(*[s for s, r in zip(spec, roles) if r == layout_lib.STACK])


def adapter_shardings(tree: Any) -> Any:
  """Shardings for the adapter leaves of a wrapped tree, derived from each kernel's.

  ``lora_a`` takes the kernel's stacked and input-axis shardings plus an
  unsharded rank axis; ``lora_b`` an unsharded rank axis plus the output-axis
  shardings; ``lora_scale`` the stacked axes'; a DoRA ``lora_magnitude`` the
  stacked, batch and output axes' shardings. Kernels that are not
  `NamedSharding`-sharded give their own sharding (e.g. one device) to the
  adapter. Works on abstract trees whose kernels carry a ``sharding``.

  Args:
    tree: a wrapped tree (arrays or ShapeDtypeStructs with shardings).

  Returns:
    A tree like `jaxlora.adapter(tree)` holding shardings.

  >>> import jax, jax.numpy as jnp, numpy as np, jaxlora
  >>> from jax.sharding import NamedSharding, PartitionSpec as P
  >>> mesh = jax.make_mesh((jax.device_count(),), ("fsdp",),
  ...                      axis_types=(jax.sharding.AxisType.Auto,))
  >>> kernel = jax.device_put(jnp.ones((8, 4)), NamedSharding(mesh, P("fsdp", None)))
  >>> tree = jaxlora.wrap({"d": {"kernel": kernel}}, rank=2, key=jax.random.key(0))
  >>> adapter_shardings(tree)["d"]["lora_a"].spec == P("fsdp", None)
  True
  """
  p = _tree.get_params(tree)
  new = {}
  for path_t, mod in _tree.adapter_modules(p):
    kernel = mod[KERNEL_KEY]
    sharding = getattr(kernel, "sharding", None)
    scale_ndim = len(getattr(mod[SCALE_KEY], "shape", ()))
    roles = layout_lib.roles_from_shapes(_tree.join(path_t), kernel.shape, mod[A_KEY].shape,
                                         mod[B_KEY].shape, scale_ndim)
    out: dict[str, Any] = {}  # a NamedSharding each, or the kernel's own sharding
    for k in _tree.LORA_KEYS + ((MAGNITUDE_KEY,) if MAGNITUDE_KEY in mod else ()):
      if isinstance(sharding, NamedSharding):
        out[k] = NamedSharding(sharding.mesh, _spec_for(sharding.spec, roles, k))
      else:
        out[k] = sharding
    new[path_t] = out
  new.update(tokens.shardings(p))  # trained token rows: the table's feature axis; ids replicated
  adapter_only = _tree.adapter_leaves(p)
  # Other saved leaves (trained base leaves, markers) keep their own sharding.
  own = jax.tree.map(lambda x: getattr(x, "sharding", None), adapter_only)
  result = _tree.overlay(own, _tree.nest(new))
  return _tree.with_params(tree, result) if _tree.is_variables(tree) else result


def quantized_sharding(q: Any, kernel_sharding: Any) -> Any:
  """Shardings for a `jaxlora.QuantizedArray`, given the sharding of the float kernel.

  Stacked (layer) axes keep the kernel's spec. A 4-bit record stores each
  layer flat in bitsandbytes' order (output rows one after another), so its
  packed codes, block maxima and double-quantization group scales are split
  into contiguous runs of output rows over every mesh axis that shards the
  kernel: the same bytes per device as the float kernel, whichever of its axes
  those mesh axes shard. A leaf whose length they do not divide stays whole
  (replicated), as do the code tables. An int8 record keeps the kernel's
  layout and spec; its per-output-channel scales follow the output axis.

  Args:
    q: the record (arrays or ShapeDtypeStructs).
    kernel_sharding: the float kernel's sharding (e.g. from `param_shardings`).

  Returns:
    A `QuantizedArray` whose leaves are shardings.

  >>> import numpy as np, jax, jaxlora
  >>> mesh = jaxlora.sharding.make_mesh(fsdp=-1)
  >>> q = jaxlora.quantization.quantize_array(np.ones((128, 64), np.float32), "nf4")
  >>> kernel_sh = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("fsdp", None))
  >>> quantized_sharding(q, kernel_sh).packed.spec == jax.sharding.PartitionSpec("fsdp")
  True
  """
  from jaxlora import quantization  # pylint: disable=import-outside-toplevel
  children, aux = q.tree_flatten_with_keys()
  if not isinstance(kernel_sharding, NamedSharding):
    return type(q).tree_unflatten(aux, [kernel_sharding for _ in children])
  mesh = kernel_sharding.mesh
  spec = tuple(kernel_sharding.spec) + (None,) * (len(q.shape) - len(kernel_sharding.spec))
  stack, rest = spec[:q.n_stack], spec[q.n_stack:]
  axes = tuple(a for s in rest for a in ((s,) if isinstance(s, str) else tuple(s or ())))
  size = math.prod(mesh.shape[a] for a in axes)

  def split_last(x):
    if not axes or x.shape[-1] % size:
      return NamedSharding(mesh, PartitionSpec(*stack, None))
    return NamedSharding(mesh, PartitionSpec(*stack, axes[0] if len(axes) == 1 else axes))

  out = []
  for key, x in children:
    name = key.key
    if name in ("quant_map", "nested_quant_map"):
      out.append(NamedSharding(mesh, PartitionSpec(*stack, None)))
    elif name == "offset":
      out.append(NamedSharding(mesh, PartitionSpec(*stack)))
    elif q.qtype == "int8" and name == "packed":
      out.append(NamedSharding(mesh, _fit(PartitionSpec(*spec), tuple(x.shape), mesh)))
    elif q.qtype == "int8":  # per-output-channel scales
      outs = rest[q.n_in:]
      s = outs[0] if len(outs) == 1 else None
      out.append(NamedSharding(mesh, _fit(PartitionSpec(*stack, s), tuple(x.shape), mesh)))
    else:
      out.append(split_last(x))
  del quantization
  return type(q).tree_unflatten(aux, out)


MESH_AXES = ("data", "fsdp", "tensor")

# Logical axis names used by jaxlora.models -> mesh axes. The mesh has no expert axis, so
# stacked expert kernels ("expert", in, out) are sharded over their in/out axes like dense ones.
FSDP_RULES = (("batch", ("data", "fsdp")), ("embed", "fsdp"), ("vocab", None), ("heads", None),
              ("kv_heads", None), ("qkv", None), ("mlp", None), ("layers", None), ("norm", None),
              ("expert", None))
FSDP_TP_RULES = (("batch", ("data", "fsdp")), ("embed", "fsdp"), ("vocab", "tensor"),
                 ("heads", "tensor"), ("kv_heads", "tensor"), ("qkv", "tensor"),
                 ("mlp", "tensor"), ("layers", None), ("norm", None), ("expert", None))
# Expert parallelism: each device of the 'fsdp' axis holds whole experts of a mixture-of-experts
# layer (the stacked expert axis is split, their hidden axis is not); every other kernel is
# sharded as with FSDP_RULES. The 'expert' rule must come before 'embed': a mesh axis shards
# one dimension of an array, and flax gives it to the first rule that claims it.
EP_RULES = (("batch", ("data", "fsdp")), ("expert", "fsdp")) + tuple(
    r for r in FSDP_RULES if r[0] not in ("batch", "expert"))


def make_mesh(*, data: int = 1, fsdp: int = -1, tensor: int = 1,
              devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A ('data', 'fsdp', 'tensor') mesh; one size may be -1 for "all remaining devices".

  Args:
    data: data-parallel size (replicated params).
    fsdp: fully sharded data-parallel size (params sharded over it, batch too).
    tensor: tensor-parallel size.
    devices: devices to use (default: all, in `jax.devices()` order).

  Returns:
    A `jax.sharding.Mesh` with Auto axis types (jit-with-shardings style).

  Raises:
    ValueError: if the sizes do not multiply to the device count.

  >>> import jaxlora
  >>> mesh = jaxlora.sharding.make_mesh(fsdp=-1)
  >>> mesh.axis_names
  ('data', 'fsdp', 'tensor')
  """
  devices = list(devices if devices is not None else jax.devices())
  sizes = [data, fsdp, tensor]
  if sizes.count(-1) > 1 or any(s == 0 or s < -1 for s in sizes):
    raise InputError(f"mesh sizes data={data}, fsdp={fsdp}, tensor={tensor}: use positive sizes "
                     "and at most one -1.")
  known = math.prod(s for s in sizes if s != -1)
  if -1 in sizes:
    if len(devices) % known:
      raise InputError(f"{len(devices)} devices cannot be split with data={data}, fsdp={fsdp}, "
                       f"tensor={tensor}.")
    sizes[sizes.index(-1)] = len(devices) // known
  if math.prod(sizes) != len(devices):
    raise InputError(f"mesh data={sizes[0]} x fsdp={sizes[1]} x tensor={sizes[2]} = "
                     f"{math.prod(sizes)} devices, but {len(devices)} are available.")
  arr = np.asarray(devices, dtype=object).reshape(sizes)
  return Mesh(arr, MESH_AXES, axis_types=(AxisType.Auto,) * 3)


def _fit(spec: PartitionSpec, shape: tuple[int, ...],
         mesh: Mesh | AbstractMesh) -> PartitionSpec:
  """Drops mesh axes from dims they do not divide (small or odd-sized dims stay whole)."""
  out = []
  for dim, axes in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
    names = (axes,) if isinstance(axes, str) else tuple(axes or ())
    size = math.prod(mesh.shape[n] for n in names)
    out.append(axes if names and dim % size == 0 else None)
  return PartitionSpec(*out)


def param_shardings(model: model_api.AbstractModel, mesh: Mesh,
                    rules: Sequence[tuple[str, Any]] = FSDP_RULES) -> Any:
  """NamedShardings for the (unboxed) params of a model.

  The model describes its params through ``model.abstract_variables()``
  (`jaxlora.model_api.AbstractModel`): `jaxlora.models.Decoder` does, and
  any linen module does as ``jaxlora.model_api.LinenModel(module, inputs)``.
  Params annotated with logical axis names (``nn.with_logical_partitioning``)
  are sharded as `rules` map those names to mesh axes; a dim that a mesh axis
  does not divide, and a param without names, are left unsharded.

  Args:
    model: the model (`jaxlora.model_api.AbstractModel`).
    mesh: the device mesh.
    rules: ``(logical name, mesh axes)`` pairs.

  Returns:
    A tree of `NamedSharding`s shaped like the model's (unboxed) params.

  Raises:
    InputTypeError: a model without ``abstract_variables()``.

  >>> import jax, jaxlora
  >>> cfg = jaxlora.models.ModelConfig.tiny("llama")
  >>> model = jaxlora.models.Decoder(cfg)
  >>> mesh = jaxlora.sharding.make_mesh(fsdp=-1)
  >>> sh = jaxlora.sharding.param_shardings(model, mesh)
  >>> sh["layers"]["mlp"]["up_proj"]["kernel"].spec[1]
  'fsdp'
  """
  model_api.require(model, model_api.AbstractModel, "param_shardings")
  return _shardings_of(model.abstract_variables(), mesh, rules)


def _shardings_of(boxed: Any, mesh: Mesh, rules: Sequence[tuple[str, Any]]) -> Any:
  """Param shardings from abstract boxed variables (logical names -> mesh axes)."""
  specs = nn.get_partition_spec(boxed)["params"]
  shapes = nn.unbox(boxed)["params"]
  logical = nn.logical_to_mesh(specs, rules)
  return jax.tree.map(lambda s, x: NamedSharding(mesh, _fit(s, x.shape, mesh)), logical, shapes,
                      is_leaf=lambda s: isinstance(s, PartitionSpec))


def tree_shardings(tree: Any, base_shardings: Any) -> Any:
  """Shardings for a wrapped tree: base leaves from `base_shardings`, adapters follow kernels.

  Args:
    tree: a wrapped params tree (arrays or ShapeDtypeStructs).
    base_shardings: shardings of the unwrapped params (e.g. `param_shardings`).

  Returns:
    A tree of shardings with the structure of `tree`.

  >>> import jax, jaxlora
  >>> cfg = jaxlora.models.ModelConfig.tiny("llama")
  >>> model = jaxlora.models.Decoder(cfg)
  >>> mesh = jaxlora.sharding.make_mesh(fsdp=-1)
  >>> params = jaxlora.models.init(model, jax.random.key(0))
  >>> tree = jaxlora.wrap(params, rank=2, layout=model, key=jax.random.key(1))
  >>> sh = tree_shardings(tree, param_shardings(model, mesh))
  >>> sh["layers"]["mlp"]["up_proj"]["lora_a"].spec[1]
  'fsdp'
  """
  from jaxlora.quantization import is_quantized  # pylint: disable=import-outside-toplevel
  p = _tree.get_params(tree)
  base = _tree.base_leaves(p, prune=False)
  base_sh = _tree.get_params(base_shardings)
  # Quantized kernels: adapters follow the float kernel's sharding; the record gets its own.
  with_sharding = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                               base, base_sh, is_leaf=is_quantized)
  base_sh = jax.tree.map(lambda x, s: quantized_sharding(x, s) if is_quantized(x) else s,
                         base, base_sh, is_leaf=is_quantized)
  adapters = _tree.adapter_leaves(p)
  abstract = _tree.overlay(adapters, with_sharding)  # trained base leaves: the base's sharding
  return _tree.overlay(base_sh, adapter_shardings(abstract))


def opt_state_shardings(tx: Any, params: Any, shardings: Any, mesh: Mesh) -> Any:
  """Optimizer-state shardings: param-shaped state follows its param; the rest is replicated.

  Args:
    tx: the optax transformation.
    params: the tree `tx.init` is called on (arrays or ShapeDtypeStructs).
    shardings: shardings of `params`.
    mesh: the mesh (for replicated scalars such as step counts).

  Returns:
    A tree of shardings with the structure of ``tx.init(params)``.

  >>> import jax, jax.numpy as jnp, optax, jaxlora
  >>> mesh = jaxlora.sharding.make_mesh(fsdp=-1)
  >>> params = {"w": jnp.zeros((8, 2))}
  >>> sh = {"w": jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("fsdp"))}
  >>> state = opt_state_shardings(optax.adam(1e-3), params, sh, mesh)
  >>> state[0].mu["w"].spec == sh["w"].spec
  True
  """
  state = jax.eval_shape(tx.init, params)
  replicated = NamedSharding(mesh, PartitionSpec())
  try:
    return optax.tree_map_params(tx, lambda _, s: s, state, shardings,
                                 transform_non_params=lambda _: replicated,
                                 is_leaf=lambda x: isinstance(x, NamedSharding))
  except (AttributeError, TypeError, ValueError):
    # Label functions (optax.partition, jaxlora.loraplus) cannot run on optax's placeholder:
    # match state leaves to params by the dict keys their paths end with, and their shape.
    return _match_state_shardings(state, params, shardings, replicated)


def _match_state_shardings(state: Any, params: Any, shardings: Any, replicated: Any) -> Any:
  is_sh = lambda x: isinstance(x, jax.sharding.Sharding)
  keys = lambda kp: tuple(getattr(k, "key", None) for k in kp)
  by_path = {keys(kp): (tuple(np.shape(x)), s) for (kp, x), s in zip(
      jax.tree_util.tree_flatten_with_path(params)[0],
      jax.tree.leaves(shardings, is_leaf=is_sh))}
  longest = max((len(k) for k in by_path), default=0)

  def pick(kp, leaf):
    path = keys(kp)
    for n in range(min(longest, len(path)), 0, -1):
      found = by_path.get(path[-n:])
      if found is not None and found[0] == tuple(np.shape(leaf)):
        return found[1]
    return replicated

  return jax.tree_util.tree_map_with_path(pick, state)


def bytes_per_device(tree: Any, shardings: Any) -> int:
  """Bytes one device holds of `tree` under `shardings` (from shapes and specs alone).

  >>> import jax, jax.numpy as jnp, jaxlora
  >>> mesh = jaxlora.sharding.make_mesh(fsdp=-1)
  >>> sh = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  >>> bytes_per_device({"w": jnp.zeros((4, 2))}, {"w": sh})
  32
  """
  total = 0
  for x, s in zip(jax.tree.leaves(tree), jax.tree.leaves(
      shardings, is_leaf=lambda v: isinstance(v, jax.sharding.Sharding))):
    shard = s.shard_shape(tuple(x.shape)) if hasattr(s, "shard_shape") else tuple(x.shape)
    total += math.prod(shard) * jnp.dtype(x.dtype).itemsize
  return total


class _ModelDefault:
  """Marks an argument that defaults to the model's own attribute."""

  def __repr__(self) -> str:
    return "<the model's>"


_FROM_MODEL: Any = _ModelDefault()

def logical_mesh_axes(mesh: Mesh, rules: Sequence[tuple[str, Any]],
                      logical: str) -> tuple[str, ...]:
  """The axes of `mesh` that `rules` map the logical axis name `logical` to.

  >>> import jaxlora
  >>> mesh = jaxlora.sharding.make_mesh(fsdp=-1)
  >>> logical_mesh_axes(mesh, jaxlora.sharding.FSDP_RULES, "batch")
  ('data', 'fsdp')
  """
  axes = dict(rules).get(logical)
  return tuple(a for a in ((axes,) if isinstance(axes, str) else tuple(axes or ()))
               if a in mesh.shape)


def _check_step(mesh: Mesh, rules: Sequence[tuple[str, Any]], batch: Any, seq: Any,
                loss_chunk_size: Any) -> None:
  """Refuses step sizes no model can plan: non-positive sizes, a batch the mesh cannot split."""
  for name, value in (("batch", batch), ("seq", seq)):
    if not isinstance(value, int) or value < 1:
      raise InputError(f"{name}={value!r}: give a positive integer (global batch rows, tokens "
                       "per row).")
  if loss_chunk_size is not None and (not isinstance(loss_chunk_size, int) or loss_chunk_size < 1):
    raise InputError(f"loss_chunk_size={loss_chunk_size!r}: give a positive integer, or None for "
                     "the full (batch, seq, vocab) logits.")
  batch_axes = logical_mesh_axes(mesh, rules, "batch")
  shards = math.prod(mesh.shape[a] for a in batch_axes)
  if batch % shards:
    raise InputError(f"batch={batch} cannot be split over the {shards} devices of the mesh axes "
                     f"{batch_axes} that carry the batch; use a multiple of {shards}.")


def memory_plan(model: Any, mesh: Mesh, *, rank: int = 16, targets: Any = "all-linear",
                rules: Sequence[tuple[str, Any]] = FSDP_RULES, tx: Any = None,
                adapter_dtype: Any = None, quantize: str | None = None, block_size: int = 64,
                double_quant: bool = True, batch: int | None = None, seq: int | None = None,
                remat: Any = _FROM_MODEL, attention: Any = _FROM_MODEL,
                loss_chunk_size: int | None = None) -> dict[str, int]:
  """Per-device bytes of a LoRA training step, computed from shapes.

  Nothing is allocated: the model is traced abstractly
  (`jaxlora.model_api`: ``model.abstract_variables()`` for the params and
  their shardings, ``model.lora_layout(params)`` when the model has one).
  Without ``batch`` and
  ``seq`` the plan holds what exists between steps: base params, adapters and
  optimizer state. With them it adds what one training step needs on top,
  for the step ``jaxlora.apply(model.apply)`` forward, gradients of the
  adapters only (`jaxlora.split`), ``tx`` update, as the model counts them
  (``model.activation_bytes``, `jaxlora.model_api.ActivationPlanner`); for
  `jaxlora.models.Decoder`:

  - ``activations``: the residuals every scanned layer saves for the backward
    pass under the ``remat`` policy (on the XLA attention path each layer's
    float32 ``(batch, heads, seq, seq)`` exp(logits) and its probabilities in
    the compute dtype; fused kernels keep the output and a float32
    ``(batch, heads, seq)`` log-sum-exp), plus one layer's working set in the
    backward pass (what the policy recomputes, the gradients through the
    layer, the layer's weights as FSDP gathers them) and the adapters'
    gradient. ``'offload_dots_no_batch'`` counts what stays on the device;
    the offloaded matmul outputs wait in pinned host memory.
  - ``logits``: the loss: ``(batch, seq, vocab)`` logits in the compute dtype
    and their float32 softmax (which becomes their gradient), or one
    ``(batch, loss_chunk_size, vocab)`` block of each with
    `jaxlora.models.chunked_cross_entropy`. These buffers are dead before the
    layers' backward pass starts, so only what exceeds one layer's working
    set is counted: that is what they add to the peak.

  The estimate describes the model's saved state (shapes, dtypes, what each
  policy keeps), not one compiler's buffer assignment: XLA on GPU and TPU
  fuses and reuses buffers differently from XLA on CPU. The tests compare it
  with XLA's memory analysis of the compiled step on CPU (within 25%).
  Residuals are counted for LoRA on every projection of the layer (fewer
  targets save slightly less) and for batch-sharded activations (see
  docs/design.md on FSDP).

  Args:
    model: a model implementing `jaxlora.model_api.AbstractModel` (and
      `ActivationPlanner` with ``batch`` and ``seq``), e.g. a
      `jaxlora.models.Decoder` (its ``param_dtype`` sets the base bytes, its
      ``dtype`` the activations') or a `jaxlora.model_api.LinenModel`.
    mesh: the device mesh.
    rank, targets: as for `jaxlora.wrap`.
    rules: logical-axis rules (the batch is split over the mesh axes of
      ``'batch'``; heads, MLP and vocab over ``'tensor'`` under
      `FSDP_TP_RULES`).
    tx: optimizer (default: optax.adamw, two moments per adapter parameter).
    adapter_dtype: as `jaxlora.wrap(dtype=...)`.
    quantize, block_size, double_quant: a quantized base, as `jaxlora.quantize`
      makes it (``'nf4'``, ``'fp4'``, ``'int8'``; every linear kernel but the
      head); records shard as `quantized_sharding` says.
    batch: global batch (rows per step, over all devices); with ``seq``.
    seq: tokens per row; with ``batch``.
    remat: with ``batch`` and ``seq``, passed to ``model.activation_bytes``
      when given. For the Decoder: None or a policy of
      `jaxlora.models.decoder.REMAT_POLICIES` (default: the model's ``remat``).
    attention: likewise; for the Decoder ``'auto'``, ``'xla'``, ``'cudnn'``, ``'splash'`` or ``'flash'``
      (default: the model's ``attention``). ``'auto'`` means what the mesh's
      devices would run; a fused implementation named explicitly is planned as
      it runs on its own platform (so a CPU host can plan a TPU run), with the
      same fallbacks to XLA as `jaxlora.models.attention.plan`.
    loss_chunk_size: the ``chunk_size`` of `jaxlora.models.chunked_cross_entropy`,
      or None for the full logits.

  Returns:
    ``{'base', 'adapter', 'optimizer', 'total'}`` in bytes per device; with
    ``batch`` and ``seq`` also ``'activations'`` and ``'logits'``, which
    ``'total'`` then includes.

  Raises:
    ValueError: ``batch`` without ``seq`` (or the reverse), a batch the batch
      mesh axes do not divide, an unknown remat policy or attention name.
    TypeError: a model without ``abstract_variables()``, or without
      ``activation_bytes`` when ``batch`` and ``seq`` are given
      (`jaxlora.errors.InputTypeError`).

  >>> import jaxlora
  >>> cfg = jaxlora.models.ModelConfig.tiny("llama")
  >>> model = jaxlora.models.Decoder(cfg)
  >>> mesh = jaxlora.sharding.make_mesh(fsdp=-1)
  >>> plan = jaxlora.sharding.memory_plan(model, mesh, rank=2)
  >>> sorted(plan)
  ['adapter', 'base', 'optimizer', 'total']
  >>> step = jaxlora.sharding.memory_plan(model, mesh, rank=2, batch=8, seq=64, remat="full")
  >>> sorted(step)
  ['activations', 'adapter', 'base', 'logits', 'optimizer', 'total']
  >>> step["total"] == plan["total"] + step["activations"] + step["logits"]
  True
  """
  from jaxlora import quantization  # pylint: disable=import-outside-toplevel
  from jaxlora import transform  # pylint: disable=import-outside-toplevel

  if (batch is None) != (seq is None):
    raise InputError(f"batch={batch!r}, seq={seq!r}: give both (to plan activations and logits) "
                     "or neither (params, adapters and optimizer state only).")
  model_api.require(model, model_api.AbstractModel, "memory_plan")
  if batch is not None:
    model_api.require(model, model_api.ActivationPlanner, "memory_plan(batch=..., seq=...)")
    _check_step(mesh, rules, batch, seq, loss_chunk_size)
  boxed = model.abstract_variables()  # traced once, for both shapes and shardings
  base_sh = _shardings_of(boxed, mesh, rules)
  abstract = nn.unbox(boxed)["params"]
  # Without a layout of its own, the model's kernels must be plain 2-D (wrap says so if not).
  lay = (model.lora_layout(abstract) if isinstance(model, model_api.LayoutProvider) else None)
  float_params = abstract
  if quantize is not None:  # abstract records: shapes only, nothing is quantized
    abstract = quantization.quantize(abstract, quantize, block_size=block_size,
                                     double_quant=double_quant, layout=lay)
  wrapped = jax.eval_shape(lambda p: transform.wrap(p, rank=rank, targets=targets, layout=lay,
                                                    key=jax.random.key(0), dtype=adapter_dtype),
                           abstract)
  sh = tree_shardings(wrapped, base_sh)
  trainable, _ = transform.split(wrapped)
  t_sh, _ = transform.split(sh)
  tx = tx if tx is not None else optax.adamw(1e-4)
  state = jax.eval_shape(tx.init, trainable)
  base = bytes_per_device(_tree.base_leaves(wrapped, prune=True), _tree.base_leaves(sh, prune=True))
  adapter = bytes_per_device(transform.adapter(wrapped), transform.adapter(sh))
  opt = bytes_per_device(state, opt_state_shardings(tx, trainable, t_sh, mesh))
  plan = {"base": base, "adapter": adapter, "optimizer": opt, "total": base + adapter + opt}
  if batch is None:
    return plan
  # Options the caller left at "the model's" are not passed: the model knows its own.
  options = {k: v for k, v in (("remat", remat), ("attention", attention)) if v is not _FROM_MODEL}
  step = model.activation_bytes(mesh, rules=rules, params=float_params, shardings=base_sh,
                                wrapped=wrapped, batch=batch, seq=seq,
                                loss_chunk_size=loss_chunk_size, adapter_bytes=adapter,
                                **options)
  plan.update(activations=int(step["activations"]), logits=int(step["logits"]))
  plan["total"] += plan["activations"] + plan["logits"]
  return plan
