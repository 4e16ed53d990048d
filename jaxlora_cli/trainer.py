"""The training loop behind `jaxlora train`, built on jaxlora's public API."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import shutil
import time
import warnings
import zlib
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from etils import epath
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec

import jaxlora
from jaxlora import _files
from jaxlora import _tree
from jaxlora.models import attention as attention_lib
from jaxlora_cli import config as config_lib
from jaxlora_cli import data as data_lib
from jaxlora_cli import objectives
from jaxlora_cli import preemption
from jaxlora_cli import reporting
from jaxlora_cli import rl
from jaxlora_cli.config import Config, ConfigError
from jaxlora_cli.preemption import TrainingPreempted  # noqa: F401  (re-exported)


class TrainingDiverged(RuntimeError):
  """The loss became NaN or infinite."""


def make_mesh(cfg: Config):
  try:
    return jaxlora.sharding.make_mesh(data=cfg.mesh.data, fsdp=cfg.mesh.fsdp,
                                      tensor=cfg.mesh.tensor)
  except jaxlora.errors.JaxloraError as e:
    raise ConfigError(f"mesh: {e}") from None


def rules(cfg: Config):
  return {"fsdp_tp": jaxlora.sharding.FSDP_TP_RULES,
          "ep": jaxlora.sharding.EP_RULES}.get(cfg.mesh.rules, jaxlora.sharding.FSDP_RULES)


def resolve_model(path: str, revision: str | None = None) -> str:
  """The local directory of ``model.path``: a directory as is, a Hub id's snapshot.

  A Hugging Face Hub id (``org/name``) is fetched by `jaxlora.models.resolve`
  (config, safetensors and tokenizer files; the local cache only while
  ``HF_HUB_OFFLINE=1``, which the command line sets unless the environment has it).

  >>> import tempfile
  >>> d = tempfile.mkdtemp()
  >>> resolve_model(d) == d
  True
  >>> resolve_model("/nonexistent/model")
  Traceback (most recent call last):
  ...
  jaxlora_cli.config.ConfigError: model directory /nonexistent/model not found
  """
  if not path:
    raise ConfigError("no model given: set model.path=<local Hugging Face checkpoint directory "
                      "or Hub id org/name>")
  if not os.path.isdir(path) and not jaxlora.models.is_repo_id(path):
    raise ConfigError(f"model directory {path} not found")
  try:
    return jaxlora.models.resolve(path, revision)
  except jaxlora.errors.JaxloraError as e:
    raise ConfigError(f"model.path: {e}") from None


def base_name(path: str) -> str:
  """``base_model_name_or_path`` for PEFT: a Hub id as is, a directory made absolute."""
  return path if jaxlora.models.is_repo_id(path) and not os.path.isdir(path) \
      else os.path.abspath(path)


def load_model(cfg: Config, mesh=None):
  path = resolve_model(cfg.model.path, cfg.model.revision)
  try:
    # Fails here, before any weights are read, when this platform cannot run the choice.
    attention_lib.resolve(cfg.model.attention)
  except jaxlora.errors.JaxloraError as e:
    raise ConfigError(f"config key 'model.attention': {e}") from None
  try:
    # QLoRA (model.quantize): kernels are quantized tensor by tensor as they are read; a
    # bitsandbytes 4-bit checkpoint loads quantized as stored.
    model, params = jaxlora.models.from_pretrained(
        path, dtype=jnp.dtype(cfg.model.dtype), param_dtype=jnp.dtype(cfg.model.param_dtype),
        remat=cfg.model.remat,
        shardings=None if mesh is None else
        (lambda m: jaxlora.sharding.param_shardings(m, mesh, rules(cfg))),
        quantize=cfg.model.quantize, block_size=cfg.model.quant_block_size,
        double_quant=cfg.model.double_quant, attention=cfg.model.attention)
  except jaxlora.errors.JaxloraError as e:
    raise ConfigError(str(e)) from None
  if cfg.model.merge_adapter:
    if cfg.model.quantize:
      raise ConfigError("model.merge_adapter cannot merge into a quantized base "
                        f"(model.quantize={cfg.model.quantize}); merge it into a float "
                        "checkpoint first (jaxlora merge) and quantize that")
    params = jaxlora.merge(start_from(cfg.model.merge_adapter, params, model,
                                      "model.merge_adapter"))
  return model, params


def load_tokenizer(path: str, revision: str | None = None):
  """The tokenizer of a checkpoint directory or Hub id (`resolve_model`)."""
  import transformers  # pylint: disable=import-outside-toplevel

  path = resolve_model(path, revision)
  try:
    tok = transformers.AutoTokenizer.from_pretrained(path, local_files_only=True)
  except Exception as e:  # transformers raises OSError/ValueError/... for missing files
    raise ConfigError(f"no tokenizer in {path}: {type(e).__name__}: {str(e).splitlines()[0]}") \
        from None
  return tok


def pad_id(tok) -> int:
  for cand in (tok.pad_token_id, tok.eos_token_id, 0):
    if cand is not None:
      return int(cand)
  return 0


def load_data(cfg: Config, tok, model_max: int):
  if cfg.data.max_length > model_max:
    raise ConfigError(f"data.max_length={cfg.data.max_length} exceeds the model's context of "
                      f"{model_max} tokens")
  train = data_lib.tokenize(data_lib.read_rows(cfg.data.train_file), cfg.data, tok,
                            cfg.data.train_file)
  if cfg.data.eval_file:
    evals = data_lib.tokenize(data_lib.read_rows(cfg.data.eval_file), cfg.data, tok,
                              cfg.data.eval_file)
  elif cfg.data.eval_fraction > 0:
    order = np.random.default_rng([cfg.data.seed, 10**6]).permutation(len(train))
    n_eval = max(1, int(len(train) * cfg.data.eval_fraction))
    if n_eval >= len(train):
      raise ConfigError(f"data.eval_fraction={cfg.data.eval_fraction} leaves no training rows")
    evals = [train[i] for i in order[:n_eval]]
    train = [train[i] for i in order[n_eval:]]
  else:
    evals = []
  return train, evals


def schedule(cfg: Config):
  t = cfg.train
  if t.warmup_steps > 0:
    return optax.warmup_cosine_decay_schedule(0.0, t.lr, t.warmup_steps,
                                              max(t.steps, t.warmup_steps + 1),
                                              t.lr * t.min_lr_ratio)
  return optax.cosine_decay_schedule(t.lr, t.steps, alpha=t.min_lr_ratio)


def optimizer(cfg: Config, lr_schedule, tree=None) -> optax.GradientTransformation:
  """AdamW on the trainable half (LoRA+ with lora.loraplus_ratio), after gradient clipping."""
  parts = []
  if cfg.train.max_grad_norm > 0:
    parts.append(optax.clip_by_global_norm(cfg.train.max_grad_norm))
  if cfg.lora.loraplus_ratio is not None:
    parts.append(jaxlora.loraplus(optax.adamw, lr_schedule, cfg.lora.loraplus_ratio, tree=tree,
                                  weight_decay=cfg.train.weight_decay))
  else:
    parts.append(optax.adamw(lr_schedule, weight_decay=cfg.train.weight_decay))
  return optax.chain(*parts)


def loss_weights(batch) -> jax.Array:
  """Weights of the next-token predictions: (batch, seq - 1), position i predicting i + 1.

  A prediction counts where token i + 1 is a target and positions i and i + 1
  hold the same example: never across two packed examples (`segment_ids`) nor
  into padding. Without `segment_ids` the attention mask plays their part
  (one example per row), which gives ``targets[:, 1:] * attention_mask[:, 1:]``.
  """
  seg = batch.get("segment_ids", batch["attention_mask"])
  same = (seg[:, :-1] == seg[:, 1:]) & (seg[:, 1:] > 0)
  return batch["targets"][:, 1:] * same.astype(jnp.float32)


def _weighted_losses(fwd, trainable, frozen, batch, key, weight_sets, *, model=None,
                     chunk_size: int = 0, aux_coef: float = 0.0):
  """``sum(cross-entropy * w)`` for each ``w`` in `weight_sets`, from one forward pass.

  Each ``w`` is (batch, seq - 1), as `loss_weights`. With `chunk_size` > 0 the
  model returns its final hidden states and `chunked_cross_entropy` applies the
  head chunk by chunk, so the float32 (batch, seq, vocab) logits never exist;
  `fwd` must then skip its reached-adapter check (the head's adapter, if any, is
  applied by the loss). A batch with ``adapter_ids`` (batch, 1) runs each row
  with its adapter of the bank. With `aux_coef` > 0 (a mixture-of-experts model)
  each sum also gets ``aux_coef * load-balancing loss * sum(w)``, so that the
  mean over tokens is the cross-entropy plus the weighted auxiliary loss.
  """
  params = jaxlora.combine(trainable, frozen)
  kwargs = {"attention_mask": batch["attention_mask"],
            "rngs": None if key is None else {"dropout": key}}
  if "segment_ids" in batch:  # packed rows
    kwargs["segment_ids"] = batch["segment_ids"]
  if "adapter_ids" in batch:  # an adapter bank: row i runs with adapter adapter_ids[i]
    kwargs["adapter_ids"] = batch["adapter_ids"][:, 0]
  labels = batch["input_ids"][:, 1:]
  aux = 0.0
  if aux_coef:
    kwargs["mutable"] = ["intermediates"]
  out = fwd({"params": params}, batch["input_ids"], return_hidden=chunk_size > 0, **kwargs)
  if aux_coef:
    out, state = out
    aux = aux_coef * _router_aux_loss(model, state, batch["attention_mask"])
  if chunk_size > 0:
    return [jaxlora.models.chunked_cross_entropy(model, params, out[:, :-1], labels, w,
                                                 chunk_size=chunk_size, reduction="sum")
            + aux * jnp.sum(w) for w in weight_sets]
  logits = out[:, :-1].astype(jnp.float32)
  ce = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
  return [jnp.sum(ce * w) + aux * jnp.sum(w) for w in weight_sets]


def _router_aux_loss(model, state, attention_mask):
  """The load-balancing loss of the router logits a mixture-of-experts model sowed."""
  from jaxlora.models import moe  # pylint: disable=import-outside-toplevel
  found = [v for path, v in jax.tree_util.tree_flatten_with_path(
      state.get("intermediates", {}), is_leaf=lambda x: isinstance(x, tuple))[0]
           if getattr(path[-1], "key", None) == "router_logits"]
  if not found:
    raise ValueError("train.router_aux_loss_coef > 0 but the model sowed no router logits; it "
                     "applies to mixture-of-experts models only (set it to 0).")
  logits = jnp.concatenate([jnp.asarray(x).reshape(-1, *jnp.shape(x)[-2:]) for x in found[0]])
  cfg = model.config
  return moe.load_balancing_loss(logits, cfg.num_experts, cfg.num_experts_per_tok,
                                 attention_mask)


def _token_loss(fwd, trainable, frozen, batch, key, *, model=None, chunk_size: int = 0,
                row_scale=None, aux_coef: float = 0.0):
  """Summed cross-entropy over target tokens, and their count.

  `row_scale` (batch,) multiplies each row's terms (the per-adapter
  normalisation of `make_train_step`); the count is unscaled.
  """
  weights = loss_weights(batch)
  scaled = weights if row_scale is None else weights * row_scale[:, None]
  total, = _weighted_losses(fwd, trainable, frozen, batch, key, [scaled], model=model,
                            chunk_size=chunk_size, aux_coef=aux_coef)
  return total, jnp.sum(weights)


def make_loss(model, dropout: float = 0.0, loss_chunk_size: int = 512,
              router_aux_loss_coef: float = 0.0):
  """``loss(trainable, frozen, batch, key, row_scale=None) -> (summed cross-entropy, count)``.

  `batch` holds one micro-batch (batch, seq) arrays; `key` None disables dropout.
  `router_aux_loss_coef` adds that multiple of the load-balancing loss (mixture of
  experts) per token.
  """
  # The chunked loss applies the head's adapter itself, so the forward pass leaves it unused.
  fwd = jaxlora.apply(model.apply, dropout=dropout, check_reached=loss_chunk_size == 0)

  def loss(trainable, frozen, batch, key, row_scale=None):
    return _token_loss(fwd, trainable, frozen, batch, key, model=model,
                       chunk_size=loss_chunk_size, row_scale=row_scale,
                       aux_coef=router_aux_loss_coef)

  return loss


def adapter_token_counts(batch, capacity: int) -> jax.Array:
  """Target tokens per bank slot in a step's (accum, batch, seq) batch: (capacity,).

  Rows with ``adapter_ids`` -1 (empty rows) count for no slot.
  """
  w = jax.vmap(loss_weights)(batch).sum(-1)  # (accum, batch)
  ids = batch["adapter_ids"][..., 0]
  ids = jnp.where(ids < 0, capacity, ids)  # dropped below (a negative index would wrap)
  return jnp.zeros((capacity,), jnp.float32).at[ids.reshape(-1)].add(w.reshape(-1), mode="drop")


def make_grads(model, dropout: float = 0.0, *, loss_chunk_size: int = 512,
               capacity: int | None = None, router_aux_loss_coef: float = 0.0):
  """``grads(trainable, frozen, batch, key) -> (grads, metrics)`` of one step's batch.

  `batch` holds (accum, batch, seq) arrays. The loss is the mean over every
  target token of the step. With an adapter bank (`capacity` slots; the batch
  holds ``adapter_ids``) the loss is normalised per adapter instead: the sum
  over adapters of each adapter's mean token loss over its own rows. Adapter
  k's parameters only see its rows, so its gradient is exactly the gradient of
  training it alone on those rows, whatever the mix of the batch. The
  reported ``loss`` is then the mean over the adapters present in the step.
  """
  loss_fn = make_loss(model, dropout, loss_chunk_size, router_aux_loss_coef)

  def grads_fn(trainable, frozen, batch, key):
    keys = jax.random.split(key, batch["input_ids"].shape[0])
    if capacity is not None:
      counts = adapter_token_counts(batch, capacity)
      inv = jnp.where(counts > 0, 1.0 / jnp.maximum(counts, 1.0), 0.0)

    def micro(carry, xs):
      g_acc, l_acc, n_acc = carry
      mb, k = xs
      row_scale = None
      if capacity is not None:
        ids = mb["adapter_ids"][:, 0]
        row_scale = jnp.where(ids < 0, 0.0, inv[jnp.clip(ids, 0, capacity - 1)])
      (l, n), g = jax.value_and_grad(
          lambda t: loss_fn(t, frozen, mb, k, row_scale), has_aux=True)(trainable)
      return (jax.tree.map(jnp.add, g_acc, g), l_acc + l, n_acc + n), None

    zeros = jax.tree.map(jnp.zeros_like, trainable)
    (g, loss_sum, n), _ = jax.lax.scan(micro, (zeros, 0.0, 0.0), (batch, keys))
    n = jnp.maximum(n, 1.0)
    if capacity is None:
      grads = jax.tree.map(lambda x: x / n, g)  # the mean over every target token of the step
      return grads, {"loss": loss_sum / n, "tokens": n}
    present = jnp.maximum(jnp.sum(counts > 0), 1)
    return g, {"loss": loss_sum / present, "tokens": n}

  return grads_fn


def make_train_step(model, tx, dropout: float, shardings=None, *, loss_chunk_size: int = 512,
                    capacity: int | None = None, router_aux_loss_coef: float = 0.0,
                    objective: Any = None):
  """The jitted step; `shardings` = (trainable, opt_state, frozen, batch, replicated).

  `loss_chunk_size` as `train.loss_chunk_size` (0: the loss from full logits);
  `capacity`: the adapter bank's slots, for the per-adapter loss of `make_grads`;
  `objective`: None (next-token loss), an `objectives.PairObjective` (preference pairs) or an
  `objectives.GrpoObjective` (sampled completions with advantages).
  """
  if isinstance(objective, objectives.PairObjective):
    grads_fn = objectives.make_pair_grads(model, objective, dropout,
                                          loss_chunk_size=loss_chunk_size)
  elif isinstance(objective, objectives.GrpoObjective):
    grads_fn = objectives.make_grpo_grads(model, objective, dropout,
                                          loss_chunk_size=loss_chunk_size)
  else:
    grads_fn = make_grads(model, dropout, loss_chunk_size=loss_chunk_size, capacity=capacity,
                          router_aux_loss_coef=router_aux_loss_coef)

  def step(trainable, opt_state, frozen, batch, key):
    grads, m = grads_fn(trainable, frozen, batch, key)
    updates, opt_state = tx.update(grads, opt_state, trainable)
    return (optax.apply_updates(trainable, updates), opt_state,
            {**m, "grad_norm": optax.tree.norm(grads)})

  if shardings is None:
    return jax.jit(step)
  t_sh, o_sh, f_sh, b_sh, rep = shardings
  return jax.jit(step, in_shardings=(t_sh, o_sh, f_sh, b_sh, rep),
                 out_shardings=(t_sh, o_sh, rep))


def make_eval(model, place=None, *, loss_chunk_size: int = 512,
              adapters: tuple[str | None, ...] | None = None):
  """Mean eval loss over fixed batches; `place` puts a host batch on the mesh.

  `loss_chunk_size` as in `make_train_step` (the same loss either way). Batches
  with ``adapter_ids`` run each row with its adapter of the bank. With
  `adapters` (the bank's names by slot) `run` returns ``{name: mean loss over
  that adapter's rows}`` for the adapters that have eval rows, from one
  forward pass per batch.
  """
  fwd = jaxlora.apply(model.apply, check_reached=loss_chunk_size == 0)

  @jax.jit
  def ev(trainable, frozen, batch):
    mb = jax.tree.map(lambda x: x[0], batch)
    w = loss_weights(mb)
    if adapters is None:
      sets = [w]
    else:
      ids = mb["adapter_ids"][:, 0]
      sets = [w * (ids == k)[:, None] for k in range(len(adapters))]
    sums = _weighted_losses(fwd, trainable, frozen, mb, None, sets, model=model,
                            chunk_size=loss_chunk_size)
    return jnp.stack(sums), jnp.stack([jnp.sum(x) for x in sets])

  def run(trainable, frozen, batches):
    total, count = 0.0, 0.0
    for b in batches:
      l, n = ev(trainable, frozen, place(b) if place else b)
      total, count = total + np.asarray(l, np.float64), count + np.asarray(n, np.float64)
    if adapters is None:
      return float(total[0] / max(count[0], 1.0))
    return {name: float(total[k] / count[k]) for k, name in enumerate(adapters)
            if name is not None and count[k] > 0}

  return run


def run_path(run_dir: str, *parts: str) -> str:
  """A path inside a run directory: absolute for local directories, a URL for gs:// ones.

  >>> run_path("gs://bucket/run/", "checkpoints")
  'gs://bucket/run/checkpoints'
  >>> run_path("/runs/a", "adapter")
  '/runs/a/adapter'
  """
  if _files.is_remote(run_dir):
    return "/".join([run_dir.rstrip("/"), *parts])
  return os.path.join(os.path.abspath(run_dir), *parts)


def process_rows(batch_sharding, batch_size: int) -> tuple[int, int]:
  """The rows ``[lo, hi)`` of each global (accum, batch, length) batch that this process's
  devices hold: a part of the batch axis, or all of it where the batch is replicated.

  >>> import jaxlora
  >>> from jax.sharding import NamedSharding, PartitionSpec as P
  >>> mesh = jaxlora.sharding.make_mesh(fsdp=-1)
  >>> process_rows(NamedSharding(mesh, P(None, ("data", "fsdp"), None)), 16)  # one process
  (0, 16)
  """
  index = batch_sharding.addressable_devices_indices_map((1, batch_size, 1))
  spans = sorted({s[1].indices(batch_size)[:2] for s in index.values()})
  lo, hi = spans[0][0], max(e for _, e in spans)
  if sum(e - b for b, e in spans) != hi - lo:
    raise ConfigError(f"this process's devices hold rows {spans} of each batch, not one "
                      "contiguous block; order the mesh so that each host's devices are adjacent "
                      "along data x fsdp")
  return lo, hi


def check_run_dir(cfg: Config) -> bool:
  """True to resume. Refuses an output directory that holds a different run."""
  config_lib.check_output_dir(cfg.output_dir, "output_dir")  # not a file, nor under one
  out = epath.Path(run_path(cfg.output_dir))
  saved = out / "config.yaml"
  if not out.exists():
    return False
  if not saved.is_file():
    if any(out.iterdir()):
      raise ConfigError(f"output_dir {cfg.output_dir} exists and is not a jaxlora run directory; "
                        "choose an empty or new directory")
    return False
  old = config_lib.load(str(saved)).to_dict()
  new = cfg.to_dict()
  # A longer run may continue an earlier one, on another mesh or process layout (a resized or
  # recreated slice): the checkpoint is restored onto the new shardings. How the same step is
  # computed (attention kernel, remat, loss chunks) may change too, e.g. on other hardware.
  for d in (old, new):
    d["train"] = {**d["train"], "steps": None, "loss_chunk_size": None}
    d["model"] = {**d["model"], "attention": None, "remat": None}
    d.pop("mesh", None)
    d.pop("distributed", None)
    d.pop("report_to", None)  # where metrics go may change too
    d.pop("wandb", None)
  diffs = [f"{s}.{k}" for s in new if isinstance(new[s], dict)
           for k in new[s] if old.get(s, {}).get(k) != new[s][k]]
  diffs += [s for s in new if not isinstance(new[s], dict) and old.get(s) != new[s]]
  if diffs:
    raise ConfigError(f"output_dir {out} holds a different run (differs in {', '.join(diffs)}); "
                      "choose another output_dir, or restore its config to resume it")
  return True


def train(cfg: Config, *, log=print, progress: bool = True,
          handle_signals: bool = False) -> dict:
  """Runs (or resumes) training; returns a summary dict. Writes everything under cfg.output_dir.

  Args:
    cfg: the run's configuration.
    log: called with each line of news (resuming, what is trained, a stop).
    progress: show progress on stderr (`reporting.Progress`).
    handle_signals: stop cleanly on SIGTERM or SIGINT (`preemption.StopSignals`):
      finish the step in flight, checkpoint it and raise `TrainingPreempted`.
      The previous handlers are restored on return.

  Raises:
    TrainingPreempted: a signal stopped the run (`handle_signals`); rerunning resumes it.
    TrainingDiverged: the loss became NaN or infinite.
  """
  resume = check_run_dir(cfg)
  reporting.check_report_to(cfg.report_to)
  if jax.process_count() > 1:  # every process decides before process 0 writes anything
    multihost_utils.sync_global_devices("jaxlora: run directory checked")
  mesh = make_mesh(cfg)
  stops = preemption.StopSignals() if handle_signals else None
  # The mesh context lets the Pallas attention kernels run per device (shard_map).
  with jax.set_mesh(mesh), stops or contextlib.nullcontext():
    return _train(cfg, mesh, resume, log, progress, stops)


@dataclasses.dataclass
class TrainState:
  """What a training step changes: the step count, adapter, optimizer state and PRNG key.

  The data position lives in `Run.batcher` (it advances as batches are drawn).
  """
  step: int
  trainable: Any
  opt_state: Any
  rng: jax.Array


@dataclasses.dataclass
class Evaluator:
  """The eval loss of the run's fixed eval batches (`make_eval`).

  With an adapter bank the loss is the mean of the adapters' own eval losses,
  and `per_adapter` holds each adapter's latest one. An objective whose `run_eval`
  returns a dict reports its ``'loss'`` entry (named `name`: ``eval_reward`` for
  GRPO's mean reward) and keeps the others in `extras`.
  """
  run_eval: Any  # make_eval's run(trainable, frozen, batches)
  batches: list
  bank: bool = False
  per_adapter: dict[str, float] = dataclasses.field(default_factory=dict)
  name: str = "eval_loss"
  extras: dict[str, float] = dataclasses.field(default_factory=dict)

  def __bool__(self) -> bool:
    return bool(self.batches)

  def __call__(self, trainable, frozen) -> float | None:
    loss = self.run_eval(trainable, frozen, self.batches)
    if isinstance(loss, dict) and not self.bank:
      self.extras = {k: v for k, v in loss.items() if k != "loss"}
      return loss["loss"]
    if not self.bank:
      return loss
    self.per_adapter.clear()
    self.per_adapter.update(loss)
    return float(np.mean(list(loss.values()))) if loss else None

  def record(self, step: int, loss: float | None) -> dict:
    """The metrics.jsonl record of an eval at `step`."""
    return {"step": step, self.name: loss,
            **{f"eval_loss/{n}": v for n, v in self.per_adapter.items()},
            **{f"eval_{n}": v for n, v in self.extras.items()}}


@dataclasses.dataclass
class Run:
  """Everything `setup` builds for a training run; the loop reads it and changes no field.

  (`batcher` and `ckpt` are objects with their own state: the data position and
  the checkpoints written.)
  """
  cfg: Config
  out: str  # the run directory: an absolute path, or a URL (gs://)
  model: Any
  params: Any  # the base parameters as loaded
  tokenizer: Any
  train_examples: list
  eval_examples: list
  names: list[str] | None  # the bank's adapter names (data.adapter_field); None: one adapter
  bank: Any  # the jaxlora bank of `names` (its tree's base leaves are `frozen`), or None
  summary: Any  # jaxlora.summary of one adapter
  frozen: Any
  lr_schedule: Any
  step_fn: Any  # make_train_step's jitted step
  place: Any  # a host batch -> the global batch on the mesh (`make_place`)
  rows: tuple[int, int]  # this process's rows of each batch (`process_rows`)
  batcher: data_lib.Batcher
  evaluator: Evaluator
  ckpt: jaxlora.CheckpointManager
  metrics: Any  # reporting.Metrics on process 0, NullMetrics elsewhere
  sampler: rl.Sampler | None = None  # train.objective=grpo: the rollouts

  @property
  def n_trainable(self) -> int:
    return self.summary.trainable * (1 if self.names is None else len(self.names))

  @property
  def n_total(self) -> int:
    return self.summary.total - self.summary.trainable + self.n_trainable


@dataclasses.dataclass
class Throughput:
  """Target tokens per second, counted from the end of the first (compiling) step."""
  tokens: float = 0.0
  _t_first: float | None = None
  _tokens_first: float = 0.0

  def update(self, tokens: float, now: float) -> float:
    """Adds a step's `tokens`, finished at time `now`; returns the rate so far (0 at first).

    >>> speed = Throughput()
    >>> speed.update(100, now=10.0), speed.update(50, now=11.0), speed.update(50, now=12.0)
    (0.0, 50.0, 50.0)
    """
    self.tokens += tokens
    if self._t_first is None:
      self._t_first, self._tokens_first = now, self.tokens
    return (self.tokens - self._tokens_first) / (now - self._t_first) \
        if now > self._t_first else 0.0


def make_place(batch_sharding, rows: tuple[int, int], batch_size: int):
  """``place(batch, local=False)``: a host batch as the global batch on the mesh.

  `batch` holds this process's rows (`local`) or the whole global batch; on
  multi-process runs each process contributes only its own `rows`.
  """
  def place(batch, local=False):
    if jax.process_count() == 1:
      return jax.device_put(batch, batch_sharding)
    if not local:
      batch = {name: v[:, rows[0]:rows[1]] for name, v in batch.items()}
    shape = lambda v: (v.shape[0], batch_size, *v.shape[2:])
    return {name: jax.make_array_from_process_local_data(batch_sharding, v, shape(v))
            for name, v in batch.items()}

  return place


def init_adapters(cfg: Config, params, model, names: list[str] | None):
  """The run's wrapped tree: ``(tree, bank, one adapter's tree)``.

  Without `names`, one adapter (init key from train.seed) and no bank; with
  them, a bank (`jaxlora.stack`) of one adapter per name (`adapter_key`).
  """
  if names is None:
    tree = (start_from(cfg.lora.init_from, params, model) if cfg.lora.init_from else
            wrap(cfg, params, model, jax.random.key(cfg.train.seed)))
    return tree, None, tree
  singles = {n: wrap(cfg, params, model, adapter_key(cfg.train.seed, n)) for n in names}
  bank = jaxlora.stack(singles)
  return bank.tree, bank, singles[names[0]]


def start_from(path: str, params, model, key_name: str = "lora.init_from"):
  """The tree of a saved adapter (``lora.init_from``, ``model.merge_adapter``): a jaxlora or a
  PEFT adapter directory."""
  try:
    if epath.Path(path, "adapter_config.json").is_file():
      return jaxlora.peft.load(path, params, model=model)
    return jaxlora.load(path, params)
  except (FileNotFoundError, jaxlora.errors.JaxloraError, ValueError) as e:
    raise ConfigError(f"{key_name}={path}: {str(e).splitlines()[0]}") from None


def objective_of(cfg: Config) -> Any:
  """``train.objective`` as `make_train_step` takes it (None: next-token loss)."""
  if cfg.train.objective in config_lib.PAIR_OBJECTIVES:
    return objectives.PairObjective.from_config(cfg)
  if cfg.train.objective == "grpo":
    return objectives.GrpoObjective.from_config(cfg)
  return None


def make_sampler(cfg: Config, model, tok, train_ex) -> rl.Sampler:
  """GRPO's rollouts: the reward functions are imported (and the data checked) up front."""
  rl.check_multihost()
  rewards = rl.load_rewards(cfg.reward.fn, cfg.reward.weights, cfg.reward.answer_field)
  rl.check_columns(rewards, train_ex, cfg.reward.answer_field, cfg.data.train_file)
  g = cfg.grpo
  return rl.Sampler(model, tok, rewards, g.num_generations, g.max_completion_length,
                    g.temperature, g.top_p, g.scale_rewards, cfg.data.max_length, pad_id(tok))


def make_evaluator(cfg: Config, model, objective, place, eval_ex, pid: int, sampler, bank,
                   names, adapter_index) -> Evaluator:
  """The run's evaluation: eval loss (SFT, per adapter with a bank), the pair losses and reward
  accuracy (preference objectives), or the mean reward of greedy completions (GRPO)."""
  t = cfg.train
  if sampler is not None:
    prompts = eval_ex[:t.eval_batches * t.batch_size] if t.eval_batches else eval_ex
    rows = t.batch_size * cfg.grpo.num_generations

    def mean_reward(trainable, frozen, examples):
      m = sampler.evaluate(jaxlora.combine(trainable, frozen), examples, rows)
      return {"loss": m.pop("reward"), **m}

    return Evaluator(mean_reward, prompts, name="eval_reward")
  batches = data_lib.eval_batches(eval_ex, t.batch_size, cfg.data.max_length, pid,
                                  t.eval_batches, pad_rows=True, adapter_index=adapter_index)
  if objective is not None:
    return Evaluator(objectives.make_pair_eval(model, objective, place,
                                               loss_chunk_size=t.loss_chunk_size), batches)
  return Evaluator(make_eval(model, place, loss_chunk_size=t.loss_chunk_size,
                             adapters=None if bank is None else tuple(names)),
                   batches, bank=bank is not None)


def setup(cfg: Config, mesh, resume: bool, log=print) -> tuple[Run, TrainState]:
  """Loads model, tokenizer and data, builds adapters, optimizer and step, and restores.

  Returns the run and its state: at step 0, or at the latest checkpoint when
  `resume` (then metrics after that step are dropped). Process 0 writes the run
  directory's config.yaml.
  """
  n_batch_shards = mesh.shape["data"] * mesh.shape["fsdp"]
  if cfg.train.batch_size % n_batch_shards:
    raise ConfigError(f"train.batch_size={cfg.train.batch_size} must be a multiple of "
                      f"mesh.data x mesh.fsdp = {n_batch_shards}")
  main_process = jax.process_index() == 0
  model, params = load_model(cfg, mesh)
  tok = load_tokenizer(cfg.model.path, cfg.model.revision)
  train_ex, eval_ex = load_data(cfg, tok, model.config.max_position_embeddings)
  out = run_path(cfg.output_dir)
  if main_process:  # only process 0 writes logs, metrics and exports
    epath.Path(out).mkdir(parents=True, exist_ok=True)
    epath.Path(out, "config.yaml").write_text(config_lib.dump(cfg))

  names = adapter_names(cfg, train_ex)  # None: one adapter; else one per data.adapter_field value
  tree, bank, single = init_adapters(cfg, params, model, names)
  adapter_index = None if names is None else {n: i for i, n in enumerate(names)}
  lr_schedule = schedule(cfg)
  tx = optimizer(cfg, lr_schedule, tree)
  rep = NamedSharding(mesh, PartitionSpec())
  # Adapters follow their kernels' shardings; optimizer state follows its params.
  # The float kernels' shardings (a quantized record's own shardings derive from them).
  base_sh = jaxlora.sharding.param_shardings(model, mesh, rules(cfg))
  if bank is None:
    t_sh, f_sh = jaxlora.split(jaxlora.sharding.tree_shardings(tree, base_sh))
  else:  # a bank's stacked adapter leaves are small: replicated; base leaves as usual
    t_sh, f_sh = jaxlora.split(_bank_shardings(
        tree, jaxlora.sharding.tree_shardings(single, base_sh), rep))
  b_sh = NamedSharding(mesh, PartitionSpec(None, ("data", "fsdp"), None))
  trainable, frozen = jaxlora.split(tree)
  trainable, frozen = jax.device_put(trainable, t_sh), jax.device_put(frozen, f_sh)
  o_sh = jaxlora.sharding.opt_state_shardings(tx, trainable, t_sh, mesh)
  opt_state = jax.jit(tx.init, out_shardings=o_sh)(trainable)

  rows = process_rows(b_sh, cfg.train.batch_size)
  place = make_place(b_sh, rows, cfg.train.batch_size)
  pid = pad_id(tok)
  objective = objective_of(cfg)
  sampler = make_sampler(cfg, model, tok, train_ex) if cfg.train.objective == "grpo" else None
  evaluator = make_evaluator(cfg, model, objective, place, eval_ex, pid, sampler, bank, names,
                             adapter_index)
  if cfg.train.router_aux_loss_coef and objective is not None:
    raise ConfigError(f"train.router_aux_loss_coef applies to train.objective=sft; set it to 0 "
                      f"for train.objective={cfg.train.objective}")
  if cfg.train.router_aux_loss_coef and not getattr(model.config, "num_experts", 0):
    raise ValueError(f"train.router_aux_loss_coef={cfg.train.router_aux_loss_coef} applies to "
                     f"mixture-of-experts models, but {cfg.model.path!r} is a dense "
                     f"{model.config.model_type!r} model; set it to 0.")
  run = Run(
      cfg=cfg, out=out, model=model, params=params, tokenizer=tok, train_examples=train_ex,
      eval_examples=eval_ex, names=names, bank=bank, summary=jaxlora.summary(single),
      frozen=frozen, lr_schedule=lr_schedule,
      step_fn=make_train_step(model, tx, cfg.lora.dropout, (t_sh, o_sh, f_sh, b_sh, rep),
                              loss_chunk_size=cfg.train.loss_chunk_size,
                              capacity=None if bank is None else len(names),
                              router_aux_loss_coef=cfg.train.router_aux_loss_coef,
                              objective=objective),
      place=place, rows=rows,
      batcher=data_lib.Batcher(train_ex, cfg.train.batch_size, cfg.data.max_length,
                               cfg.data.seed, pid, packing=cfg.data.packing,
                               adapter_index=adapter_index),
      evaluator=evaluator,
      ckpt=jaxlora.CheckpointManager(run_path(out, "checkpoints"),
                                     max_to_keep=cfg.train.keep_checkpoints,
                                     save_interval_steps=cfg.train.save_every),
      metrics=reporting.Metrics(out, cfg.report_to, wandb_init(cfg, out)) if main_process
      else reporting.NullMetrics(),
      sampler=sampler)
  state = TrainState(0, trainable, opt_state, jax.random.key(cfg.train.seed + 1))
  if resume and run.ckpt.latest_step() is not None:
    state = restore(run, state)
    log(f"resuming {out} from step {state.step}")
  return run, state


def wandb_init(cfg: Config, out: str) -> dict[str, Any]:
  """The ``wandb.init`` arguments of a run: ``wandb.*`` keys, the whole config, the run dir.

  >>> from jaxlora_cli import config as config_lib
  >>> kw = wandb_init(config_lib.load(None, ["wandb.mode=offline"]), "/tmp/runs/a")
  >>> kw["project"], kw["name"], kw["mode"], kw["dir"], kw["config"]["lora"]["rank"]
  ('jaxlora', 'a', 'offline', '/tmp/runs/a', 16)
  """
  w, remote = cfg.wandb, _files.is_remote(out)
  return {"project": w.project, "entity": w.entity, "mode": w.mode,  # None: WANDB_MODE or online
          "name": w.run_name or epath.Path(out if remote else os.path.abspath(out)).name,
          "config": cfg.to_dict(),
          # W&B writes its files locally (synced from there): not into a gs:// run directory.
          "dir": None if remote else out}


def restore(run: Run, state: TrainState) -> TrainState:
  """The state of the latest checkpoint (onto `state`'s shardings); rewinds data and metrics."""
  try:
    saved = run.ckpt.restore(trainable=state.trainable, opt_state=state.opt_state)
  except ValueError as e:
    raise ConfigError(f"the checkpoint in {run_path(run.out, 'checkpoints')} does not match "
                      f"this run's adapter/optimizer settings ({str(e).splitlines()[0]})") \
        from None
  run.batcher.state = saved["data_state"]
  run.metrics.truncate(saved["step"])
  return TrainState(saved["step"], saved["trainable"], saved["opt_state"], saved["rng"])


def train_step(run: Run, state: TrainState) -> tuple[TrainState, dict[str, float]]:
  """One optimizer step on the next batch: the new state and its loss, tokens and grad norm.

  Raises:
    TrainingDiverged: the loss is NaN or infinite; `state` is not advanced and no
      checkpoint of it is written (pending saves finish first).
  """
  cfg = run.cfg
  rng, sub = jax.random.split(state.rng)
  rollout: dict[str, float] = {}
  if run.sampler is not None:  # GRPO: sample and score this step's completions first
    sub, key = jax.random.split(sub)
    position = dict(run.batcher.state)
    prompts = run.batcher.take(cfg.train.batch_size * cfg.train.grad_accum)
    try:
      host, rollout = run.sampler.rollout(jaxlora.combine(state.trainable, run.frozen), prompts,
                                          [e.row for e in prompts], cfg.train.grad_accum, key)
    except rl.RewardError as e:
      run.batcher.state = position  # nothing of this step happened
      kept = run.ckpt.latest_step()
      raise rl.RewardError(f"step {state.step + 1}: {e} (last checkpoint: "
                           f"{'step ' + str(kept) if kept is not None else 'none yet'})") from e
    batch = run.place(host)
  else:
    batch = run.place(run.batcher.next(cfg.train.grad_accum, rows=run.rows), local=True)
  trainable, opt_state, m = run.step_fn(state.trainable, state.opt_state, run.frozen, batch, sub)
  loss = float(m["loss"])
  if not math.isfinite(loss):
    run.ckpt.wait()
    kept = run.ckpt.latest_step()
    raise TrainingDiverged(
        f"loss became {loss} at step {state.step + 1}; stopped. The last good checkpoint "
        f"({'step ' + str(kept) if kept is not None else 'none yet'}) is kept in "
        f"{run_path(run.out, 'checkpoints')}. Lower train.lr or raise train.warmup_steps.")
  return (TrainState(state.step + 1, trainable, opt_state, rng),
          {"loss": loss, **{k: float(v) for k, v in m.items() if k != "loss"}, **rollout})


def save_checkpoint(run: Run, state: TrainState, *, force: bool = False) -> bool:
  """Starts saving `state` if its step is on train.save_every (or `force`); returns whether."""
  return run.ckpt.save(state.step, trainable=state.trainable, opt_state=state.opt_state,
                       rng=state.rng, data_state=run.batcher.state, force=force)


def export(run: Run, trainable) -> str:
  """Writes the final adapter(s), Orbax and PEFT; returns the Orbax directory.

  Collective: every process writes its shards (or joins the gather), process 0
  writes the files.
  """
  cfg, out = run.cfg, run.out
  tuned = jaxlora.combine(trainable, run.frozen)
  meta = {"config": cfg.to_dict(), "step": cfg.train.steps}
  base_path = base_name(cfg.model.path)
  if run.bank is None:
    adapter_dir = run_path(out, "adapter")
    jaxlora.save(adapter_dir, tuned, metadata=meta)
    jaxlora.peft.save(run_path(out, "adapter_peft"), tuned, model=run.model,
                      base_model_name_or_path=base_path)
    return adapter_dir
  # One ordinary adapter per name, loadable alone.
  for name, single in jaxlora.unstack(dataclasses.replace(run.bank, tree=tuned)).items():
    jaxlora.save(run_path(out, "adapters", name), single, metadata={**meta, "adapter": name})
    jaxlora.peft.save(run_path(out, "adapters_peft", name), single, model=run.model,
                      base_model_name_or_path=base_path)
  return run_path(out, "adapters")


_LOGGED = ("loss", "grad_norm", "tokens")  # written under their own names, or as tokens_per_s


def _describe(run: Run) -> str:
  """The line logged before training: what is trained on what, and where it is written."""
  return (f"training {run.n_trainable:,} of {run.n_total:,} parameters "
          f"({100 * run.summary.trainable_fraction:.3f}% per adapter"
          f"{'' if run.bank is None else f', {len(run.names)} adapters: ' + ', '.join(run.names)}"
          f") on {len(run.train_examples)} examples; run dir {run.out}")


def _preempted(run: Run, state: TrainState, stops: preemption.StopSignals) -> \
    preemption.TrainingPreempted:
  name = stops.signal_name or "a signal to another process"
  return preemption.TrainingPreempted(
      f"stopped on {name} after step {state.step} of {run.cfg.train.steps}; checkpoint of step "
      f"{state.step} written to {run_path(run.out, 'checkpoints')}. Rerun the same command to "
      f"resume (exit status {preemption.EXIT_CODE}).",
      step=state.step, signal_name=stops.signal_name or "")


def _train(cfg: Config, mesh, resume: bool, log, progress: bool,
           stops: preemption.StopSignals | None = None) -> dict:
  run, state = setup(cfg, mesh, resume, log)
  with run.metrics:  # closes the reporters (finishes a W&B run) on errors and stops too
    return _run(cfg, run, state, log, progress, stops)


def _run(cfg: Config, run: Run, state: TrainState, log, progress: bool,
         stops: preemption.StopSignals | None) -> dict:
  evaluator = run.evaluator
  eval_before, adapter_eval_before = None, None
  if evaluator and state.step == 0:
    eval_before = evaluator(state.trainable, run.frozen)
    adapter_eval_before = dict(evaluator.per_adapter) or None
    run.metrics.write(evaluator.record(0, eval_before))
  log(_describe(run))

  bar = reporting.Progress(cfg.train.steps, state.step, enabled=progress,
                           every=cfg.train.log_every)
  t0, speed = time.time(), Throughput()
  last_loss, last_good = None, run.ckpt.latest_step()
  try:
    while state.step < cfg.train.steps:
      state, m = train_step(run, state)
      done, last_loss = state.step, m["loss"]
      now = time.time()
      rate = speed.update(m["tokens"], now)
      bar.update(done, last_loss, rate)
      if done % cfg.train.log_every == 0 or done == cfg.train.steps:
        run.metrics.write({"step": done, "loss": last_loss, "grad_norm": m["grad_norm"],
                           "lr": float(run.lr_schedule(done - 1)), "tokens_per_s": rate,
                           "elapsed_s": now - t0,
                           **{k: v for k, v in m.items() if k not in _LOGGED}})
      if evaluator and cfg.train.eval_every and done % cfg.train.eval_every == 0 \
          and done != cfg.train.steps:
        run.metrics.write(evaluator.record(done, evaluator(state.trainable, run.frozen)))
      stop = stops is not None and stops.requested()  # collective: every process, every step
      if save_checkpoint(run, state, force=done == cfg.train.steps or stop):
        last_good = done
      if stop:
        run.ckpt.wait()
        error = _preempted(run, state, stops)
        log(str(error))
        raise error
  finally:
    bar.close()
    run.ckpt.close()

  eval_after = evaluator(state.trainable, run.frozen) if evaluator else None
  if eval_after is not None:
    run.metrics.write(evaluator.record(cfg.train.steps, eval_after))
  adapter_dir = export(run, state.trainable)
  if jax.process_index() != 0:
    return {}
  name = evaluator.name  # eval_loss, or GRPO's eval_reward
  result = {
      "steps": cfg.train.steps, "objective": cfg.train.objective, "final_loss": last_loss,
      f"{name}_before": eval_before, f"{name}_after": eval_after,
      **({"eval_metrics_after": dict(evaluator.extras)} if evaluator.extras else {}),
      "trainable_params": run.n_trainable,
      "total_params": run.n_total, "train_examples": len(run.train_examples),
      "adapter_bytes": reporting.du(adapter_dir),
      "base_bytes": sum(x.nbytes for x in jax.tree.leaves(run.params)),
      "wall_s": time.time() - t0, "last_checkpoint": last_good,
  }
  if run.bank is not None:
    result.update({"adapters": list(run.names), "adapter_eval_loss_before": adapter_eval_before,
                   "adapter_eval_loss_after": dict(evaluator.per_adapter)
                   if eval_after is not None else None})
  epath.Path(run.out, "result.json").write_text(json.dumps(result, indent=2))
  reporting.plot(run.out)
  reporting.write_report(run.out, cfg, result)
  return result


def _sel(value: Any) -> Any:
  return tuple(value) if isinstance(value, list) else value


def wrap(cfg: Config, params, model, key):
  """`jaxlora.wrap` with the run's lora settings."""
  lc = cfg.lora
  try:
    return jaxlora.wrap(params, rank=lc.rank, alpha=lc.alpha, targets=_sel(lc.targets),
                        exclude=_sel(lc.exclude), rank_pattern=lc.rank_pattern or None,
                        alpha_pattern=lc.alpha_pattern or None, use_rslora=lc.use_rslora,
                        init=lc.init, layout=model, key=key, use_dora=lc.use_dora,
                        train_extra=_sel(lc.train_extra), bias=lc.bias,
                        trainable_tokens=lc.trainable_tokens)
  except jaxlora.errors.JaxloraError as e:
    raise ConfigError(f"lora: {e}") from None


def adapter_key(seed: int, name: str) -> jax.Array:
  """The init key of adapter `name` (data.adapter_field): from train.seed and the name.

  >>> data = lambda name: jax.random.key_data(adapter_key(0, name))
  >>> bool((data("a") != data("b")).any())
  True
  """
  return jax.random.fold_in(jax.random.key(seed), zlib.crc32(name.encode()) & 0x7FFFFFFF)


def adapter_names(cfg: Config, examples) -> list[str] | None:
  """The sorted adapter names of the training rows (data.adapter_field), or None without it."""
  field = cfg.data.adapter_field
  if field is None:
    return None
  names = sorted({e.adapter for e in examples})
  for n in names:
    if not n or n.startswith(".") or "/" in n or "\\" in n:
      raise ConfigError(f"data.adapter_field '{field}' value {n!r} cannot name an adapter "
                        "directory (adapters/<name>/); use names without '/' that do not "
                        "start with '.'")
  return names


def _bank_shardings(bank_tree, single_shardings, replicated):
  """Shardings of a bank's tree: adapter leaves replicated, the rest as in one adapter's tree."""
  is_sh = lambda x: isinstance(x, jax.sharding.Sharding)
  by_path = {jax.tree_util.keystr(p): s for p, s in
             jax.tree_util.tree_flatten_with_path(single_shardings, is_leaf=is_sh)[0]}

  def pick(path, _):
    if _tree.is_adapter_key(getattr(path[-1], "key", None)):
      return replicated
    return by_path[jax.tree_util.keystr(path)]

  return jax.tree_util.tree_map_with_path(pick, bank_tree)


@dataclasses.dataclass(frozen=True)
class RunArtifacts:
  """What `load_run` reads back from a finished run directory.

  Attributes:
    cfg: the run's config (its config.yaml).
    model: the model (`jaxlora.models.from_pretrained` of ``cfg.model.path``).
    tokenizer: the base checkpoint's tokenizer.
    params: the base parameters.
    tree: `params` wrapped with the run's final adapter (adapter/).
  """
  cfg: Config
  model: Any
  tokenizer: Any
  params: Any
  tree: Any

  def __iter__(self):
    """The old 5-tuple ``(cfg, model, tokenizer, params, tree)``; deprecated."""
    warnings.warn("unpacking load_run()'s result is deprecated; use its fields (.cfg, .model, "
                  ".tokenizer, .params, .tree)", DeprecationWarning, stacklevel=2)
    return iter((self.cfg, self.model, self.tokenizer, self.params, self.tree))


def load_run(run_dir: str) -> RunArtifacts:
  """Config, model, tokenizer, base params and wrapped tree of a finished run."""
  cfg_path = run_path(run_dir, "config.yaml")
  if not epath.Path(cfg_path).is_file():
    raise ConfigError(f"{run_dir} is not a jaxlora run directory (no config.yaml)")
  cfg = config_lib.load(cfg_path)
  model, params = load_model(cfg)
  tok = load_tokenizer(cfg.model.path, cfg.model.revision)
  adapter = run_path(run_dir, "adapter")
  if not epath.Path(adapter).is_dir() and epath.Path(run_path(run_dir, "adapters")).is_dir():
    names = sorted(p.name for p in epath.Path(run_path(run_dir, "adapters")).iterdir())
    raise ConfigError(f"{run_dir} trained several adapters ({', '.join(names)}); pass them "
                      f"with --base {cfg.model.path} --adapter NAME={run_path(run_dir, 'adapters')}"
                      "/NAME (repeatable)")
  if not epath.Path(adapter).is_dir():
    raise ConfigError(f"{run_dir} has no final adapter yet; finish the run first "
                      "(rerunning the train command resumes it)")
  try:
    tree = jaxlora.load(adapter, params)
  except (FileNotFoundError, ValueError) as e:
    raise ConfigError(str(e)) from None
  return RunArtifacts(cfg, model, tok, params, tree)


def copy_tokenizer(src: str, dst: str) -> None:
  for name in os.listdir(src):
    if name.startswith(("tokenizer", "special_tokens", "vocab", "merges", "generation_config")):
      shutil.copy(os.path.join(src, name), os.path.join(dst, name))
