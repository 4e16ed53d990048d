"""optax helpers that train the adapters and nothing else."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax

from jaxlora import _tree
from jaxlora import transform


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
    zeros = jax.tree.map(lambda u: jnp.full_like(u, -0.0), frozen(updates))
    return _tree.merge_trees(zeros, new_t), state

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
