"""Flax (linen) decoders: GPT-2, the Llama family (Llama 2/3.x, Mistral, Qwen2/2.5, Qwen3),
Gemma 1/2/3 (text), Phi-3 and mixture-of-experts models (Mixtral, Qwen2-MoE, Qwen3-MoE).

Layers are stacked with `nn.scan` (one kernel per projection with a leading
layer axis) and optionally rematerialised. Module names follow the Hugging Face
checkpoints (`self_attn/q_proj`, `mlp/down_proj`, GPT-2's `attn/c_attn`), so
target regexes and PEFT key names carry over. Kernels carry logical axis names
for sharding (`nn.with_logical_partitioning`); `model.init` therefore returns
boxed params: use `flax.linen.unbox` (or `jaxlora.models.init`) for plain arrays.
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxlora import _tree
from jaxlora import kernel_layout
from jaxlora.models import attention as attention_lib
from jaxlora.models.config import ModelConfig
from jaxlora.errors import InputError

Array = jax.Array

REMAT_POLICIES = {
    "full": None,  # save nothing: recompute the whole layer in the backward pass
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    # As dots_no_batch, but the saved matmul outputs wait in pinned host memory for the
    # backward pass (device memory of `full`, fewer recomputed FLOPs; costs host transfers).
    "offload_dots_no_batch": jax.checkpoint_policies.offload_dot_with_no_batch_dims(
        "device", "pinned_host"),
}


def _init(axes: tuple[str | None, ...], std: float = 0.02):
  return nn.with_logical_partitioning(nn.initializers.normal(std), axes)


class RMSNorm(nn.Module):
  """Llama's RMSNorm: normalise in float32, cast back, then scale.

  With ``plus_one`` (Gemma) the stored weight ``w`` scales by ``1 + w`` and the
  whole computation stays in float32 until the final cast, as Gemma's does.
  """
  eps: float
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  plus_one: bool = False

  @nn.compact
  def __call__(self, x):
    init = nn.initializers.zeros if self.plus_one else nn.initializers.ones
    scale = self.param("scale", nn.with_logical_partitioning(init, ("norm",)),
                       (x.shape[-1],), self.param_dtype)
    h = x.astype(jnp.float32)
    h = h * jax.lax.rsqrt(jnp.mean(h * h, axis=-1, keepdims=True) + self.eps)
    shape = (1,) * (h.ndim - 1) + (-1,)
    if self.plus_one:
      return (h * (1.0 + scale.astype(jnp.float32).reshape(shape))).astype(self.dtype)
    return scale.astype(self.dtype).reshape(shape) * h.astype(self.dtype)


def _rms(mod, name):
  cfg = mod.config
  return RMSNorm(cfg.norm_eps, mod.dtype, mod.param_dtype, cfg.norm_plus_one, name=name)


def rope_inv_freq(cfg: ModelConfig, local: bool = False) -> np.ndarray:
  """Inverse RoPE frequencies, with the checkpoint's rope scaling.

  ``local``: those of the sliding-window layers (Gemma 3's own base, no scaling).
  """
  d = cfg.head_dim
  theta = (cfg.local_rope_theta or cfg.rope_theta) if local else cfg.rope_theta
  inv = 1.0 / (theta ** (np.arange(0, d, 2, dtype=np.int64).astype(np.float32) / d))
  if local:
    return inv.astype(np.float32)
  if cfg.rope_type == "linear":
    inv = inv / cfg.rope_factor
  elif cfg.rope_type == "llama3":
    factor, lo, hi = cfg.rope_factor, cfg.rope_low_freq_factor, cfg.rope_high_freq_factor
    old = cfg.rope_original_max_position_embeddings
    wavelen = 2 * math.pi / inv
    scaled = np.where(wavelen > old / lo, inv / factor, inv)
    smooth = (old / wavelen - lo) / (hi - lo)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < old / hi) & ~(wavelen > old / lo)
    inv = np.where(medium, smoothed, scaled)
  return inv.astype(np.float32)


def _rotate_half(x):
  h = x.shape[-1] // 2
  return jnp.concatenate([-x[..., h:], x[..., :h]], axis=-1)


def _apply_rope(x, cos, sin):
  return x * cos[:, :, None, :] + _rotate_half(x) * sin[:, :, None, :]


def _dense(mod, features, axes, name, bias):
  return nn.Dense(features, use_bias=bias, dtype=mod.dtype, param_dtype=mod.param_dtype,
                  kernel_init=_init(axes),
                  bias_init=nn.with_logical_partitioning(nn.initializers.zeros, axes[1:]),
                  name=name)


class Attention(nn.Module):
  """Multi-head attention with grouped KV heads, RoPE (Llama) and an optional KV cache."""
  config: ModelConfig
  dtype: Any
  param_dtype: Any
  implementation: str = "xla"  # concrete, from attention.plan

  @nn.compact
  def __call__(self, h, ctx, layer_cache, is_local=None):
    cfg = self.config
    attn, cos, sin, index = ctx["attn"], ctx["cos"], ctx["sin"], ctx["index"]
    if is_local is not None:  # alternating layers: this layer's mask and RoPE, picked at run time
      local = ctx["local"]
      attn = {"mask": jnp.where(is_local, local["mask"], attn["mask"])}
      cos, sin = jnp.where(is_local, local["cos"], cos), jnp.where(is_local, local["sin"], sin)
    b, t, _ = h.shape
    n, kv, hd = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    if cfg.is_gpt2:
      qkv = _dense(self, 3 * n * hd, ("embed", "qkv"), "c_attn", True)(h)
      q, k, v = jnp.split(qkv, 3, axis=-1)
    elif cfg.fused_qkv:  # Phi-3: q, k, v rows of one projection, in that order
      qkv = _dense(self, (n + 2 * kv) * hd, ("embed", "heads"), "qkv_proj", cfg.qkv_bias)(h)
      q, k, v = jnp.split(qkv, [n * hd, (n + kv) * hd], axis=-1)
    else:
      q = _dense(self, n * hd, ("embed", "heads"), "q_proj", cfg.qkv_bias)(h)
      k = _dense(self, kv * hd, ("embed", "kv_heads"), "k_proj", cfg.qkv_bias)(h)
      v = _dense(self, kv * hd, ("embed", "kv_heads"), "v_proj", cfg.qkv_bias)(h)
    q = q.reshape(b, t, n, hd)
    k = k.reshape(b, t, kv, hd)
    v = v.reshape(b, t, kv, hd)
    if cfg.qk_norm:
      q, k = _rms(self, "q_norm")(q), _rms(self, "k_norm")(k)
    if cos is not None:
      q, k = _apply_rope(q, cos, sin), _apply_rope(k, cos, sin)
    new_cache = None
    if layer_cache is not None:
      ck, cv = layer_cache
      ck = jax.lax.dynamic_update_slice(ck, k.astype(ck.dtype), (0, index, 0, 0))
      cv = jax.lax.dynamic_update_slice(cv, v.astype(cv.dtype), (0, index, 0, 0))
      new_cache = (ck, cv)
      k, v = ck.astype(self.dtype), cv.astype(self.dtype)
    scalar = cfg.query_pre_attn_scalar or hd
    o = attention_lib.attend(q, k, v, attn, implementation=self.implementation,
                             scale=1.0 / math.sqrt(scalar), window=cfg.window,
                             softcap=cfg.attn_softcap)
    o = o.reshape(b, t, n * hd)
    if cfg.is_gpt2:
      return _dense(self, cfg.hidden_size, ("heads", "embed"), "c_proj", True)(o), new_cache
    return _dense(self, cfg.hidden_size, ("heads", "embed"), "o_proj", cfg.o_bias)(o), new_cache


def activation(name: str):
  """The MLP nonlinearity of a config's ``activation`` name.

  ``'silu'``/``'swish'``; ``'gelu'`` (exact); ``'gelu_new'``/``'gelu_pytorch_tanh'`` (tanh).

  >>> import jax.numpy as jnp
  >>> round(float(activation("gelu_pytorch_tanh")(jnp.float32(1.0))), 4)
  0.8412
  """
  if name in ("silu", "swish"):
    return jax.nn.silu
  return lambda x: jax.nn.gelu(x, approximate=name != "gelu")


class MLP(nn.Module):
  """GPT-2's GELU MLP, or the gated MLP (SwiGLU; GeGLU for Gemma; fused for Phi-3)."""
  config: ModelConfig
  dtype: Any
  param_dtype: Any

  @nn.compact
  def __call__(self, h):
    cfg = self.config
    act = activation(cfg.activation)
    if cfg.is_gpt2:
      h = _dense(self, cfg.intermediate_size, ("embed", "mlp"), "c_fc", True)(h)
      return _dense(self, cfg.hidden_size, ("mlp", "embed"), "c_proj", True)(act(h))
    if cfg.fused_gate_up:  # Phi-3: gate rows first, then up
      gu = _dense(self, 2 * cfg.intermediate_size, ("embed", "mlp"), "gate_up_proj",
                  cfg.mlp_bias)(h)
      g, u = jnp.split(gu, 2, axis=-1)
    else:
      g = _dense(self, cfg.intermediate_size, ("embed", "mlp"), "gate_proj", cfg.mlp_bias)(h)
      u = _dense(self, cfg.intermediate_size, ("embed", "mlp"), "up_proj", cfg.mlp_bias)(h)
    return _dense(self, cfg.hidden_size, ("mlp", "embed"), "down_proj", cfg.mlp_bias)(act(g) * u)


class Block(nn.Module):
  """One pre-norm decoder layer; `nn.scan` carries `x` and maps over the KV cache."""
  config: ModelConfig
  dtype: Any
  param_dtype: Any
  implementation: str = "xla"

  def _norm(self, name):
    cfg = self.config
    if cfg.is_gpt2:
      return nn.LayerNorm(cfg.norm_eps, dtype=self.dtype, param_dtype=self.param_dtype,
                          use_fast_variance=False, name=name)
    return _rms(self, name)

  def _mlp(self):
    cfg = self.config
    if not cfg.num_experts:
      return MLP(cfg, self.dtype, self.param_dtype, name="mlp")
    from jaxlora.models import moe  # pylint: disable=import-outside-toplevel
    return moe.MoE(hidden_size=cfg.hidden_size, intermediate_size=cfg.moe_intermediate_size,
                   num_experts=cfg.num_experts, top_k=cfg.num_experts_per_tok,
                   norm_topk_prob=cfg.norm_topk_prob,
                   shared_intermediate_size=cfg.shared_expert_intermediate_size or None,
                   dtype=self.dtype, param_dtype=self.param_dtype, name="mlp")

  @nn.compact
  def __call__(self, x, ctx, layer_cache, is_local=None):
    cfg = self.config
    gpt2 = cfg.is_gpt2
    h = self._norm("ln_1" if gpt2 else "input_layernorm")(x)
    o, new_cache = Attention(cfg, self.dtype, self.param_dtype, self.implementation,
                             name="attn" if gpt2 else "self_attn")(h, ctx, layer_cache, is_local)
    if cfg.sandwich_norm:  # Gemma 2/3: every sublayer's output is normalised too
      x = x + self._norm("post_attention_layernorm")(o)
      h = self._mlp()(self._norm("pre_feedforward_layernorm")(x))
      return x + self._norm("post_feedforward_layernorm")(h), new_cache
    x = x + o
    h = self._norm("ln_2" if gpt2 else "post_attention_layernorm")(x)
    return x + self._mlp()(h), new_cache


class Decoder(nn.Module):
  """A causal language model: token ids in, logits out.

  Attributes:
    config: the architecture (`ModelConfig`, usually from `from_pretrained`).
    dtype: compute dtype (bfloat16 on accelerators, float32 on CPU).
    param_dtype: dtype of freshly initialised params.
    remat: None, or a rematerialisation policy name: 'full', 'dots', 'dots_no_batch'.
    scan_unroll: layers per iteration of the `nn.scan` loop (`num_hidden_layers` unrolls it
      fully). The params keep their stacked layout either way.
    attention: the attention implementation (`jaxlora.models.attention`): 'auto' (cuDNN
      on NVIDIA GPUs, splash on TPU, XLA elsewhere), 'xla', 'cudnn', 'splash' or 'flash'.

  The decoder implements every protocol of `jaxlora.model_api`, which is how
  the core (`jaxlora.wrap`, `jaxlora.sharding`, `jaxlora.peft`,
  `jaxlora.generate`) uses it without importing it.

  >>> import jaxlora
  >>> cfg = jaxlora.models.ModelConfig.tiny("llama")
  >>> model = jaxlora.models.Decoder(cfg)
  >>> api = jaxlora.model_api
  >>> all(isinstance(model, p) for p in (api.AbstractModel, api.LayoutProvider,
  ...     api.ActivationPlanner, api.HubNames, api.CachedLM))
  True
  >>> model.hf_module_name(("layers", "mlp", "up_proj"), 1)
  'model.layers.1.mlp.up_proj'
  >>> model.flax_module_path("model.layers.1.mlp.up_proj")
  (('layers', 'mlp', 'up_proj'), 1)
  >>> model.init_cache(batch=2, max_length=8)["k"].shape
  (2, 2, 8, 2, 4)
  """
  config: ModelConfig
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  remat: str | None = None
  scan_unroll: int = 1
  attention: str = "auto"

  # jaxlora.model_api.LayoutProvider
  def lora_layout(self, params) -> kernel_layout.Layout:
    """The kernel layout of this model, so that ``jaxlora.wrap(..., layout=model)`` works."""
    return _lora_layout(self, params)

  # jaxlora.model_api.AbstractModel
  def abstract_variables(self) -> dict:
    """The boxed variables `init` would create (logical axis names kept), allocating nothing."""
    # Params do not depend on the attention implementation; trace with XLA's, which every
    # host runs, so that a CPU host can plan a model set up for its TPU or GPU kernels.
    return abstract_variables(self.clone(attention="xla"))

  # jaxlora.model_api.ActivationPlanner
  def activation_bytes(self, mesh: Any, **kwargs: Any) -> dict[str, int]:
    """Per-device bytes of a training step's activations and logits (`memory.activation_bytes`).

    ``remat`` and ``attention`` default to the model's own.
    """
    from jaxlora.models import memory  # pylint: disable=import-outside-toplevel
    return memory.activation_bytes(self, mesh, **kwargs)

  # jaxlora.model_api.HubNames
  @property
  def fan_in_fan_out(self) -> bool:
    """PEFT's flag for PyTorch weights stored (in, out): GPT-2's Conv1D."""
    return self.config.is_gpt2

  def hf_module_name(self, module_path: tuple[str, ...], layer: int | None) -> str:
    """The PyTorch module name of a flax module path (`jaxlora.models.hub.hf_module_name`)."""
    from jaxlora.models import hub  # pylint: disable=import-outside-toplevel
    return hub.hf_module_name(self.config, module_path, layer)

  def flax_module_path(self, name: str) -> tuple[tuple[str, ...], int | None]:
    """Inverse of `hf_module_name`: ``(module path, layer or None)``."""
    from jaxlora.models import hub  # pylint: disable=import-outside-toplevel
    return hub.flax_module_path(self.config, name)

  # jaxlora.model_api.CachedLM
  def init_cache(self, batch: int, max_length: int) -> dict:
    """An empty KV cache in the compute dtype (`jaxlora.models.init_cache`)."""
    return init_cache(self.config, batch, max_length, self.dtype)

  @property
  def eos_token_id(self) -> int | tuple[int, ...] | None:
    """The checkpoint's end-of-sequence token(s)."""
    return self.config.eos_token_id

  @property
  def pad_token_id(self) -> int | None:
    """The checkpoint's padding token."""
    return self.config.pad_token_id

  @property
  def max_positions(self) -> int | None:
    """GPT-2's learned positions bound the sequence; rotary positions (Llama) do not."""
    return self.config.max_position_embeddings if self.config.is_gpt2 else None

  @nn.compact
  def __call__(self, input_ids: Array, attention_mask: Array | None = None,
               position_ids: Array | None = None, cache: dict | None = None,
               segment_ids: Array | None = None, return_hidden: bool = False):
    """Logits `(batch, seq, vocab)`; with `cache`, also the updated cache.

    Args:
      input_ids: int `(batch, seq)`.
      attention_mask: `(batch, seq)`, 1 for tokens and 0 for padding (either side).
      position_ids: `(batch, seq)`; by default counted from the first real token (with
        `segment_ids`, from the first token of each segment).
      cache: from `init_cache`; new keys and values are written at `cache['index']`.
      segment_ids: int `(batch, seq)` for packed rows: tokens attend only to earlier tokens of
        their own segment, positions restart at 0 in each segment, and 0 marks padding. A
        segment is a run of equal ids. Not with `cache`.
      return_hidden: return the final normalised hidden states `(batch, seq, hidden)` instead
        of logits (for `jaxlora.models.chunked_cross_entropy`, which applies the head itself).
    """
    cfg = self.config
    b, t = input_ids.shape
    chosen = attention_lib.plan(self.attention, packed=segment_ids is not None,
                                cache=cache is not None, window=cfg.window,
                                dtype=self.dtype, head_dim=cfg.head_dim,
                                xla_only=cfg.fused_attention_blocker)
    attention_lib.log_fallback(self.attention, chosen)
    impl = chosen.implementation
    valid = (jnp.ones((b, t), bool) if attention_mask is None
             else jnp.asarray(attention_mask).astype(bool))
    seg = None
    if segment_ids is not None:
      seg = _check_segments(segment_ids, (b, t), cache)
      valid = valid & (seg > 0)
      if position_ids is None:
        position_ids = _segment_positions(seg)
    restore = None  # the inverse permutation of the cuDNN path's compaction
    if cache is None:
      index = jnp.zeros((), jnp.int32)
      if position_ids is None:
        position_ids = jnp.maximum(jnp.cumsum(valid, axis=-1) - 1, 0)
      padded = attention_mask is not None or seg is not None
      if impl == "xla":
        masks = lambda w: {"mask": attention_lib.xla_mask(jnp.arange(t), jnp.arange(t), valid,
                                                          w, seg)}
      elif impl.startswith("cudnn"):
        attn = {}
        if padded:  # real tokens first in every row, so that lengths describe the padding
          perm, restore, lengths = attention_lib.compact(valid)
          input_ids = attention_lib.gather_rows(jnp.asarray(input_ids), perm)
          position_ids = attention_lib.gather_rows(jnp.asarray(position_ids), perm)
          attn = {"lengths": lengths}
      else:  # splash / flash: padding is segment 0
        attn = {}
        if padded:
          attn = {"segment_ids": jnp.where(valid, 1 if seg is None else seg, 0)
                                 .astype(jnp.int32)}
    else:
      index = cache["index"]
      key_valid = jax.lax.dynamic_update_slice(cache["valid"], valid, (0, index))
      if position_ids is None:  # continue each row from its last real token
        position_ids = cache["next_position"][:, None] + jnp.maximum(
            jnp.cumsum(valid, axis=-1) - 1, 0)
      masks = lambda w: {"mask": attention_lib.xla_mask(
          index + jnp.arange(t), jnp.arange(key_valid.shape[1]), key_valid, w)}
    if impl == "xla" or cache is not None:
      attn = masks(cfg.window)

    embed_name = "wte" if cfg.is_gpt2 else "embed_tokens"
    embed = nn.Embed(cfg.vocab_size, cfg.hidden_size, dtype=self.dtype,
                     param_dtype=self.param_dtype,
                     embedding_init=_init(("vocab", "embed")), name=embed_name)
    x = attention_lib.shard_batch(embed(input_ids))  # rows, not features, split over devices
    if cfg.embed_scale:  # Gemma: sqrt(hidden) rounded to the compute dtype, as transformers does
      x = x * jnp.asarray(math.sqrt(cfg.hidden_size), self.dtype)
    if cfg.is_gpt2:
      wpe = nn.Embed(cfg.max_position_embeddings, cfg.hidden_size, dtype=self.dtype,
                     param_dtype=self.param_dtype, embedding_init=_init((None, "embed"), 0.01),
                     name="wpe")
      x = x + wpe(position_ids)
      cos = sin = None
    else:
      all_local = cfg.window is not None and cfg.local_rope_theta is not None
      cos, sin = _rope(cfg, position_ids, self.dtype, local=all_local)
    ctx = {"attn": attn, "cos": cos, "sin": sin, "index": index, "local": None}
    is_local = None
    if cfg.mixed_layers:  # Gemma 2/3: each scanned layer picks the local or global context
      local_cos, local_sin = ((cos, sin) if cfg.local_rope_theta is None
                              else _rope(cfg, position_ids, self.dtype, local=True))
      ctx["local"] = {"mask": masks(cfg.sliding_window)["mask"], "cos": local_cos,
                      "sin": local_sin}
      is_local = jnp.asarray([k == "sliding_attention" for k in cfg.layer_types or ()])

    block = Block
    if self.remat is not None:
      if self.remat not in REMAT_POLICIES:
        raise InputError(f"remat={self.remat!r}; choose one of {sorted(REMAT_POLICIES)} or None.")
      block = nn.remat(Block, policy=REMAT_POLICIES[self.remat], prevent_cse=False)
    stack = nn.scan(block, variable_axes={"params": 0, "intermediates": 0},
                    # LoRA dropout draws its masks inside the layers: one key per layer.
                    split_rngs={"params": True, "dropout": True},
                    in_axes=(nn.broadcast, 0, 0), length=cfg.num_hidden_layers,
                    unroll=self.scan_unroll,
                    metadata_params={nn.PARTITION_NAME: "layers"})
    layer_cache = None if cache is None else (cache["k"], cache["v"])
    x, new_kv = stack(cfg, self.dtype, self.param_dtype, impl,
                      name="h" if cfg.is_gpt2 else "layers")(x, ctx, layer_cache, is_local)
    if restore is not None:
      x = attention_lib.gather_rows(x, restore)

    if cfg.is_gpt2:
      x = nn.LayerNorm(cfg.norm_eps, dtype=self.dtype, param_dtype=self.param_dtype,
                       use_fast_variance=False, name="ln_f")(x)
    else:
      x = _rms(self, "norm")(x)
    if return_hidden:
      logits = x
    elif cfg.tie_word_embeddings:
      logits = embed.attend(x)
    else:
      logits = nn.Dense(cfg.vocab_size, use_bias=False, dtype=self.dtype,
                        param_dtype=self.param_dtype, kernel_init=_init(("embed", "vocab")),
                        name="lm_head")(x)
    if not return_hidden and cfg.final_softcap:
      logits = softcap(logits, cfg.final_softcap)
    if cache is None:
      return logits
    n_new = jnp.sum(valid, axis=-1).astype(jnp.int32)
    new_cache = {"k": new_kv[0], "v": new_kv[1], "valid": key_valid, "index": index + t,
                 "next_position": cache["next_position"] + n_new}
    return logits, new_cache


def softcap(x: Array, cap: float) -> Array:
  """``cap * tanh(x / cap)``: Gemma 2's soft-capping of logits.

  >>> float(softcap(jnp.asarray(1e6), 30.0))
  30.0
  """
  return jnp.tanh(x / cap) * cap


def _rope(cfg: ModelConfig, position_ids, dtype, local: bool):
  freqs = (position_ids[..., None].astype(jnp.float32)
           * jnp.asarray(rope_inv_freq(cfg, local))[None, None, :])
  emb = jnp.concatenate([freqs, freqs], axis=-1)
  return jnp.cos(emb).astype(dtype), jnp.sin(emb).astype(dtype)


def _check_segments(segment_ids, shape, cache):
  seg = jnp.asarray(segment_ids)
  if cache is not None:
    raise InputError("segment_ids (packed rows) cannot be combined with a KV cache; decode "
                     "one sequence per row with attention_mask instead.")
  if tuple(seg.shape) != tuple(shape) or not jnp.issubdtype(seg.dtype, jnp.integer):
    raise InputError(f"segment_ids must be an integer array shaped like input_ids {shape}, got "
                     f"{seg.dtype} {tuple(seg.shape)}.")
  return seg


def _segment_positions(seg):
  """Index of each token within its segment (a run of equal ids)."""
  t = seg.shape[1]
  idx = jnp.arange(t)[None, :]
  starts = jnp.concatenate([jnp.ones_like(seg[:, :1], bool), seg[:, 1:] != seg[:, :-1]], axis=1)
  return idx - jax.lax.cummax(jnp.where(starts, idx, 0), axis=1)


def _lora_layout(model: "Decoder", params) -> kernel_layout.Layout:
  ids = jax.ShapeDtypeStruct((1, 8), jnp.int32)
  # Kernel roles do not depend on the attention implementation; XLA's traces on every host.
  return kernel_layout.trace_layout(model.clone(attention="xla").apply,
                                    {"params": _tree.get_params(params)}, ids)


def abstract_variables(model: "Decoder") -> dict:
  """The (boxed) variables `model.init` would create, as ShapeDtypeStructs; nothing is allocated.

  >>> import jaxlora
  >>> cfg = jaxlora.models.ModelConfig.tiny("llama")
  >>> v = abstract_variables(jaxlora.models.Decoder(cfg))
  >>> v["params"]["layers"]["mlp"]["up_proj"]["kernel"].value.shape
  (2, 16, 32)
  """
  return jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 1), jnp.int32)))


def init_cache(config: ModelConfig, batch: int, max_length: int, dtype: Any = jnp.float32) -> dict:
  """An empty KV cache for `batch` sequences of up to `max_length` tokens.

  >>> from jaxlora.models import ModelConfig, init_cache
  >>> cfg = ModelConfig.tiny("llama")
  >>> init_cache(cfg, batch=3, max_length=10)["k"].shape
  (2, 3, 10, 2, 4)
  """
  shape = (config.num_hidden_layers, batch, max_length, config.num_key_value_heads,
           config.head_dim)
  return {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype),
          "valid": jnp.zeros((batch, max_length), bool), "index": jnp.zeros((), jnp.int32),
          "next_position": jnp.zeros((batch,), jnp.int32)}
