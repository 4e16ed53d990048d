"""GRPO's rollouts: sample completions with the adapter being trained, score them, group them.

A step of ``train.objective=grpo`` takes ``train.batch_size x train.grad_accum`` prompts, samples
``grpo.num_generations`` completions of each with `jaxlora.generate` on the run's own tree (the
frozen base and the current adapter: no copy of the weights), scores them with the reward
functions (``reward.fn``), turns the rewards into group-normalised advantages and hands a batch
to the jitted update (`objectives.make_grpo_grads`). Sampling and the update are two separately
compiled programs.

A reward function is called as ``fn(prompts, completions, **columns)``: ``prompts`` and
``completions`` are lists of strings, one entry per completion (a prompt repeated for each of
its completions), and each of the data row's other columns is a list aligned with them, as TRL
calls its reward functions. It returns one float per completion, or None where it does not
apply (it then adds nothing to that completion's total).
"""

from __future__ import annotations

import dataclasses
import importlib
import math
import os
import sys
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

import jaxlora
from jaxlora_cli.config import ConfigError


class RewardError(ConfigError):
  """A reward function failed or returned something unusable; the run is left as it was."""


def exact_match(prompts: list[str], completions: list[str], answer: list[Any],
                **columns: Any) -> list[float]:
  """1.0 where the completion, stripped of surrounding white space, equals the answer.

  >>> exact_match(["2+2="] * 2, [" 4", "5"], answer=[4, 4])
  [1.0, 0.0]
  """
  del prompts, columns
  return [float(c.strip() == str(a).strip()) for c, a in zip(completions, answer)]


BUILTIN_REWARDS: dict[str, Callable[..., list]] = {"exact_match": exact_match}


@dataclasses.dataclass(frozen=True)
class Reward:
  """A named reward function and its weight."""
  name: str
  fn: Callable[..., Any]
  weight: float = 1.0


def load_rewards(spec: str | list, weights: list | None, answer_field: str) -> list[Reward]:
  """The reward functions of ``reward.fn``: built-in names or ``module:function``.

  The built-in ``exact_match`` reads the ``reward.answer_field`` column. A module is imported
  as Python finds it, or else from the current directory.

  >>> [r.name for r in load_rewards(["exact_match", "os.path:basename"], None, "answer")]
  ['exact_match', 'os.path:basename']
  >>> load_rewards("nomodule_xyz:f", None, "answer")
  Traceback (most recent call last):
  ...
  jaxlora_cli.rl.RewardError: reward.fn 'nomodule_xyz:f': no module named 'nomodule_xyz' (put \
it on PYTHONPATH or in the current directory)
  """
  names = spec if isinstance(spec, list) else [spec]
  weights = [1.0] * len(names) if weights is None else [float(w) for w in weights]
  out = []
  for name, w in zip(names, weights):
    name = str(name)
    if name in BUILTIN_REWARDS:
      fn = BUILTIN_REWARDS[name]
      if answer_field != "answer":
        fn = _renamed(fn, answer_field)
      out.append(Reward(name, fn, w))
      continue
    module, sep, attr = name.partition(":")
    if not sep or not module or not attr:
      raise RewardError(f"reward.fn {name!r} is neither a built-in ({', '.join(BUILTIN_REWARDS)}) "
                        "nor module:function")
    try:
      mod = _import(module)
    except ModuleNotFoundError as e:
      raise RewardError(f"reward.fn {name!r}: no module named {e.name!r} (put it on "
                        "PYTHONPATH or in the current directory)") from None
    fn = getattr(mod, attr, None)
    if not callable(fn):
      raise RewardError(f"reward.fn {name!r}: module {module!r} has no function {attr!r}")
    out.append(Reward(name, fn, w))
  return out


def _renamed(fn: Callable[..., Any], field: str) -> Callable[..., Any]:
  def call(prompts, completions, **columns):
    if field not in columns:
      raise KeyError(f"no column {field!r} (reward.answer_field)")
    return fn(prompts, completions, answer=columns.pop(field), **columns)
  return call


def _import(module: str):
  try:
    return importlib.import_module(module)
  except ModuleNotFoundError as e:
    if e.name != module.split(".")[0] or os.getcwd() in sys.path:
      raise
  sys.path.insert(0, os.getcwd())  # `jaxlora train` from a directory holding the module
  try:
    return importlib.import_module(module)
  finally:
    sys.path.remove(os.getcwd())


def check_columns(rewards: list[Reward], examples: list, answer_field: str, path: str) -> None:
  """A built-in reward's column must be in the data: said before the first step."""
  if not any(r.name == "exact_match" for r in rewards):
    return
  for i, e in enumerate(examples):
    if answer_field not in (e.columns or {}):
      raise ConfigError(f"{path} row {i} has no column '{answer_field}', which "
                        f"reward.fn=exact_match compares with; set reward.answer_field")


def score(rewards: list[Reward], prompts: list[str], completions: list[str],
          columns: list[dict], rows: list[int]) -> tuple[np.ndarray, dict[str, float]]:
  """The weighted total reward of each completion, and each function's mean.

  Args:
    rewards: the reward functions.
    prompts: one per completion.
    completions: the decoded completions.
    columns: one data row's other columns per completion.
    rows: the data row of each completion, to name it in errors.

  Raises:
    RewardError: a function raised, returned the wrong number of values, or a value that is
      not a finite number (nor None).
  """
  keys = sorted({k for c in columns for k in c})
  kwargs = {k: [c.get(k) for c in columns] for k in keys}
  total = np.zeros(len(completions), np.float64)
  means = {}
  for r in rewards:
    try:
      values = r.fn(list(prompts), list(completions), **kwargs)
    except Exception as e:  # the user's code: any failure stops the run with its name
      raise RewardError(f"reward function {r.name!r} raised {type(e).__name__}: "
                        f"{str(e).splitlines()[0] if str(e) else ''}; the run is stopped "
                        "before this step's update (its checkpoints are untouched)") from e
    values = list(values) if values is not None else None
    if values is None or len(values) != len(completions):
      raise RewardError(f"reward function {r.name!r} returned "
                        f"{'None' if values is None else f'{len(values)} values'} for "
                        f"{len(completions)} completions; return one float (or None) each")
    got = np.full(len(values), np.nan)
    for j, v in enumerate(values):
      if v is None:
        continue
      if isinstance(v, bool) or not isinstance(v, (int, float, np.floating, np.integer)) \
          or not math.isfinite(float(v)):
        raise RewardError(f"reward function {r.name!r} returned {v!r} for the completion "
                          f"{completions[j]!r} of data row {rows[j]}; rewards must be finite "
                          "numbers (or None where the function does not apply)")
      got[j] = float(v)
    total += np.nan_to_num(got * r.weight, nan=0.0)  # None adds nothing (TRL's nansum)
    means[f"rewards/{r.name}"] = float(np.nanmean(got)) if np.isfinite(got).any() else 0.0
  return total, means


def left_pad(examples: list, pad_id: int, length: int) -> tuple[np.ndarray, np.ndarray]:
  """Prompts right-aligned in ``(n, length)`` rows, and their attention mask."""
  ids = np.full((len(examples), length), pad_id, np.int32)
  mask = np.zeros((len(examples), length), np.int32)
  for i, e in enumerate(examples):
    ids[i, length - len(e.ids):] = e.ids
    mask[i, length - len(e.ids):] = 1
  return ids, mask


def completion_mask(tokens: np.ndarray, eos: tuple[int, ...]) -> np.ndarray:
  """1 on each row's tokens up to and including its first EOS (all of them without one).

  >>> completion_mask(np.array([[5, 2, 0], [5, 6, 7]]), (2,)).tolist()
  [[1, 1, 0], [1, 1, 1]]
  """
  is_eos = np.isin(tokens, eos) if eos else np.zeros(tokens.shape, bool)
  after = np.cumsum(is_eos, axis=1) - is_eos  # EOS tokens before this one
  return (after == 0).astype(np.int32)


@dataclasses.dataclass
class Sampler:
  """Samples and scores completions of prompts with the run's current tree."""
  model: Any
  tokenizer: Any
  rewards: list[Reward]
  num_generations: int
  max_completion_length: int
  temperature: float
  top_p: float
  scale_rewards: str
  max_length: int
  pad_id: int

  @property
  def eos(self) -> tuple[int, ...]:
    e = self.tokenizer.eos_token_id
    return () if e is None else (int(e),)

  def _length(self, examples: list) -> int:
    from jaxlora_cli import data as data_lib  # pylint: disable=import-outside-toplevel
    length = data_lib.bucket(max(len(e.ids) for e in examples), self.max_length)
    limit = self.model.max_positions
    if limit is not None and length + self.max_completion_length > limit:
      raise ConfigError(f"prompts of up to {length} tokens plus grpo.max_completion_length="
                        f"{self.max_completion_length} exceed the model's {limit} positions; "
                        "lower data.max_length or grpo.max_completion_length")
    return length

  def generate(self, tree, examples: list, key, temperature: float | None = None
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, list[str]]:
    """Completions of `examples` (each once): prompt ids and mask, completion tokens and
    mask, and the decoded completions."""
    ids, mask = left_pad(examples, self.pad_id, self._length(examples))
    temp = self.temperature if temperature is None else temperature
    tokens = np.asarray(jaxlora.generate(
        self.model, tree, ids, attention_mask=mask, max_new_tokens=self.max_completion_length,
        temperature=temp, top_p=self.top_p if temp > 0 else 1.0, key=key,
        eos_token_id=self.eos or None, pad_token_id=self.pad_id))
    cmask = completion_mask(tokens, self.eos)
    texts = [self.tokenizer.decode([int(t) for t, m in zip(row, mrow) if m and t not in self.eos])
             for row, mrow in zip(tokens, cmask)]
    return ids, mask, tokens, cmask, texts

  def rollout(self, tree, prompts: list, rows: list[int], accum: int, key
              ) -> tuple[dict[str, np.ndarray], dict[str, float]]:
    """A step's batch: `prompts` (each repeated ``num_generations`` times, in groups),
    completions, advantages; arrays (accum, rows // accum, ...). And the rollout metrics."""
    k = self.num_generations
    group = [e for e in prompts for _ in range(k)]
    ids, mask, tokens, cmask, texts = self.generate(tree, group, key)
    rewards, means = score(self.rewards, [e.prompt for e in group], texts,
                           [e.columns or {} for e in group], [r for r in rows for _ in range(k)])
    adv = np.asarray(jaxlora.preference.group_advantages(jnp.asarray(rewards, jnp.float32), k,
                                                         self.scale_rewards))
    n = len(group)
    shape = lambda x: x.reshape(accum, n // accum, *x.shape[1:])
    batch = {"input_ids": np.concatenate([ids, np.where(cmask > 0, tokens, self.pad_id)], 1),
             "attention_mask": np.concatenate([mask, cmask], 1),
             "targets": np.concatenate([np.zeros_like(mask), cmask], 1).astype(np.float32),
             "advantages": adv.astype(np.float32)[:, None]}
    grouped = rewards.reshape(-1, k)
    lengths = cmask.sum(1)
    ended = np.isin(tokens, self.eos).any(1) if self.eos else np.zeros(n, bool)
    metrics = {"reward": float(rewards.mean()), "reward_std": float(grouped.std(1, ddof=1).mean()),
               "frac_reward_zero_std": float(np.mean(grouped.std(1) == 0)),
               "completions/mean_length": float(lengths.mean()),
               "completions/clipped_ratio": float(1.0 - ended.mean()), **means}
    return {name: shape(v) for name, v in batch.items()}, metrics

  def evaluate(self, tree, examples: list, batch: int) -> dict[str, float]:
    """Greedy completions of the eval prompts: the mean reward (and each function's)."""
    totals, parts, lengths = [], [], []
    for s in range(0, len(examples), batch):
      chunk = examples[s:s + batch]
      _, _, _, cmask, texts = self.generate(tree, chunk, None, temperature=0.0)
      r, means = score(self.rewards, [e.prompt for e in chunk], texts,
                       [e.columns or {} for e in chunk], list(range(s, s + len(chunk))))
      totals.append(r)
      parts.append((len(chunk), means))
      lengths.append(cmask.sum(1))
    n = sum(c for c, _ in parts)
    out = {"reward": float(np.concatenate(totals).mean()),
           "completions/mean_length": float(np.concatenate(lengths).mean())}
    for name in parts[0][1]:
      out[name] = float(sum(c * m[name] for c, m in parts) / n)
    return out


def check_multihost() -> None:
  if jax.process_count() > 1:
    raise ConfigError("train.objective=grpo runs in one process (any number of local devices); "
                      "multi-host GRPO is not supported yet")
