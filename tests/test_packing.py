"""Packed rows (segment_ids): each packed example gives the logits of its own separate run."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxlora
from conftest import randomize_adapters

CONFIGS = {
    "gpt2": jaxlora.models.ModelConfig(
        "gpt2", vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=4, head_dim=8, intermediate_size=64, max_position_embeddings=32,
        norm_eps=1e-5, tie_word_embeddings=True),
    "llama": jaxlora.models.ModelConfig(
        "llama", vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, intermediate_size=64, max_position_embeddings=32,
        norm_eps=1e-6, tie_word_embeddings=False),
}


# GPT-2 (learned positions) in the full suite only: the fast tier keeps llama.
@pytest.mark.parametrize("name", [n if n == "llama" else pytest.param(n, marks=pytest.mark.slow)
                                  for n in sorted(CONFIGS)])
def test_packed_logits_equal_separate_runs(name):
  model = jaxlora.models.Decoder(CONFIGS[name])
  params = jax.jit(jaxlora.models.init, static_argnums=0)(model, jax.random.key(0))
  tree = jax.jit(lambda t: randomize_adapters(t, jax.random.key(2), scale=0.2))(
      jaxlora.wrap(params, rank=2, layout=model, key=jax.random.key(1)))
  fwd = jax.jit(jaxlora.apply(model.apply))
  rng = np.random.default_rng(0)
  lengths = [[5, 3, 4], [2, 9]]  # row 0 ends in 2 padding slots, row 1 in 3
  ids = rng.integers(1, 64, size=(2, 14)).astype(np.int32)
  seg = np.zeros((2, 14), np.int32)
  for r, lens in enumerate(lengths):
    start = 0
    for k, n in enumerate(lens):
      seg[r, start:start + n] = k + 1
      start += n
  packed = fwd({"params": tree}, jnp.asarray(ids), segment_ids=jnp.asarray(seg))
  # Each example alone in its own row (right-padded), all in one batch.
  pieces = [(r, start, n) for r, lens in enumerate(lengths)
            for start, n in zip(np.cumsum([0] + lens[:-1]), lens)]
  alone_ids = np.zeros((len(pieces), 9), np.int32)
  alone_mask = np.zeros((len(pieces), 9), np.int32)
  for i, (r, start, n) in enumerate(pieces):
    alone_ids[i, :n] = ids[r, start:start + n]
    alone_mask[i, :n] = 1
  alone = fwd({"params": tree}, jnp.asarray(alone_ids), attention_mask=jnp.asarray(alone_mask))
  for i, (r, start, n) in enumerate(pieces):
    np.testing.assert_allclose(packed[r, start:start + n], alone[i, :n], rtol=1e-5, atol=1e-5)


def test_segment_ids_errors():
  model = jaxlora.models.Decoder(CONFIGS["llama"])
  params = jax.jit(jaxlora.models.init, static_argnums=0)(model, jax.random.key(0))
  ids = jnp.ones((2, 4), jnp.int32)
  with pytest.raises(ValueError, match=r"segment_ids must be an integer array.*\(2, 4\)"):
    model.apply({"params": params}, ids, segment_ids=jnp.ones((2, 3), jnp.int32))
  with pytest.raises(ValueError, match="segment_ids must be an integer.*float32"):
    model.apply({"params": params}, ids, segment_ids=jnp.ones((2, 4), jnp.float32))
  cache = jaxlora.models.init_cache(CONFIGS["llama"], 2, 8)
  with pytest.raises(ValueError, match="KV cache"):
    model.apply({"params": params}, ids, segment_ids=jnp.ones((2, 4), jnp.int32), cache=cache)


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_chunked_cross_entropy_equals_full_loss_and_gradients(name):
  model = jaxlora.models.Decoder(CONFIGS[name])
  params = jax.jit(jaxlora.models.init, static_argnums=0)(model, jax.random.key(0))
  # Adapters everywhere, the untied head included: the chunked head must add its LoRA term.
  tree = jax.jit(lambda t: randomize_adapters(t, jax.random.key(2), scale=0.2))(
      jaxlora.wrap(params, rank=2, targets=".*", layout=model, key=jax.random.key(1)))
  trainable, frozen = jaxlora.split(tree)
  rng = np.random.default_rng(1)
  ids = jnp.asarray(rng.integers(0, 64, size=(2, 12)), jnp.int32)
  w = jnp.asarray(rng.integers(0, 2, size=(2, 11)), jnp.float32)
  fwd = jaxlora.apply(model.apply, check_reached=False)

  def full(t):
    logits = fwd({"params": jaxlora.combine(t, frozen)}, ids[:, :-1]).astype(jnp.float32)
    nll = -jnp.take_along_axis(jax.nn.log_softmax(logits), ids[:, 1:, None], -1)[..., 0]
    return jnp.sum(nll * w) / jnp.sum(w)

  def chunked(t):
    p = jaxlora.combine(t, frozen)
    h = fwd({"params": p}, ids[:, :-1], return_hidden=True)
    return jaxlora.models.chunked_cross_entropy(model, p, h, ids[:, 1:], w, chunk_size=4)

  (l1, g1), (l2, g2) = jax.jit(jax.value_and_grad(full))(trainable), jax.jit(
      jax.value_and_grad(chunked))(trainable)
  np.testing.assert_allclose(l2, l1, rtol=1e-6)
  for a, b in zip(jax.tree.leaves(g2), jax.tree.leaves(g1)):
    assert np.max(np.abs(a - b)) <= 1e-5 * np.max(np.abs(b))
