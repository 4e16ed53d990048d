"""Training configuration: one declaration per key, YAML presets and dotted command-line overrides.

Every key is a field of a section dataclass, declared once with `key`: its type (the annotation),
its default, its help text and the values it allows (``choices``, a range ``ge``/``gt``/``lt``, a
``multiple_of``). Type coercion and the checks of `load`, the help of ``jaxlora train --help``
(`describe`) and `DOCS` all read that declaration, so adding a key is one edit.

>>> cfg = load(None, ["lora.rank=8", "model.quantize=none"])
>>> cfg.lora.rank, cfg.model.quantize, cfg.train.lr
(8, None, 0.0002)
>>> [line for line in describe().splitlines() if "lora.dropout" in line]
['  lora.dropout [0.0]: dropout on the LoRA input during training; must be in [0, 1)']
>>> load(None, ["data.format=csv"])
Traceback (most recent call last):
...
jaxlora_cli.config.ConfigError: config key 'data.format' must be one of text, \
prompt_completion, chat, preference, prompts, got 'csv'
"""

from __future__ import annotations

import dataclasses
import os
import types
import typing
import warnings
from typing import Any, Callable, Iterator, Union

import yaml
from etils import epath

from jaxlora import _files
from jaxlora import errors


class ConfigError(errors.ConfigError):
  """A configuration or command-line problem, reported to the user as one line.

  A `jaxlora.errors.ConfigError`: the command line prints it as ``error: ...`` and
  exits with status 2.
  """


def key(default: Any = dataclasses.MISSING, doc: str = "", *,
        factory: Callable[[], Any] | None = None, choices: tuple[Any, ...] | None = None,
        ge: float | None = None, gt: float | None = None, lt: float | None = None,
        multiple_of: int | None = None) -> Any:
  """Declares one config key: a dataclass field whose metadata says what it means and allows.

  Args:
    default: the value when neither the YAML file nor an override sets the key.
    doc: what the key does, for ``jaxlora train --help``.
    factory: makes the default instead of `default` (for dicts and lists).
    choices: the allowed values. With None among them the string ``none`` reads as
      None too (YAML's spelling is ``null``).
    ge: the value must be at least this.
    gt: the value must be more than this.
    lt: the value must be less than this.
    multiple_of: the value must be a multiple of this.

  Returns:
    A `dataclasses.field` to assign in a section dataclass.

  >>> @dataclasses.dataclass
  ... class Demo:
  ...   rank: int = key(16, "LoRA rank r", gt=0)
  >>> dataclasses.fields(Demo)[0].metadata["help"]
  'LoRA rank r'
  """
  if not doc:
    raise ValueError("every config key needs its help text (doc=...)")
  meta = {"help": doc, "choices": choices, "ge": ge, "gt": gt, "lt": lt,
          "multiple_of": multiple_of}
  if factory is not None:
    return dataclasses.field(default_factory=factory, metadata=meta)
  return dataclasses.field(default=default, metadata=meta)


_DTYPES = ("float32", "bfloat16", "float16")


@dataclasses.dataclass
class ModelSection:
  """``model.*``: the base checkpoint, its dtypes and how its layers run."""
  path: str = key("", "local Hugging Face checkpoint directory (config.json, safetensors, "
                  "tokenizer), or a Hub id org/name (config, safetensors and tokenizer files "
                  "only; from the local cache unless HF_HUB_OFFLINE=0)")
  dtype: str = key("float32", "compute dtype: float32 (CPU) or bfloat16 (accelerators)",
                   choices=_DTYPES)
  param_dtype: str = key("float32", "dtype the base weights are held in", choices=_DTYPES)
  remat: Union[str, None] = key(None, "rematerialise layers in the backward pass",
                                # jaxlora.models.REMAT_POLICIES' names (checked by a test;
                                # not imported here, so that --help does not load jax)
                                choices=(None, "full", "dots", "dots_no_batch",
                                         "offload_dots_no_batch"))
  quantize: Union[str, None] = key(
      None, "quantize the frozen base kernels (QLoRA); adapters stay float32, embeddings, "
      "norms and the output head stay float", choices=(None, "nf4", "fp4", "int8"))
  quant_block_size: int = key(64, "values per 4-bit block (nf4/fp4; bitsandbytes' default 64)",
                              ge=2, multiple_of=2)
  double_quant: bool = key(True, "quantize the 4-bit block maxima again (QLoRA's double "
                           "quantization)")
  attention: str = key("auto", "attention implementation: auto picks cuDNN on NVIDIA GPUs, "
                       "splash on TPU, XLA elsewhere; an explicit choice the platform cannot run "
                       "is an error", choices=("auto", "xla", "cudnn", "splash", "flash"))
  revision: Union[str, None] = key(None, "branch, tag or commit of a Hub id model.path "
                                   "(default: main)")
  merge_adapter: Union[str, None] = key(
      None, "merge this adapter (a jaxlora or PEFT adapter directory, e.g. an SFT run's "
      "runs/sft/adapter) into the base weights as they load: the run's fresh adapter trains on "
      "top, and the DPO/GRPO reference (adapters off) is that merged model. To serve, load both "
      "adapters (PEFT: both active) or merge this one first")


@dataclasses.dataclass
class LoraSection:
  """``lora.*``: which layers get adapters, of what rank and scale."""
  rank: int = key(16, "LoRA rank r", gt=0)
  alpha: Union[float, None] = key(None, "LoRA alpha (scale alpha/r); default: rank")
  targets: Union[str, list] = key("all-linear", "regex over module paths, a preset (all-linear, "
                                  "attention, mlp) or a list")
  exclude: Union[str, list, None] = key(None, "layers to leave out, same language as targets")
  rank_pattern: dict = key(factory=dict, doc="{regex: rank} per-layer ranks")
  alpha_pattern: dict = key(factory=dict, doc="{regex: alpha} per-layer alphas")
  use_rslora: bool = key(False, "scale by alpha/sqrt(r)")
  init: str = key("kaiming", "initialisation: kaiming (PEFT's default), gaussian, pissa, "
                  "pissa_niter_K (randomized SVD, K iterations), olora")
  dropout: float = key(0.0, "dropout on the LoRA input during training", ge=0, lt=1)
  use_dora: bool = key(False, "DoRA: a trained magnitude per output unit")
  loraplus_ratio: Union[float, None] = key(None, "LoRA+: lora_b learns this many times faster "
                                           "than lora_a (the paper suggests 16)", gt=0)
  train_extra: Union[str, list, None] = key(None, "regex(es) over module paths of whole modules "
                                            "trained in full (PEFT's modules_to_save), e.g. "
                                            "lm_head$")
  trainable_tokens: Union[list, dict, None] = key(None, "token ids whose embedding rows train "
                                                  "(PEFT's trainable_token_indices), or "
                                                  "{module regex: [ids]}")
  bias: str = key("none", "biases that train: none, all, or lora_only (the adapted layers')",
                  choices=("none", "all", "lora_only"))
  init_from: Union[str, None] = key(
      None, "start from a saved adapter instead of a fresh one: a jaxlora adapter directory "
      "(e.g. an SFT run's runs/sft/adapter) or a PEFT adapter directory; its rank, targets and "
      "scale replace lora.rank/targets/alpha")


@dataclasses.dataclass
class DataSection:
  """``data.*``: the data files, their format and how examples become rows."""
  train_file: str = key("", "training data: .jsonl/.json/.csv/.parquet/.txt, or a Hub dataset "
                        "id org/name (its train split; from the datasets cache unless "
                        "HF_DATASETS_OFFLINE=0)")
  eval_file: Union[str, None] = key(None, "evaluation data (optional; a file or Hub dataset id, "
                                    "like train_file)")
  format: str = key("text", "text (loss on all tokens), prompt_completion (loss on the "
                    "completion), chat (messages rendered with the chat template; loss on "
                    "assistant turns), preference (prompt, chosen, rejected: plain text or chat "
                    "messages; train.objective dpo/ipo/hinge/robust/simpo/orpo), prompts "
                    "(prompts to sample from, other columns go to the reward; "
                    "train.objective=grpo)",
                    choices=("text", "prompt_completion", "chat", "preference", "prompts"))
  text_field: str = key("text", "column with the text (format text)")
  prompt_field: str = key("prompt", "column with the prompt (prompt_completion)")
  completion_field: str = key("completion", "column with the completion (prompt_completion)")
  messages_field: str = key("messages", "column with the chat messages (chat)")
  chosen_field: str = key("chosen", "column with the preferred completion (preference)")
  rejected_field: str = key("rejected", "column with the dispreferred completion (preference)")
  max_length: int = key(512, "longest example in tokens (at most the model's context)", gt=0)
  truncate: bool = key(False, "cut over-long examples instead of stopping with an error")
  eval_fraction: float = key(0.0, "share of train_file held out for evaluation when no "
                             "eval_file", ge=0, lt=1)
  seed: int = key(0, "shuffling seed")
  packing: bool = key(False, "pack several examples into each training row of data.max_length "
                      "(first-fit in shuffled order; examples attend only within themselves and "
                      "the loss never crosses them); evaluation stays one example per row")
  adapter_field: Union[str, None] = key(
      None, "column naming each row's adapter: trains one adapter per distinct value at once "
      "(an adapter bank; each adapter's loss is its own token mean), saved to adapters/<name>/ "
      "and adapters_peft/<name>/; not with data.packing")


# The objectives of train.objective: the DPO family and ORPO/SimPO train on preference pairs.
PAIR_OBJECTIVES = ("dpo", "ipo", "hinge", "robust", "simpo", "orpo")
OBJECTIVES = ("sft", *PAIR_OBJECTIVES, "grpo")


@dataclasses.dataclass
class TrainSection:
  """``train.*``: the optimizer, its schedule, and how often to evaluate, save and log."""
  steps: int = key(1000, "optimizer steps (raise it and rerun to continue a finished run)", gt=0)
  batch_size: int = key(8, "examples per micro-batch", gt=0)
  grad_accum: int = key(1, "micro-batches per optimizer step", gt=0)
  lr: float = key(2e-4, "peak learning rate (adamw)", gt=0)
  warmup_steps: int = key(0, "linear warm-up steps before the cosine decay")
  min_lr_ratio: float = key(0.1, "final learning rate as a share of the peak")
  weight_decay: float = key(0.0, "adamw weight decay")
  max_grad_norm: float = key(1.0, "global gradient-norm clipping; 0 disables it")
  eval_every: int = key(0, "evaluate every N steps (0: at the start and the end only)")
  eval_batches: int = key(0, "evaluation batches per evaluation (0: all)")
  save_every: int = key(100, "checkpoint every N steps", gt=0)
  keep_checkpoints: int = key(3, "how many recent checkpoints to keep", gt=0)
  log_every: int = key(10, "write metrics every N steps", gt=0)
  seed: int = key(0, "seed for the adapter init and dropout")
  loss_chunk_size: int = key(
      512, "sequence positions per chunk of the output head and loss, so the full float32 "
      "logits never exist (the same loss); 0: full logits. An adapter on the head gets no LoRA "
      "dropout when chunked", ge=0)
  router_aux_loss_coef: float = key(
      0.0, "mixture-of-experts models: weight of the router load-balancing loss added to the "
      "objective (config.json's router_aux_loss_coef is the usual value; 0: off)", ge=0)
  objective: str = key(
      "sft", "sft (next-token loss), dpo, ipo, hinge, robust (DPO family; the reference is the "
      "base with the adapters off), simpo (reference-free), orpo (SFT plus an odds-ratio term): "
      "data.format=preference; grpo (sampled completions scored by reward.fn): "
      "data.format=prompts", choices=OBJECTIVES)


@dataclasses.dataclass
class MeshSection:
  """``mesh.*``: the device mesh and how parameters and batches are sharded over it."""
  data: int = key(1, "data-parallel mesh size (params replicated)")
  fsdp: int = key(-1, "FSDP mesh size (params and batch sharded); -1: all remaining devices")
  tensor: int = key(1, "tensor-parallel mesh size")
  rules: str = key("fsdp", "logical-axis rules: fsdp (shard the embed axis), fsdp_tp (plus "
                   "heads/mlp over tensor) or ep (mixture of experts: whole experts per fsdp "
                   "device, other kernels as fsdp)", choices=("fsdp", "fsdp_tp", "ep"))


@dataclasses.dataclass
class DistributedSection:
  """``distributed.*``: multi-host start-up (`jax.distributed.initialize`)."""
  initialize: bool = key(False, "call jax.distributed.initialize() first (multi-host; TPU pods "
                         "and SLURM need no other setting)")
  coordinator_address: Union[str, None] = key(None, "host:port of process 0 (GPU clusters "
                                              "without SLURM)")
  num_processes: Union[int, None] = key(None, "number of processes (GPU clusters without SLURM)")
  process_id: Union[int, None] = key(None, "this process's index (GPU clusters without SLURM)")


@dataclasses.dataclass
class WandbSection:
  """``wandb.*``: the Weights & Biases run, when ``report_to`` holds wandb."""
  project: str = key("jaxlora", "W&B project")
  run_name: Union[str, None] = key(None, "W&B run name (default: the output_dir's name)")
  entity: Union[str, None] = key(None, "W&B entity, a user or team (default: your default "
                                 "entity)")
  mode: Union[str, None] = key(None, "online, offline (sync later with `wandb sync`) or "
                               "disabled; default: the WANDB_MODE environment variable if set, "
                               "else online", choices=(None, "online", "offline", "disabled"))


@dataclasses.dataclass
class PreferenceSection:
  """``preference.*``: the DPO-family losses (train.objective dpo, ipo, hinge, robust, simpo,
  orpo)."""
  beta: Union[float, None] = key(
      None, "the loss's beta: DPO's temperature (IPO's tau, ORPO's lambda, SimPO's reward "
      "scale); default 0.1, for simpo 2.0", gt=0)
  label_smoothing: float = key(0.0, "assumed share of flipped labels (dpo: cDPO, robust: "
                               "rDPO, below 0.5; simpo)", ge=0, lt=1)
  simpo_gamma: float = key(0.5, "SimPO's target reward margin")


@dataclasses.dataclass
class GrpoSection:
  """``grpo.*``: sampling and the clipped objective of train.objective=grpo."""
  num_generations: int = key(8, "completions sampled per prompt (a group); each step samples "
                             "train.batch_size x train.grad_accum prompts", ge=2)
  max_completion_length: int = key(32, "longest sampled completion in tokens", gt=0)
  temperature: float = key(1.0, "sampling temperature of the rollouts", gt=0)
  top_p: float = key(1.0, "nucleus sampling mass of the rollouts", gt=0)
  beta: float = key(0.04, "weight of the KL term to the reference (the base with the adapters "
                    "off; the GRPO paper's 0.04; 0: no reference pass)", ge=0)
  epsilon: float = key(0.2, "clipping range of the probability ratio", gt=0)
  epsilon_high: Union[float, None] = key(None, "upper clipping range (DAPO); default "
                                         "grpo.epsilon", gt=0)
  loss_type: str = key("dapo", "how token losses are averaged: dapo (over all completion "
                       "tokens of the step), grpo (per completion, then over completions), "
                       "bnpo, dr_grpo", choices=("dapo", "grpo", "bnpo", "dr_grpo"))
  scale_rewards: str = key("group", "divide advantages by the std of the group, of the whole "
                           "batch, or none (Dr. GRPO)", choices=("group", "batch", "none"))


@dataclasses.dataclass
class RewardSection:
  """``reward.*``: how sampled completions are scored (train.objective=grpo)."""
  fn: Union[str, list, None] = key(
      None, "reward function(s): a built-in (exact_match) or module:function, called as "
      "fn(prompts, completions, **columns) -> one float (or None) per completion; a list sums "
      "the rewards (weighted by reward.weights)")
  weights: Union[list, None] = key(None, "one weight per reward.fn (default all 1)")
  answer_field: str = key("answer", "column holding the reference answer (exact_match)")


# Where metrics go (`report_to`); jsonl is required: metrics.jsonl is the run's own record.
REPORTERS = ("tensorboard", "wandb", "jsonl")


def _section(cls: type) -> Any:
  return dataclasses.field(default_factory=cls)


@dataclasses.dataclass
class Config:
  """A whole training configuration: `output_dir` and one dataclass per section.

  >>> Config(output_dir="runs/a", lora=LoraSection(rank=8)).lora.rank
  8
  """
  output_dir: str = key("runs/default", "run directory; rerunning the same config there "
                        "resumes it")
  model: ModelSection = _section(ModelSection)
  lora: LoraSection = _section(LoraSection)
  data: DataSection = _section(DataSection)
  train: TrainSection = _section(TrainSection)
  mesh: MeshSection = _section(MeshSection)
  distributed: DistributedSection = _section(DistributedSection)
  report_to: Union[str, list] = key(
      factory=lambda: ["tensorboard", "jsonl"],
      doc="where metrics go, a list of tensorboard, wandb (pip install 'jaxlora[tracking]'; "
      "wandb.* keys) and jsonl; jsonl (metrics.jsonl: loss.png, report.md, jaxlora plot, "
      "resuming) is required")
  wandb: WandbSection = _section(WandbSection)
  preference: PreferenceSection = _section(PreferenceSection)
  grpo: GrpoSection = _section(GrpoSection)
  reward: RewardSection = _section(RewardSection)

  def to_dict(self) -> dict:
    return dataclasses.asdict(self)


# The sections' names before they were renamed: `ModelConfig` read as `jaxlora.models.ModelConfig`
# and `LoraConfig` as PEFT's. Kept for one release; each use warns.
_DEPRECATED = {"ModelConfig": "ModelSection", "LoraConfig": "LoraSection",
               "DataConfig": "DataSection", "TrainConfig": "TrainSection",
               "MeshConfig": "MeshSection", "DistributedConfig": "DistributedSection"}


def __getattr__(name: str) -> Any:
  if name in _DEPRECATED:
    new = _DEPRECATED[name]
    warnings.warn(f"jaxlora_cli.config.{name} is deprecated; use jaxlora_cli.config.{new}",
                  DeprecationWarning, stacklevel=2)
    return globals()[new]
  raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def keys(cls: type = Config, prefix: str = "") -> Iterator[tuple[str, dataclasses.Field, Any]]:
  """``(dotted key, field, type)`` of every config key, sections expanded, in declaration order.

  >>> [k for k, _, _ in keys()][:3]
  ['output_dir', 'model.path', 'model.dtype']
  """
  hints = typing.get_type_hints(cls)
  for f in dataclasses.fields(cls):
    if dataclasses.is_dataclass(hints[f.name]):
      yield from keys(hints[f.name], f"{prefix}{f.name}.")
    else:
      yield prefix + f.name, f, hints[f.name]


def _show(value: Any) -> str:
  return "null" if value is None else str(value)


def allowed(meta: typing.Mapping[str, Any]) -> str | None:
  """The values a key's metadata allows, in words; None when its type is the only limit.

  >>> allowed({"ge": 0, "lt": 1}), allowed({"gt": 0}), allowed({"choices": (None, "nf4")})
  ('in [0, 1)', 'positive', 'one of null, nf4')
  """
  if meta.get("choices") is not None:
    return "one of " + ", ".join(map(_show, meta["choices"]))
  ge, gt, lt, mult = (meta.get(k) for k in ("ge", "gt", "lt", "multiple_of"))
  parts = []
  if mult is not None:
    parts.append(f"a multiple of {mult}")
  if ge is not None and lt is not None:
    parts.append(f"in [{ge}, {lt})")
  elif gt == 0 and lt is None:
    parts.append("positive")
  elif ge == 0 and lt is None:
    parts.append("positive or 0")
  else:
    parts += ([f"at least {ge}"] if ge is not None else []) + \
             ([f"more than {gt}"] if gt is not None else []) + \
             ([f"less than {lt}"] if lt is not None else [])
  return " and ".join(parts) or None


def _check(name: str, value: Any, meta: typing.Mapping[str, Any]) -> Any:
  """`value` if the key's declaration allows it (``none`` read as None), else a ConfigError."""
  choices = meta.get("choices")
  if choices is not None:
    if None in choices and isinstance(value, str) and value.lower() == "none":
      value = None  # YAML reads `none` as a string; store one spelling
    if value not in choices:
      raise ConfigError(f"config key '{name}' must be {allowed(meta)}, got {value!r}")
    return value
  if value is None or isinstance(value, (bool, str, list, dict)):
    return value
  ge, gt, lt, mult = (meta.get(k) for k in ("ge", "gt", "lt", "multiple_of"))
  if ((ge is not None and value < ge) or (gt is not None and value <= gt)
      or (lt is not None and value >= lt) or (mult is not None and value % mult)):
    raise ConfigError(f"config key '{name}' must be {allowed(meta)}, got {value!r}")
  return value


def _type_name(tp: Any) -> str:
  args = typing.get_args(tp)
  if args:
    return " or ".join(_type_name(a) for a in args)
  return "null" if tp is type(None) else getattr(tp, "__name__", str(tp))


def _coerce(name: str, value: Any, tp: Any) -> Any:
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
  raise ConfigError(f"config key '{name}' must be {_type_name(tp)}, got {value!r}")


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
  setattr(cfg, head, _check(full, value, fields[head].metadata))


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
    except (OSError, UnicodeDecodeError) as e:  # a directory, no permission, not text
      raise ConfigError(f"config file {path} could not be read: {e}") from None
    except yaml.YAMLError as e:  # its message spans lines: where and what, kept on one
      raise ConfigError(f"config file {path} is not valid YAML: {' '.join(str(e).split())}") \
          from None
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
  """Checks every key against its declaration (for configs built in code too) and the rules
  that tie keys together.

  Raises:
    ConfigError: a value outside its key's choices or range, or keys that do not combine.

  >>> cfg = Config()
  >>> cfg.lora.dropout = 1.5
  >>> validate(cfg)
  Traceback (most recent call last):
  ...
  jaxlora_cli.config.ConfigError: config key 'lora.dropout' must be in [0, 1), got 1.5
  """
  for name, f, _ in keys():
    section, _, leaf = name.rpartition(".")
    owner = getattr(cfg, section) if section else cfg
    setattr(owner, leaf, _check(name, getattr(owner, leaf), f.metadata))
  from jaxlora import initialisation  # pylint: disable=import-outside-toplevel
  try:
    initialisation.check(cfg.lora.init)
  except errors.JaxloraError as e:
    raise ConfigError(f"config key 'lora.init': {e}") from None
  if cfg.data.adapter_field is not None and cfg.data.packing:
    raise ConfigError(f"config keys 'data.adapter_field'={cfg.data.adapter_field!r} and "
                      "'data.packing'=true cannot be combined: a packed row would mix "
                      "adapters. Set data.packing=false to train one adapter per "
                      f"'{cfg.data.adapter_field}' value.")
  if isinstance(cfg.report_to, str):  # report_to=wandb: one reporter
    cfg.report_to = [cfg.report_to]
  unknown = [r for r in cfg.report_to if r not in REPORTERS]
  if unknown:
    raise ConfigError(f"config key 'report_to' has unknown reporter {unknown[0]!r}; use a list "
                      f"of {', '.join(REPORTERS)}, e.g. report_to=[tensorboard,wandb,jsonl]")
  if "jsonl" not in cfg.report_to:
    raise ConfigError(f"config key 'report_to'={cfg.report_to} must include jsonl: "
                      "metrics.jsonl is the run's own record (loss.png, report.md, jaxlora "
                      f"plot, resuming); use report_to=[{','.join(cfg.report_to + ['jsonl'])}]")
  _check_objective(cfg)
  if cfg.lora.init_from and cfg.data.adapter_field is not None:
    raise ConfigError("lora.init_from starts one adapter from a saved one; data.adapter_field "
                      "trains a bank of new ones: unset one of them")
  if cfg.data.adapter_field == "":
    raise ConfigError("config key 'data.adapter_field' is empty; name the column that holds "
                      "each row's adapter (e.g. data.adapter_field=task), or leave it unset")


def _check_objective(cfg: Config) -> None:
  """The data format, packing and adapter bank an objective works with."""
  objective, fmt = cfg.train.objective, cfg.data.format
  wanted = ("preference" if objective in PAIR_OBJECTIVES else
            "prompts" if objective == "grpo" else None)
  if wanted is not None and fmt != wanted:
    raise ConfigError(f"train.objective={objective} trains on data.format={wanted}, got "
                      f"data.format={fmt}; set data.format={wanted}")
  if wanted is None and fmt in ("preference", "prompts"):
    raise ConfigError(f"data.format={fmt} needs a matching train.objective (preference: dpo, "
                      "ipo, hinge, robust, simpo or orpo; prompts: grpo), got "
                      f"train.objective={objective}")
  if wanted is not None and cfg.data.packing:
    raise ConfigError(f"train.objective={objective} scores whole sequences, one per row; set "
                      "data.packing=false")
  if wanted is not None and cfg.data.adapter_field is not None:
    raise ConfigError(f"train.objective={objective} trains one adapter; data.adapter_field "
                      "(an adapter bank) works with train.objective=sft only")
  if objective == "grpo" and not cfg.reward.fn:
    raise ConfigError("train.objective=grpo needs a reward: set reward.fn=exact_match (the "
                      "completion equals the reward.answer_field column) or "
                      "reward.fn=module:function")
  if cfg.train.objective == "robust" and cfg.preference.label_smoothing >= 0.5:
    raise ConfigError(f"preference.label_smoothing={cfg.preference.label_smoothing} must be "
                      "below 0.5 for train.objective=robust")
  uses_reference = objective in ("dpo", "ipo", "hinge", "robust") or \
      (objective == "grpo" and cfg.grpo.beta > 0)
  if uses_reference and (cfg.lora.train_extra or cfg.lora.bias != "none"):
    raise ConfigError(f"train.objective={objective} compares with the base as reference, but "
                      "lora.train_extra / lora.bias train base leaves in place, so the reference "
                      "would see their trained values; leave them unset (or, for grpo, set "
                      "grpo.beta=0)")
  fns = cfg.reward.fn if isinstance(cfg.reward.fn, list) else [cfg.reward.fn]
  if cfg.reward.weights is not None and len(cfg.reward.weights) != len(fns):
    raise ConfigError(f"reward.weights={cfg.reward.weights} must give one weight per reward.fn "
                      f"({len(fns)}: {fns})")


def dump(cfg: Config) -> str:
  return yaml.safe_dump(cfg.to_dict(), sort_keys=False)


def check_output_dir(path: str, name: str) -> None:
  """Refuses an output directory that cannot be created: `path` or a parent is a file.

  Called before anything is read or written, so a wrong path costs nothing. A
  URL (``gs://...``) is left to its writer.

  Args:
    path: the directory a command will write (it may not exist yet).
    name: how the user gave it, for the message (``output_dir``, ``--out``).

  Raises:
    ConfigError: naming the file in the way.

  >>> import tempfile
  >>> f = tempfile.NamedTemporaryFile()
  >>> check_output_dir(f.name + "/run", "--out")  # doctest: +ELLIPSIS
  Traceback (most recent call last):
  ...
  jaxlora_cli.config.ConfigError: --out .../run: ... is a file, not a directory; ...
  """
  if not path or _files.is_remote(path):
    return
  existing = os.path.abspath(path)
  while not os.path.exists(existing) and os.path.dirname(existing) != existing:
    existing = os.path.dirname(existing)
  if os.path.exists(existing) and not os.path.isdir(existing):
    where = "" if existing == os.path.abspath(path) else f": {existing}"
    raise ConfigError(f"{name} {path}{where} is a file, not a directory; give a directory "
                      "path (a new one is created)")


# {dotted key: help}, from the declarations above.
DOCS = {name: f.metadata["help"] for name, f, _ in keys()}


def _default(f: dataclasses.Field) -> Any:
  return f.default_factory() if f.default is dataclasses.MISSING else f.default


def describe() -> str:
  """Every config key with its default, meaning and allowed values (for ``jaxlora train --help``).

  >>> print("\\n".join(describe().splitlines()[:3]))  # doctest: +ELLIPSIS
  config keys (section.key=value; defaults in brackets):
    output_dir ['runs/default']: run directory; rerunning the same config there resumes it
    model.path ['']: local Hugging Face checkpoint directory (config.json, safetensors, ...
  """
  lines = ["config keys (section.key=value; defaults in brackets):"]
  for name, f, _ in keys():
    limit = allowed(f.metadata)
    lines.append(f"  {name} [{_default(f)!r}]: {f.metadata['help']}"
                 + (f"; must be {limit}" if limit else ""))
  return "\n".join(lines)
