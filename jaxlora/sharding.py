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
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from jaxlora import _tree
from jaxlora import kernel_layout as layout_lib
from jaxlora._tree import A_KEY, B_KEY, KERNEL_KEY, SCALE_KEY


def _spec_for(kernel_spec: tuple, roles: tuple[str, ...], which: str) -> PartitionSpec:
  spec = tuple(kernel_spec) + (None,) * (len(roles) - len(kernel_spec))
  shared = [s for s, r in zip(spec, roles) if r in (layout_lib.STACK, layout_lib.BATCH)]
  if which == A_KEY:
    return PartitionSpec(*shared, *[s for s, r in zip(spec, roles) if r == layout_lib.IN], None)
  if which == B_KEY:
    return PartitionSpec(*shared, None, *[s for s, r in zip(spec, roles) if r == layout_lib.OUT])
  return PartitionSpec(*[s for s, r in zip(spec, roles) if r == layout_lib.STACK])


def adapter_shardings(tree: Any) -> Any:
  """Shardings for the adapter leaves of a wrapped tree, derived from each kernel's.

  ``lora_a`` takes the kernel's stacked and input-axis shardings plus an
  unsharded rank axis; ``lora_b`` an unsharded rank axis plus the output-axis
  shardings; ``lora_scale`` the stacked axes'. Kernels that are not
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
    out = {}
    for k in _tree.ADAPTER_KEYS:
      if isinstance(sharding, NamedSharding):
        out[k] = NamedSharding(sharding.mesh, _spec_for(sharding.spec, roles, k))
      else:
        out[k] = sharding
    new[path_t] = out
  adapter_only = _tree.filter_tree(p, lambda k: k in _tree.ADAPTER_KEYS, prune=True)
  result = _tree.replace_modules(adapter_only, new)
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

# Logical axis names used by jaxlora.models -> mesh axes.
FSDP_RULES = (("batch", ("data", "fsdp")), ("embed", "fsdp"), ("vocab", None), ("heads", None),
              ("kv_heads", None), ("qkv", None), ("mlp", None), ("layers", None), ("norm", None))
FSDP_TP_RULES = (("batch", ("data", "fsdp")), ("embed", "fsdp"), ("vocab", "tensor"),
                 ("heads", "tensor"), ("kv_heads", "tensor"), ("qkv", "tensor"),
                 ("mlp", "tensor"), ("layers", None), ("norm", None))


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
    raise ValueError(f"mesh sizes data={data}, fsdp={fsdp}, tensor={tensor}: use positive sizes "
                     "and at most one -1.")
  known = math.prod(s for s in sizes if s != -1)
  if -1 in sizes:
    if len(devices) % known:
      raise ValueError(f"{len(devices)} devices cannot be split with data={data}, fsdp={fsdp}, "
                       f"tensor={tensor}.")
    sizes[sizes.index(-1)] = len(devices) // known
  if math.prod(sizes) != len(devices):
    raise ValueError(f"mesh data={sizes[0]} x fsdp={sizes[1]} x tensor={sizes[2]} = "
                     f"{math.prod(sizes)} devices, but {len(devices)} are available.")
  arr = np.asarray(devices, dtype=object).reshape(sizes)
  return Mesh(arr, MESH_AXES, axis_types=(AxisType.Auto,) * 3)


def _fit(spec: PartitionSpec, shape: tuple[int, ...], mesh: Mesh) -> PartitionSpec:
  """Drops mesh axes from dims they do not divide (small or odd-sized dims stay whole)."""
  out = []
  for dim, axes in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
    names = (axes,) if isinstance(axes, str) else tuple(axes or ())
    size = math.prod(mesh.shape[n] for n in names)
    out.append(axes if names and dim % size == 0 else None)
  return PartitionSpec(*out)


def param_shardings(model: Any, mesh: Mesh, rules: Sequence[tuple[str, Any]] = FSDP_RULES) -> Any:
  """NamedShardings for the (unboxed) params of a `jaxlora.models.Decoder`.

  Kernels are annotated with logical axis names; `rules` map them to mesh
  axes. A dim that a mesh axis does not divide is left unsharded.

  >>> import jax, jaxlora
  >>> cfg = jaxlora.models.ModelConfig("llama", 32, 16, 2, 4, 2, 4, 32, 64, 1e-6, False)
  >>> model = jaxlora.models.Decoder(cfg)
  >>> mesh = jaxlora.sharding.make_mesh(fsdp=-1)
  >>> sh = jaxlora.sharding.param_shardings(model, mesh)
  >>> sh["layers"]["mlp"]["up_proj"]["kernel"].spec[1]
  'fsdp'
  """
  from jaxlora.models.decoder import abstract_variables  # pylint: disable=import-outside-toplevel
  return _shardings_of(abstract_variables(model), mesh, rules)


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
  >>> cfg = jaxlora.models.ModelConfig("llama", 32, 16, 2, 4, 2, 4, 32, 64, 1e-6, False)
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
  base = _tree.filter_tree(p, lambda k: k not in _tree.ADAPTER_KEYS, prune=False)
  base_sh = _tree.get_params(base_shardings)
  # Quantized kernels: adapters follow the float kernel's sharding; the record gets its own.
  with_sharding = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                               base, base_sh, is_leaf=is_quantized)
  base_sh = jax.tree.map(lambda x, s: quantized_sharding(x, s) if is_quantized(x) else s,
                         base, base_sh, is_leaf=is_quantized)
  adapters = _tree.filter_tree(p, lambda k: k in _tree.ADAPTER_KEYS, prune=True)
  abstract = _tree.merge_trees(with_sharding, adapters)
  return _tree.merge_trees(base_sh, adapter_shardings(abstract))


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
  return optax.tree_map_params(tx, lambda _, s: s, state, shardings,
                               transform_non_params=lambda _: replicated,
                               is_leaf=lambda x: isinstance(x, NamedSharding))


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


def memory_plan(model: Any, mesh: Mesh, *, rank: int = 16, targets: Any = "all-linear",
                rules: Sequence[tuple[str, Any]] = FSDP_RULES, tx: Any = None,
                adapter_dtype: Any = None, quantize: str | None = None, block_size: int = 64,
                double_quant: bool = True) -> dict[str, int]:
  """Per-device bytes of base params, adapters and optimizer state, computed from shapes.

  Nothing is allocated: the model is traced abstractly. Activations are not
  included (they depend on batch, sequence length and remat policy).

  Args:
    model: a `jaxlora.models.Decoder` (its `param_dtype` sets the base bytes).
    mesh: the device mesh.
    rank, targets: as for `jaxlora.wrap`.
    rules: logical-axis rules.
    tx: optimizer (default: optax.adamw, two moments per adapter parameter).
    adapter_dtype: as `jaxlora.wrap(dtype=...)`.
    quantize, block_size, double_quant: a quantized base, as `jaxlora.quantize`
      makes it (``'nf4'``, ``'fp4'``, ``'int8'``; every linear kernel but the
      head); records shard as `quantized_sharding` says.

  Returns:
    ``{'base', 'adapter', 'optimizer', 'total'}`` in bytes per device.

  >>> import jaxlora
  >>> cfg = jaxlora.models.ModelConfig("llama", 32, 16, 2, 4, 2, 4, 32, 64, 1e-6, False)
  >>> plan = jaxlora.sharding.memory_plan(jaxlora.models.Decoder(cfg),
  ...                                     jaxlora.sharding.make_mesh(fsdp=-1), rank=2)
  >>> sorted(plan)
  ['adapter', 'base', 'optimizer', 'total']
  """
  from jaxlora import quantization  # pylint: disable=import-outside-toplevel
  from jaxlora import transform  # pylint: disable=import-outside-toplevel
  from jaxlora.models.decoder import abstract_variables  # pylint: disable=import-outside-toplevel

  boxed = abstract_variables(model)  # traced once, for both shapes and shardings
  base_sh = _shardings_of(boxed, mesh, rules)
  abstract = nn.unbox(boxed)["params"]
  lay = model.lora_layout(abstract)
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
  not_adapter = lambda t: _tree.filter_tree(t, lambda k: k not in _tree.ADAPTER_KEYS, prune=True)
  base = bytes_per_device(not_adapter(wrapped), not_adapter(sh))
  adapter = bytes_per_device(transform.adapter(wrapped), transform.adapter(sh))
  opt = bytes_per_device(state, opt_state_shardings(tx, trainable, t_sh, mesh))
  return {"base": base, "adapter": adapter, "optimizer": opt, "total": base + adapter + opt}
