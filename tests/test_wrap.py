"""wrap: shapes, initialisation, selection, per-layer hyperparameters and errors."""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxlora
from models import MLP, Attention, EinsumNet, Stack

KEY = jax.random.key(0)


def _mlp_params(hidden=16):
  return MLP(hidden=hidden).init(KEY, jnp.ones((1, 4)))["params"]


def _stack():
  m = Stack()
  x = jnp.zeros((2, 5), jnp.int32)
  v = m.init(KEY, x)
  return m, v, x, jaxlora.trace_layout(m.apply, v, x)


def test_shapes_and_init_match_peft_defaults():
  p = MLP(hidden=256).init(KEY, jnp.ones((1, 512)))["params"]
  w = jaxlora.wrap(p, rank=8, targets="fc2", key=KEY)
  m = w["fc2"]
  assert m["lora_a"].shape == (256, 8) and m["lora_b"].shape == (8, 256)
  assert m["lora_scale"].shape == () and float(m["lora_scale"]) == 1.0  # alpha defaults to rank
  np.testing.assert_array_equal(m["lora_b"], 0.0)
  # Kaiming-uniform with a=sqrt(5) on [r, in]: U(-1/sqrt(in), 1/sqrt(in)).
  a = np.asarray(m["lora_a"])
  bound = 1 / math.sqrt(256)
  assert np.abs(a).max() <= bound and np.abs(a).max() > 0.9 * bound
  assert abs(a.std() - bound / math.sqrt(3)) < 0.1 * bound
  g = jaxlora.wrap(p, rank=8, targets="fc2", key=KEY, init="gaussian")["fc2"]["lora_a"]
  assert abs(float(jnp.std(g)) - 1 / 8) < 0.01
  # Base leaves are the very same arrays.
  assert w["fc2"]["kernel"] is p["fc2"]["kernel"] and w["head"]["kernel"] is p["head"]["kernel"]


def test_all_linear_skips_head_and_embeddings():
  _, v, _, lay = _stack()
  w = jaxlora.wrap(v, rank=2, key=KEY, layout=lay)
  paths = [l.path for l in jaxlora.summary(w).layers]
  assert paths == ["layers/attn/k", "layers/attn/o", "layers/attn/q", "layers/attn/v",
                   "layers/down", "layers/up"]
  assert "lora_a" not in w["params"]["lm_head"] and "lora_a" not in w["params"]["embed"]
  # Without a layout, 2-D kernels are Dense layers and a head named like one is skipped.
  w2 = jaxlora.wrap(_mlp_params(), rank=2, key=KEY)
  assert [l.path for l in jaxlora.summary(w2).layers] == ["fc1", "fc2"]


def test_head_found_by_tracing_even_with_an_unusual_name():
  class Net(nn.Module):
    @nn.compact
    def __call__(self, x):
      return nn.Dense(3, name="readout")(nn.Dense(8, name="body")(x))

  x = jnp.ones((1, 4))
  v = Net().init(KEY, x)
  lay = jaxlora.trace_layout(Net().apply, v, x)
  assert lay["readout"].is_head and not lay["body"].is_head
  w = jaxlora.wrap(v, rank=2, key=KEY, layout=lay)
  assert [l.path for l in jaxlora.summary(w).layers] == ["body"]


def test_target_language_regex_callable_tuple_exclude():
  p = _mlp_params()
  names = lambda t: [l.path for l in jaxlora.summary(t).layers]
  assert names(jaxlora.wrap(p, rank=2, key=KEY, targets=r"fc1$")) == ["fc1"]
  assert names(jaxlora.wrap(p, rank=2, key=KEY, targets=lambda path, k: k.shape[1] == 5)) == ["head"]
  assert names(jaxlora.wrap(p, rank=2, key=KEY, targets=("fc1", lambda path, k: path == "head"))) \
      == ["fc1", "head"]
  assert names(jaxlora.wrap(p, rank=2, key=KEY, targets=".*", exclude="fc")) == ["head"]


def test_variables_and_params_forms():
  v = MLP().init(KEY, jnp.ones((1, 4)))
  v = {**v, "batch_stats": {"x": jnp.ones(3)}}
  w = jaxlora.wrap(v, rank=2, key=KEY)
  assert set(w) == {"params", "batch_stats"} and w["batch_stats"] is v["batch_stats"]
  w2 = jaxlora.wrap(v["params"], rank=2, key=KEY)
  for a, b in zip(jax.tree.leaves(w["params"]), jax.tree.leaves(w2)):
    np.testing.assert_array_equal(a, b)


def test_rank_alpha_patterns_and_rslora():
  m, v, x, lay = _stack()
  w = jaxlora.wrap(v, rank=4, alpha=8, key=KEY, layout=lay,
                   rank_pattern={r"attn/(q|v)$": 2, "up": 1}, alpha_pattern={"down": 3.0})
  by = {l.path: l for l in jaxlora.summary(w).layers}
  assert by["layers/attn/q"].rank == 2 and by["layers/attn/q"].scale == 4.0
  assert by["layers/attn/k"].rank == 4 and by["layers/attn/k"].scale == 2.0
  assert by["layers/up"].rank == 1 and by["layers/up"].scale == 8.0
  assert by["layers/down"].rank == 4 and by["layers/down"].scale == 0.75
  assert w["params"]["layers"]["attn"]["q"]["lora_a"].shape == (3, 8, 2)
  assert w["params"]["layers"]["attn"]["o"]["lora_a"].shape == (3, 2, 4, 4)
  assert w["params"]["layers"]["attn"]["o"]["lora_b"].shape == (3, 4, 8)
  np.testing.assert_array_equal(w["params"]["layers"]["up"]["lora_scale"], np.full(3, 8.0))
  rs = jaxlora.wrap(v, rank=16, alpha=8, key=KEY, layout=lay, use_rslora=True, targets="up",
                    rank_pattern={"up": 4})
  assert float(rs["params"]["layers"]["up"]["lora_scale"][0]) == 8 / math.sqrt(4)


def test_works_under_eval_shape_and_jit():
  m, v, x, lay = _stack()
  abstract = jax.eval_shape(lambda v: jaxlora.wrap(v, rank=2, key=KEY, layout=lay), v)
  concrete = jaxlora.wrap(v, rank=2, key=KEY, layout=lay)
  assert jax.tree.map(lambda a: (a.shape, a.dtype), abstract) == \
      jax.tree.map(lambda a: (a.shape, a.dtype), concrete)
  # Layout from abstract inputs too.
  lay2 = jaxlora.trace_layout(m.apply, jax.eval_shape(lambda: v),
                              jax.ShapeDtypeStruct(x.shape, x.dtype))
  assert lay2 == lay
  jitted = jax.jit(lambda v, k: jaxlora.wrap(v, rank=2, key=k, layout=lay))(v, KEY)
  for a, b in zip(jax.tree.leaves(jitted), jax.tree.leaves(concrete)):
    np.testing.assert_array_equal(a, b)


def test_dtype_option():
  w = jaxlora.wrap(_mlp_params(), rank=2, key=KEY, dtype=jnp.bfloat16)
  assert w["fc1"]["lora_a"].dtype == jnp.bfloat16 and w["fc1"]["lora_scale"].dtype == jnp.float32


@pytest.mark.parametrize("rank", [0, -3, 2.5, True])
def test_bad_rank(rank):
  with pytest.raises(ValueError, match="positive integer"):
    jaxlora.wrap(_mlp_params(), rank=rank, key=KEY)


def test_rank_larger_than_kernel():
  with pytest.raises(ValueError, match=r"rank 5 for 'fc1'.*\(4, 16\).*at most 4.*rank_pattern"):
    jaxlora.wrap(_mlp_params(), rank=5, key=KEY, targets="fc1")
  with pytest.raises(ValueError, match="rank for 'fc2'"):
    jaxlora.wrap(_mlp_params(), rank=2, key=KEY, rank_pattern={"fc2": 0})


def test_targets_matching_nothing_lists_paths():
  with pytest.raises(ValueError, match=r"matched no kernel.*'fc1', 'fc2', 'head'"):
    jaxlora.wrap(_mlp_params(), rank=2, key=KEY, targets="attention")
  with pytest.raises(ValueError, match="matched no kernel"):
    jaxlora.wrap(_mlp_params(), rank=2, key=KEY, targets=".*", exclude=".*")
  with pytest.raises(ValueError, match="valid regular expression"):
    jaxlora.wrap(_mlp_params(), rank=2, key=KEY, targets="(")
  with pytest.raises(TypeError, match="targets"):
    jaxlora.wrap(_mlp_params(), rank=2, key=KEY, targets=3)


def test_already_wrapped():
  w = jaxlora.wrap(_mlp_params(), rank=2, key=KEY)
  with pytest.raises(ValueError, match="already wrapped.*'fc1'.*merge"):
    jaxlora.wrap(w, rank=2, key=KEY)


def test_nd_kernel_without_layout():
  _, v, _, _ = _stack()
  with pytest.raises(ValueError,
                     match=r"layers/attn/k/kernel' has 4 axes.*layout=jaxlora.trace_layout"):
    jaxlora.wrap(v, rank=2, key=KEY)
  x = jnp.ones((1, 5, 6))
  a = Attention().init(KEY, x)
  with pytest.raises(ValueError, match="cannot be read from the tree"):
    jaxlora.wrap(a, rank=2, key=KEY, targets="q")


def test_layout_from_another_model():
  _, v, _, _ = _stack()
  m = Stack(layers=2)
  x = jnp.zeros((2, 5), jnp.int32)
  other = m.init(KEY, x)
  lay = jaxlora.trace_layout(m.apply, other, x)
  w = jaxlora.wrap(v, rank=2, key=KEY, layout=lay)  # same axes, more layers: fine
  assert w["params"]["layers"]["up"]["lora_a"].shape == (3, 8, 2)
  einsum_lay = jaxlora.trace_layout(EinsumNet().apply, EinsumNet().init(KEY, jnp.ones((1, 2, 6))),
                                    jnp.ones((1, 2, 6)))
  with pytest.raises(ValueError, match="was not used"):
    jaxlora.wrap(v, rank=2, key=KEY, layout=einsum_lay, targets="up")


def test_ambiguous_interleaved_einsum_is_refused():
  x = jnp.ones((1, 4))
  m = nn.Einsum((4, 4), "bi,oi->bo")  # output axis first, square: A/B shapes cannot tell
  v = m.init(KEY, x)
  with pytest.raises(ValueError, match="interleave"):
    jaxlora.wrap(v, rank=2, key=KEY, targets=".*", layout=jaxlora.trace_layout(m.apply, v, x))
  # Non-square: the shapes identify the axes, so it is accepted and merges correctly.
  x = jnp.ones((1, 6))
  m = nn.Einsum((4, 6), "bi,oi->bo")
  v = m.init(KEY, x)
  w = jaxlora.wrap(v, rank=2, key=KEY, targets=".*", layout=jaxlora.trace_layout(m.apply, v, x))
  w["params"]["lora_b"] = jnp.ones_like(w["params"]["lora_b"])
  np.testing.assert_allclose(jaxlora.apply(m.apply)(w, x), m.apply(jaxlora.merge(w), x),
                             rtol=1e-5)


def test_key_defaults_to_a_fixed_key_and_init_checked():
  # The card's own call works, reproducibly, and is the same as key=jax.random.key(0).
  params = _mlp_params()
  a, b = jaxlora.wrap(params, rank=4), jaxlora.wrap(params, rank=4)
  explicit = jaxlora.wrap(params, rank=4, key=jax.random.key(0))
  other = jaxlora.wrap(params, rank=4, key=jax.random.key(1))
  assert jax.tree.all(jax.tree.map(lambda x, y: bool(jnp.array_equal(x, y)), a, b))
  assert jax.tree.all(jax.tree.map(lambda x, y: bool(jnp.array_equal(x, y)), a, explicit))
  assert not np.array_equal(a["fc2"]["lora_a"], other["fc2"]["lora_a"])
  with pytest.raises(ValueError, match="init"):
    jaxlora.wrap(_mlp_params(), rank=2, key=KEY, init="xavier")
