"""Preference and RL tuning pieces: the reference model, log-probs, DPO/SimPO/ORPO and GRPO losses.

The losses are pure functions of log-probabilities and equal those of TRL (version 1.16.0:
``DPOTrainer._compute_loss``, ``CPOTrainer.cpo_loss``, ``ORPOTrainer.odds_ratio_loss``,
``GRPOTrainer._compute_loss`` and its group advantages) for the same inputs
(tests/test_preference.py compares them). The reference model of a LoRA run is the base the
adapters sit on: `reference_tree` removes the adapters from the tree without copying the base,
so the policy and reference passes run in one jitted step::

  fwd = jaxlora.apply(model.apply)

  def loss_fn(trainable, frozen, batch):  # batch: chosen rows, then rejected rows
    tree = jaxlora.combine(trainable, frozen)
    ids, mask = batch["input_ids"], batch["completion_mask"]
    policy = jaxlora.preference.logprobs(fwd, tree, ids, mask, batch["attention_mask"])
    ref = jaxlora.preference.logprobs(fwd, jaxlora.preference.reference_tree(tree), ids, mask,
                                      batch["attention_mask"])
    (pc, pr), (rc, rr) = jnp.split(policy, 2), jnp.split(ref, 2)
    losses, chosen, rejected = jaxlora.preference.dpo_loss(pc, pr, rc, rr, beta=0.1)
    return losses.mean()

Token alignment: for a row of ``input_ids`` (prompt then completion) the log-prob of token ``t``
comes from the logits at ``t - 1``; ``completion_mask[:, 1:]`` marks the scored targets, as TRL's
``completion_mask`` does (``labels = input_ids`` where the mask is 1).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxlora import _tree
from jaxlora.errors import InputError, InputTypeError

PyTree = Any
Array = jax.Array

DPO_LOSS_TYPES = ("sigmoid", "ipo", "hinge", "robust")
GRPO_LOSS_TYPES = ("dapo", "grpo", "bnpo", "dr_grpo")
SCALE_REWARDS = ("group", "batch", "none")


# --------------------------------------------------------------------------- the reference model


def _stop(x: Any) -> Any:
  # Under a trace, cut the gradient; a concrete array is returned as it is (no copy: the same
  # buffer), and outside a trace nothing differentiates it anyway.
  return jax.lax.stop_gradient(x) if isinstance(x, jax.core.Tracer) else x


def _reference_params(params: Mapping) -> dict:
  out: dict = {}
  init_keys = (_tree.INIT_A_KEY, _tree.INIT_B_KEY, _tree.INIT_SCALE_KEY)
  for k, v in params.items():
    if isinstance(v, Mapping):
      out[k] = _reference_params(v)
    elif not _tree.is_adapter_key(k):
      out[k] = v
  if all(k in params for k in init_keys):
    # PiSSA/OLoRA: the kernel is the residual W - s*A0@B0; the initial factors, as the module's
    # adapter, give the original base back (as the wrapped model computed it at init).
    out[_tree.A_KEY] = params[_tree.INIT_A_KEY]
    out[_tree.B_KEY] = params[_tree.INIT_B_KEY]
    out[_tree.SCALE_KEY] = params[_tree.INIT_SCALE_KEY]
  return out


def reference_tree(tree: PyTree) -> PyTree:
  """The tree with its adapters off: the base model the adapters sit on, as a frozen reference.

  Every adapter leaf (``lora_a``, ``lora_b``, ``lora_scale``, DoRA magnitudes, trained token rows
  and ids, the markers) is left out; the base leaves, quantized kernels included, are the same
  arrays (no copy). Under a trace (``jax.jit``, ``jax.grad``) each remaining leaf is wrapped in
  ``jax.lax.stop_gradient``, so ``fwd({'params': reference_tree(tree)}, ...)`` with
  ``fwd = jaxlora.apply(model.apply)`` computes the base model inside the same jitted step as the
  policy pass, and no gradient flows through it. `jaxlora.apply` has no adapter to check on such a
  tree (its ``check_reached`` check passes).

  What the reference holds, module by module:

  - LoRA and DoRA layers: the base kernel alone (the adapter's current values play no part).
  - PiSSA/OLoRA layers (``init='pissa'``/``'olora'``, which replaced the kernel by a residual):
    the residual plus the *initial* factors (``lora_init_a``, ``lora_init_b``,
    ``lora_init_scale``), i.e. the original base, as the wrapped model computed it at init.
  - Trainable tokens: the embedding table's own rows (the original ones; the trained rows are
    separate leaves, left out).
  - Leaves trained in full (``train_extra``, ``bias='all'|'lora_only'``): these train in place,
    and the tree keeps no copy of their original values, so the reference uses their *current
    (trained) values*. For a reference with the original values, keep a copy of those leaves
    before training and put them back into the reference (the same keys of the nested dict),
    or precompute the reference log-probs before training. (The command line refuses
    ``lora.train_extra`` and ``lora.bias`` with a reference model for this reason.)

  Args:
    tree: a wrapped param tree (a params dict or ``{'params': ...}`` variables, as `jaxlora.wrap`
      returned it, or `jaxlora.combine` of its halves); also a `Bank`'s ``.tree``.

  Returns:
    The same structure (variables in, variables out; other collections kept) less the adapters.

  Raises:
    InputTypeError: if `tree` is not a nested dict.

  >>> import jax, jax.numpy as jnp, flax.linen as nn, jaxlora
  >>> model = nn.Dense(3)
  >>> x = jnp.ones((2, 4))
  >>> params = model.init(jax.random.key(0), x)['params']
  >>> tree = jaxlora.wrap(params, rank=2, targets='.*', key=jax.random.key(1))
  >>> ref = jaxlora.preference.reference_tree(tree)
  >>> sorted(ref), ref['kernel'] is tree['kernel']
  (['bias', 'kernel'], True)
  >>> y = jaxlora.apply(model.apply)({'params': ref}, x)
  >>> bool(jnp.array_equal(y, model.apply({'params': params}, x)))
  True
  """
  params = _tree.get_params(tree)
  ref = jax.tree.map(_stop, _reference_params(params))
  return _tree.with_params(tree, ref)


# ------------------------------------------------------------------------------------ log-probs


def _check_tokens(logits: Any, input_ids: Any, completion_mask: Any) -> tuple[Array, Array, Array]:
  logits, input_ids, completion_mask = (jnp.asarray(logits), jnp.asarray(input_ids),
                                        jnp.asarray(completion_mask))
  if logits.ndim != 3:
    raise InputError(f"`logits` must be (batch, seq, vocab), got shape {tuple(logits.shape)}.")
  if input_ids.ndim != 2 or tuple(input_ids.shape) != tuple(logits.shape[:2]):
    raise InputError(f"`input_ids` must be (batch, seq) = {tuple(logits.shape[:2])} to match "
                     f"`logits` {tuple(logits.shape)}, got shape {tuple(input_ids.shape)}.")
  if not jnp.issubdtype(input_ids.dtype, jnp.integer):
    raise InputError(f"`input_ids` must be integer token ids, got dtype {input_ids.dtype}.")
  if tuple(completion_mask.shape) != tuple(input_ids.shape):
    raise InputError(f"`completion_mask` must have the shape of `input_ids` "
                     f"{tuple(input_ids.shape)}, got {tuple(completion_mask.shape)}.")
  if input_ids.shape[1] < 2:
    raise InputError(f"Sequences need at least 2 tokens to score one (a prefix and a target), "
                     f"got `input_ids` of shape {tuple(input_ids.shape)}.")
  return logits, input_ids, completion_mask


def per_token_logprobs(logits: Any, input_ids: Any, completion_mask: Any) -> Array:
  """``log p(input_ids[:, t] | input_ids[:, :t])`` for each target token, 0 off the completion.

  ``logits[:, :-1]`` predict ``input_ids[:, 1:]``; ``completion_mask[:, 1:]`` marks the targets
  that count. Computed in float32 (float64 for float64 logits) as the target's logit less the
  ``logsumexp`` over the vocabulary, so no softmax is materialised.

  Args:
    logits: ``(batch, seq, vocab)``, any float dtype.
    input_ids: int ``(batch, seq)``.
    completion_mask: ``(batch, seq)``, 1 (or True) for completion tokens, 0 for prompt and padding.

  Returns:
    ``(batch, seq - 1)``: entry ``t`` scores ``input_ids[:, t + 1]`` (0 where
    ``completion_mask[:, t + 1]`` is 0).

  Raises:
    InputError: on shapes that do not fit together, or non-integer ids.

  >>> import jax.numpy as jnp, jaxlora
  >>> logits = jnp.log(jnp.array([[[0.5, 0.5], [0.25, 0.75], [1.0, 1.0]]]))
  >>> lp = jaxlora.preference.per_token_logprobs(logits, jnp.array([[0, 1, 1]]),
  ...                                            jnp.array([[0, 1, 1]]))
  >>> lp.shape, [round(float(v), 4) for v in lp[0]]
  ((1, 2), [-0.6931, -0.2877])
  """
  logits, input_ids, completion_mask = _check_tokens(logits, input_ids, completion_mask)
  dt = _tree.wide_float(logits.dtype)
  pred = logits[:, :-1].astype(dt)
  target = input_ids[:, 1:]
  picked = jnp.take_along_axis(pred, target[..., None], axis=-1)[..., 0]
  lp = picked - jax.nn.logsumexp(pred, axis=-1)
  return jnp.where(completion_mask[:, 1:].astype(bool), lp, jnp.zeros((), dt))


def sequence_logprobs(logits: Any, input_ids: Any, completion_mask: Any, *,
                      average: bool = False) -> Array:
  """Log-probability of each row's completion: the sum (or mean) of `per_token_logprobs`.

  Args:
    logits: ``(batch, seq, vocab)``.
    input_ids: int ``(batch, seq)``.
    completion_mask: ``(batch, seq)``, 1 for completion tokens; ``completion_mask[:, 1:]`` marks
      the scored targets.
    average: divide by the number of scored tokens (at least 1): the length-normalised log-probs
      that SimPO, ORPO (and TRL's IPO, see `dpo_loss`) take.

  Returns:
    float32 (float64 for float64 logits) ``(batch,)``.

  Raises:
    InputError: on shapes that do not fit together.

  >>> import jax.numpy as jnp, jaxlora
  >>> logits = jnp.log(jnp.array([[[0.5, 0.5], [0.25, 0.75], [1.0, 1.0]]]))
  >>> ids, mask = jnp.array([[0, 1, 1]]), jnp.array([[0, 1, 1]])
  >>> round(float(jaxlora.preference.sequence_logprobs(logits, ids, mask)[0]), 4)  # log(.5*.75)
  -0.9808
  >>> round(float(jaxlora.preference.sequence_logprobs(logits, ids, mask, average=True)[0]), 4)
  -0.4904
  """
  lp = per_token_logprobs(logits, input_ids, completion_mask)
  total = lp.sum(axis=-1)
  if not average:
    return total
  n = jnp.asarray(completion_mask)[:, 1:].astype(lp.dtype).sum(axis=-1)
  return total / jnp.maximum(n, 1)


def logprobs(fwd: Callable[..., Any], tree: PyTree, input_ids: Any, completion_mask: Any,
             attention_mask: Any = None, *, average: bool = False, **kwargs: Any) -> Array:
  """Runs the model and returns each row's completion log-probability (`sequence_logprobs`).

  Args:
    fwd: the forward function, usually ``jaxlora.apply(model.apply)``; called as
      ``fwd(variables, input_ids, attention_mask=attention_mask, **kwargs)`` and returning logits
      ``(batch, seq, vocab)``.
    tree: params (or ``{'params': ...}`` variables): the policy's tree, or `reference_tree` of it.
    input_ids: int ``(batch, seq)``, prompt then completion.
    completion_mask: ``(batch, seq)``, 1 for completion tokens.
    attention_mask: ``(batch, seq)``, 1 for tokens and 0 for padding; not passed when None.
    average: length-normalised log-probs instead of sums.
    **kwargs: passed on to `fwd` (e.g. ``rngs=``, ``adapter_ids=``).

  Returns:
    ``(batch,)`` log-probs.

  Raises:
    InputError: on shapes that do not fit together.

  >>> import jax, jax.numpy as jnp, jaxlora
  >>> model = jaxlora.models.Decoder(jaxlora.models.ModelConfig.tiny("llama"))
  >>> ids = jnp.array([[1, 2, 3, 4]])
  >>> params = jaxlora.models.init(model, jax.random.key(0))
  >>> tree = jaxlora.wrap(params, rank=2, layout=model, key=jax.random.key(1))
  >>> lp = jaxlora.preference.logprobs(jaxlora.apply(model.apply), tree, ids,
  ...                                  jnp.array([[0, 0, 1, 1]]))
  >>> lp.shape, bool(lp[0] < 0)
  ((1,), True)
  """
  variables = tree if _tree.is_variables(tree) else {"params": _tree.get_params(tree)}
  if attention_mask is not None:
    kwargs["attention_mask"] = attention_mask
  out = fwd(variables, input_ids, **kwargs)
  if isinstance(out, tuple):
    out = out[0]
  return sequence_logprobs(out, input_ids, completion_mask, average=average)


# ------------------------------------------------------------------------------- pair losses


def _vec(name: str, x: Any) -> Array:
  x = jnp.asarray(x)
  if x.ndim != 1:
    raise InputError(f"`{name}` must be one log-prob per sequence, shape (pairs,), got shape "
                     f"{tuple(x.shape)}.")
  if not jnp.issubdtype(x.dtype, jnp.floating):
    x = x.astype(jnp.float32)
  return x


def _same_shape(**arrays: Array) -> None:
  shapes = {k: tuple(v.shape) for k, v in arrays.items()}
  if len(set(shapes.values())) > 1:
    raise InputError(f"The log-probs must have one shape, got {shapes}.")


def _positive(name: str, value: Any) -> float:
  if isinstance(value, bool) or not isinstance(value, (int, float, np.floating, np.integer)):
    raise InputTypeError(f"`{name}` must be a number, got {value!r}.")
  if not value > 0:
    raise InputError(f"`{name}` must be > 0, got {value!r}.")
  return float(value)


def _smoothing(value: Any, upper: float = 1.0) -> float:
  if isinstance(value, bool) or not isinstance(value, (int, float, np.floating, np.integer)):
    raise InputTypeError(f"`label_smoothing` must be a number, got {value!r}.")
  if not 0.0 <= value < upper:
    raise InputError(f"`label_smoothing` must be in [0, {upper}), got {value!r}.")
  return float(value)


def _smoothed_sigmoid(logits: Array, beta: float, label_smoothing: float) -> Array:
  return (-jax.nn.log_sigmoid(beta * logits) * (1 - label_smoothing)
          - jax.nn.log_sigmoid(-beta * logits) * label_smoothing)


def dpo_loss(policy_chosen: Any, policy_rejected: Any, ref_chosen: Any, ref_rejected: Any, *,
             loss_type: str = "sigmoid", beta: float = 0.1, label_smoothing: float = 0.0,
             chosen_lengths: Any = None, rejected_lengths: Any = None
             ) -> tuple[Array, Array, Array]:
  """DPO-family losses per pair, as TRL's ``DPOTrainer`` computes them.

  With ``delta = (policy_chosen - ref_chosen) - (policy_rejected - ref_rejected)``:

  - ``'sigmoid'`` (DPO): ``-(1 - ls) * log_sigmoid(beta * delta) - ls * log_sigmoid(-beta *
    delta)``; with ``label_smoothing=0`` (the default) TRL 1.16's ``-log_sigmoid(beta * delta)``.
    A non-zero ``label_smoothing`` gives conservative DPO (cDPO), as TRL's ``dpo_loss`` up to
    0.x computed it; TRL 1.16 ignores ``label_smoothing`` for ``'sigmoid'``.
  - ``'hinge'`` (SLiC): ``relu(1 - beta * delta)``.
  - ``'ipo'``: ``(delta / n - 1 / (2 * beta)) ** 2`` where each side's log-ratio is divided by
    its number of completion tokens (TRL 1.16 sums the log-probs over the completion and divides
    the log-ratios by ``completion_mask.sum(1).clamp(min=1)``). Pass summed log-probs with
    ``chosen_lengths``/``rejected_lengths`` (the token counts), or length-averaged log-probs
    (``average=True`` in `sequence_logprobs`) without them: the two are the same.
  - ``'robust'`` (rDPO): ``((1 - ls) * -log_sigmoid(beta * delta) - ls * -log_sigmoid(-beta *
    delta)) / (1 - 2 * ls)``, ``label_smoothing`` in ``[0, 0.5)``.

  Args:
    policy_chosen: ``(pairs,)`` log-probs of the chosen completions under the policy (summed
      over their tokens).
    policy_rejected: ``(pairs,)``, the rejected completions under the policy.
    ref_chosen: ``(pairs,)``, the chosen completions under the reference.
    ref_rejected: ``(pairs,)``, the rejected completions under the reference.
    loss_type: ``'sigmoid'``, ``'ipo'``, ``'hinge'`` or ``'robust'``.
    beta: the DPO temperature (IPO's tau).
    label_smoothing: the assumed share of flipped labels (cDPO, rDPO).
    chosen_lengths: ``'ipo'`` only: completion token counts of the chosen rows.
    rejected_lengths: ``'ipo'`` only: those of the rejected rows.

  Returns:
    ``(losses, chosen_rewards, rejected_rewards)``, each ``(pairs,)``; the rewards are
    ``beta * (policy - ref)`` under ``stop_gradient`` (TRL's logged rewards). The training loss
    is ``losses.mean()``.

  Raises:
    InputError: on an unknown loss type, shapes that differ, ``beta <= 0``, a
      ``label_smoothing`` out of range, or lengths given for a loss other than ``'ipo'``.

  >>> import jax.numpy as jnp, jaxlora
  >>> losses, chosen, rejected = jaxlora.preference.dpo_loss(
  ...     jnp.array([-4.0]), jnp.array([-6.0]), jnp.array([-5.0]), jnp.array([-5.0]), beta=0.5)
  >>> round(float(losses[0]), 4), float(chosen[0]), float(rejected[0])  # -log_sigmoid(1)
  (0.3133, 0.5, -0.5)
  """
  if loss_type not in DPO_LOSS_TYPES:
    raise InputError(f"Unknown DPO `loss_type` {loss_type!r}; one of {list(DPO_LOSS_TYPES)}.")
  beta = _positive("beta", beta)
  label_smoothing = _smoothing(label_smoothing, 0.5 if loss_type == "robust" else 1.0)
  pc, pr = _vec("policy_chosen", policy_chosen), _vec("policy_rejected", policy_rejected)
  rc, rr = _vec("ref_chosen", ref_chosen), _vec("ref_rejected", ref_rejected)
  _same_shape(policy_chosen=pc, policy_rejected=pr, ref_chosen=rc, ref_rejected=rr)
  chosen_ratio, rejected_ratio = pc - rc, pr - rr
  if (chosen_lengths is not None or rejected_lengths is not None) and loss_type != "ipo":
    raise InputError(f"`chosen_lengths`/`rejected_lengths` are for loss_type='ipo', not "
                     f"{loss_type!r}.")
  if loss_type == "sigmoid":
    losses = _smoothed_sigmoid(chosen_ratio - rejected_ratio, beta, label_smoothing)
  elif loss_type == "hinge":
    losses = jax.nn.relu(1 - beta * (chosen_ratio - rejected_ratio))
  elif loss_type == "ipo":
    if (chosen_lengths is None) != (rejected_lengths is None):
      raise InputError("Pass both `chosen_lengths` and `rejected_lengths` (or neither, with "
                       "length-averaged log-probs).")
    c, r = chosen_ratio, rejected_ratio
    if chosen_lengths is not None:
      cl, rl = _vec("chosen_lengths", chosen_lengths), _vec("rejected_lengths", rejected_lengths)
      _same_shape(policy_chosen=pc, chosen_lengths=cl, rejected_lengths=rl)
      c = c / jnp.maximum(cl, 1).astype(c.dtype)
      r = r / jnp.maximum(rl, 1).astype(r.dtype)
    losses = (c - r - 1 / (2 * beta)) ** 2
  else:  # robust
    clean = -(1 - label_smoothing) * jax.nn.log_sigmoid(beta * (chosen_ratio - rejected_ratio))
    flipped = -label_smoothing * jax.nn.log_sigmoid(-beta * (chosen_ratio - rejected_ratio))
    losses = (clean - flipped) / (1 - 2 * label_smoothing)
  chosen_rewards = jax.lax.stop_gradient(beta * chosen_ratio)
  rejected_rewards = jax.lax.stop_gradient(beta * rejected_ratio)
  return losses, chosen_rewards, rejected_rewards


def simpo_loss(chosen_logps: Any, rejected_logps: Any, *, beta: float = 2.0, gamma: float = 0.5,
               label_smoothing: float = 0.0) -> tuple[Array, Array, Array]:
  """SimPO's reference-free loss per pair, as TRL's ``CPOTrainer.cpo_loss`` with ``'simpo'``.

  ``logits = (chosen - rejected) - gamma / beta``;
  ``losses = -(1 - ls) * log_sigmoid(beta * logits) - ls * log_sigmoid(-beta * logits)``.
  TRL feeds length-averaged log-probs (``average_log_prob=True`` for SimPO): use
  ``sequence_logprobs(..., average=True)``. TRL's CPO adds ``cpo_alpha`` times the chosen NLL,
  which SimPO sets to 0 (not part of this function).

  Args:
    chosen_logps: ``(pairs,)`` length-averaged log-probs of the chosen completions.
    rejected_logps: ``(pairs,)``, the rejected ones.
    beta: the reward scale (SimPO's beta; TRL's ``beta``, which defaults to 0.1 in ``CPOConfig``;
      the SimPO paper uses 2 to 2.5).
    gamma: the target reward margin (TRL's ``simpo_gamma``).
    label_smoothing: as in `dpo_loss` (``'sigmoid'``).

  Returns:
    ``(losses, chosen_rewards, rejected_rewards)``, each ``(pairs,)``; the rewards are
    ``beta * logps`` under ``stop_gradient``.

  Raises:
    InputError: on shapes that differ, ``beta <= 0`` or ``label_smoothing`` outside ``[0, 1)``.

  >>> import jax.numpy as jnp, jaxlora
  >>> losses, chosen, rejected = jaxlora.preference.simpo_loss(jnp.array([-0.5]),
  ...                                                          jnp.array([-1.0]))
  >>> round(float(losses[0]), 4), float(chosen[0])  # -log_sigmoid(2 * 0.5 - 0.5)
  (0.4741, -1.0)
  """
  beta = _positive("beta", beta)
  label_smoothing = _smoothing(label_smoothing)
  c, r = _vec("chosen_logps", chosen_logps), _vec("rejected_logps", rejected_logps)
  _same_shape(chosen_logps=c, rejected_logps=r)
  if isinstance(gamma, bool) or not isinstance(gamma, (int, float, np.floating, np.integer)):
    raise InputTypeError(f"`gamma` must be a number, got {gamma!r}.")
  logits = (c - r) - gamma / beta
  losses = _smoothed_sigmoid(logits, beta, label_smoothing)
  return losses, jax.lax.stop_gradient(beta * c), jax.lax.stop_gradient(beta * r)


def _log1mexp(x: Array) -> Array:
  """``log(1 - exp(x))`` for ``x < 0``, branched at ``-log 2`` as TRL's ``log1mexp``."""
  return jnp.where(x < -0.6931471805599453, jnp.log1p(-jnp.exp(x)), jnp.log(-jnp.expm1(x)))


def orpo_loss(chosen_logps: Any, rejected_logps: Any, *,
              beta: float = 0.1) -> tuple[Array, dict[str, Array]]:
  """ORPO's odds-ratio term per pair, as TRL's ``ORPOTrainer.odds_ratio_loss``.

  ``log_odds = (chosen - rejected) - (log(1 - exp(chosen)) - log(1 - exp(rejected)))``; the term
  is ``-beta * log_sigmoid(log_odds)``, so ORPO's loss is ``nll_chosen + losses.mean()`` (TRL
  returns ``beta * log_sigmoid(log_odds)``, the negative, and computes ``nll - losses.mean()``).
  Inputs are length-averaged log-probs (TRL's ORPO averages over the completion tokens): use
  ``sequence_logprobs(..., average=True)``; they must be ``< 0``.

  Args:
    chosen_logps: ``(pairs,)`` length-averaged log-probs of the chosen completions.
    rejected_logps: ``(pairs,)``, the rejected ones.
    beta: ORPO's lambda (TRL's ``beta``).

  Returns:
    ``(losses, metrics)``: ``losses`` ``(pairs,)``, the term to add to the SFT NLL; ``metrics``
    holds what TRL returns beside it: ``'chosen_rewards'`` and ``'rejected_rewards'``
    (``beta * logps``, ``(pairs,)``, under ``stop_gradient``), ``'log_odds_ratio'`` (the mean of
    ``log_sigmoid(log_odds)``) and ``'log_odds_chosen'`` (the mean of ``log_odds``).

  Raises:
    InputError: on shapes that differ or ``beta <= 0``.

  >>> import jax.numpy as jnp, jaxlora
  >>> losses, metrics = jaxlora.preference.orpo_loss(jnp.array([-0.5]), jnp.array([-1.0]))
  >>> round(float(losses[0]), 4), round(float(metrics['log_odds_chosen']), 4)
  (0.032, 0.9741)
  """
  beta = _positive("beta", beta)
  c, r = _vec("chosen_logps", chosen_logps), _vec("rejected_logps", rejected_logps)
  _same_shape(chosen_logps=c, rejected_logps=r)
  dt = _tree.wide_float(c.dtype, r.dtype)
  c, r = c.astype(dt), r.astype(dt)
  log_odds = (c - r) - (_log1mexp(c) - _log1mexp(r))
  ratio = jax.nn.log_sigmoid(log_odds)
  metrics = {"chosen_rewards": jax.lax.stop_gradient(beta * c),
             "rejected_rewards": jax.lax.stop_gradient(beta * r),
             "log_odds_ratio": jax.lax.stop_gradient(jnp.mean(ratio)),
             "log_odds_chosen": jax.lax.stop_gradient(jnp.mean(log_odds))}
  return -beta * ratio, metrics


def preference_metrics(chosen_rewards: Any, rejected_rewards: Any) -> dict[str, Array]:
  """Reward accuracy and margins of a batch of pairs (TRL's ``rewards/*`` metrics).

  Args:
    chosen_rewards: ``(pairs,)`` from `dpo_loss`, `simpo_loss` or `orpo_loss`.
    rejected_rewards: ``(pairs,)``.

  Returns:
    ``{'accuracy': mean(chosen > rejected), 'margin': mean(chosen - rejected),
    'chosen': mean(chosen), 'rejected': mean(rejected)}``, scalars.

  Raises:
    InputError: on shapes that differ.

  >>> import jax.numpy as jnp, jaxlora
  >>> m = jaxlora.preference.preference_metrics(jnp.array([1.0, 0.0]), jnp.array([0.5, 0.5]))
  >>> float(m['accuracy']), float(m['margin'])
  (0.5, 0.0)
  """
  c, r = _vec("chosen_rewards", chosen_rewards), _vec("rejected_rewards", rejected_rewards)
  _same_shape(chosen_rewards=c, rejected_rewards=r)
  dt = _tree.wide_float(c.dtype, r.dtype)
  return {"accuracy": jnp.mean((c > r).astype(dt)), "margin": jnp.mean(c - r),
          "chosen": jnp.mean(c), "rejected": jnp.mean(r)}


# ---------------------------------------------------------------------------------------- GRPO


def _nanstd(x: Array, axis: int | None) -> Array:
  """TRL's ``nanstd``: NaN-ignoring, Bessel-corrected (NaN for fewer than 2 values)."""
  mean = jnp.nanmean(x, axis=axis, keepdims=True)
  var = jnp.nanmean((x - mean) ** 2, axis=axis, keepdims=True)
  count = jnp.sum(~jnp.isnan(x), axis=axis, keepdims=True).astype(x.dtype)
  var = var * jnp.where(count > 1, count / jnp.maximum(count - 1, 1), jnp.nan)
  return jnp.sqrt(var)


def group_advantages(rewards: Any, group_size: int, scale_rewards: bool | str = "group") -> Array:
  """GRPO advantages: each reward less its group's mean, over its group's std (+1e-4).

  As TRL's ``GRPOTrainer._generate_and_score_completions`` (``multi_objective_aggregation=
  'sum_then_normalize'``, the default): rows come in groups of ``group_size`` consecutive
  completions of one prompt; ``advantage = (r - nanmean(group)) / (nanstd(group) + 1e-4)`` with
  the unbiased (Bessel-corrected) std of TRL's ``nanstd``; NaN rewards (unscorable completions)
  are left out of the statistics and get advantage 0.

  Args:
    rewards: ``(batch,)`` total reward per completion, ``batch`` a multiple of ``group_size``.
    group_size: completions per prompt (TRL's ``num_generations``).
    scale_rewards: ``'group'`` or True (divide by the group's std), ``'batch'`` (by the std of
      the whole batch), ``'none'`` or False (centre only; Dr. GRPO).

  Returns:
    ``(batch,)`` advantages.

  Raises:
    InputError: on a bad shape, group size or ``scale_rewards``.

  >>> import jax.numpy as jnp, jaxlora
  >>> adv = jaxlora.preference.group_advantages(jnp.array([1.0, 0.0, 2.0, 2.0]), 2)
  >>> [round(float(a), 3) for a in adv]
  [0.707, -0.707, 0.0, 0.0]
  """
  scale: Any = scale_rewards
  if isinstance(scale, bool):
    scale = "group" if scale else "none"
  if scale not in SCALE_REWARDS:
    raise InputError(f"`scale_rewards` must be one of {list(SCALE_REWARDS)} (or True/False), "
                     f"got {scale_rewards!r}.")
  if isinstance(group_size, bool) or not isinstance(group_size, (int, np.integer)) or group_size < 1:
    raise InputError(f"`group_size` must be a positive integer, got {group_size!r}.")
  r = jnp.asarray(rewards)
  if not jnp.issubdtype(r.dtype, jnp.floating):
    r = r.astype(jnp.float32)
  if r.ndim != 1 or r.shape[0] % group_size:
    raise InputError(f"`rewards` must be (batch,) with batch a multiple of group_size="
                     f"{group_size}, got shape {tuple(r.shape)}.")
  grouped = r.reshape(-1, group_size)
  mean = jnp.repeat(jnp.nanmean(grouped, axis=1), group_size)
  adv = r - mean
  if scale != "none":
    if scale == "group":
      std = (jnp.repeat(_nanstd(grouped, axis=1)[:, 0], group_size) if group_size > 1
             else jnp.zeros_like(r))
    else:
      std = _nanstd(r, axis=None).reshape(()) if r.shape[0] > 1 else jnp.zeros((), r.dtype)
    adv = adv / (std + 1e-4)
  return jnp.nan_to_num(adv, nan=0.0)


def grpo_loss(per_token_logps: Any, old_per_token_logps: Any, ref_per_token_logps: Any,
              advantages: Any, completion_mask: Any, *, epsilon: float = 0.2,
              epsilon_high: float | None = None, beta: float = 0.0, loss_type: str = "dapo",
              delta: float | None = None, num_items_in_batch: Any = None,
              max_completion_length: int | None = None) -> tuple[Array, dict[str, Array]]:
  """The GRPO policy loss, as TRL's ``GRPOTrainer._compute_loss`` (token-level ratios).

  Per completion token: ``ratio = exp(logp - old_logp)``, ``loss_t = -min(ratio * A,
  clip(ratio, 1 - epsilon, 1 + epsilon_high) * A) + beta * kl_t`` with the k3 estimator
  ``kl_t = exp(ref - logp) - (ref - logp) - 1``. Aggregation (``m``: the completion mask):

  - ``'dapo'`` (TRL's default): ``sum(loss * m) / num_items_in_batch`` (default ``sum(m)``;
    TRL passes the active-token count of the whole generation batch, per process and
    accumulation step).
  - ``'bnpo'``: ``sum(loss * m) / sum(m)``.
  - ``'grpo'``: the mean over rows of ``sum_t(loss * m) / sum_t(m)``.
  - ``'dr_grpo'``: ``sum(loss * m) / (rows * max_completion_length)``.

  TRL also divides the ``'grpo'``/``'bnpo'``/``'dr_grpo'`` loss by the gradient accumulation
  steps while training; do that in the training loop if you accumulate.

  Args:
    per_token_logps: ``(batch, seq)`` log-probs of the completion tokens under the policy (the
      differentiated ones), aligned with `completion_mask` (e.g. `per_token_logprobs` of the
      whole row with ``completion_mask[:, 1:]`` as the mask).
    old_per_token_logps: ``(batch, seq)``, under the policy that sampled them (TRL uses
      ``stop_gradient(per_token_logps)`` when there is one iteration per batch: pass that).
    ref_per_token_logps: ``(batch, seq)``, under the reference; may be None when ``beta == 0``.
    advantages: ``(batch,)`` (`group_advantages`) or ``(batch, seq)``.
    completion_mask: ``(batch, seq)``, 1 for the completion tokens that count.
    epsilon: the lower clipping range (and the upper one, unless ``epsilon_high`` is given).
    epsilon_high: the upper clipping range (DAPO's clip-higher); default ``epsilon``.
    beta: the KL coefficient (TRL's default 0.0; the GRPO paper used 0.04).
    loss_type: ``'dapo'``, ``'grpo'``, ``'bnpo'`` or ``'dr_grpo'``.
    delta: two-sided clipping: the unclipped ratio is capped at ``delta`` (TRL's ``delta``).
    num_items_in_batch: ``'dapo'`` only: the token count to divide by.
    max_completion_length: ``'dr_grpo'`` only: the constant length; default ``seq``.

  Returns:
    ``(loss, metrics)``: the scalar loss, and TRL's masked means ``'clip_ratio/low_mean'``,
    ``'clip_ratio/high_mean'``, ``'clip_ratio/region_mean'`` and, with a reference, ``'kl'``.

  Raises:
    InputError: on an unknown loss type, shapes that differ, a missing reference with
      ``beta != 0``, or bad clipping ranges.

  >>> import jax.numpy as jnp, jaxlora
  >>> logps = jnp.array([[-1.0, -2.0, 0.0]])
  >>> loss, metrics = jaxlora.preference.grpo_loss(
  ...     logps, logps, None, jnp.array([0.5]), jnp.array([[1, 1, 0]]))
  >>> float(loss), float(metrics['clip_ratio/region_mean'])
  (-0.5, 0.0)
  """
  if loss_type not in GRPO_LOSS_TYPES:
    raise InputError(f"Unknown GRPO `loss_type` {loss_type!r}; one of {list(GRPO_LOSS_TYPES)}.")
  eps_low = _positive("epsilon", epsilon)
  eps_high = eps_low if epsilon_high is None else _positive("epsilon_high", epsilon_high)
  if isinstance(beta, bool) or not isinstance(beta, (int, float, np.floating, np.integer)) \
      or beta < 0:
    raise InputError(f"`beta` must be a number >= 0, got {beta!r}.")
  logp = jnp.asarray(per_token_logps)
  if logp.ndim != 2:
    raise InputError(f"`per_token_logps` must be (batch, seq), got shape {tuple(logp.shape)}.")
  shape = tuple(logp.shape)
  old = jnp.asarray(old_per_token_logps)
  mask = jnp.asarray(completion_mask)
  for name, x in (("old_per_token_logps", old), ("completion_mask", mask)):
    if tuple(x.shape) != shape:
      raise InputError(f"`{name}` must have the shape of `per_token_logps` {shape}, got "
                       f"{tuple(x.shape)}.")
  if beta != 0 and ref_per_token_logps is None:
    raise InputError(f"beta={beta!r} weighs a KL term to the reference: pass "
                     "`ref_per_token_logps` (or beta=0).")
  ref = None if ref_per_token_logps is None else jnp.asarray(ref_per_token_logps)
  if ref is not None and tuple(ref.shape) != shape:
    raise InputError(f"`ref_per_token_logps` must have the shape of `per_token_logps` {shape}, "
                     f"got {tuple(ref.shape)}.")
  adv = jnp.asarray(advantages)
  if adv.ndim == 1:
    adv = adv[:, None]
  if adv.ndim != 2 or adv.shape[0] != shape[0] or adv.shape[1] not in (1, shape[1]):
    raise InputError(f"`advantages` must be (batch,) or (batch, seq) for per_token_logps {shape}, "
                     f"got {tuple(jnp.shape(advantages))}.")
  if (num_items_in_batch is not None) and loss_type != "dapo":
    raise InputError(f"`num_items_in_batch` is for loss_type='dapo', not {loss_type!r}.")
  if (max_completion_length is not None) and loss_type != "dr_grpo":
    raise InputError(f"`max_completion_length` is for loss_type='dr_grpo', not {loss_type!r}.")

  dt = logp.dtype if jnp.issubdtype(logp.dtype, jnp.floating) else jnp.float32
  m = mask.astype(dt)
  coef_1 = jnp.exp(logp - old)
  coef_2 = jnp.clip(coef_1, 1 - eps_low, 1 + eps_high)
  capped = coef_1 if delta is None else jnp.minimum(coef_1, delta)
  adv = jnp.broadcast_to(adv.astype(dt), shape)
  per_token = -jnp.minimum(capped * adv, coef_2 * adv)
  kl = None
  if ref is not None:
    kl = jnp.exp(ref - logp) - (ref - logp) - 1
    if beta != 0:
      per_token = per_token + beta * kl
  masked = per_token * m
  if loss_type == "grpo":
    loss = jnp.mean(masked.sum(-1) / jnp.maximum(m.sum(-1), 1.0))
  elif loss_type == "bnpo":
    loss = masked.sum() / jnp.maximum(m.sum(), 1.0)
  elif loss_type == "dr_grpo":
    length = shape[1] if max_completion_length is None else max_completion_length
    loss = masked.sum() / (shape[0] * length)
  else:  # dapo
    n = m.sum() if num_items_in_batch is None else jnp.asarray(num_items_in_batch, dt)
    loss = masked.sum() / jnp.maximum(n, 1.0)

  count = jnp.maximum(m.sum(), 1.0)
  masked_mean = lambda x: jax.lax.stop_gradient((x.astype(dt) * m).sum() / count)
  low = (coef_1 < 1 - eps_low) & (adv < 0)
  high = (coef_1 > 1 + eps_high) & (adv > 0)
  metrics = {"clip_ratio/low_mean": masked_mean(low), "clip_ratio/high_mean": masked_mean(high),
             "clip_ratio/region_mean": masked_mean(low | high)}
  if kl is not None:
    metrics["kl"] = masked_mean(kl)
  return loss, metrics
