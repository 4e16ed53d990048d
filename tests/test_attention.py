"""Every attention path's masking equals a float64 NumPy reference and the XLA path.

The Pallas kernels run in interpret mode on CPU; the cuDNN path's arguments
(compaction, per-row lengths, causal flag, window) run through
`jax.nn.dot_product_attention`'s XLA implementation ('cudnn-interpret').
"""

import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxlora
from jaxlora.models import Decoder, ModelConfig
from jaxlora.models import attention as attn

FAST = ("cudnn-interpret", "splash-interpret", "flash-interpret")


def reference(q, k, v, seg, window, scale):
  """float64 attention: causal, same segment, segment 0 never a key, optional window."""
  q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
  b, t, n, d = q.shape
  groups = n // k.shape[2]
  k, v = np.repeat(k, groups, axis=2), np.repeat(v, groups, axis=2)
  i, j = np.arange(t)[:, None], np.arange(t)[None, :]
  allowed = j <= i
  if window is not None:
    allowed &= i - j < window
  logits = np.einsum("bqnd,bknd->bnqk", q, k) * scale
  ok = allowed[None, None] & (seg[:, None, :, None] == seg[:, None, None, :]) \
      & (seg[:, None, None, :] > 0)
  logits = np.where(ok, logits, -np.inf)
  with np.errstate(invalid="ignore"):  # padding queries see no key: NaN rows, never compared
    p = np.exp(logits - logits.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
  return np.einsum("bnqk,bknd->bqnd", p, v)


def _inputs(t=40, n=4, kv=2, d=16, seed=0):
  ks = jax.random.split(jax.random.key(seed), 3)
  q = jax.random.normal(ks[0], (3, t, n, d))
  k = jax.random.normal(ks[1], (3, t, kv, d))
  v = jax.random.normal(ks[2], (3, t, kv, d))
  return q, k, v


def _layouts(t):
  right = np.r_[np.ones(t - 9), np.zeros(9)]
  left = np.r_[np.zeros(7), np.ones(t - 7)]
  holes = (np.arange(t) % 5 != 2).astype(float)
  packed = np.r_[np.full(11, 1), np.full(t - 20, 2), np.full(6, 3), np.zeros(3)]
  return {"padding": np.stack([right, left, holes]).astype(np.int32),
          "packed": np.stack([packed, np.r_[np.full(t // 2, 1), np.full(t - t // 2, 2)],
                              np.ones(t)]).astype(np.int32)}


def _ctx(impl, seg, window):
  t = seg.shape[1]
  if impl == "xla":
    return {"mask": attn.xla_mask(jnp.arange(t), jnp.arange(t), jnp.asarray(seg > 0), window,
                                  jnp.asarray(seg))}
  return {"segment_ids": jnp.asarray(seg)}


@pytest.mark.parametrize("impl", ["xla", "splash-interpret", "flash-interpret"])
@pytest.mark.parametrize("layout", ["padding", "packed"])
def test_attend_matches_float64_reference(impl, layout):
  q, k, v = _inputs()
  seg = _layouts(q.shape[1])[layout]
  out = attn.attend(q, k, v, _ctx(impl, seg, None), implementation=impl, scale=0.25)
  want = reference(q, k, v, seg, None, 0.25)
  real = seg > 0
  np.testing.assert_allclose(np.asarray(out)[real], want[real], atol=2e-6, rtol=1e-5)


@pytest.mark.parametrize("impl", ["xla", "cudnn-interpret", "splash-interpret"])
def test_sliding_window_matches_reference(impl):
  q, k, v = _inputs(t=36)
  seg = np.ones((3, 36), np.int32)
  ctx = {} if impl.startswith("cudnn") else _ctx(impl, seg, 5)
  out = attn.attend(q, k, v, ctx, implementation=impl, scale=0.25, window=5)
  np.testing.assert_allclose(np.asarray(out), reference(q, k, v, seg, 5, 0.25), atol=2e-6,
                             rtol=1e-5)


def test_cudnn_lengths_after_compaction_match_reference():
  q, k, v = _inputs()
  valid = _layouts(q.shape[1])["padding"]
  perm, inv, lengths = attn.compact(jnp.asarray(valid > 0))
  g = lambda x: attn.gather_rows(x, perm)
  out = attn.attend(g(q), g(k), g(v), {"lengths": lengths}, implementation="cudnn-interpret",
                    scale=0.25)
  out = np.asarray(attn.gather_rows(out, inv))
  real = valid > 0
  np.testing.assert_allclose(out[real], reference(q, k, v, valid, None, 0.25)[real],
                             atol=2e-6, rtol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("impl", ["flash-interpret"])  # splash's backward: its own kernel
def test_pallas_gradients_equal_xla(impl):
  q, k, v = _inputs(t=24, seed=1)
  seg = _layouts(24)["packed"]
  real = jnp.asarray(seg > 0)[..., None, None]
  loss = lambda i: lambda q, k, v: jnp.sum(jnp.sin(attn.attend(
      q, k, v, _ctx(i, seg, None), implementation=i, scale=0.25)) * real)
  want = jax.grad(loss("xla"), argnums=(0, 1, 2))(q, k, v)
  got = jax.grad(loss(impl), argnums=(0, 1, 2))(q, k, v)
  for g, w in zip(got, want):
    np.testing.assert_allclose(np.asarray(g), np.asarray(w), atol=1e-5, rtol=1e-4)


# --- the decoder on each path -------------------------------------------------------------

LLAMA = ModelConfig("llama", 64, 32, 2, 4, 2, 8, 64, 128, 1e-6, False)
MISTRAL = ModelConfig("mistral", 64, 32, 2, 4, 2, 8, 64, 128, 1e-6, False, sliding_window=4)
GPT2 = ModelConfig("gpt2", 64, 32, 2, 4, 4, 8, 128, 64, 1e-5, True, qkv_bias=True,
                   o_bias=True, mlp_bias=True, activation="gelu_new")


@pytest.fixture(scope="module")
def batch():
  ids = jax.random.randint(jax.random.key(1), (3, 12), 0, 64)
  mask = jnp.array([[1] * 12, [0] * 3 + [1] * 9, [1] * 7 + [0] * 5])
  seg = jnp.array([[1] * 5 + [2] * 7, [1] * 4 + [2] * 4 + [0] * 4, [3] * 12])
  return ids, mask, seg


# (config, inputs, paths): grouped heads on every path and input kind; the window on the
# paths that take one; GPT-2's learned positions through the cuDNN path's compaction.
DECODER_CASES = [
    ("llama", "padding", FAST), ("llama", "packed", FAST),
    ("mistral", "padding", ("cudnn-interpret", "splash-interpret")),
    ("gpt2", "padding", ("cudnn-interpret",)),
]


# Packed llama (every fast path) in the fast tier; the other cases in the full suite.
@pytest.mark.parametrize("name,inputs,paths", [
    c if c[:2] == ("llama", "packed") else pytest.param(*c, marks=pytest.mark.slow)
    for c in DECODER_CASES], ids=[f"{c[0]}-{c[1]}" for c in DECODER_CASES])
def test_decoder_paths_equal_xla(name, inputs, paths, batch):
  cfg = {"llama": LLAMA, "mistral": MISTRAL, "gpt2": GPT2}[name]
  ids, mask, seg = batch
  kw, real = (({"attention_mask": mask}, mask > 0) if inputs == "padding"
              else ({"segment_ids": seg}, seg > 0))
  params = jaxlora.models.init(Decoder(cfg), jax.random.key(0))
  run = lambda impl: jax.jit(Decoder(cfg, attention=impl).apply)({"params": params}, ids, **kw)
  want = run("xla")
  for impl in paths:
    err = float(jnp.max(jnp.abs(run(impl) - want) * real[..., None]))
    assert err < 1e-5, (impl, err)


def test_lora_gradients_on_fast_paths_equal_xla(batch):
  ids, mask, seg = batch
  model = Decoder(LLAMA)
  params = jaxlora.models.init(model, jax.random.key(0))
  tree = jaxlora.wrap(params, rank=2, layout=model, key=jax.random.key(3))
  tree = jax.tree.map(lambda x: x + 0.01, tree)  # B != 0, so every adapter gets a gradient
  train, frozen = jaxlora.split(tree)

  def grads(impl, **kw):
    fwd = jaxlora.apply(Decoder(LLAMA, attention=impl).apply)
    real = kw.get("attention_mask", kw.get("segment_ids", jnp.ones_like(ids)) > 0)
    loss = lambda t: jnp.sum(jnp.tanh(fwd({"params": jaxlora.combine(t, frozen)}, ids, **kw))
                             * real[..., None])
    return jax.jit(jax.grad(loss))(train)

  # The cuDNN path's compaction (left padding) under LoRA; the Pallas kernels' own gradients
  # are checked against XLA in test_pallas_gradients_equal_xla.
  for impl, kw in (("cudnn-interpret", {"attention_mask": mask}),):
    want, got = grads("xla", **kw), grads(impl, **kw)
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
      np.testing.assert_allclose(np.asarray(g), np.asarray(w), atol=2e-5, rtol=1e-4)


def test_generate_falls_back_to_xla_with_a_logged_reason(batch, caplog):
  ids, mask, _ = batch
  params = jaxlora.models.init(Decoder(LLAMA), jax.random.key(0))
  want = jaxlora.generate(Decoder(LLAMA), params, ids, attention_mask=mask, max_new_tokens=3)
  with caplog.at_level(logging.WARNING, logger="jaxlora"):
    got = jaxlora.generate(Decoder(LLAMA, attention="flash-interpret"), params, ids,
                           attention_mask=mask, max_new_tokens=3)
  np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
  assert "KV-cache decoding uses the XLA path" in caplog.text


# --- choosing a path ----------------------------------------------------------------------

@pytest.mark.parametrize("name", ["cudnn", "splash", "flash"])
def test_explicit_choice_the_platform_cannot_run_is_an_error(name):
  with pytest.raises(ValueError, match=f"attention='{name}' needs .* runs on cpu"):
    attn.resolve(name, backend="cpu")
  if jax.default_backend() == "cpu":
    with pytest.raises(ValueError, match=f"attention='{name}' needs"):
      Decoder(LLAMA, attention=name).init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32))


def test_unknown_choice_names_the_value():
  with pytest.raises(ValueError, match="attention='fast' is not an attention implementation"):
    attn.resolve("fast")


def test_auto_and_fallbacks_per_platform():
  kw = dict(cache=False, window=None, dtype=jnp.bfloat16, head_dim=64)
  assert attn.plan("auto", packed=False, backend="nvidia", **kw) == attn.Plan("cudnn")
  assert attn.plan("auto", packed=True, backend="nvidia", **kw) == attn.Plan("flash")
  assert attn.plan("auto", packed=True, backend="tpu", **kw) == attn.Plan("splash")
  assert attn.plan("auto", packed=True, backend="cpu", **kw) == attn.Plan("xla")
  p = attn.plan("cudnn", packed=True, backend="nvidia", **kw)
  assert p.implementation == "xla" and "segment ids" in p.reason
  p = attn.plan("flash", packed=False, backend="nvidia", **{**kw, "window": 8})
  assert p.implementation == "xla" and "sliding window" in p.reason
  p = attn.plan("splash", packed=True, backend="tpu", **{**kw, "window": 8})
  assert p == attn.Plan("splash")
  p = attn.plan("cudnn", packed=False, backend="nvidia", **{**kw, "dtype": jnp.float32})
  assert p.implementation == "xla" and "float32" in p.reason
  p = attn.plan("splash", packed=False, backend="tpu", **{**kw, "cache": True})
  assert p.implementation == "xla" and "KV-cache" in p.reason


def test_pallas_kernels_run_per_shard_under_a_mesh(batch):
  ids, _, seg = batch
  mesh = jaxlora.sharding.make_mesh(fsdp=-1, tensor=2)  # 4 x 2 of the 8 host devices
  ids, seg = jnp.tile(ids, (4, 1))[:8], jnp.tile(seg, (4, 1))[:8]
  params = jaxlora.models.init(Decoder(LLAMA), jax.random.key(0))
  want = Decoder(LLAMA).apply({"params": params}, ids, segment_ids=seg)
  fn = jax.jit(lambda p, i, s: Decoder(LLAMA, attention="flash-interpret").apply(
      {"params": p}, i, segment_ids=s))
  with jax.set_mesh(mesh):
    hlo = fn.lower(params, ids, seg).as_text()
    assert "manual_computation" in hlo  # the kernel runs per shard, not on a gathered batch
    got = fn(params, ids, seg)
  err = float(jnp.max(jnp.abs(got - want) * (seg > 0)[..., None]))
  assert err < 1e-5, err
