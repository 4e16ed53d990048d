"""Training only the adapters: split/combine, optimizer, gradients and state sizes."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxlora
from conftest import randomize_adapters
from models import MLP, Stack

KEY = jax.random.key(0)


def _nbytes(tree):
  return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree))


def _data():
  rng = np.random.default_rng(0)
  tokens = jnp.asarray(rng.integers(0, 11, size=(4, 6)), jnp.int32)
  return tokens[:, :-1], tokens[:, 1:]


def _setup():
  m = Stack()
  x, y = _data()
  v = m.init(KEY, x)
  w = jaxlora.wrap(v, rank=2, key=jax.random.key(1), layout=jaxlora.trace_layout(m.apply, v, x))
  return m, v, w, x, y


def _loss_fn(m):
  fwd = jaxlora.apply(m.apply, dropout=0.1)

  def loss(trainable, frozen, x, y, key):
    logits = fwd(jaxlora.combine(trainable, frozen), x, rngs={"dropout": key})
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
  return loss


def test_split_combine_are_exact_inverses():
  _, v, w, _, _ = _setup()
  t, f = jaxlora.split(w)
  assert {k for x in jax.tree_util.tree_flatten_with_path(t)[0] for k in [x[0][-1].key]} == \
      {"lora_a", "lora_b"}
  assert not any(x[0][-1].key in ("lora_a", "lora_b")
                 for x in jax.tree_util.tree_flatten_with_path(f)[0])
  back = jaxlora.combine(t, f)
  assert jax.tree.structure(back) == jax.tree.structure(w)
  for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(w)):
    assert a is b
  with pytest.raises(ValueError, match="no adapter"):
    jaxlora.split(v)
  with pytest.raises(ValueError, match="Both trees hold a leaf"):
    jaxlora.combine(t, w)


def test_training_changes_only_adapters_and_sizes_match():
  m, v, w, x, y = _setup()
  trainable, frozen = jaxlora.split(w)
  tx = optax.adamw(1e-2)
  opt_state = tx.init(trainable)
  loss = _loss_fn(m)

  @jax.jit
  def step(trainable, opt_state, frozen, x, y, key):
    l, g = jax.value_and_grad(loss)(trainable, frozen, x, y, key)
    updates, opt_state = tx.update(g, opt_state, trainable)
    return optax.apply_updates(trainable, updates), opt_state, l, g

  adapter_bytes = _nbytes(trainable)
  losses = []
  t = trainable
  for i in range(20):
    t, opt_state, l, g = step(t, opt_state, frozen, x, y, jax.random.key(i))
    losses.append(float(l))
  assert losses[-1] < losses[0] - 0.1
  # Gradients exist for A and B alone, and adam's state is two copies of them.
  assert _nbytes(g) == adapter_bytes
  assert jax.tree.structure(g) == jax.tree.structure(trainable)
  mu_nu = [s for s in jax.tree.leaves(opt_state) if s.ndim > 0]
  assert sum(s.size * s.dtype.itemsize for s in mu_nu) == 2 * adapter_bytes
  assert _nbytes(opt_state) - 2 * adapter_bytes <= 16  # plus scalar step counts
  assert adapter_bytes < 0.5 * _nbytes(v)
  # A and B moved; every base leaf (and the scale) is bit-identical.
  new = jaxlora.combine(t, frozen)
  for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(new)[0], jax.tree.leaves(w)):
    if path[-1].key in ("lora_a", "lora_b"):
      assert not np.array_equal(a, b), path
    else:
      np.testing.assert_array_equal(np.asarray(a).view(np.uint8), np.asarray(b).view(np.uint8))


def test_optimizer_on_full_tree_freezes_the_base():
  m, v, w, x, y = _setup()
  w = jax.tree.map(lambda a: a, w)
  w["params"]["layers"]["up"]["bias"] = w["params"]["layers"]["up"]["bias"].at[0, 0].set(-0.0)
  tx = jaxlora.optimizer(optax.adamw(1e-2, weight_decay=0.5), w)
  state = tx.init(w)
  trainable, _ = jaxlora.split(w)
  # State for the adapter factors alone (optax.masked would not freeze the rest).
  assert _nbytes([s for s in jax.tree.leaves(state) if s.ndim]) == 2 * _nbytes(trainable)
  fwd = jaxlora.apply(m.apply)

  @jax.jit
  def step(params, state):
    g = jax.grad(lambda p: optax.softmax_cross_entropy_with_integer_labels(
        fwd(p, x), y).mean())(params)
    updates, state = tx.update(g, state, params)
    return optax.apply_updates(params, updates), state

  p = w
  for _ in range(3):
    p, state = step(p, state)
  for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(p)[0], jax.tree.leaves(w)):
    if path[-1].key in ("lora_a", "lora_b"):
      assert not np.array_equal(a, b)
    else:  # bit-identical, signed zeros included
      np.testing.assert_array_equal(np.asarray(a).view(np.uint8), np.asarray(b).view(np.uint8))
  # It composes with optax like any transformation, and also takes the trainable half.
  chained = optax.chain(optax.clip_by_global_norm(1.0), jaxlora.optimizer(optax.sgd(0.1), w))
  chained.init(w)
  half = jaxlora.optimizer(optax.sgd(0.1), w)
  upd, _ = half.update(trainable, half.init(trainable), trainable)
  assert jax.tree.structure(upd) == jax.tree.structure(trainable)


def test_optimizer_needs_an_adapter():
  v = MLP().init(KEY, jnp.ones((1, 4)))
  with pytest.raises(ValueError, match="jaxlora.wrap"):
    jaxlora.optimizer(optax.adam(1e-3), v)


@pytest.mark.slow
def test_gradient_matches_finite_differences_in_float64_reference():
  """d loss / d A and d B from the factored path equal the merged path's gradients."""
  m, v, w, x, y = _setup()
  w = randomize_adapters(w, jax.random.key(3), scale=0.2)
  t, f = jaxlora.split(w)
  fwd = jaxlora.apply(m.apply)

  def loss_factored(t):
    return optax.softmax_cross_entropy_with_integer_labels(
        fwd(jaxlora.combine(t, f), x), y).mean()

  def loss_merged(t):
    return optax.softmax_cross_entropy_with_integer_labels(
        m.apply(jaxlora.merge(jaxlora.combine(t, f)), x), y).mean()

  g1 = jax.grad(loss_factored)(t)
  g2 = jax.grad(loss_merged)(t)
  for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g2)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
