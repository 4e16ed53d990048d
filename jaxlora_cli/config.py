"""Training configuration: a typed schema, YAML presets and dotted command-line overrides."""

from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any, Union

import yaml
from etils import epath


class ConfigError(ValueError):
  """A configuration problem, reported to the user as one line."""


@dataclasses.dataclass
class ModelConfig:
  path: str = ""            # local Hugging Face checkpoint directory
  dtype: str = "float32"    # compute dtype: float32 (CPU) or bfloat16 (accelerators)
  param_dtype: str = "float32"
  remat: Union[str, None] = None  # None, 'full', 'dots', 'dots_no_batch'
  quantize: Union[str, None] = None  # None (float base), 'nf4', 'fp4', 'int8' (QLoRA)
  quant_block_size: int = 64
  double_quant: bool = True
  attention: str = "auto"   # auto | xla | cudnn | splash | flash


@dataclasses.dataclass
class LoraConfig:
  rank: int = 16
  alpha: Union[float, None] = None   # default: rank
  targets: Union[str, list] = "all-linear"
  exclude: Union[str, list, None] = None
  rank_pattern: dict = dataclasses.field(default_factory=dict)
  alpha_pattern: dict = dataclasses.field(default_factory=dict)
  use_rslora: bool = False
  init: str = "kaiming"
  dropout: float = 0.0


@dataclasses.dataclass
class DataConfig:
  train_file: str = ""
  eval_file: Union[str, None] = None
  format: str = "text"              # text | prompt_completion | chat
  text_field: str = "text"
  prompt_field: str = "prompt"
  completion_field: str = "completion"
  messages_field: str = "messages"
  max_length: int = 512
  truncate: bool = False            # cut over-long examples instead of failing
  eval_fraction: float = 0.0        # held out from train_file when no eval_file is given
  seed: int = 0
  packing: bool = False             # pack several examples per training row (segment_ids)
  adapter_field: Union[str, None] = None  # column naming each row's adapter (one per value)


@dataclasses.dataclass
class TrainConfig:
  steps: int = 1000
  batch_size: int = 8
  grad_accum: int = 1
  lr: float = 2e-4
  warmup_steps: int = 0
  min_lr_ratio: float = 0.1         # cosine decays to lr * min_lr_ratio
  weight_decay: float = 0.0
  max_grad_norm: float = 1.0        # 0 disables clipping
  eval_every: int = 0               # 0: only at the end
  eval_batches: int = 0             # 0: the whole eval set
  save_every: int = 100
  keep_checkpoints: int = 3
  log_every: int = 10
  seed: int = 0
  loss_chunk_size: int = 512        # 0: the loss from the full (batch, seq, vocab) logits


@dataclasses.dataclass
class MeshConfig:
  data: int = 1
  fsdp: int = -1          # -1: all remaining devices
  tensor: int = 1
  rules: str = "fsdp"     # fsdp | fsdp_tp


@dataclasses.dataclass
class DistributedConfig:
  initialize: bool = False
  coordinator_address: Union[str, None] = None
  num_processes: Union[int, None] = None
  process_id: Union[int, None] = None


@dataclasses.dataclass
class Config:
  output_dir: str = "runs/default"
  model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
  lora: LoraConfig = dataclasses.field(default_factory=LoraConfig)
  data: DataConfig = dataclasses.field(default_factory=DataConfig)
  train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
  mesh: MeshConfig = dataclasses.field(default_factory=MeshConfig)
  distributed: DistributedConfig = dataclasses.field(default_factory=DistributedConfig)

  def to_dict(self) -> dict:
    return dataclasses.asdict(self)


_CHOICES = {
    "model.dtype": ("float32", "bfloat16", "float16"),
    "model.param_dtype": ("float32", "bfloat16", "float16"),
    "model.remat": (None, "full", "dots", "dots_no_batch"),
    "model.quantize": (None, "none", "nf4", "fp4", "int8"),
    "model.attention": ("auto", "xla", "cudnn", "splash", "flash"),
    "lora.init": ("kaiming", "gaussian"),
    "data.format": ("text", "prompt_completion", "chat"),
    "mesh.rules": ("fsdp", "fsdp_tp"),
}


def _type_name(tp: Any) -> str:
  args = typing.get_args(tp)
  if args:
    return " or ".join(_type_name(a) for a in args)
  return "null" if tp is type(None) else getattr(tp, "__name__", str(tp))


def _coerce(key: str, value: Any, tp: Any) -> Any:
  """Checks `value` against the field type `tp` (ints are accepted for floats)."""
  options = typing.get_args(tp) if typing.get_origin(tp) in (Union, types.UnionType) else (tp,)
  for opt in options:
    if opt is type(None) and value is None:
      return None
    if opt is bool and isinstance(value, bool):
      return value
    if opt is int and isinstance(value, int) and not isinstance(value, bool):
      return value
    if opt is float and isinstance(value, (int, float)) and not isinstance(value, bool):
      return float(value)
    if opt is float and isinstance(value, str):  # YAML reads "3e-4" (no dot) as a string
      try:
        return float(value)
      except ValueError:
        pass
    if opt in (str, list, dict) and isinstance(value, opt):
      return value
  raise ConfigError(f"config key '{key}' must be {_type_name(tp)}, got {value!r}")


def _set(cfg: Any, dotted: str, value: Any, prefix: str = "") -> None:
  head, _, rest = dotted.partition(".")
  fields = {f.name: f for f in dataclasses.fields(cfg)}
  full = prefix + head
  if head not in fields:
    raise ConfigError(f"unknown config key '{full}'; valid keys here: "
                      f"{', '.join(prefix + k for k in fields)}")
  current = getattr(cfg, head)
  if dataclasses.is_dataclass(current):
    if not rest:
      if not isinstance(value, dict):
        raise ConfigError(f"config key '{full}' is a section; set its keys, e.g. {full}.<key>=...")
      for k, v in value.items():
        _set(current, str(k), v, full + ".")
      return
    _set(current, rest, value, full + ".")
    return
  if rest:
    raise ConfigError(f"unknown config key '{full}.{rest}': '{full}' is not a section")
  hints = typing.get_type_hints(type(cfg))
  value = _coerce(full, value, hints[head])
  if full in _CHOICES and value not in _CHOICES[full]:
    raise ConfigError(f"config key '{full}' must be one of {_CHOICES[full]}, got {value!r}")
  setattr(cfg, head, value)


def load(path: str | None, overrides: list[str] = ()) -> Config:
  """A Config from a YAML file (or defaults) and `key=value` overrides (values parsed as YAML).

  >>> cfg = load(None, ["train.lr=3e-4", "lora.rank=8", "data.format=chat"])
  >>> cfg.train.lr, cfg.lora.rank, cfg.data.format
  (0.0003, 8, 'chat')
  >>> load(None, ["train.learning_rate=1"])
  Traceback (most recent call last):
  ...
  jaxlora_cli.config.ConfigError: unknown config key 'train.learning_rate'; valid keys here: ...
  """
  cfg = Config()
  if path is not None:
    try:
      raw = yaml.safe_load(epath.Path(path).read_text()) or {}
    except FileNotFoundError:
      raise ConfigError(f"config file {path} not found") from None
    except yaml.YAMLError as e:
      raise ConfigError(f"config file {path} is not valid YAML: {e}") from None
    if not isinstance(raw, dict):
      raise ConfigError(f"config file {path} must hold a mapping of sections")
    for k, v in raw.items():
      _set(cfg, str(k), v)
  for item in overrides:
    key, eq, text = item.partition("=")
    if not eq or not key:
      raise ConfigError(f"override {item!r} must look like section.key=value")
    try:
      value = yaml.safe_load(text) if text else ""
    except yaml.YAMLError:
      value = text
    _set(cfg, key.strip(), value)
  validate(cfg)
  return cfg


def validate(cfg: Config) -> None:
  """Range checks that types alone do not catch."""
  positive = {"lora.rank": cfg.lora.rank, "data.max_length": cfg.data.max_length,
              "train.steps": cfg.train.steps, "train.batch_size": cfg.train.batch_size,
              "train.grad_accum": cfg.train.grad_accum, "train.save_every": cfg.train.save_every,
              "train.keep_checkpoints": cfg.train.keep_checkpoints,
              "train.log_every": cfg.train.log_every}
  for k, v in positive.items():
    if v <= 0:
      raise ConfigError(f"config key '{k}' must be positive, got {v}")
  if cfg.model.quantize == "none":  # `none` reads as a string in YAML; store one spelling
    cfg.model.quantize = None
  if cfg.model.quant_block_size < 2 or cfg.model.quant_block_size % 2:
    raise ConfigError(f"config key 'model.quant_block_size' must be a positive even number "
                      f"(bitsandbytes uses 64), got {cfg.model.quant_block_size}")
  if not 0 <= cfg.lora.dropout < 1:
    raise ConfigError(f"config key 'lora.dropout' must be in [0, 1), got {cfg.lora.dropout}")
  if not 0 <= cfg.data.eval_fraction < 1:
    raise ConfigError(f"config key 'data.eval_fraction' must be in [0, 1), got "
                      f"{cfg.data.eval_fraction}")
  if cfg.train.lr <= 0:
    raise ConfigError(f"config key 'train.lr' must be positive, got {cfg.train.lr}")
  if cfg.data.adapter_field is not None and cfg.data.packing:
    raise ConfigError(f"config keys 'data.adapter_field'={cfg.data.adapter_field!r} and "
                      "'data.packing'=true cannot be combined: a packed row would mix "
                      "adapters. Set data.packing=false to train one adapter per "
                      f"'{cfg.data.adapter_field}' value.")
  if cfg.data.adapter_field == "":
    raise ConfigError("config key 'data.adapter_field' is empty; name the column that holds "
                      "each row's adapter (e.g. data.adapter_field=task), or leave it unset")
  if cfg.train.loss_chunk_size < 0:
    raise ConfigError(f"config key 'train.loss_chunk_size' must be positive, or 0 for the "
                      f"full-logits loss, got {cfg.train.loss_chunk_size}")


def dump(cfg: Config) -> str:
  return yaml.safe_dump(cfg.to_dict(), sort_keys=False)


DOCS = {
    "output_dir": "run directory; rerunning the same config there resumes it",
    "model.path": "local Hugging Face checkpoint directory (config.json, safetensors, tokenizer)",
    "model.dtype": "compute dtype: float32 (CPU) or bfloat16 (accelerators)",
    "model.param_dtype": "dtype the base weights are held in",
    "model.remat": "rematerialise layers in the backward pass: full, dots, dots_no_batch",
    "model.quantize": "quantize the frozen base kernels (QLoRA): nf4, fp4, int8 or none; "
                      "adapters stay float32, embeddings, norms and the output head stay float",
    "model.quant_block_size": "values per 4-bit block (nf4/fp4; bitsandbytes' default 64)",
    "model.double_quant": "quantize the 4-bit block maxima again (QLoRA's double quantization)",
    "model.attention": "attention implementation: auto (cuDNN on NVIDIA GPUs, splash on TPU, "
                       "XLA elsewhere), xla, cudnn, splash or flash; an explicit choice the "
                       "platform cannot run is an error",
    "lora.rank": "LoRA rank r",
    "lora.alpha": "LoRA alpha (scale alpha/r); default: rank",
    "lora.targets": "regex over module paths, a preset (all-linear, attention, mlp) or a list",
    "lora.exclude": "layers to leave out, same language as targets",
    "lora.rank_pattern": "{regex: rank} per-layer ranks",
    "lora.alpha_pattern": "{regex: alpha} per-layer alphas",
    "lora.use_rslora": "scale by alpha/sqrt(r)",
    "lora.init": "A initialisation: kaiming (PEFT's default) or gaussian",
    "lora.dropout": "dropout on the LoRA input during training",
    "data.train_file": "training data: .jsonl/.json/.csv/.parquet/.txt",
    "data.eval_file": "evaluation data (optional)",
    "data.format": "text (loss on all tokens), prompt_completion (loss on the completion), "
                   "chat (messages rendered with the chat template; loss on assistant turns)",
    "data.text_field": "column with the text (format text)",
    "data.prompt_field": "column with the prompt (prompt_completion)",
    "data.completion_field": "column with the completion (prompt_completion)",
    "data.messages_field": "column with the chat messages (chat)",
    "data.max_length": "longest example in tokens (at most the model's context)",
    "data.truncate": "cut over-long examples instead of stopping with an error",
    "data.eval_fraction": "share of train_file held out for evaluation when no eval_file",
    "data.seed": "shuffling seed",
    "data.packing": "pack several examples into each training row of data.max_length "
                    "(first-fit in shuffled order; examples attend only within themselves and "
                    "the loss never crosses them); evaluation stays one example per row",
    "data.adapter_field": "column naming each row's adapter: trains one adapter per distinct "
                          "value at once (an adapter bank; each adapter's loss is its own "
                          "token mean), saved to adapters/<name>/ and adapters_peft/<name>/; "
                          "not with data.packing",
    "train.steps": "optimizer steps (raise it and rerun to continue a finished run)",
    "train.batch_size": "examples per micro-batch",
    "train.grad_accum": "micro-batches per optimizer step",
    "train.lr": "peak learning rate (adamw)",
    "train.warmup_steps": "linear warm-up steps before the cosine decay",
    "train.min_lr_ratio": "final learning rate as a share of the peak",
    "train.weight_decay": "adamw weight decay",
    "train.max_grad_norm": "global gradient-norm clipping; 0 disables it",
    "train.eval_every": "evaluate every N steps (0: at the start and the end only)",
    "train.eval_batches": "evaluation batches per evaluation (0: all)",
    "train.save_every": "checkpoint every N steps",
    "train.keep_checkpoints": "how many recent checkpoints to keep",
    "train.log_every": "write metrics every N steps",
    "train.seed": "seed for the adapter init and dropout",
    "train.loss_chunk_size": "sequence positions per chunk of the output head and loss, so the "
                             "full float32 logits never exist (the same loss); 0: full logits. "
                             "An adapter on the head gets no LoRA dropout when chunked",
    "mesh.data": "data-parallel mesh size (params replicated)",
    "mesh.fsdp": "FSDP mesh size (params and batch sharded); -1: all remaining devices",
    "mesh.tensor": "tensor-parallel mesh size",
    "mesh.rules": "logical-axis rules: fsdp (shard the embed axis) or fsdp_tp (plus heads/mlp "
                  "over tensor)",
    "distributed.initialize": "call jax.distributed.initialize() first (multi-host; TPU pods "
                              "and SLURM need no other setting)",
    "distributed.coordinator_address": "host:port of process 0 (GPU clusters without SLURM)",
    "distributed.num_processes": "number of processes (GPU clusters without SLURM)",
    "distributed.process_id": "this process's index (GPU clusters without SLURM)",
}


def describe() -> str:
  """Every config key with its default and meaning (for `jaxlora train --help`)."""
  defaults = Config().to_dict()
  lines = ["config keys (section.key=value; defaults in brackets):"]
  for key, doc in DOCS.items():
    node: Any = defaults
    for part in key.split("."):
      node = node[part]
    lines.append(f"  {key} [{node!r}]: {doc}")
  return "\n".join(lines)
