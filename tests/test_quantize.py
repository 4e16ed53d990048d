"""Quantized bases (QLoRA): storage against bitsandbytes, the forward pass against plain flax on the
dequantized tree, and the tree plumbing (split, jit, Orbax, shardings, merge, generate)."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import optax
import pytest

import jaxlora
from conftest import randomize_adapters
from jaxlora import quantization as Q
from models import MLP, Attention, EinsumNet, Stack

torch = pytest.importorskip("torch")
bnbf = pytest.importorskip("bitsandbytes.functional")

# bitsandbytes' portable kernels (the reference implementation its backends share). Its native CPU
# kernels are reached through the ordinary calls; they are compared where they are right.
_PORTABLE = torch._C.DispatchKeySet(torch._C.DispatchKey.CompositeExplicitAutograd)
_ops = torch.ops.bitsandbytes


def _bnb_reference(w_torch, qtype, block_size, double_quant, offset=None):
  """bitsandbytes' quantization of a PyTorch (out, in) weight and its dequantization."""
  packed, absmax = _ops.quantize_4bit.default.redispatch(_PORTABLE, w_torch, block_size, qtype,
                                                         torch.uint8)
  out = {"packed": packed.numpy().reshape(-1), "absmax": absmax.numpy()}
  full_absmax = absmax
  if double_quant:
    off = absmax.mean() if offset is None else torch.tensor(offset)
    dmap = bnbf.create_dynamic_map(signed=True)
    codes, nested = _ops.quantize_blockwise.default.redispatch(_PORTABLE, absmax - off, dmap, 256)
    full_absmax = _ops.dequantize_blockwise.default.redispatch(
        _PORTABLE, codes, nested, dmap, 256, torch.float32) + off
    out.update(absmax=codes.numpy(), nested_absmax=nested.numpy(), offset=float(off))
  out["dequantized"] = _ops.dequantize_4bit.default.redispatch(
      _PORTABLE, packed, full_absmax, block_size, qtype, tuple(w_torch.shape), w_torch.dtype)
  return out


def _flax_kernel(w_torch):
  w = w_torch.float().numpy().T
  return w.astype(ml_dtypes.bfloat16) if w_torch.dtype == torch.bfloat16 else w


def test_code_tables_are_bitsandbytes():
  from bitsandbytes.backends.utils import _get_4bit_code
  np.testing.assert_array_equal(Q.NF4_CODE, _get_4bit_code("nf4", "cpu").numpy())
  np.testing.assert_array_equal(Q.FP4_CODE, _get_4bit_code("fp4", "cpu").numpy())
  np.testing.assert_array_equal(Q.DYNAMIC_CODE, bnbf.create_dynamic_map(signed=True).numpy())


# Sizes (out x in) that are and are not multiples of 64 (blocks straddle rows, a partial last
# block) and of 64 x 256 (a partial double-quantization group).
SHAPES = [(40, 70), (33, 129), (300, 257), (128, 256), (8, 32)]


@pytest.mark.parametrize("qtype", ["nf4", "fp4"])
@pytest.mark.parametrize("double_quant", [False, True])
def test_4bit_bit_exact_with_bitsandbytes(qtype, double_quant):
  rng = np.random.default_rng(0)
  for i, shape in enumerate(SHAPES):
    dt = torch.bfloat16 if i % 2 else torch.float32
    w = torch.from_numpy(rng.standard_normal(shape).astype(np.float32) * 0.3).to(dt)
    q = Q.quantize_array(_flax_kernel(w), qtype, double_quant=double_quant)
    # The float32 offset is a mean: jaxlora's is correctly rounded, torch's sum order varies.
    ref = _bnb_reference(w, qtype, 64, double_quant,
                         offset=float(q.offset) if double_quant else None)
    np.testing.assert_array_equal(q.packed, ref["packed"], err_msg=str(shape))
    np.testing.assert_array_equal(q.absmax, ref["absmax"], err_msg=str(shape))
    if double_quant:
      np.testing.assert_array_equal(q.nested_absmax, ref["nested_absmax"])
      bnb_offset = float(_ops.quantize_4bit.default.redispatch(
          _PORTABLE, w, 64, qtype, torch.uint8)[1].mean())
      assert abs(float(q.offset) - bnb_offset) <= 2 * np.spacing(np.float32(bnb_offset))
    ours = np.asarray(Q.dequantize_array(q)).T
    assert ours.dtype == _flax_kernel(w).dtype
    np.testing.assert_array_equal(ours.astype(np.float32), ref["dequantized"].float().numpy(),
                                  err_msg=str(shape))


def test_dequantize_equals_bitsandbytes_functional_on_its_own_quantization():
  """bitsandbytes' public quantize_4bit/dequantize_4bit (native CPU kernels), read into records."""
  rng = np.random.default_rng(1)
  for shape, qtype, dq in [((64, 128), "nf4", True), ((96, 256), "fp4", False),
                           ((300, 512), "nf4", True)]:
    w = torch.from_numpy(rng.standard_normal(shape).astype(np.float32))
    packed, st = bnbf.quantize_4bit(w, blocksize=64, compress_statistics=dq, quant_type=qtype)
    ref = bnbf.dequantize_4bit(packed, st).numpy()
    fields = {"packed": packed.numpy().reshape(-1), "quant_map": st.code.numpy(),
              "absmax": st.absmax.numpy()}
    if dq:
      fields.update(nested_absmax=st.state2.absmax.numpy(), nested_quant_map=st.state2.code.numpy(),
                    offset=np.float32(st.offset))
    q = Q.QuantizedArray(qtype=qtype, layer_shape=shape[::-1], n_in=1, dtype=np.float32,
                         block_size=64, **fields)
    np.testing.assert_array_equal(np.asarray(Q.dequantize_array(q)).T, ref)
    if dq:  # bnb's native CPU search of the 8-bit map is approximate: where it picks another
      # code than jaxlora (the nearest, as bnb's portable kernel), jaxlora's is nearer.
      _, absmax = _ops.quantize_4bit.default.redispatch(_PORTABLE, w, 64, qtype, torch.uint8)
      x = absmax.numpy() - np.float32(st.offset)
      codes, nested = Q._quantize_8bit_dynamic(x, 256)
      np.testing.assert_array_equal(nested, st.state2.absmax.numpy())
      normed = x / np.repeat(nested, 256)[:x.size]
      theirs = st.absmax.numpy()
      err = lambda c: np.abs(normed - Q.DYNAMIC_CODE[c])
      assert np.all(err(codes) <= err(theirs)) and np.mean(codes != theirs) < 0.01


def test_int8_matches_bitsandbytes_vectorwise():
  rng = np.random.default_rng(2)
  w = torch.from_numpy(rng.standard_normal((24, 40)).astype(np.float32))
  codes, stats, _ = bnbf.int8_vectorwise_quant(w.clone())
  q = Q.quantize_array(w.numpy().T, "int8")
  np.testing.assert_array_equal(q.packed, codes.numpy().T)
  np.testing.assert_array_equal(q.absmax, stats.numpy())
  np.testing.assert_array_equal(np.asarray(Q.dequantize_array(q)).T,
                                bnbf.int8_vectorwise_dequant(codes, stats).numpy())


def test_storage_bits_and_abstract_records():
  w = np.random.default_rng(3).standard_normal((4096, 256)).astype(np.float32)
  q = jaxlora.quantize({"d": {"kernel": w}}, "nf4")
  assert abs(Q.bits_per_parameter(q) - 4.127) < 1e-3
  assert Q.bits_per_parameter(jaxlora.quantize({"d": {"kernel": w}}, "nf4",
                                               double_quant=False)) == 4.5
  a = jaxlora.quantize({"d": {"kernel": jax.ShapeDtypeStruct(w.shape, w.dtype)}}, "nf4")
  shapes = lambda t: [(x.shape, x.dtype) for x in jax.tree.leaves(t)]
  assert shapes(a) == shapes(q)


def _quantized_case(model, x, targets="all-linear", exclude=None, qtype="nf4", block_size=64):
  v = jax.jit(model.init)(jax.random.key(0), x)
  lay = jaxlora.trace_layout(model.apply, v, x)
  q = jaxlora.quantize(v, qtype, targets=targets, exclude=exclude, layout=lay,
                       block_size=block_size)
  w = jaxlora.wrap(q, rank=2, targets=".*", key=jax.random.key(1), layout=lay)
  return jax.jit(randomize_adapters)(w, jax.random.key(2))


CASES = {
    "dense": (MLP(hidden=64), lambda: jnp.ones((3, 4)) * 0.3, {}),
    "dense_general": (Attention(), lambda: jnp.linspace(-1, 1, 60).reshape(2, 5, 6), {}),
    # per-head ("batch" letter) and interleaved kernels do not map to bnb's layout: kept float
    "einsum": (EinsumNet(), lambda: jnp.linspace(-1, 1, 36).reshape(2, 3, 6),
               {"exclude": "per_head|interleaved"}),
    "scan_remat": (Stack(), lambda: jnp.arange(10).reshape(2, 5) % 11, {}),
}


# Dense (nf4) and DenseGeneral (int8) in the fast tier; the other kernels in the full suite.
@pytest.mark.parametrize("name,qtype", [(n, "nf4") if n == "dense" else
                                        pytest.param(n, "nf4", marks=pytest.mark.slow)
                                        for n in sorted(CASES)]
                         + [("dense_general", "int8")])
def test_forward_and_grads_equal_the_dequantized_float_tree(name, qtype):
  model, make_x, kw = CASES[name]
  x = make_x()
  tree = _quantized_case(model, x, qtype=qtype, block_size=8, **kw)
  assert Q.records(tree)
  floats = jaxlora.dequantize(tree)
  fwd = jaxlora.apply(model.apply)
  y = jax.jit(fwd)(tree, x)
  ref = jax.jit(fwd)(floats, x)
  assert np.max(np.abs(y - ref)) <= 1e-5 * np.max(np.abs(ref))

  trainable, frozen = jaxlora.split(tree)
  assert not any(Q.is_quantized(l) for l in jax.tree.leaves(trainable, is_leaf=Q.is_quantized))
  loss = lambda t, f: jnp.sum(jnp.sin(fwd(jaxlora.combine(t, f), x)))
  g = jax.jit(jax.grad(loss))(trainable, frozen)
  _, f_frozen = jaxlora.split(floats)
  g_ref = jax.jit(jax.grad(loss))(trainable, f_frozen)
  assert jax.tree.structure(g) == jax.tree.structure(trainable)
  for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(g_ref)):
    assert np.max(np.abs(a - b)) <= 1e-4 * np.max(np.abs(b))  # float32, other fusions


def test_plain_flax_on_dequantized_kernels_matches_interceptor():
  model = MLP(hidden=64)
  x = jnp.linspace(-1, 1, 12).reshape(3, 4)
  v = model.init(jax.random.key(0), x)
  q = jaxlora.quantize(v, "fp4", targets=".*", block_size=16)
  y = jaxlora.apply(model.apply)(q, x)
  np.testing.assert_array_equal(y, model.apply(jaxlora.dequantize(q), x))


LLAMA = jaxlora.models.ModelConfig(
    "llama", vocab_size=96, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, head_dim=16, intermediate_size=128, max_position_embeddings=64,
    norm_eps=1e-6, tie_word_embeddings=False, eos_token_id=None)


@pytest.fixture(scope="module")
def llama():
  model = jaxlora.models.Decoder(LLAMA)
  params = jax.jit(jaxlora.models.init, static_argnums=0)(model, jax.random.key(0))
  q = jaxlora.quantize(params, "nf4", layout=model)
  tree = jax.jit(lambda t: randomize_adapters(t, jax.random.key(2), scale=0.1))(
      jaxlora.wrap(q, rank=4, layout=model, key=jax.random.key(1)))
  return model, params, q, tree


def test_decoder_defaults_leave_head_and_embeddings_float(llama):
  model, params, q, tree = llama
  assert sorted(Q.records(q)) == sorted(
      f"layers/{m}" for m in ("self_attn/q_proj", "self_attn/k_proj", "self_attn/v_proj",
                              "self_attn/o_proj", "mlp/gate_proj", "mlp/up_proj",
                              "mlp/down_proj"))
  assert q["lm_head"]["kernel"].dtype == jnp.float32 and not Q.is_quantized(q["lm_head"]["kernel"])
  assert not Q.is_quantized(q["embed_tokens"]["embedding"])


@pytest.mark.slow
def test_generate_and_merge_on_a_quantized_base(llama):
  model, params, q, tree = llama
  ids = jnp.asarray([[0, 0, 5, 6, 7], [1, 2, 3, 4, 5]], jnp.int32)
  mask = jnp.asarray([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]], jnp.int32)
  floats = jaxlora.dequantize(tree)
  out = jaxlora.generate(model, tree, ids, attention_mask=mask, max_new_tokens=4)
  np.testing.assert_array_equal(
      out, jaxlora.generate(model, floats, ids, attention_mask=mask, max_new_tokens=4))
  merged = jaxlora.merge(tree)
  assert not Q.records(merged) and not jaxlora.quantization.records(jaxlora.merge(q_only(q)))
  fwd = jaxlora.apply(model.apply)
  np.testing.assert_allclose(model.apply({"params": merged}, ids), fwd({"params": tree}, ids),
                             rtol=1e-5, atol=1e-5)
  requant = jaxlora.merge(tree, requantize=True)
  assert sorted(Q.records(requant)) == sorted(Q.records(q))
  k = Q.records(requant)["layers/mlp/up_proj"]
  assert (k.qtype, k.block_size, k.double_quant, k.shape) == ("nf4", 64, True, (2, 64, 128))
  np.testing.assert_array_equal(
      Q.dequantize_array(k),
      Q.dequantize_array(Q.quantize_array(merged["layers"]["mlp"]["up_proj"]["kernel"], "nf4",
                                          n_stack=1)))


def q_only(q):
  """A wrapped tree whose adapters cover one layer: merge must still dequantize the others."""
  return jaxlora.wrap(q, rank=2, targets="up_proj", layout=jaxlora.models.Decoder(LLAMA),
                      key=jax.random.key(5))


def test_orbax_round_trip_and_abstract_restore(llama, tmp_path):
  import orbax.checkpoint as ocp
  model, params, q, tree = llama
  with ocp.StandardCheckpointer() as ck:
    ck.save(tmp_path / "q", q)
    ck.wait_until_finished()
    abstract = jaxlora.quantize(jax.eval_shape(lambda: params), "nf4", layout=model)
    back = ck.restore(tmp_path / "q", abstract)
  assert jax.tree.structure(back) == jax.tree.structure(q)
  for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(q)):
    np.testing.assert_array_equal(a, b)
  assert repr(Q.records(back)["layers/mlp/up_proj"]) == repr(Q.records(q)["layers/mlp/up_proj"])


@pytest.mark.slow
@pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 (simulated) devices, as in CI")
def test_sharded_records_memory_plan_and_training_step(llama):
  model, params, q, tree = llama
  mesh = jaxlora.sharding.make_mesh(fsdp=-1)
  sh = jaxlora.sharding.param_shardings(model, mesh)
  qs = jaxlora.quantize(jax.device_put(params, sh), "nf4", layout=model)
  rec = Q.records(qs)["layers/mlp/down_proj"]
  assert rec.packed.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp")
  assert rec.packed.addressable_shards[0].data.shape == (2, 64 * 128 // 2 // 8)
  # The plan's per-device bytes, from shapes alone, equal the bytes the shards hold.
  plan = jaxlora.sharding.memory_plan(model, mesh, rank=4, quantize="nf4")
  held = sum(x.addressable_shards[0].data.nbytes for x in jax.tree.leaves(qs))
  assert plan["base"] == held
  assert plan["base"] < jaxlora.sharding.memory_plan(model, mesh, rank=4)["base"]
  # A jitted step on the sharded quantized base gives the single-device result.
  t = jaxlora.wrap(qs, rank=4, layout=model, key=jax.random.key(1))
  t = randomize_adapters(t, jax.random.key(2), scale=0.1)
  tsh = jaxlora.sharding.tree_shardings(t, sh)
  t = jax.device_put(t, tsh)
  assert Q.records(t)["layers/mlp/up_proj"].absmax.sharding.spec[1] == "fsdp"
  trainable, frozen = jaxlora.split(t)
  ids = jax.random.randint(jax.random.key(3), (8, 9), 0, 96)
  fwd = jaxlora.apply(model.apply)
  loss = lambda tr, fr: jnp.mean(fwd({"params": jaxlora.combine(tr, fr)}, ids) ** 2)
  g = jax.jit(jax.grad(loss))(trainable, frozen)
  g1 = jax.grad(loss)(*jax.device_get((trainable, frozen)))
  for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(g1)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_bad_input_errors():
  params = {"d": {"kernel": np.ones((64, 4), np.float32)}}
  with pytest.raises(ValueError, match="'nf5'.*nf4"):
    jaxlora.quantize(params, "nf5")
  with pytest.raises(ValueError, match="block_size=63.*even"):
    jaxlora.quantize(params, "nf4", block_size=63)
  with pytest.raises(ValueError, match="already quantized.*'d'"):
    jaxlora.quantize(jaxlora.quantize(params, "nf4"), "nf4")
  with pytest.raises(ValueError, match="matched no kernel"):
    jaxlora.quantize(params, "nf4", targets="nothing")
  x = jnp.ones((2, 3, 6))
  v = EinsumNet().init(jax.random.key(0), x)
  with pytest.raises(ValueError, match="(per_head|interleaved)/kernel.*exclude"):
    jaxlora.quantize(v, "nf4", layout=jaxlora.trace_layout(EinsumNet().apply, v, x), targets=".*")


def test_chunked_host_quantization_and_jitted_dequantization_are_exact(monkeypatch):
  rng = np.random.default_rng(4)
  for shape in [(70, 40), (129, 33), (256, 96)]:
    w = rng.standard_normal(shape).astype(np.float32)
    whole = Q.quantize_array(w, "nf4")
    monkeypatch.setattr(Q, "_CHUNK_VALUES", 100)  # many chunks of a few output rows
    parts = Q.quantize_array(w, "nf4")
    monkeypatch.undo()
    for a, b in zip(jax.tree.leaves(whole), jax.tree.leaves(parts)):
      np.testing.assert_array_equal(a, b)
    # Under jit XLA must not fuse the double-quantization multiply-add (bitsandbytes rounds twice).
    np.testing.assert_array_equal(jax.jit(Q.dequantize_array)(whole), Q.dequantize_array(whole))
