"""Model configuration, read from and written to Hugging Face `config.json` dicts."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from typing import Any
from jaxlora.errors import InputError

LLAMA_TYPES = ("llama", "mistral", "qwen2", "qwen3")
MODEL_TYPES = ("gpt2",) + LLAMA_TYPES
ROPE_TYPES = ("default", "linear", "llama3")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Architecture hyperparameters of a jaxlora decoder (GPT-2 or Llama family).

  Field names follow the Llama convention; `from_hf` maps GPT-2's names.
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
    unknown = sorted(set(changes) - {f.name for f in dataclasses.fields(cls)})
    if unknown:
      raise InputError(f"ModelConfig has no field(s) {unknown}; see the ModelConfig fields.")
    return cls(**{**fields, **changes})

  @property
  def is_gpt2(self) -> bool:
    return self.model_type == "gpt2"

  @classmethod
  def from_hf(cls, cfg: Mapping[str, Any], *, source: str = "config.json") -> "ModelConfig":
    """Builds a config from a Hugging Face `config.json` dict."""
    mt = cfg.get("model_type")
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
    act = cfg.get("hidden_act", "silu")
    if act not in ("silu", "swish"):
      raise InputError(f"{source}: hidden_act {act!r} is not supported (expected 'silu').")
    d, h = need("hidden_size"), need("num_attention_heads")
    rope = dict(cfg.get("rope_parameters") or {})
    legacy = cfg.get("rope_scaling") or {}
    rope = {**legacy, **rope}
    theta = rope.get("rope_theta", cfg.get("rope_theta", 10000.0))
    rtype = rope.get("rope_type", rope.get("type", "default"))
    if rtype not in ROPE_TYPES:
      raise InputError(f"{source}: rope type {rtype!r} is not supported; jaxlora implements "
                       f"{', '.join(ROPE_TYPES)}.")
    if rope.get("partial_rotary_factor", 1.0) != 1.0:
      raise InputError(f"{source}: partial_rotary_factor is not supported.")
    if cfg.get("use_sliding_window"):
      raise InputError(f"{source}: use_sliding_window=true is not supported for {mt}.")
    sliding = cfg.get("sliding_window") if mt == "mistral" else None
    attn_bias = bool(cfg.get("attention_bias", False))
    known = {"hidden_size", "num_attention_heads", "num_key_value_heads", "num_hidden_layers",
             "head_dim", "intermediate_size", "max_position_embeddings", "rms_norm_eps",
             "tie_word_embeddings", "rope_theta", "rope_scaling", "rope_parameters",
             "attention_bias", "mlp_bias", "hidden_act", "vocab_size", "sliding_window",
             "use_sliding_window"}
    return cls(model_type=mt, vocab_size=need("vocab_size"), hidden_size=d,
               num_hidden_layers=need("num_hidden_layers"), num_attention_heads=h,
               num_key_value_heads=cfg.get("num_key_value_heads") or h,
               head_dim=cfg.get("head_dim") or d // h,
               intermediate_size=need("intermediate_size"),
               max_position_embeddings=cfg.get("max_position_embeddings", 4096),
               norm_eps=cfg.get("rms_norm_eps", 1e-6),
               tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
               rope_theta=float(theta), rope_type=rtype,
               rope_factor=float(rope.get("factor", 1.0)),
               rope_low_freq_factor=float(rope.get("low_freq_factor", 1.0)),
               rope_high_freq_factor=float(rope.get("high_freq_factor", 4.0)),
               rope_original_max_position_embeddings=int(
                   rope.get("original_max_position_embeddings",
                            cfg.get("max_position_embeddings", 8192))),
               qkv_bias=attn_bias or mt == "qwen2", o_bias=attn_bias,
               mlp_bias=bool(cfg.get("mlp_bias", False)), qk_norm=mt == "qwen3",
               sliding_window=sliding, extra=_extra(cfg, known), **common)

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
    arch = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
            "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}[self.model_type]
    rope: dict[str, Any] = {"rope_type": self.rope_type, "rope_theta": self.rope_theta}
    if self.rope_type in ("linear", "llama3"):
      rope["factor"] = self.rope_factor
    if self.rope_type == "llama3":
      rope.update(low_freq_factor=self.rope_low_freq_factor,
                  high_freq_factor=self.rope_high_freq_factor,
                  original_max_position_embeddings=self.rope_original_max_position_embeddings)
    out.update(model_type=self.model_type, architectures=[arch], vocab_size=self.vocab_size,
               hidden_size=self.hidden_size, num_hidden_layers=self.num_hidden_layers,
               num_attention_heads=self.num_attention_heads,
               num_key_value_heads=self.num_key_value_heads, head_dim=self.head_dim,
               intermediate_size=self.intermediate_size,
               max_position_embeddings=self.max_position_embeddings,
               rms_norm_eps=self.norm_eps, tie_word_embeddings=self.tie_word_embeddings,
               hidden_act="silu", rope_theta=self.rope_theta, rope_parameters=rope,
               rope_scaling=None if self.rope_type == "default" else rope,
               mlp_bias=self.mlp_bias, **ids)
    if self.model_type in ("llama", "qwen3"):
      out["attention_bias"] = self.o_bias or (self.qkv_bias and self.model_type != "qwen2")
    if self.model_type == "mistral":
      out["sliding_window"] = self.sliding_window
    return out


def _extra(cfg: Mapping[str, Any], known: set[str]) -> tuple[tuple[str, str], ...]:
  # Kept as JSON text so that the config stays hashable (it is a module attribute).
  skip = known | {"model_type", "architectures", "transformers_version", "dtype", "torch_dtype",
                  "bos_token_id", "eos_token_id", "pad_token_id"}
  return tuple((k, json.dumps(v)) for k, v in sorted(cfg.items()) if k not in skip)
