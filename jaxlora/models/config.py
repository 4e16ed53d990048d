"""Model configuration, read from and written to Hugging Face `config.json` dicts."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from typing import Any
from jaxlora.errors import InputError

LLAMA_TYPES = ("llama", "mistral", "qwen2", "qwen3")
GEMMA_TYPES = ("gemma", "gemma2", "gemma3_text")
MOE_TYPES = ("mixtral", "qwen2_moe", "qwen3_moe")
MODEL_TYPES = ("gpt2",) + LLAMA_TYPES + GEMMA_TYPES + ("phi3",) + MOE_TYPES
ROPE_TYPES = ("default", "linear", "llama3")
LAYER_TYPES = ("full_attention", "sliding_attention")
_ARCHITECTURES = {
    "llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM", "gemma": "GemmaForCausalLM", "gemma2": "Gemma2ForCausalLM",
    "gemma3_text": "Gemma3ForCausalLM", "phi3": "Phi3ForCausalLM",
    "mixtral": "MixtralForCausalLM", "qwen2_moe": "Qwen2MoeForCausalLM",
    "qwen3_moe": "Qwen3MoeForCausalLM"}
_GELU_TANH = ("gelu_pytorch_tanh", "gelu_new")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Architecture hyperparameters of a jaxlora decoder.

  GPT-2, the Llama family (Llama, Mistral, Qwen2, Qwen3), Gemma 1/2/3 (text),
  Phi-3 and the mixture-of-experts families (Mixtral, Qwen2-MoE, Qwen3-MoE).
  Field names follow the Llama convention; `from_hf` maps each family's names.
  """
  model_type: str
  vocab_size: int
  hidden_size: int
  num_hidden_layers: int
  num_attention_heads: int
  num_key_value_heads: int
  head_dim: int
  intermediate_size: int
  max_position_embeddings: int
  norm_eps: float
  tie_word_embeddings: bool
  rope_theta: float = 10000.0
  rope_type: str = "default"
  rope_factor: float = 1.0
  rope_low_freq_factor: float = 1.0
  rope_high_freq_factor: float = 4.0
  rope_original_max_position_embeddings: int = 8192
  qkv_bias: bool = False      # bias on q/k/v projections (Qwen2, Llama attention_bias)
  o_bias: bool = False        # bias on the output projection (Llama attention_bias)
  mlp_bias: bool = False
  qk_norm: bool = False       # Qwen3: RMSNorm on each head of q and k before RoPE
  activation: str = "silu"
  sliding_window: int | None = None
  # Per-layer attention kinds ('full_attention' / 'sliding_attention'); None: every layer
  # is sliding when `sliding_window` is set (Mistral, Phi-3), else full.
  layer_types: tuple[str, ...] | None = None
  local_rope_theta: float | None = None  # Gemma 3: RoPE base of the sliding layers
  norm_plus_one: bool = False       # Gemma: RMSNorm scales by (1 + w), all in float32
  embed_scale: bool = False         # Gemma: embeddings times sqrt(hidden_size)
  sandwich_norm: bool = False       # Gemma 2/3: norms after attention and MLP as well
  query_pre_attn_scalar: float | None = None  # Gemma 2/3: logits scale scalar**-0.5
  attn_softcap: float | None = None   # Gemma 2: cap * tanh(logits / cap) on attention
  final_softcap: float | None = None  # Gemma 2: the same on the output logits
  fused_qkv: bool = False           # Phi-3: one qkv_proj (q, k, v rows in order)
  fused_gate_up: bool = False       # Phi-3: one gate_up_proj (gate rows first)
  num_experts: int = 0              # mixture of experts (Mixtral, Qwen MoE); 0: dense MLP
  num_experts_per_tok: int = 2
  moe_intermediate_size: int = 0
  norm_topk_prob: bool = True       # renormalise the top-k routing weights (Mixtral: always)
  shared_expert_intermediate_size: int = 0  # Qwen2-MoE's shared expert (with a sigmoid gate)
  router_aux_loss_coef: float = 0.0
  bos_token_id: int | None = None
  eos_token_id: int | tuple[int, ...] | None = None
  pad_token_id: int | None = None
  extra: tuple[tuple[str, str], ...] = ()  # other config.json keys (JSON text), written back

  @classmethod
  def tiny(cls, model_type: str = "llama", **changes: Any) -> "ModelConfig":
    """A two-layer model of a few thousand parameters, for examples and pipeline tests.

    Args:
      model_type: ``'gpt2'`` or one of the Llama family (``'llama'``, ``'mistral'``, ...).
      **changes: any other field, by name, e.g. ``num_hidden_layers=4``.

    >>> import jaxlora
    >>> cfg = jaxlora.models.ModelConfig.tiny("llama", num_hidden_layers=3)
    >>> cfg == jaxlora.models.ModelConfig(
    ...     model_type="llama", vocab_size=32, hidden_size=16, num_hidden_layers=3,
    ...     num_attention_heads=4, num_key_value_heads=2, head_dim=4,
    ...     intermediate_size=32, max_position_embeddings=64, norm_eps=1e-6,
    ...     tie_word_embeddings=False)
    True
    """
    if model_type not in MODEL_TYPES:
      raise InputError(f"model_type {model_type!r} is not supported; choose one of "
                       f"{', '.join(MODEL_TYPES)}.")
    gpt2 = model_type == "gpt2"
    fields = dict(model_type=model_type, vocab_size=32, hidden_size=16, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=4 if gpt2 else 2, head_dim=4,
                  intermediate_size=64 if gpt2 else 32, max_position_embeddings=64,
                  norm_eps=1e-5 if gpt2 else 1e-6, tie_word_embeddings=gpt2)
    fields.update(_FAMILY_DEFAULTS.get(model_type, {}))
    unknown = sorted(set(changes) - {f.name for f in dataclasses.fields(cls)})
    if unknown:
      raise InputError(f"ModelConfig has no field(s) {unknown}; see the ModelConfig fields.")
    return cls(**{**fields, **changes})

  @property
  def is_gpt2(self) -> bool:
    return self.model_type == "gpt2"

  @property
  def mixed_layers(self) -> bool:
    """Whether sliding and full attention layers alternate (Gemma 2/3): then each layer
    picks its mask (and RoPE base) at run time, inside the scanned stack."""
    return self.layer_types is not None and len(set(self.layer_types)) > 1

  @property
  def window(self) -> int | None:
    """The sliding window every layer shares (None: full attention, or mixed layers)."""
    if self.layer_types is None:
      return self.sliding_window
    if set(self.layer_types) == {"sliding_attention"}:
      return self.sliding_window
    return None

  @property
  def fused_attention_blocker(self) -> str | None:
    """Why this architecture's attention runs on the XLA path only, or None."""
    if self.attn_softcap:
      return "attention logit soft-capping (Gemma 2) runs on the XLA path"
    if self.mixed_layers:
      return "alternating sliding and full attention layers run on the XLA path"
    return None

  @classmethod
  def from_hf(cls, cfg: Mapping[str, Any], *, source: str = "config.json") -> "ModelConfig":
    """Builds a config from a Hugging Face `config.json` dict."""
    mt = cfg.get("model_type")
    if mt == "gemma3" and "text_config" in cfg:
      raise InputError(f"{source}: model_type 'gemma3' is Gemma 3 with its vision tower; "
                       "jaxlora reads the text model (model_type 'gemma3_text', e.g. "
                       "gemma-3-1b), not the multimodal checkpoints.")
    if mt not in MODEL_TYPES:
      raise InputError(f"{source}: model_type {mt!r} is not supported; jaxlora.models "
                       f"reads {', '.join(MODEL_TYPES)}.")

    def need(key):
      if key not in cfg:
        raise InputError(f"{source}: missing key {key!r} required for model_type {mt!r}.")
      return cfg[key]

    eos = cfg.get("eos_token_id")
    common: dict[str, Any] = dict(bos_token_id=cfg.get("bos_token_id"),
                                  eos_token_id=tuple(eos) if isinstance(eos, list) else eos,
                                  pad_token_id=cfg.get("pad_token_id"))
    if mt == "gpt2":
      act = cfg.get("activation_function", "gelu_new")
      if act not in ("gelu_new", "gelu_pytorch_tanh", "gelu"):
        raise InputError(f"{source}: activation_function {act!r} is not supported for gpt2.")
      if cfg.get("scale_attn_by_inverse_layer_idx") or cfg.get("add_cross_attention"):
        raise InputError(f"{source}: scale_attn_by_inverse_layer_idx / add_cross_attention "
                         "are not supported.")
      d, h = need("n_embd"), need("n_head")
      known = {"n_embd", "n_head", "n_layer", "n_positions", "n_inner", "vocab_size",
               "layer_norm_epsilon", "activation_function", "tie_word_embeddings"}
      return cls(model_type=mt, vocab_size=need("vocab_size"), hidden_size=d,
                 num_hidden_layers=need("n_layer"), num_attention_heads=h,
                 num_key_value_heads=h, head_dim=d // h,
                 intermediate_size=cfg.get("n_inner") or 4 * d,
                 max_position_embeddings=need("n_positions"),
                 norm_eps=cfg.get("layer_norm_epsilon", 1e-5),
                 tie_word_embeddings=cfg.get("tie_word_embeddings", True), qkv_bias=True,
                 o_bias=True, mlp_bias=True, activation=act,
                 extra=_extra(cfg, known), **common)
    return cls(model_type=mt, **_decoder_fields(cfg, mt, source, need), **common)

  def to_hf(self) -> dict[str, Any]:
    """The Hugging Face `config.json` dict for this config."""
    out = {k: json.loads(v) for k, v in self.extra}
    eos = list(self.eos_token_id) if isinstance(self.eos_token_id, tuple) else self.eos_token_id
    ids = dict(bos_token_id=self.bos_token_id, eos_token_id=eos,
               pad_token_id=self.pad_token_id)
    if self.is_gpt2:
      out.update(model_type="gpt2", architectures=["GPT2LMHeadModel"],
                 vocab_size=self.vocab_size, n_embd=self.hidden_size,
                 n_layer=self.num_hidden_layers, n_head=self.num_attention_heads,
                 n_inner=self.intermediate_size, n_positions=self.max_position_embeddings,
                 layer_norm_epsilon=self.norm_eps, activation_function=self.activation,
                 tie_word_embeddings=self.tie_word_embeddings, **ids)
      return out
    rope = _rope_dict(self.rope_type, self.rope_theta, self)
    out.update(model_type=self.model_type, architectures=[_ARCHITECTURES[self.model_type]],
               vocab_size=self.vocab_size, hidden_size=self.hidden_size,
               num_hidden_layers=self.num_hidden_layers,
               num_attention_heads=self.num_attention_heads,
               num_key_value_heads=self.num_key_value_heads, head_dim=self.head_dim,
               intermediate_size=self.intermediate_size,
               max_position_embeddings=self.max_position_embeddings,
               rms_norm_eps=self.norm_eps, tie_word_embeddings=self.tie_word_embeddings,
               hidden_act=self.activation, rope_theta=self.rope_theta, rope_parameters=rope,
               rope_scaling=None if self.rope_type == "default" else rope, **ids)
    mt = self.model_type
    if mt in LLAMA_TYPES:
      out["mlp_bias"] = self.mlp_bias
    if mt in ("llama", "qwen3", "qwen3_moe") + GEMMA_TYPES:
      out["attention_bias"] = self.o_bias or (self.qkv_bias and mt != "qwen2")
    if mt in ("mistral", "phi3", "mixtral"):
      out["sliding_window"] = self.sliding_window
    if mt in GEMMA_TYPES:
      out["hidden_activation"] = self.activation
    if mt in ("gemma2", "gemma3_text"):
      out.update(sliding_window=self.sliding_window, layer_types=list(self.layer_types or ()),
                 query_pre_attn_scalar=_number(self.query_pre_attn_scalar),
                 attn_logit_softcapping=self.attn_softcap,
                 final_logit_softcapping=self.final_softcap)
    if mt == "gemma3_text":
      local = {"rope_type": "default", "rope_theta": self.local_rope_theta}
      out.update(rope_parameters={"full_attention": rope, "sliding_attention": local},
                 rope_scaling=None)
    if mt in MOE_TYPES:
      out.update(num_experts_per_tok=self.num_experts_per_tok,
                 router_aux_loss_coef=self.router_aux_loss_coef)
      out["num_local_experts" if mt == "mixtral" else "num_experts"] = self.num_experts
    if mt in ("qwen2_moe", "qwen3_moe"):
      out.update(moe_intermediate_size=self.moe_intermediate_size,
                 norm_topk_prob=self.norm_topk_prob, decoder_sparse_step=1, mlp_only_layers=[])
    if mt == "qwen2_moe":
      out.update(shared_expert_intermediate_size=self.shared_expert_intermediate_size,
                 qkv_bias=self.qkv_bias)
    return out


def _number(x: float | None) -> float | int | None:
  """Whole numbers as ints: transformers' configs type-check some fields as int."""
  return int(x) if x is not None and float(x).is_integer() else x


def _rope_dict(rtype: str, theta: float, c: "ModelConfig") -> dict[str, Any]:
  rope: dict[str, Any] = {"rope_type": rtype, "rope_theta": theta}
  if rtype in ("linear", "llama3"):
    rope["factor"] = c.rope_factor
  if rtype == "llama3":
    rope.update(low_freq_factor=c.rope_low_freq_factor, high_freq_factor=c.rope_high_freq_factor,
                original_max_position_embeddings=c.rope_original_max_position_embeddings)
  return rope


def _parse_rope(rope: Mapping[str, Any], cfg: Mapping[str, Any], source: str,
                key: str = "rope_parameters") -> dict[str, Any]:
  """The ModelConfig rope fields of one rope-parameters dict, refusing what is not implemented."""
  rtype = rope.get("rope_type", rope.get("type", "default"))
  if rtype not in ROPE_TYPES:
    raise InputError(f"{source}: {key}.rope_type {rtype!r} is not supported; jaxlora "
                     f"implements {', '.join(ROPE_TYPES)}.")
  if rope.get("partial_rotary_factor", cfg.get("partial_rotary_factor", 1.0)) != 1.0:
    raise InputError(f"{source}: partial_rotary_factor "
                     f"{rope.get('partial_rotary_factor', cfg.get('partial_rotary_factor'))} "
                     "is not supported (RoPE on every head dimension only).")
  return dict(rope_theta=float(rope.get("rope_theta", cfg.get("rope_theta", 10000.0))),
              rope_type=rtype, rope_factor=float(rope.get("factor", 1.0)),
              rope_low_freq_factor=float(rope.get("low_freq_factor", 1.0)),
              rope_high_freq_factor=float(rope.get("high_freq_factor", 4.0)),
              rope_original_max_position_embeddings=int(
                  rope.get("original_max_position_embeddings",
                           cfg.get("max_position_embeddings", 8192))))


def _layer_types(cfg: Mapping[str, Any], mt: str, n: int, source: str) -> tuple[str, ...] | None:
  """Per-layer attention kinds: the config's `layer_types`, or the family's pattern."""
  given = cfg.get("layer_types")
  if given is not None:
    if not isinstance(given, list) or len(given) != n:
      raise InputError(f"{source}: layer_types must list one entry per layer ({n}), got "
                       f"{given!r}.")
    for i, kind in enumerate(given):
      if kind not in LAYER_TYPES:
        raise InputError(f"{source}: layer_types[{i}] is {kind!r}; jaxlora implements the "
                         f"attention layer kinds {', '.join(LAYER_TYPES)} only.")
    return tuple(given)
  if mt == "gemma2":
    return tuple("sliding_attention" if (i + 1) % 2 else "full_attention" for i in range(n))
  if mt == "gemma3_text":
    every = int(cfg.get("sliding_window_pattern", cfg.get("_sliding_window_pattern", 6)))
    return tuple("sliding_attention" if (i + 1) % every else "full_attention" for i in range(n))
  return None


def _decoder_fields(cfg: Mapping[str, Any], mt: str, source: str, need) -> dict[str, Any]:
  """ModelConfig fields (all but model_type and token ids) of a rotary-decoder config."""
  gemma = mt in GEMMA_TYPES
  act = cfg.get("hidden_activation") or cfg.get("hidden_act") or (
      "gelu_pytorch_tanh" if gemma else "silu")
  if act == "swish":
    act = "silu"
  if act not in ("silu",) + _GELU_TANH:
    raise InputError(f"{source}: hidden_act {act!r} is not supported (expected 'silu' or "
                     "'gelu_pytorch_tanh').")
  if cfg.get("use_bidirectional_attention"):
    raise InputError(f"{source}: use_bidirectional_attention=true is not supported (causal "
                     "decoders only).")
  if cfg.get("use_sliding_window") and mt not in GEMMA_TYPES:
    raise InputError(f"{source}: use_sliding_window=true is not supported for {mt}.")
  n_layers = need("num_hidden_layers")
  d, h = need("hidden_size"), need("num_attention_heads")
  rope = {**(cfg.get("rope_scaling") or {}), **(cfg.get("rope_parameters") or {})}
  local_theta = None
  if mt == "gemma3_text":
    if "full_attention" in rope or "sliding_attention" in rope:
      local = rope.get("sliding_attention", {})
      if local.get("rope_type", "default") != "default":
        raise InputError(f"{source}: rope_parameters.sliding_attention.rope_type "
                         f"{local.get('rope_type')!r} is not supported (Gemma 3's local "
                         "layers use the default RoPE).")
      local_theta = float(local.get("rope_theta", cfg.get("rope_local_base_freq", 10000.0)))
      rope = dict(rope.get("full_attention", {}))
    else:
      local_theta = float(cfg.get("rope_local_base_freq", 10000.0))
  rope_fields = _parse_rope(rope, cfg, source)
  layer_types = _layer_types(cfg, mt, n_layers, source)
  window = cfg.get("sliding_window") if mt in ("mistral", "phi3", "mixtral") + GEMMA_TYPES \
      else None
  if layer_types is not None and mt not in ("gemma2", "gemma3_text"):
    if len(set(layer_types)) > 1:
      raise InputError(f"{source}: layer_types mixes {sorted(set(layer_types))}; jaxlora runs "
                       f"per-layer attention kinds for Gemma 2/3 only, not {mt}.")
    layer_types = None
  if layer_types is not None and "sliding_attention" in layer_types and not window:
    raise InputError(f"{source}: layer_types has sliding layers but sliding_window is "
                     f"{window!r}; set sliding_window.")
  if mt == "gemma":
    window = None
  attn_bias = bool(cfg.get("attention_bias", False))
  fields: dict[str, Any] = dict(
      vocab_size=need("vocab_size"), hidden_size=d, num_hidden_layers=n_layers,
      num_attention_heads=h, num_key_value_heads=cfg.get("num_key_value_heads") or h,
      head_dim=cfg.get("head_dim") or d // h, intermediate_size=need("intermediate_size"),
      max_position_embeddings=cfg.get("max_position_embeddings", 4096),
      norm_eps=cfg.get("rms_norm_eps", 1e-6),
      tie_word_embeddings=bool(cfg.get("tie_word_embeddings", gemma)), **rope_fields,
      qkv_bias=attn_bias or mt == "qwen2" or (mt == "qwen2_moe" and cfg.get("qkv_bias", True)),
      o_bias=attn_bias, mlp_bias=bool(cfg.get("mlp_bias", False)),
      qk_norm=mt in ("qwen3", "qwen3_moe", "gemma3_text"), activation=act,
      sliding_window=window or None, layer_types=layer_types, local_rope_theta=local_theta,
      norm_plus_one=gemma, embed_scale=gemma, sandwich_norm=mt in ("gemma2", "gemma3_text"),
      fused_qkv=mt == "phi3", fused_gate_up=mt == "phi3")
  if mt in ("gemma2", "gemma3_text"):
    fields.update(query_pre_attn_scalar=float(cfg.get("query_pre_attn_scalar", 256)),
                  attn_softcap=cfg.get("attn_logit_softcapping"),
                  final_softcap=cfg.get("final_logit_softcapping"))
  if mt in MOE_TYPES:
    n_exp = cfg.get("num_local_experts", cfg.get("num_experts"))
    if not n_exp:
      raise InputError(f"{source}: missing key 'num_experts' (or 'num_local_experts') "
                       f"required for model_type {mt!r}.")
    if mt != "mixtral":
      if cfg.get("decoder_sparse_step", 1) != 1 or cfg.get("mlp_only_layers"):
        raise InputError(
            f"{source}: decoder_sparse_step={cfg.get('decoder_sparse_step')!r} / "
            f"mlp_only_layers={cfg.get('mlp_only_layers')!r} mix dense and expert layers; "
            "jaxlora's stacked layers need every layer to be a mixture of experts "
            "(decoder_sparse_step 1, mlp_only_layers []).")
    fields.update(num_experts=int(n_exp), num_experts_per_tok=int(need("num_experts_per_tok")),
                  moe_intermediate_size=int(cfg.get("moe_intermediate_size")
                                            or fields["intermediate_size"]),
                  norm_topk_prob=True if mt == "mixtral" else bool(
                      cfg.get("norm_topk_prob", False)),
                  shared_expert_intermediate_size=int(
                      cfg.get("shared_expert_intermediate_size", 0)) if mt == "qwen2_moe" else 0,
                  router_aux_loss_coef=float(cfg.get("router_aux_loss_coef", 0.001)))
    if cfg.get("router_jitter_noise"):
      raise InputError(f"{source}: router_jitter_noise={cfg['router_jitter_noise']} is not "
                       "supported (deterministic routing only); set it to 0.")
  known = {"hidden_size", "num_attention_heads", "num_key_value_heads", "num_hidden_layers",
           "head_dim", "intermediate_size", "max_position_embeddings", "rms_norm_eps",
           "tie_word_embeddings", "rope_theta", "rope_scaling", "rope_parameters",
           "attention_bias", "mlp_bias", "hidden_act", "hidden_activation", "vocab_size",
           "sliding_window", "use_sliding_window", "query_pre_attn_scalar",
           "attn_logit_softcapping", "final_logit_softcapping", "rope_local_base_freq",
           "num_local_experts", "num_experts", "num_experts_per_tok", "moe_intermediate_size",
           "norm_topk_prob", "shared_expert_intermediate_size", "router_aux_loss_coef",
           "decoder_sparse_step", "mlp_only_layers", "qkv_bias"}
  if mt in ("gemma2", "gemma3_text"):
    known |= {"layer_types", "sliding_window_pattern", "_sliding_window_pattern"}
  fields["extra"] = _extra(cfg, known)
  return fields


_FAMILY_DEFAULTS: dict[str, dict[str, Any]] = {
    "gemma": dict(tie_word_embeddings=True, norm_plus_one=True, embed_scale=True,
                  activation="gelu_pytorch_tanh", head_dim=8),
    "gemma2": dict(tie_word_embeddings=True, norm_plus_one=True, embed_scale=True,
                   activation="gelu_pytorch_tanh", head_dim=8, sandwich_norm=True,
                   sliding_window=4, layer_types=("sliding_attention", "full_attention"),
                   query_pre_attn_scalar=8.0, attn_softcap=50.0, final_softcap=30.0),
    "gemma3_text": dict(tie_word_embeddings=True, norm_plus_one=True, embed_scale=True,
                        activation="gelu_pytorch_tanh", head_dim=8, sandwich_norm=True,
                        sliding_window=4, layer_types=("sliding_attention", "full_attention"),
                        query_pre_attn_scalar=8.0, qk_norm=True, rope_theta=1e6,
                        local_rope_theta=1e4),
    "phi3": dict(fused_qkv=True, fused_gate_up=True),
    "mixtral": dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32),
    "qwen2_moe": dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16,
                      shared_expert_intermediate_size=32, norm_topk_prob=False, qkv_bias=True),
    "qwen3_moe": dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16,
                      norm_topk_prob=True, qk_norm=True),
}


def _extra(cfg: Mapping[str, Any], known: set[str]) -> tuple[tuple[str, str], ...]:
  # Kept as JSON text so that the config stays hashable (it is a module attribute).
  skip = known | {"model_type", "architectures", "transformers_version", "dtype", "torch_dtype",
                  "bos_token_id", "eos_token_id", "pad_token_id"}
  return tuple((k, json.dumps(v)) for k, v in sorted(cfg.items()) if k not in skip)
