"""optax helpers that train the adapters and nothing else."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import optax

from jaxlora import _tree
from jaxlora import transform
from jaxlora._tree import A_KEY, B_KEY, MAGNITUDE_KEY, SCALE_KEY, TOKEN_ROWS_KEY
from jaxlora.errors import InputError, InputTypeError


def optimizer(tx: optax.GradientTransformation, tree: Any) -> optax.GradientTransformation:
  """Wraps `tx` so that it updates only ``lora_a``/``lora_b`` of a full tree.

  State is allocated for the adapter factors alone (``tx.init`` sees only the
  trainable half of `jaxlora.split`); every other leaf gets a zero update.
  Unlike ``optax.masked``, which passes unmasked gradients through as updates,
  this really freezes the base. The zero update is ``-0.0``, which leaves every
  frozen value bit-identical under ``optax.apply_updates`` (``x + -0.0 == x``,
  signed zeros included).

  Args:
    tx: any optax transformation, e.g. ``optax.adamw(1e-3)``.
    tree: the wrapped tree (or its ``jax.eval_shape``), used to check that it
      holds an adapter.

  Returns:
    A ``GradientTransformation`` over full trees of the same form as `tree`;
    it also accepts trees that hold only the trainable half.

  >>> import jax, jax.numpy as jnp, optax, jaxlora
  >>> t = jaxlora.wrap({'d': {'kernel': jnp.ones((4, 4))}}, rank=2, key=jax.random.key(0))
  >>> tx = jaxlora.optimizer(optax.adam(1e-2), t)
  >>> state = tx.init(t)
  >>> grads = jax.tree.map(jnp.ones_like, t)
  >>> updates, state = tx.update(grads, state, t)
  >>> new = optax.apply_updates(t, updates)
  >>> bool(jnp.array_equal(new['d']['kernel'], t['d']['kernel']))
  True
  """
  transform.split(tree)  # raises a clear error when there is no adapter
  # Which leaves train is read once from the full tree: markers (train_extra, bias) live
  # in its frozen half, so a trainable half alone could not say it.
  params = _tree.get_params(tree)
  trained = _tree.leaf_paths(_tree.trainable_leaves(params))

  def trainable(x):
    out = _tree.select_paths(_tree.get_params(x), trained, keep=True, prune=True)
    return _tree.with_params(x, out)

  def frozen(x):
    out = _tree.select_paths(_tree.get_params(x), trained, keep=False, prune=False)
    return _tree.with_params(x, out)

  def init_fn(params):
    return tx.init(trainable(params))

  def update_fn(updates, state, params=None, **extra):
    t_updates = trainable(updates)
    t_params = None if params is None else trainable(params)
    new_t, state = tx.update(t_updates, state, t_params, **extra)
    zeros = jax.tree.map(_no_update, frozen(updates))
    return _tree.merge_trees(zeros, new_t), state

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def _no_update(u: jax.Array) -> jax.Array:
  # -0.0 leaves a float bit-identical under `optax.apply_updates`; an integer leaf (trained
  # tokens' ids, differentiated with `jax.grad(..., allow_int=True)`) has a float0 gradient,
  # which no arithmetic accepts: it gets integer zeros.
  if u.dtype == jax.dtypes.float0:
    return jnp.zeros(u.shape, jnp.int32)
  return jnp.full_like(u, -0.0)


_A_GROUP, _B_GROUP, _FROZEN = "lora_plus_a", "lora_plus_b", "frozen"


def _zero_updates() -> optax.GradientTransformation:
  """Updates of ``-0.0``: leaves every value bit-identical under ``optax.apply_updates``."""
  return optax.stateless(lambda updates, params=None: jax.tree.map(_no_update, updates))


def _loraplus_labels(params: Mapping, trained: set | None, stack_of: dict | None) -> dict:
  """A label per leaf of `params`: LoRA+'s fast group, its base group, or frozen.

  `trained` and `stack_of` (module path -> stacked axes) come from the full tree
  when one was given; otherwise they are read from `params` itself.
  """
  if trained is None:
    full = any(SCALE_KEY in m for _, m in _tree.iter_modules(params))
    # A full tree says which leaves train (markers, lora_scale); a trainable half trains whole.
    trained = _tree.leaf_paths(_tree.trainable_leaves(params) if full else params)
    stack_of = _stacked_axes(params)

  def label(path, key, leaf):
    if path + (key,) not in trained:
      return _FROZEN
    if key in (B_KEY, MAGNITUDE_KEY):
      return _B_GROUP
    if key in (A_KEY, TOKEN_ROWS_KEY):
      return _A_GROUP
    # PEFT gives every other trained vector (bias, norm scale) lora_B's rate, matrices lora_A's.
    n_stack = stack_of.get(path, 0)
    return _B_GROUP if len(getattr(leaf, "shape", ())) - n_stack == 1 else _A_GROUP

  def walk(node, path):
    out = {}
    for k, v in node.items():
      if isinstance(v, Mapping):
        out[k] = walk(v, path + (k,))
      else:  # one label for the leaf, or for each array of a QuantizedArray record
        lab = label(path, k, v)
        out[k] = jax.tree.map(lambda _, lab=lab: lab, v)
    return out

  return walk(params, ())


def _stacked_axes(params: Mapping) -> dict:
  """Module path -> number of stacked (``nn.scan``) axes, from lora_scale or the markers."""
  out: dict = {}

  def walk(node, path, inherited):
    n = inherited
    for key in (SCALE_KEY,) + _tree.MARKER_KEYS:
      if key in node and hasattr(node[key], "shape"):
        n = len(node[key].shape)
        break
    out[path] = n
    for k, v in node.items():
      if isinstance(v, Mapping):
        walk(v, path + (k,), n if _tree.EXTRA_KEY in node else inherited)

  walk(params, (), 0)
  return out


def loraplus(optimizer: Callable[..., optax.GradientTransformation],
             lr: float | optax.Schedule, ratio: float = 16.0, *, tree: Any = None,
             **kwargs: Any) -> optax.GradientTransformation:
  """LoRA+ (Hayou et al. 2024): ``lora_b`` learns `ratio` times faster than ``lora_a``.

  The leaves are grouped as PEFT's ``create_loraplus_optimizer`` groups them,
  and each group gets its own ``optimizer(learning_rate, **kwargs)``:

  * ``lr * ratio``: every ``lora_b``, DoRA magnitudes, and other trained
    leaves that are vectors (per stacked layer): biases, norm scales.
  * ``lr``: every ``lora_a``, trainable token rows, and other trained
    matrices (fully trained kernels and embeddings).
  * frozen leaves (the base, ``lora_scale``, token ids, markers): a ``-0.0``
    update and no optimizer state, as in `jaxlora.optimizer`.

  PEFT's separate rate for LoRA on embedding layers has no counterpart
  (jaxlora adapts Dense-like kernels only). A schedule `lr` is multiplied by
  `ratio` step by step. Use it inside `jaxlora.optimizer`, on the trainable
  half of `jaxlora.split`, or on a full wrapped tree directly; pass the full
  wrapped tree as `tree` when only a part is given to it, so that it knows
  which leaves are per-layer vectors of a stacked module (otherwise a leaf's
  own shape decides).

  Args:
    optimizer: an optax factory taking the learning rate first, such as
      ``optax.adamw``, or any ``lambda lr: GradientTransformation``.
    lr: the learning rate of ``lora_a`` (a float or an optax schedule).
    ratio: ``lr_B / lr_A`` (PEFT's ``loraplus_lr_ratio``; the paper suggests 16).
    tree: the full wrapped tree (optional, see above).
    **kwargs: passed to every ``optimizer(...)`` call (e.g. ``weight_decay``).

  Returns:
    An ``optax.GradientTransformationExtraArgs``.

  >>> import jax, jax.numpy as jnp, optax, jaxlora
  >>> t = jaxlora.wrap({'d': {'kernel': jnp.ones((4, 4))}}, rank=2, key=jax.random.key(0))
  >>> tx = jaxlora.optimizer(jaxlora.loraplus(optax.sgd, 0.5, ratio=4), t)
  >>> state = tx.init(t)
  >>> grads = jax.tree.map(jnp.ones_like, t)
  >>> updates, _ = tx.update(grads, state, t)
  >>> float(updates['d']['lora_a'][0, 0]), float(updates['d']['lora_b'][0, 0])
  (-0.5, -2.0)
  """
  if not callable(optimizer):
    raise InputTypeError(f"`optimizer` must be an optax factory such as optax.adamw (called as "
                         f"optimizer(learning_rate, **kwargs)), got {type(optimizer).__name__}.")
  if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not ratio > 0:
    raise InputError(f"`ratio` (lr_B / lr_A) must be a positive number, got {ratio!r}; "
                     "LoRA+ suggests 16.")
  lr_b = (lambda count: ratio * lr(count)) if callable(lr) else lr * ratio
  trained = stack_of = None
  if tree is not None:
    p = _tree.get_params(tree)
    trained = _tree.leaf_paths(_tree.trainable_leaves(p))
    stack_of = _stacked_axes(p)

  def labels(x):
    if _tree.is_variables(x):  # other collections (batch stats, ...) do not train
      return {k: _loraplus_labels(v, trained, stack_of) if k == "params"
              else jax.tree.map(lambda _: _FROZEN, v) for k, v in x.items()}
    return _loraplus_labels(x, trained, stack_of)

  return optax.partition({_A_GROUP: optimizer(lr, **kwargs), _B_GROUP: optimizer(lr_b, **kwargs),
                          _FROZEN: _zero_updates()}, labels)
