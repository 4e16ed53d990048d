"""jaxlora.loraplus against optax optimizers built and applied by hand, group by group."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxlora
import models
from jaxlora import _tree


def _tree_with_every_kind():
  """An MLP with LoRA on fc1/fc2, a DoRA-like magnitude on fc1 and the head trained in full."""
  params = models.MLP().init(jax.random.key(0), jnp.ones((1, 4)))["params"]
  tree = jaxlora.wrap(params, rank=2, targets=r"fc\d", key=jax.random.key(1))
  tree["fc1"] = dict(tree["fc1"], lora_magnitude=jnp.ones(16))
  tree["head"] = dict(tree["head"], **{_tree.EXTRA_KEY: jnp.zeros((), jnp.int8)})
  return tree


def _grads(tree, key):
  leaves, treedef = jax.tree.flatten(tree)
  keys = jax.random.split(key, len(leaves))
  return jax.tree.unflatten(treedef, [jax.random.normal(k, x.shape, jnp.float32).astype(x.dtype)
                                      if jnp.issubdtype(x.dtype, jnp.floating) else x
                                      for k, x in zip(keys, leaves)])


# PEFT's groups: lora_B and every trained vector at lr * ratio, lora_A and matrices at lr.
FAST = [("fc1", "lora_b"), ("fc2", "lora_b"), ("fc1", "lora_magnitude"), ("head", "bias")]
SLOW = [("fc1", "lora_a"), ("fc2", "lora_a"), ("head", "kernel")]


@pytest.mark.parametrize("lr", [2e-2, optax.linear_schedule(1e-2, 5e-2, 3)])
@pytest.mark.parametrize("how", ["full_tree", "inside_optimizer"])
def test_matches_two_optimizers_applied_by_hand(lr, how):
  tree = _tree_with_every_kind()
  ratio = 8.0
  if how == "full_tree":
    tx = jaxlora.loraplus(optax.adamw, lr, ratio, weight_decay=0.1)
  else:
    tx = jaxlora.optimizer(jaxlora.loraplus(optax.adamw, lr, ratio, weight_decay=0.1), tree)
  lr_b = (lambda n: ratio * lr(n)) if callable(lr) else ratio * lr
  ref_a, ref_b = optax.adamw(lr, weight_decay=0.1), optax.adamw(lr_b, weight_decay=0.1)
  pick = lambda t, keys: {f"{m}/{k}": t[m][k] for m, k in keys}
  ra, rb = pick(tree, SLOW), pick(tree, FAST)
  sa, sb, state = ref_a.init(ra), ref_b.init(rb), tx.init(tree)
  params = tree
  update = jax.jit(tx.update)
  for step in range(3):
    g = _grads(params, jax.random.key(10 + step))
    updates, state = update(g, state, params)
    params = optax.apply_updates(params, updates)
    ua, sa = ref_a.update(pick(g, SLOW), sa, ra)
    ra = optax.apply_updates(ra, ua)
    ub, sb = ref_b.update(pick(g, FAST), sb, rb)
    rb = optax.apply_updates(rb, ub)
  for name, want in {**ra, **rb}.items():
    m, k = name.split("/")
    np.testing.assert_allclose(params[m][k], want, rtol=1e-6, atol=1e-7, err_msg=name)
  # Frozen leaves, the scale and the marker included, are bit for bit what they were.
  for path in _tree.leaf_paths(_tree.frozen_leaves(tree)):
    np.testing.assert_array_equal(_tree.lookup(params, path), _tree.lookup(tree, path))
  assert float(jnp.abs(params["fc1"]["lora_b"]).max()) > 0


def test_stacked_vectors_need_the_full_tree():
  """A per-layer bias of a scanned stack is a (layers, d) array: the tree says it is a vector."""
  m = models.ScanDense()
  params = m.init(jax.random.key(0), jnp.ones((1, 6)))["params"]
  lay = jaxlora.trace_layout(m.apply, {"params": params}, jnp.ones((1, 6)))
  tree = jaxlora.wrap(params, rank=2, layout=lay, targets=".*")
  tree["layers"]["dense"][_tree.BIAS_KEY] = jnp.zeros((3,), jnp.int8)  # the bias trains too
  g = jax.tree.map(jnp.ones_like, tree)
  for given, bias_rate in ((tree, 4.0), (None, 1.0)):
    tx = jaxlora.optimizer(jaxlora.loraplus(optax.sgd, 1.0, 4.0, tree=given), tree)
    u, _ = tx.update(g, tx.init(tree), tree)
    d = u["layers"]["dense"]
    assert float(d["lora_a"][0, 0, 0]) == -1.0 and float(d["lora_b"][0, 0, 0]) == -4.0
    assert float(d["bias"][0, 0]) == -bias_rate
    assert not np.any(np.asarray(d["kernel"]))


def test_bad_arguments():
  with pytest.raises(jaxlora.errors.InputError, match="ratio"):
    jaxlora.loraplus(optax.adam, 1e-3, ratio=0)
  with pytest.raises(jaxlora.errors.InputTypeError, match="optax factory"):
    jaxlora.loraplus(optax.adam(1e-3), 1e-3)


def test_optimizer_state_shardings_follow_the_params():
  # optax.tree_map_params cannot run label functions; the state still follows its params.
  from jax.sharding import NamedSharding, PartitionSpec as P
  mesh = jaxlora.sharding.make_mesh(fsdp=-1)
  n = jax.device_count()
  kernel = jax.device_put(jnp.ones((4 * n, 6)), NamedSharding(mesh, P("fsdp", None)))
  tree = jaxlora.wrap({"d": {"kernel": kernel}}, rank=2)
  trainable, _ = jaxlora.split(tree)
  sh = jaxlora.split(jaxlora.sharding.tree_shardings(
      tree, {"d": {"kernel": kernel.sharding}}))[0]
  tx = optax.chain(optax.clip_by_global_norm(1.0), jaxlora.loraplus(optax.adamw, 1e-3, tree=tree))
  state_sh = jaxlora.sharding.opt_state_shardings(tx, trainable, sh, mesh)
  specs = {jax.tree_util.keystr(kp): s.spec for kp, s in jax.tree_util.tree_flatten_with_path(
      state_sh, is_leaf=lambda x: isinstance(x, NamedSharding))[0]}
  mu_a = [v for k, v in specs.items() if "mu" in k and "lora_a" in k]
  assert mu_a and all(v == P("fsdp", None) for v in mu_a)
  assert all(v == P() for k, v in specs.items() if "count" in k)
