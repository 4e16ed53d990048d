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
from jaxlora.errors import InputError


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
  adapter_only = _tree.adapter_leaves(p)
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
  >>> cfg = jaxlora.models.ModelConfig(
  ...     model_type="llama", vocab_size=32, hidden_size=16, num_hidden_layers=2,
  ...     num_attention_heads=4, num_key_value_heads=2, head_dim=4,
  ...     intermediate_size=32, max_position_embeddings=64, norm_eps=1e-6,
  ...     tie_word_embeddings=False)
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
  >>> cfg = jaxlora.models.ModelConfig(
  ...     model_type="llama", vocab_size=32, hidden_size=16, num_hidden_layers=2,
  ...     num_attention_heads=4, num_key_value_heads=2, head_dim=4,
  ...     intermediate_size=32, max_position_embeddings=64, norm_eps=1e-6,
  ...     tie_word_embeddings=False)
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


class _ModelDefault:
  """Marks an argument that defaults to the model's own attribute."""

  def __repr__(self) -> str:
    return "<the model's>"


_FROM_MODEL: Any = _ModelDefault()

# Activation estimates: bytes of a float32 value.
_F32 = 4


def _mesh_axes(mesh: Mesh, rules: Sequence[tuple[str, Any]], logical: str) -> tuple[str, ...]:
  """The mesh axes the rules map a logical axis name to."""
  axes = dict(rules).get(logical)
  return tuple(a for a in ((axes,) if isinstance(axes, str) else tuple(axes or ()))
               if a in mesh.shape)


def _axis_size(mesh: Mesh, rules: Sequence[tuple[str, Any]], logical: str, dim: int) -> int:
  """How many ways the rules split a `logical` dim of size `dim` (1 if they do not divide it)."""
  size = math.prod(mesh.shape[a] for a in _mesh_axes(mesh, rules, logical))
  return size if dim % size == 0 else 1


def _mesh_backend(mesh: Mesh) -> str:
  """'nvidia', 'rocm', 'tpu' or 'cpu': the platform of the mesh's devices."""
  device = mesh.devices.flat[0]
  platform = device.platform
  if platform in ("gpu", "cuda", "rocm"):
    version = str(getattr(device.client, "platform_version", "")).lower()
    return "rocm" if platform == "rocm" or "rocm" in version or "hip" in version else "nvidia"
  return platform


def _attention_kind(model: Any, mesh: Mesh, attention: str) -> str:
  """'xla' (dense (T, T) probabilities saved) or 'fused' (output and log-sum-exp only)."""
  from jaxlora.models import attention as attention_lib  # pylint: disable=import-outside-toplevel
  cfg = model.config
  base = attention.split("-")[0]
  # An explicit fused implementation is planned for the platform it needs, so that a CPU
  # host can plan a TPU or GPU run; 'auto' is resolved for the mesh's own devices.
  backend = {"cudnn": "nvidia", "flash": "nvidia", "splash": "tpu"}.get(base)
  if backend is None:
    backend = _mesh_backend(mesh)
  chosen = attention_lib.plan(attention, packed=False, cache=False, window=cfg.sliding_window,
                              dtype=model.dtype, head_dim=cfg.head_dim, backend=backend)
  # 'cudnn-interpret' runs jax.nn.dot_product_attention's XLA implementation.
  return "xla" if chosen.implementation in ("xla", "cudnn-interpret") else "fused"


def _read_weight_bytes(model: Any, params: Any, shardings: Any, mesh: Mesh,
                       rules: Sequence[tuple[str, Any]]) -> tuple[int, int]:
  """Bytes of one layer's kernels and of the output head as the step reads them.

  In the compute dtype, split only over the mesh axes that do not carry the
  batch (FSDP gathers the rest before the matmul).
  """
  batch_axes = _mesh_axes(mesh, rules, "batch")
  cfg = model.config
  c = jnp.dtype(model.dtype).itemsize
  layers = "h" if cfg.is_gpt2 else "layers"
  head = (("wte" if cfg.is_gpt2 else "embed_tokens", "embedding") if cfg.tie_word_embeddings
          else ("lm_head", KERNEL_KEY))

  def read(x, s):
    spec = [tuple(a for a in ((e,) if isinstance(e, str) else tuple(e or ()))
                  if a not in batch_axes) or None for e in s.spec]
    shape = NamedSharding(mesh, PartitionSpec(*spec)).shard_shape(tuple(x.shape))
    return math.prod(shape) * c

  layer = head_bytes = 0
  flat_sh = dict(jax.tree_util.tree_flatten_with_path(shardings)[0])
  for path, x in jax.tree_util.tree_flatten_with_path(params)[0]:
    keys = tuple(getattr(k, "key", k) for k in path)
    if keys[0] == layers:
      layer += read(x, flat_sh[path]) // cfg.num_hidden_layers
    elif keys[-2:] == head:
      head_bytes = read(x, flat_sh[path])
  return layer, head_bytes


def _activation_plan(model: Any, mesh: Mesh, rules: Sequence[tuple[str, Any]], wrapped: Any,
                     batch: int, seq: int, remat: str | None, attention: str,
                     loss_chunk_size: int | None, layer_bytes: int, head_bytes: int,
                     grad_bytes: int) -> dict[str, int]:
  """Per-device bytes of activations (saved residuals and one layer's backward) and logits.

  Counts what the scanned layer keeps for the backward pass under each remat
  policy, as XLA keeps it after merging duplicates (a reshaped copy of a
  tensor is the same buffer): ``n`` tokens per device, hidden ``d``, and per
  device ``q`` query features, ``k`` key/value features, ``i`` MLP features,
  ``h`` heads; ``c`` is the compute dtype's size.
  """
  from jaxlora.models.decoder import REMAT_POLICIES  # pylint: disable=import-outside-toplevel
  cfg = model.config
  if remat is not None and remat not in REMAT_POLICIES:
    raise InputError(f"remat={remat!r}; choose one of {sorted(REMAT_POLICIES)} or None.")
  for name, value in (("batch", batch), ("seq", seq)):
    if not isinstance(value, int) or value < 1:
      raise InputError(f"{name}={value!r}: give a positive integer (global batch rows, tokens "
                       "per row).")
  if loss_chunk_size is not None and (not isinstance(loss_chunk_size, int) or loss_chunk_size < 1):
    raise InputError(f"loss_chunk_size={loss_chunk_size!r}: give a positive integer, or None for "
                     "the full (batch, seq, vocab) logits.")
  batch_axes = _mesh_axes(mesh, rules, "batch")
  shards = math.prod(mesh.shape[a] for a in batch_axes)
  if batch % shards:
    raise InputError(f"batch={batch} cannot be split over the {shards} devices of the mesh axes "
                     f"{batch_axes} that carry the batch; use a multiple of {shards}.")
  c = jnp.dtype(model.dtype).itemsize
  f = _F32
  b, t = batch // shards, seq
  n = b * t
  d = cfg.hidden_size
  hd = cfg.head_dim
  heads = cfg.num_attention_heads // _axis_size(mesh, rules, "heads", cfg.num_attention_heads)
  kv = cfg.num_key_value_heads // _axis_size(mesh, rules, "kv_heads", cfg.num_key_value_heads)
  inter = cfg.intermediate_size // _axis_size(mesh, rules, "mlp", cfg.intermediate_size)
  vocab = cfg.vocab_size // _axis_size(mesh, rules, "vocab", cfg.vocab_size)
  q = heads * hd
  k = q if cfg.is_gpt2 else kv * hd
  fused = _attention_kind(model, mesh, attention) == "fused"
  tt = b * heads * t * t  # one layer's attention probabilities
  bht = b * heads * t

  # The layer's projections: (module path under the layer, output features per device).
  if cfg.is_gpt2:
    projections = {("attn", "c_attn"): 3 * q, ("attn", "c_proj"): d, ("mlp", "c_fc"): inter,
                   ("mlp", "c_proj"): d}
    last = ("mlp", "c_proj")
    projections_attn = "attn"
  else:
    projections = {("self_attn", "q_proj"): q, ("self_attn", "k_proj"): k,
                   ("self_attn", "v_proj"): k, ("self_attn", "o_proj"): d,
                   ("mlp", "gate_proj"): inter, ("mlp", "up_proj"): inter,
                   ("mlp", "down_proj"): d}
    last = ("mlp", "down_proj")
    projections_attn = "self_attn"
  ranks = {}
  layers = "h" if cfg.is_gpt2 else "layers"
  for path, mod in _tree.adapter_modules(_tree.get_params(wrapped)):
    if path[0] == layers and tuple(path[-2:]) in projections:
      ranks[tuple(path[-2:])] = int(mod[A_KEY].shape[-1])
  # x @ A of every adapted projection, by half of the layer.
  lowrank = {part: n * sum(r for name, r in ranks.items() if name[0] == part)
             for part in (projections_attn, "mlp")}

  # Policy None: everything the backward pass reads, as XLA keeps it (a reshaped copy
  # of a tensor, such as the flat input of a LoRA term, shares the buffer). Attention
  # half: the first norm's float32 input and statistics and three (n, d) tensors in the
  # compute dtype; q (rotated), k, v and the attention's output; XLA attention's
  # float32 exp(logits) and compute-dtype probabilities, or the fused kernels'
  # float32 log-sum-exp. MLP half: the second norm's (its float32 input, two tensors);
  # gate, up, sigmoid, silu, their product and one more (n, i) tensor (GPT-2: four
  # for the GELU). Both: the rank-r intermediates.
  norm = f * (n * d + 2 * n)
  attn = norm + c * (3 * n * d + n * (2 * q + 2 * k)) + c * lowrank[projections_attn]
  attn += f * bht if fused else f * (tt + 2 * bht) + c * tt
  if cfg.qk_norm:
    attn += n * (q + k) * (f + 2 * c)
  mlp = norm + c * (2 * n * d + (4 if cfg.is_gpt2 else 6) * n * inter + lowrank["mlp"])
  carry = c * n * d  # the layer's input, saved by the scan under every remat policy
  if remat is None:
    saved = attn + mlp
  elif remat == "full":
    saved = carry
  else:
    # Matmul outputs: each projection's base output and, when adapted, its LoRA term
    # (two tensors: they are added after the dots), and every x @ A. The last
    # projection's outputs are not read by the backward pass. Offloaded, they wait in
    # pinned host memory, not on the device.
    dots = c * (sum(out * n * (2 if name in ranks else 1) for name, out in projections.items()
                    if name != last) + sum(lowrank.values()))
    if remat == "dots" and not fused:  # batched dots too: q @ k (float32) and probs @ v
      dots += f * tt + c * n * q
    saved = carry if remat.startswith("offload") else carry + dots

  # One layer in the backward pass, half by half (the MLP's buffers are dead before the
  # attention's backward starts): under remat the half's residuals again (recomputed or
  # copied back), plus its gradient temporaries: float32 dP and d(logits) and, without
  # remat, a copy of the layer's probabilities (XLA attention) or float32 dq, dk, dv
  # (fused); dh, d(gate), d(up), d(silu) in the MLP; the gradient flowing through the
  # layer.
  flow = f * 2 * n * d
  attn_tmp = flow + (f * n * (q + 2 * k) if fused else f * tt * (2 if remat else 3))
  mlp_tmp = flow + f * 4 * n * inter
  if remat is None:
    working = max(attn_tmp, mlp_tmp)
  else:
    working = max(attn + attn_tmp, mlp + mlp_tmp)
  # The dense mask of the XLA path (bool, broadcast over heads without remat), once.
  mask = 0 if fused else (b * t * t if remat is not None else b * heads * t * t)
  # One layer's weights as the layer reads them (sliced from the stack, gathered over the
  # batch axes, in the compute dtype), and the adapters' gradient.
  activations = (cfg.num_hidden_layers * saved + working + mask + layer_bytes + grad_bytes)

  # The loss: the head's logits in the compute dtype (the full (batch, seq, vocab) or
  # one chunk) and their float32 softmax, which becomes their gradient; the head's
  # weights as the matmul reads them. These buffers are dead before the layers'
  # backward pass starts, so only what exceeds one layer's working set adds to the peak.
  rows = n if loss_chunk_size is None else b * min(loss_chunk_size, t)
  loss = rows * vocab * (c + f) + head_bytes
  logits = max(0, loss - working)
  return {"activations": int(activations), "logits": int(logits)}


def memory_plan(model: Any, mesh: Mesh, *, rank: int = 16, targets: Any = "all-linear",
                rules: Sequence[tuple[str, Any]] = FSDP_RULES, tx: Any = None,
                adapter_dtype: Any = None, quantize: str | None = None, block_size: int = 64,
                double_quant: bool = True, batch: int | None = None, seq: int | None = None,
                remat: Any = _FROM_MODEL, attention: Any = _FROM_MODEL,
                loss_chunk_size: int | None = None) -> dict[str, int]:
  """Per-device bytes of a LoRA training step, computed from shapes.

  Nothing is allocated: the model is traced abstractly. Without ``batch`` and
  ``seq`` the plan holds what exists between steps: base params, adapters and
  optimizer state. With them it adds what one training step needs on top,
  for the step ``jaxlora.apply(model.apply)`` forward, gradients of the
  adapters only (`jaxlora.split`), ``tx`` update:

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
    model: a `jaxlora.models.Decoder` (its ``param_dtype`` sets the base bytes,
      its ``dtype`` the activations').
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
    remat: None or a policy of `jaxlora.models.decoder.REMAT_POLICIES`
      (default: the model's ``remat``).
    attention: ``'auto'``, ``'xla'``, ``'cudnn'``, ``'splash'`` or ``'flash'``
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

  >>> import jaxlora
  >>> cfg = jaxlora.models.ModelConfig(
  ...     model_type="llama", vocab_size=32, hidden_size=16, num_hidden_layers=2,
  ...     num_attention_heads=4, num_key_value_heads=2, head_dim=4,
  ...     intermediate_size=32, max_position_embeddings=64, norm_eps=1e-6,
  ...     tie_word_embeddings=False)
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
  from jaxlora.models.decoder import abstract_variables  # pylint: disable=import-outside-toplevel

  if (batch is None) != (seq is None):
    raise InputError(f"batch={batch!r}, seq={seq!r}: give both (to plan activations and logits) "
                     "or neither (params, adapters and optimizer state only).")
  # Params do not depend on the attention implementation; trace with XLA's, which every
  # host runs, so that a CPU host can plan a model set up for its TPU or GPU kernels.
  shapes_model = model.clone(attention="xla") if hasattr(model, "attention") else model
  boxed = abstract_variables(shapes_model)  # traced once, for both shapes and shardings
  base_sh = _shardings_of(boxed, mesh, rules)
  abstract = nn.unbox(boxed)["params"]
  lay = shapes_model.lora_layout(abstract)
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
  remat = model.remat if remat is _FROM_MODEL else remat
  attention = model.attention if attention is _FROM_MODEL else attention
  layer_bytes, head_bytes = _read_weight_bytes(model, float_params, base_sh, mesh, rules)
  plan.update(_activation_plan(model, mesh, rules, wrapped, batch, seq, remat, attention,
                               loss_chunk_size, layer_bytes, head_bytes, adapter))
  plan["total"] += plan["activations"] + plan["logits"]
  return plan
