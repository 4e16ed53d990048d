"""The training objectives beyond next-token loss: the DPO family, SimPO, ORPO and GRPO's update.

Each builds ``grads(trainable, frozen, batch, key) -> (grads, metrics)`` for one optimizer step
on an ``(accum, rows, seq)`` batch, like `trainer.make_grads` does for SFT, from the losses of
`jaxlora.preference`. The reference model is the base with the adapters off
(`jaxlora.preference.reference_tree`): no copy of the weights, computed in the same jitted step
as the policy pass.

Every micro-batch's loss is divided by the whole step's count (pairs, or tokens), which is known
from the batch before the first micro-batch runs, so that the accumulated gradient is the
gradient of the step's mean whatever the split into micro-batches.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

import jaxlora
from jaxlora import preference

# preference.beta's default per objective (TRL's DPO/CPO/ORPO defaults; SimPO's paper value).
DEFAULT_BETA = {"dpo": 0.1, "ipo": 0.1, "hinge": 0.1, "robust": 0.1, "simpo": 2.0, "orpo": 0.1}
_DPO_LOSS = {"dpo": "sigmoid", "ipo": "ipo", "hinge": "hinge", "robust": "robust"}


@dataclasses.dataclass(frozen=True)
class PairObjective:
  """A preference-pair loss and its settings (``train.objective``, ``preference.*``)."""
  name: str
  beta: float
  label_smoothing: float = 0.0
  simpo_gamma: float = 0.5

  @classmethod
  def from_config(cls, cfg) -> PairObjective:
    """The objective of a `jaxlora_cli.config.Config`.

    >>> from jaxlora_cli import config
    >>> PairObjective.from_config(config.load(None, ["train.objective=simpo",
    ...                                              "data.format=preference"]))
    PairObjective(name='simpo', beta=2.0, label_smoothing=0.0, simpo_gamma=0.5)
    """
    name, p = cfg.train.objective, cfg.preference
    return cls(name, DEFAULT_BETA[name] if p.beta is None else p.beta, p.label_smoothing,
               p.simpo_gamma)

  @property
  def needs_reference(self) -> bool:
    return self.name in _DPO_LOSS


@dataclasses.dataclass(frozen=True)
class GrpoObjective:
  """GRPO's clipped objective (``grpo.*``)."""
  beta: float = 0.04
  epsilon: float = 0.2
  epsilon_high: float | None = None
  loss_type: str = "dapo"
  max_completion_length: int = 32

  @classmethod
  def from_config(cls, cfg) -> GrpoObjective:
    g = cfg.grpo
    return cls(g.beta, g.epsilon, g.epsilon_high, g.loss_type, g.max_completion_length)


def completion_weights(mask, targets) -> jax.Array:
  """``(..., seq - 1)``: 1 where position ``t + 1`` is a scored completion token."""
  return targets[..., 1:] * mask[..., 1:].astype(jnp.float32)


def token_logprobs(fwd, model, params, ids, mask, weights, key, chunk_size: int) -> jax.Array:
  """``log p(ids[:, t + 1] | ids[:, :t + 1])`` where `weights` is 1, else 0: ``(rows, seq - 1)``.

  With `chunk_size` > 0 the head runs chunk by chunk (`jaxlora.models.chunked_cross_entropy`),
  so the float32 ``(rows, seq, vocab)`` logits never exist.
  """
  kwargs = {"attention_mask": mask, "rngs": None if key is None else {"dropout": key}}
  out = fwd({"params": params}, ids, return_hidden=chunk_size > 0, **kwargs)
  if chunk_size > 0:
    return -jaxlora.models.chunked_cross_entropy(model, params, out[:, :-1], ids[:, 1:], weights,
                                                 chunk_size=chunk_size, reduction="none")
  full = jnp.pad(weights, ((0, 0), (1, 0)))  # per_token_logprobs reads completion_mask[:, 1:]
  return preference.per_token_logprobs(out, ids, full)


def _pair_rows(mb) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Chosen rows, then rejected rows: one forward pass scores both sides."""
  cat = lambda k: jnp.concatenate([mb[k], mb[f"rejected_{k}"]])
  return cat("input_ids"), cat("attention_mask"), cat("targets")


def pair_counts(batch) -> tuple[jax.Array, jax.Array, jax.Array]:
  """A step's (accum, pairs, seq) batch: the number of pairs, of chosen completion tokens, and
  of completion tokens on both sides.

  A pair counts when both sides have a scored token (padding rows of eval batches have none).
  """
  chosen = completion_weights(batch["attention_mask"], batch["targets"]).sum(-1)
  rejected = completion_weights(batch["rejected_attention_mask"],
                                batch["rejected_targets"]).sum(-1)
  valid = (chosen > 0) & (rejected > 0)
  return (jnp.sum(valid.astype(jnp.float32)), jnp.sum(jnp.where(valid, chosen, 0.0)),
          jnp.sum(chosen) + jnp.sum(rejected))


def pair_loss(objective: PairObjective, fwd, model, params, mb, key, n_pairs, n_chosen_tokens, *,
              chunk_size: int = 0) -> tuple[jax.Array, dict[str, jax.Array]]:
  """One micro-batch's share of the step's mean pair loss, and metric sums over its pairs.

  `n_pairs` and `n_chosen_tokens` are the whole step's counts (`pair_counts`); the metrics are
  already divided by `n_pairs`, so micro-batches add up to the step's means.
  """
  ids, mask, targets = _pair_rows(mb)
  w = completion_weights(mask, targets)
  b = mb["input_ids"].shape[0]
  tokens = w.sum(-1)
  valid = (tokens[:b] > 0) & (tokens[b:] > 0)
  logp = token_logprobs(fwd, model, params, ids, mask, w, key, chunk_size)
  total = logp.sum(-1)
  average = total / jnp.maximum(tokens, 1.0)
  name, beta = objective.name, objective.beta
  fill = lambda x: jnp.where(jnp.concatenate([valid, valid]), x, -1.0)  # empty rows: inert
  extra: dict[str, jax.Array] = {}
  if objective.needs_reference:
    ref_params = preference.reference_tree(params)
    ref = token_logprobs(fwd, model, ref_params, ids, mask, w, None, chunk_size).sum(-1)
    lengths = {}
    if name == "ipo":  # TRL 1.16 divides IPO's log-ratios by the completion lengths
      lengths = {"chosen_lengths": tokens[:b], "rejected_lengths": tokens[b:]}
    losses, chosen_r, rejected_r = preference.dpo_loss(
        total[:b], total[b:], ref[:b], ref[b:], loss_type=_DPO_LOSS[name], beta=beta,
        label_smoothing=objective.label_smoothing, **lengths)
  elif name == "simpo":
    avg = fill(average)
    losses, chosen_r, rejected_r = preference.simpo_loss(
        avg[:b], avg[b:], beta=beta, gamma=objective.simpo_gamma,
        label_smoothing=objective.label_smoothing)
  else:  # orpo: the chosen side's NLL (token mean over the step) plus the odds-ratio term
    avg = fill(average)
    losses, m = preference.orpo_loss(avg[:b], avg[b:], beta=beta)
    chosen_r, rejected_r = m["chosen_rewards"], m["rejected_rewards"]
    nll = -jnp.sum(jnp.where(valid, total[:b], 0.0)) / jnp.maximum(n_chosen_tokens, 1.0)
    log_odds = jax.lax.stop_gradient(avg[:b] - avg[b:] - (jnp.log1p(-jnp.exp(avg[:b]))
                                                          - jnp.log1p(-jnp.exp(avg[b:]))))
    extra = {"nll_loss": jax.lax.stop_gradient(nll) * n_pairs,
             "log_odds_ratio": jnp.sum(jnp.where(valid, jax.nn.log_sigmoid(log_odds), 0.0)),
             "log_odds_chosen": jnp.sum(jnp.where(valid, log_odds, 0.0))}
  v = valid.astype(jnp.float32)
  n = jnp.maximum(n_pairs, 1.0)
  loss = jnp.sum(losses * v) / n
  if name == "orpo":
    loss = loss + nll
  logps = jax.lax.stop_gradient(average if name in ("simpo", "orpo") else total)
  sums = {"rewards/chosen": chosen_r, "rewards/rejected": rejected_r,
          "rewards/accuracies": (chosen_r > rejected_r).astype(jnp.float32),
          "rewards/margins": chosen_r - rejected_r,
          "logps/chosen": logps[:b], "logps/rejected": logps[b:]}
  metrics = {k: jnp.sum(x * v) / n for k, x in sums.items()}
  metrics.update({k: x / n for k, x in extra.items()})
  return loss, metrics


def make_pair_grads(model, objective: PairObjective, dropout: float = 0.0, *,
                    loss_chunk_size: int = 512):
  """``grads(trainable, frozen, batch, key) -> (grads, metrics)`` of a step of preference pairs.

  `batch` holds (accum, pairs, seq) arrays: ``input_ids``, ``attention_mask``, ``targets`` for
  the chosen sides and the same with a ``rejected_`` prefix. ``metrics``: ``loss`` (the mean pair
  loss; for ORPO plus the chosen NLL), ``tokens`` (completion tokens scored), ``pairs`` and the
  means of TRL's ``rewards/*`` and ``logps/*``.
  """
  fwd = jaxlora.apply(model.apply, dropout=dropout, check_reached=loss_chunk_size == 0)

  def grads_fn(trainable, frozen, batch, key):
    keys = jax.random.split(key, batch["input_ids"].shape[0])
    n_pairs, n_chosen, tokens = pair_counts(batch)

    def micro(carry, xs):
      g_acc, m_acc = carry
      mb, k = xs

      def loss(t):
        return pair_loss(objective, fwd, model, jaxlora.combine(t, frozen), mb, k, n_pairs,
                         n_chosen, chunk_size=loss_chunk_size)

      (l, m), g = jax.value_and_grad(loss, has_aux=True)(trainable)
      m = {"loss": l, **m}
      return (jax.tree.map(jnp.add, g_acc, g), jax.tree.map(jnp.add, m_acc, m)), None

    zeros = jax.tree.map(jnp.zeros_like, trainable)
    (g, m), _ = jax.lax.scan(micro, (zeros, _metric_zeros(objective)), (batch, keys))
    return g, {**m, "tokens": tokens, "pairs": n_pairs}

  return grads_fn


def _metric_zeros(objective: PairObjective) -> dict[str, jax.Array]:
  names = ["loss", "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
           "logps/chosen", "logps/rejected"]
  if objective.name == "orpo":
    names += ["nll_loss", "log_odds_ratio", "log_odds_chosen"]
  return {n: jnp.zeros((), jnp.float32) for n in names}


def make_pair_eval(model, objective: PairObjective, place=None, *, loss_chunk_size: int = 512):
  """``run(trainable, frozen, batches) -> metrics``: the mean pair loss (``'loss'``) and TRL's
  ``rewards/*`` and ``logps/*`` means over fixed (1, pairs, seq) eval batches; `place` puts a
  host batch on the mesh."""
  fwd = jaxlora.apply(model.apply, check_reached=loss_chunk_size == 0)

  @jax.jit
  def ev(trainable, frozen, batch):
    mb = jax.tree.map(lambda x: x[0], batch)
    n_pairs, n_chosen, _ = pair_counts(batch)
    # Counted as one pair, the metrics come back as sums over the batch's pairs (ORPO's NLL:
    # the batch's token mean, weighted by its pairs).
    loss, m = pair_loss(objective, fwd, model, jaxlora.combine(trainable, frozen), mb, None,
                        jnp.ones(()), n_chosen / jnp.maximum(n_pairs, 1.0),
                        chunk_size=loss_chunk_size)
    return {"loss": loss, **m}, n_pairs

  def run(trainable, frozen, batches):
    sums: dict[str, float] = {}
    pairs = 0.0
    for b in batches:
      m, n = ev(trainable, frozen, place(b) if place else b)
      pairs += float(n)
      for k, v in m.items():
        sums[k] = sums.get(k, 0.0) + float(v)
    return {k: v / max(pairs, 1.0) for k, v in sums.items()}

  return run


def make_grpo_grads(model, objective: GrpoObjective, dropout: float = 0.0, *,
                    loss_chunk_size: int = 512):
  """``grads(trainable, frozen, batch, key) -> (grads, metrics)`` of a step of sampled
  completions.

  `batch` holds (accum, rows, seq) ``input_ids`` (left-padded prompt, then the completion),
  ``attention_mask``, ``targets`` (1 on completion tokens) and ``advantages`` (accum, rows, 1).
  The rollouts were sampled by the adapter being trained and are used for one update, so the
  old policy's log-probs are the current ones under ``stop_gradient`` (TRL with
  ``num_iterations=1``). The loss is `jaxlora.preference.grpo_loss`'s: ``'dapo'`` divides by the
  step's completion tokens, the others are averaged over micro-batches (TRL divides those by
  the accumulation steps).
  """
  fwd = jaxlora.apply(model.apply, dropout=dropout, check_reached=loss_chunk_size == 0)
  o = objective

  def grads_fn(trainable, frozen, batch, key):
    accum = batch["input_ids"].shape[0]
    keys = jax.random.split(key, accum)
    weights = completion_weights(batch["attention_mask"], batch["targets"])
    n_tokens = weights.sum()

    def micro(carry, xs):
      g_acc, m_acc = carry
      mb, w, k = xs

      def loss(t):
        params = jaxlora.combine(t, frozen)
        logp = token_logprobs(fwd, model, params, mb["input_ids"], mb["attention_mask"], w, k,
                              loss_chunk_size)
        ref = None
        if o.beta > 0:
          ref = token_logprobs(fwd, model, preference.reference_tree(params), mb["input_ids"],
                               mb["attention_mask"], w, None, loss_chunk_size)
        extra = ({"num_items_in_batch": n_tokens} if o.loss_type == "dapo" else
                 {"max_completion_length": o.max_completion_length}
                 if o.loss_type == "dr_grpo" else {})
        l, m = preference.grpo_loss(logp, jax.lax.stop_gradient(logp), ref,
                                    mb["advantages"][:, 0], w, epsilon=o.epsilon,
                                    epsilon_high=o.epsilon_high, beta=o.beta,
                                    loss_type=o.loss_type, **extra)
        if o.loss_type != "dapo":
          l = l / accum
        share = w.sum() / jnp.maximum(n_tokens, 1.0)  # the metrics: token means over the step
        return l, {k_: v * share for k_, v in m.items()}

      (l, m), g = jax.value_and_grad(loss, has_aux=True)(trainable)
      m = {"loss": l, **m}
      return (jax.tree.map(jnp.add, g_acc, g), jax.tree.map(jnp.add, m_acc, m)), None

    names = ["loss", "clip_ratio/low_mean", "clip_ratio/high_mean", "clip_ratio/region_mean"]
    if o.beta > 0:
      names.append("kl")
    m0 = {n: jnp.zeros((), jnp.float32) for n in names}
    zeros = jax.tree.map(jnp.zeros_like, trainable)
    (g, m), _ = jax.lax.scan(micro, (zeros, m0), (batch, weights, keys))
    return g, {**m, "tokens": n_tokens}

  return grads_fn
