import os
import sys

import jax
import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(__file__))

# The library must not rely on implicit rank broadcasting. (Strict dtype
# promotion is checked in test_forward; flax's own LayerNorm needs the default.)
jax.config.update("jax_numpy_rank_promotion", "raise")


@pytest.fixture
def rng():
  return np.random.default_rng(0)


def randomize_adapters(tree, key, scale=0.5):
  """Gives every lora_a/lora_b a random non-zero value (B starts at zero)."""
  leaves, treedef = jax.tree_util.tree_flatten_with_path(tree)
  keys = jax.random.split(key, len(leaves))
  out = []
  for k, (path, leaf) in zip(keys, leaves):
    name = getattr(path[-1], "key", None)
    if name in ("lora_a", "lora_b"):
      leaf = scale * jax.random.normal(k, leaf.shape, leaf.dtype)
    out.append(leaf)
  return jax.tree.unflatten(treedef, out)


def f64(x):
  return np.asarray(x, np.float64)
