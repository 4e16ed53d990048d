"""Adapter banks: stacking, per-row adapters, generation, hot swap and training a bank."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxlora
from jaxlora.models import Decoder, ModelConfig

LLAMA = ModelConfig("llama", 64, 32, 2, 4, 2, 8, 64, 128, 1e-6, False)


def _adapter(params, model, seed, **kw):
  """A wrapped tree with non-zero B, so every adapter changes the output."""
  tree = jaxlora.wrap(params, layout=model, key=jax.random.key(seed), **kw)
  return jax.tree_util.tree_map_with_path(
      lambda p, x: x + 0.05 * jax.random.normal(jax.random.key(seed + 100), x.shape, x.dtype)
      if p[-1].key == "lora_b" else x, tree)


@pytest.fixture(scope="module")
def setup():
  model = Decoder(LLAMA)
  params = jaxlora.models.init(model, jax.random.key(0))
  trees = {"a": _adapter(params, model, 1, rank=4),
           "b": _adapter(params, model, 2, rank=2, alpha=8.0, targets="attention"),
           "c": _adapter(params, model, 3, rank=3, use_rslora=True, targets="mlp")}
  ids = jax.random.randint(jax.random.key(9), (4, 10), 0, 64)
  return model, params, trees, ids


def test_unstack_gives_the_trees_back_exactly(setup):
  _, _, trees, _ = setup
  bank = jaxlora.stack(trees, capacity=5, max_rank=8)
  assert bank.names == ("a", "b", "c", None, None) and bank.max_rank == 8
  back = jaxlora.unstack(bank)
  for name, tree in trees.items():
    flat, want = jax.tree_util.tree_flatten_with_path(back[name]), \
        jax.tree_util.tree_flatten_with_path(tree)
    assert [p for p, _ in flat[0]] == [p for p, _ in want[0]], name
    for (path, got), (_, exp) in zip(flat[0], want[0]):
      assert got.dtype == exp.dtype and got.shape == exp.shape, (name, path)
      np.testing.assert_array_equal(np.asarray(got), np.asarray(exp))


def test_each_row_equals_its_single_adapter_run(setup):
  model, params, trees, ids = setup
  bank = jaxlora.stack(trees, capacity=4)
  fwd = jaxlora.apply(model.apply)
  rows = ["c", None, "a", "b"]
  got = jax.jit(fwd)({"params": bank.tree}, ids, adapter_ids=bank.ids(rows))
  for i, name in enumerate(rows):
    tree = params if name is None else trees[name]
    want = fwd({"params": tree}, ids[i:i + 1])
    np.testing.assert_allclose(np.asarray(got[i]), np.asarray(want[0]), atol=1e-5, rtol=1e-5)


@pytest.mark.slow
def test_generate_decodes_a_mixed_batch(setup):
  model, params, trees, ids = setup
  bank = jaxlora.stack(trees)
  rows = ["b", "a", None, "c"]
  got = jaxlora.generate(model, bank, ids, adapter_ids=rows, max_new_tokens=4)
  for i, name in enumerate(rows):
    want = jaxlora.generate(model, params if name is None else trees[name], ids[i:i + 1],
                            max_new_tokens=4)
    np.testing.assert_array_equal(np.asarray(got[i]), np.asarray(want[0]))


def test_bank_set_swaps_without_recompiling(setup):
  model, params, trees, ids = setup
  bank = jaxlora.stack({"a": trees["a"], "b": trees["b"]}, capacity=3, max_rank=4)
  fn = jax.jit(jaxlora.apply(model.apply))
  sel = bank.ids(["a", "b", "a", "b"])
  fn({"params": bank.tree}, ids, adapter_ids=sel)
  swapped = jaxlora.bank_set(bank, "a", trees["c"])  # other rank, other targets
  added = jaxlora.bank_set(swapped, "d", trees["a"])
  out = fn({"params": added.tree}, ids, adapter_ids=added.ids(["a", "b", "d", "b"]))
  assert fn._cache_size() == 1
  assert added.names == ("a", "b", "d")
  want_c = jaxlora.apply(model.apply)({"params": trees["c"]}, ids[:1])
  np.testing.assert_allclose(np.asarray(out[0]), np.asarray(want_c[0]), atol=1e-5, rtol=1e-5)
  want_a = jaxlora.apply(model.apply)({"params": trees["a"]}, ids[2:3])
  np.testing.assert_allclose(np.asarray(out[2]), np.asarray(want_a[0]), atol=1e-5, rtol=1e-5)


@pytest.mark.slow
def test_training_a_bank_gives_each_adapter_its_own_gradient(setup):
  model, params, trees, ids = setup
  bank = jaxlora.stack(trees)
  rows = jnp.array([0, 2, 0, 1])
  fwd = jaxlora.apply(model.apply)
  labels = jnp.roll(ids, -1, axis=1)

  def row_loss(tree, x, y, **kw):  # summed over rows: each row's loss is its own
    logits = fwd({"params": tree}, x, **kw)
    return -jnp.sum(jnp.take_along_axis(jax.nn.log_softmax(logits), y[..., None], -1))

  train, frozen = jaxlora.split(bank.tree)
  g_bank = jax.grad(lambda t: row_loss(jaxlora.combine(t, frozen), ids, labels,
                                       adapter_ids=rows))(train)
  grads = jaxlora.unstack(jaxlora.Bank(jaxlora.combine(g_bank, frozen), bank.names,
                                       bank.max_rank, bank.entries))
  for k, name in enumerate(bank.names):
    sel = np.flatnonzero(np.asarray(rows) == k)
    t_k, f_k = jaxlora.split(trees[name])
    want = jax.grad(lambda t: row_loss(jaxlora.combine(t, f_k), ids[sel], labels[sel]))(t_k)
    got, _ = jaxlora.split(grads[name])
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
      np.testing.assert_allclose(np.asarray(g), np.asarray(w), atol=1e-5, rtol=1e-4)


def test_bad_input_names_the_adapter_layer_or_value(setup):
  model, params, trees, ids = setup
  other = Decoder(ModelConfig("llama", 64, 48, 2, 4, 2, 8, 64, 128, 1e-6, False))
  foreign = jaxlora.wrap(jaxlora.models.init(other, jax.random.key(0)), rank=2, layout=other,
                         key=jax.random.key(1))
  with pytest.raises(ValueError, match="adapter 'x' is on a different base than 'a'"):
    jaxlora.stack({"a": trees["a"], "x": foreign})
  bank = jaxlora.stack({"a": trees["a"], "b": trees["b"]})
  with pytest.raises(ValueError, match="out of range for a bank of 2"):
    jaxlora.apply(model.apply)({"params": bank.tree}, ids, adapter_ids=jnp.array([0, 1, 2, 0]))
  with pytest.raises(ValueError, match="no adapter named 'z'.*'a', 'b'"):
    bank.ids(["z"])
  with pytest.raises(ValueError, match="holds an adapter bank of 2 adapters: call with "
                                       "adapter_ids="):
    jaxlora.apply(model.apply)({"params": bank.tree}, ids)
  with pytest.raises(ValueError, match="the bank is full"):
    jaxlora.bank_set(bank, "c", trees["c"])
  with pytest.raises(ValueError, match="rank 4 at .* above the bank's max_rank=2"):
    jaxlora.bank_set(jaxlora.stack({"b": trees["b"]}, capacity=2), "a2",
                     _adapter(params, model, 5, rank=4, targets="attention"))
