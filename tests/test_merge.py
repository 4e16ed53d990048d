"""merge, unmerge, adapter and summary against NumPy float64 references."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxlora
from conftest import f64, randomize_adapters
from models import MLP, EinsumNet, Stack

KEY = jax.random.key(0)


def _stack(dtype=jnp.float32):
  m = Stack()
  x = jnp.zeros((2, 5), jnp.int32)
  v = m.init(KEY, x)
  v = jax.tree.map(lambda a: a.astype(dtype), v)
  w = jaxlora.wrap(v, rank=3, alpha=6, key=KEY, layout=jaxlora.trace_layout(m.apply, v, x))
  return v, randomize_adapters(w, jax.random.key(1))


def test_merge_matches_numpy_float64_for_stacked_and_multi_axis_kernels():
  v, w = _stack()
  merged = jaxlora.merge(w)
  assert not any("lora" in str(p) for p, _ in jax.tree_util.tree_flatten_with_path(merged)[0])
  # layers/attn/o: kernel (L, heads, head_dim, d), A (L, heads, head_dim, r), B (L, r, d).
  o = jax.tree.map(f64, w["params"]["layers"]["attn"]["o"])
  ref = o["kernel"] + o["lora_scale"][:, None, None, None] * np.einsum(
      "lhdr,lre->lhde", o["lora_a"], o["lora_b"])
  np.testing.assert_allclose(merged["params"]["layers"]["attn"]["o"]["kernel"], ref,
                             rtol=1e-6, atol=1e-6)
  q = jax.tree.map(f64, w["params"]["layers"]["attn"]["q"])
  ref = q["kernel"] + 2.0 * np.einsum("ldr,lrhk->ldhk", q["lora_a"], q["lora_b"])
  np.testing.assert_allclose(merged["params"]["layers"]["attn"]["q"]["kernel"], ref,
                             rtol=1e-6, atol=1e-6)
  # Untouched leaves are passed through.
  assert merged["params"]["embed"]["embedding"] is v["params"]["embed"]["embedding"]


def test_merge_keeps_kernel_dtype_and_rounds_once():
  v, w = _stack(jnp.bfloat16)
  assert w["params"]["layers"]["up"]["lora_a"].dtype == jnp.float32
  merged = jaxlora.merge(w)
  k = merged["params"]["layers"]["up"]["kernel"]
  assert k.dtype == jnp.bfloat16
  up = jax.tree.map(f64, w["params"]["layers"]["up"])
  ref = up["kernel"] + 2.0 * np.einsum("lir,lro->lio", up["lora_a"], up["lora_b"])
  # One rounding of the float32 sum to bfloat16: within half a bf16 ulp of the true value.
  np.testing.assert_allclose(f64(k), ref, rtol=2 ** -8, atol=1e-6)


def test_merge_interleaved_einsum():
  m = EinsumNet()
  x = jnp.ones((1, 2, 6))
  v = m.init(KEY, x)
  w = randomize_adapters(
      jaxlora.wrap(v, rank=2, key=KEY, targets=".*", layout=jaxlora.trace_layout(m.apply, v, x)),
      jax.random.key(1))
  p = jax.tree.map(f64, w["params"]["interleaved"])  # kernel (n, f, h): out, in, out
  ref = p["kernel"] + p["lora_scale"] * np.einsum("fr,rnh->nfh", p["lora_a"], p["lora_b"])
  np.testing.assert_allclose(jaxlora.merge(w)["params"]["interleaved"]["kernel"], ref,
                             rtol=1e-6, atol=1e-6)


def test_unmerge_restores_the_wrapped_tree():
  _, w = _stack()
  back = jaxlora.unmerge(jaxlora.merge(w), jaxlora.adapter(w))
  assert jax.tree.structure(back) == jax.tree.structure(w)
  for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(w)):
    np.testing.assert_allclose(a, b, atol=1e-6)
  # A whole wrapped tree works as the adapter source too.
  back2 = jaxlora.unmerge(jaxlora.merge(w), w)
  for a, b in zip(jax.tree.leaves(back2), jax.tree.leaves(back)):
    np.testing.assert_array_equal(a, b)


def test_unmerge_with_mismatched_adapter():
  _, w = _stack()
  merged = jaxlora.merge(w)
  other = MLP().init(KEY, jnp.ones((1, 4)))["params"]
  with pytest.raises(ValueError, match="'fc1'.*no such module"):
    jaxlora.unmerge(merged, jaxlora.wrap(other, rank=2, key=KEY))
  ad = jaxlora.adapter(w)
  ad["params"]["layers"]["up"]["lora_a"] = jnp.zeros((3, 7, 3))
  with pytest.raises(ValueError, match=r"'layers/up' does not fit.*\(3, 8, 16\).*\(3, 7, 3\)"):
    jaxlora.unmerge(merged, ad)
  ad = jaxlora.adapter(w)
  ad["params"]["layers"]["up"]["lora_scale"] = jnp.ones((4,))
  with pytest.raises(ValueError, match="lora_scale"):
    jaxlora.unmerge(merged, ad)
  with pytest.raises(ValueError, match="already holds adapter"):
    jaxlora.unmerge(w, ad)
  with pytest.raises(ValueError, match="no adapter leaves"):
    jaxlora.unmerge(merged, merged)


def test_adapter_holds_only_adapter_leaves():
  _, w = _stack()
  ad = jaxlora.adapter(w)
  keys = {p[-1].key for p, _ in jax.tree_util.tree_flatten_with_path(ad)[0]}
  assert keys == {"lora_a", "lora_b", "lora_scale"}
  assert len(jax.tree.leaves(ad)) == 3 * 6


def test_summary_counts():
  v, w = _stack()
  s = jaxlora.summary(w)
  base = sum(x.size for x in jax.tree.leaves(v))
  trainable = sum(x.size for x in jax.tree.leaves(jaxlora.split(w)[0]))
  assert (s.trainable, s.total) == (trainable, base + trainable)
  up = [l for l in s.layers if l.path == "layers/up"][0]
  assert (up.rank, up.scale, up.alpha, up.kernel_shape) == (3, 2.0, 6.0, (3, 8, 16))
  text = str(s)
  assert "layers/up" in text and f"trainable {trainable:,} of {base + trainable:,}" in text
  abstract = jaxlora.summary(jax.eval_shape(lambda: w))  # no values: scale unknown
  assert abstract.trainable == trainable and abstract.layers[0].scale is None
