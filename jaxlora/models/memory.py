"""What a decoder's training step holds per device: activations and logits, from shapes.

`jaxlora.models.Decoder.activation_bytes` (the `jaxlora.model_api.ActivationPlanner`
protocol) calls `activation_bytes`, which `jaxlora.sharding.memory_plan` adds
to the params, adapters and optimizer state. docs/design.md ("Memory: what a
training step holds") derives each term and compares it with XLA's buffer
assignment.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxlora import _tree
from jaxlora import sharding
from jaxlora._tree import A_KEY, KERNEL_KEY
from jaxlora.errors import InputError, InputTypeError
from jaxlora.models import attention as attention_lib
from jaxlora.models.decoder import REMAT_POLICIES

# Activation estimates: bytes of a float32 value.
_F32 = 4


def activation_bytes(model: Any, mesh: Mesh, *, rules: Sequence[tuple[str, Any]], params: Any,
                     shardings: Any, wrapped: Any, batch: int, seq: int,
                     loss_chunk_size: int | None = None, adapter_bytes: int = 0,
                     **options: Any) -> dict[str, int]:
  """Per-device bytes of a `Decoder` training step's activations and logits.

  See `jaxlora.sharding.memory_plan` for what the two numbers count.

  Args:
    model: the `jaxlora.models.Decoder`.
    mesh: the device mesh.
    rules: logical-axis rules (the batch is split over the mesh axes of ``'batch'``).
    params: the float base params (ShapeDtypeStructs).
    shardings: their shardings (`jaxlora.sharding.param_shardings`).
    wrapped: the wrapped abstract tree (which projections carry adapters, of what rank).
    batch: global rows per step.
    seq: tokens per row.
    loss_chunk_size: the ``chunk_size`` of `jaxlora.models.chunked_cross_entropy`,
      or None for the full logits.
    adapter_bytes: the adapters' bytes per device (their gradient is counted).
    **options: ``remat``, None or a policy of
      `jaxlora.models.decoder.REMAT_POLICIES`, and ``attention``, an attention
      implementation name; each defaults to the model's own.

  Returns:
    ``{'activations': ..., 'logits': ...}`` in bytes per device.

  Raises:
    InputError: an unknown remat policy.
    InputTypeError: an option other than ``remat`` and ``attention``.

  >>> import jax, jaxlora
  >>> cfg = jaxlora.models.ModelConfig.tiny("llama")
  >>> model = jaxlora.models.Decoder(cfg, remat="full")
  >>> mesh = jaxlora.sharding.make_mesh(fsdp=1, devices=jax.devices()[:1])
  >>> params = jax.eval_shape(lambda: jaxlora.models.init(model, jax.random.key(0)))
  >>> sh = jaxlora.sharding.param_shardings(model, mesh)
  >>> out = activation_bytes(model, mesh, rules=jaxlora.sharding.FSDP_RULES, params=params,
  ...                        shardings=sh, wrapped=params, batch=2, seq=8)
  >>> sorted(out), out["activations"] > 0
  (['activations', 'logits'], True)
  """
  remat = options.pop("remat", model.remat)
  attention = options.pop("attention", model.attention)
  if options:
    raise InputTypeError(f"Decoder.activation_bytes takes the options remat and attention; got "
                         f"{sorted(options)}.")
  layer_bytes, head_bytes = _read_weight_bytes(model, params, shardings, mesh, rules)
  return _activation_plan(model, mesh, rules, wrapped, batch, seq, remat, attention,
                          loss_chunk_size, layer_bytes, head_bytes, adapter_bytes)


def _axis_size(mesh: Mesh, rules: Sequence[tuple[str, Any]], logical: str, dim: int) -> int:
  """How many ways the rules split a `logical` dim of size `dim` (1 if they do not divide it)."""
  size = math.prod(mesh.shape[a] for a in sharding.logical_mesh_axes(mesh, rules, logical))
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
  cfg = model.config
  base = attention.split("-")[0]
  # An explicit fused implementation is planned for the platform it needs, so that a CPU
  # host can plan a TPU or GPU run; 'auto' is resolved for the mesh's own devices.
  backend = {"cudnn": "nvidia", "flash": "nvidia", "splash": "tpu"}.get(base)
  if backend is None:
    backend = _mesh_backend(mesh)
  chosen = attention_lib.plan(attention, packed=False, cache=False, window=cfg.window,
                              dtype=model.dtype, head_dim=cfg.head_dim, backend=backend,
                              xla_only=cfg.fused_attention_blocker)
  # 'cudnn-interpret' runs jax.nn.dot_product_attention's XLA implementation.
  return "xla" if chosen.implementation in ("xla", "cudnn-interpret") else "fused"


def _read_weight_bytes(model: Any, params: Any, shardings: Any, mesh: Mesh,
                       rules: Sequence[tuple[str, Any]]) -> tuple[int, int]:
  """Bytes of one layer's kernels and of the output head as the step reads them.

  In the compute dtype, split only over the mesh axes that do not carry the
  batch (FSDP gathers the rest before the matmul).
  """
  batch_axes = sharding.logical_mesh_axes(mesh, rules, "batch")
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
  cfg = model.config
  if remat is not None and remat not in REMAT_POLICIES:
    raise InputError(f"remat={remat!r}; choose one of {sorted(REMAT_POLICIES)} or None.")
  # memory_plan has checked batch, seq and loss_chunk_size (batch divides over its axes).
  shards = math.prod(mesh.shape[a] for a in sharding.logical_mesh_axes(mesh, rules, "batch"))
  c = jnp.dtype(model.dtype).itemsize
  f = _F32
  b, t = batch // shards, seq
  n = b * t
  d = cfg.hidden_size
  hd = cfg.head_dim
  heads = cfg.num_attention_heads // _axis_size(mesh, rules, "heads", cfg.num_attention_heads)
  kv = cfg.num_key_value_heads // _axis_size(mesh, rules, "kv_heads", cfg.num_key_value_heads)
  if cfg.num_experts:  # each token passes top_k experts (and the shared expert)
    width = cfg.num_experts_per_tok * cfg.moe_intermediate_size \
        + cfg.shared_expert_intermediate_size
    inter = width // _axis_size(mesh, rules, "mlp", cfg.moe_intermediate_size)
  else:
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
    if cfg.fused_qkv:  # Phi-3
      projections.update({("self_attn", "qkv_proj"): q + 2 * k, ("mlp", "gate_up_proj"): 2 * inter})
    if cfg.num_experts:  # the experts' outputs, by token and chosen expert
      projections.update({("experts", "gate_up_proj"): 2 * inter, ("experts", "down_proj"): d})
    last = ("experts", "down_proj") if cfg.num_experts else ("mlp", "down_proj")
    projections_attn = "self_attn"
  ranks = {}
  layers = "h" if cfg.is_gpt2 else "layers"
  for path, mod in _tree.adapter_modules(_tree.get_params(wrapped)):
    if path[0] == layers and tuple(path[-2:]) in projections:
      ranks[tuple(path[-2:])] = int(mod[A_KEY].shape[-1])
  # x @ A of every adapted projection, by half of the layer (an expert's on top_k rows).
  per_token = lambda name: cfg.num_experts_per_tok if name[0] == "experts" else 1
  lowrank = {part: n * sum(r * per_token(name) for name, r in ranks.items()
                           if (name[0] == part) or (part == "mlp" and name[0] == "experts"))
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
