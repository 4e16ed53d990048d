"""QLoRA bases from checkpoints: quantize-on-load, transformers' bitsandbytes checkpoints, PEFT QLoRA
adapters both ways, and the errors on checkpoints jaxlora cannot read."""

import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxlora
from jaxlora import quantization as Q
from jaxlora.models import safetensors_io

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
bnb = pytest.importorskip("bitsandbytes")
peft = pytest.importorskip("peft")
import bnb_checkpoint as bc  # pylint: disable=wrong-import-position

torch.set_num_threads(2)
LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
_FWD = {}
_dequantize = jax.jit(jaxlora.dequantize)  # one compile per tree structure, not per op and shape


def _fwd(model, quantized=True):
  """One jitted forward per model and kind, so trees of one structure compile once."""
  key = (model, quantized)
  if key not in _FWD:
    _FWD[key] = jax.jit(jaxlora.apply(model.apply) if quantized else model.apply)
  return _FWD[key]


def _batch(vocab=96):
  """Two rows, the second left-padded."""
  ids = np.random.default_rng(1).integers(1, vocab, size=(2, 10))
  mask = np.ones_like(ids)
  mask[1, :3] = 0
  return ids, mask


def _logits(model, tree, quantized=True):
  ids, mask = _batch()
  return np.asarray(_fwd(model, quantized)({"params": tree}, ids, attention_mask=mask))


def _torch_logits(hf):
  ids, mask = _batch()
  pos = np.maximum(np.cumsum(mask, -1) - 1, 0)
  with torch.no_grad():
    return hf(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
              position_ids=torch.tensor(pos)).logits.numpy()


def _close(a, b, atol):
  m = _batch()[1].astype(bool)  # padded positions are not compared
  np.testing.assert_allclose(a[m], b[m], atol=atol, rtol=0)


def _randomize_adapters(tree, seed, scale=0.2):
  """Random non-zero lora_a/lora_b (NumPy: no per-shape PRNG compiles)."""
  rng = np.random.default_rng(seed)
  def f(path, leaf):
    if getattr(path[-1], "key", None) in ("lora_a", "lora_b"):
      return jnp.asarray(scale * rng.standard_normal(leaf.shape), leaf.dtype)
    return leaf
  return jax.tree_util.tree_map_with_path(f, tree)


def _leaves_equal(a, b):
  fa, ta = jax.tree_util.tree_flatten_with_path(a)
  fb, tb = jax.tree_util.tree_flatten_with_path(b)
  assert ta == tb  # same structure and static record metadata (qtype, shape, dtype, block size)
  for (path, x), (_, y) in zip(fa, fb):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=jax.tree_util.keystr(path))


# ----------------------------------------------------------------------------- checkpoints


@pytest.fixture(scope="module")
def root(tmp_path_factory):
  return tmp_path_factory.mktemp("qlora")


@pytest.fixture(scope="module")
def float_dir(root):
  """Rows of 64 and 128 values: whole 4-bit blocks, where bitsandbytes' CPU kernels are right."""
  return bc.make_float(str(root / "float"))


@pytest.fixture(scope="module")
def odd_dir(root):
  """Rows of 40 and 72 values: 64-blocks straddle rows."""
  return bc.make_float(str(root / "odd"), seed=1, hidden=40, intermediate=72)


@pytest.fixture(scope="module")
def float_load(float_dir):
  return jaxlora.models.from_pretrained(float_dir)


@pytest.fixture(scope="module")
def bnb_nf4(root, float_dir):
  path = str(root / "nf4")
  return path, bc.make_bnb(float_dir, path)


@pytest.fixture(scope="module")
def nf4_load(bnb_nf4):
  return jaxlora.models.from_pretrained(bnb_nf4[0])


# ----------------------------------------------------------------------------- quantize on load


@pytest.mark.parametrize("qtype,kw", [("nf4", {}), ("fp4", {"double_quant": False}),
                                      ("int8", {})])
def test_quantize_on_load_equals_quantizing_the_float_params(float_dir, float_load, qtype, kw):
  model, params = float_load
  qmodel, qparams = jaxlora.models.from_pretrained(float_dir, quantize=qtype, **kw)
  assert qmodel == model
  want = jaxlora.quantize(params, qtype, layout=model, **kw)
  _leaves_equal(qparams, want)
  recs = Q.records(qparams)
  assert sorted(recs) == sorted(f"layers/{'self_attn' if n[1:] == '_proj' and n[0] in 'qkvo' else 'mlp'}/{n}"
                                for n in LINEAR)
  assert all(r.n_stack == 1 and r.qtype == qtype for r in recs.values())
  # Embeddings, norms and the head stay float.
  assert isinstance(qparams["lm_head"]["kernel"], jax.Array)
  np.testing.assert_array_equal(qparams["embed_tokens"]["embedding"],
                                params["embed_tokens"]["embedding"])
  # One layer's record is quantize_array of that layer's tensor.
  layer1 = Q.quantize_array(np.asarray(params["layers"]["mlp"]["down_proj"]["kernel"][1]), qtype,
                            **kw)
  _leaves_equal(jax.tree.map(lambda x: np.asarray(x)[1], recs["layers/mlp/down_proj"]), layer1)
  # The quantized layers compute the dequantized model.
  _close(_logits(model, qparams), _logits(model, _dequantize(qparams), False), 1e-5)


def test_quantize_on_load_straddling_blocks_dtypes_and_options(odd_dir):
  model, params = jaxlora.models.from_pretrained(odd_dir, param_dtype=jnp.bfloat16)
  for qtype, kw in [("nf4", {"block_size": 32}), ("fp4", {}), ("int8", {})]:
    _, qparams = jaxlora.models.from_pretrained(odd_dir, param_dtype=jnp.bfloat16,
                                                quantize=qtype, **kw)
    for path, rec in Q.records(qparams).items():
      assert rec.dtype == jnp.bfloat16
      mods = path.split("/")
      kernel = params[mods[0]][mods[1]][mods[2]]["kernel"]
      _leaves_equal(rec, Q.quantize_array(np.asarray(kernel), qtype, n_stack=1, **kw))


def test_quantize_on_load_places_records_on_their_shards(float_dir, float_load):
  assert jax.device_count() == 8, "run with XLA_FLAGS=--xla_force_host_platform_device_count=8"
  model, params = float_load
  mesh = jaxlora.sharding.make_mesh(fsdp=-1)
  shardings = jaxlora.sharding.param_shardings(model, mesh)
  _, plain = jaxlora.models.from_pretrained(float_dir, quantize="nf4")
  for qtype in ("nf4", "int8"):
    _, qparams = jaxlora.models.from_pretrained(float_dir, quantize=qtype,
                                                shardings=lambda m: jaxlora.sharding.param_shardings(m, mesh))
    if qtype == "nf4":
      _leaves_equal(qparams, plain)
    split = 0
    for path, rec in Q.records(qparams).items():
      mods = path.split("/")
      want = jaxlora.sharding.quantized_sharding(rec, shardings[mods[0]][mods[1]][mods[2]]["kernel"])
      for x, s in zip(jax.tree.leaves(rec), jax.tree.leaves(want)):
        assert x.sharding.is_equivalent_to(s, x.ndim), (path, x.sharding, s)
        split += len(x.addressable_shards[0].data.reshape(-1)) < x.size
    assert split >= 7  # at least the packed codes of every kernel are split over the devices
    emb = qparams["embed_tokens"]["embedding"]
    assert emb.sharding.is_equivalent_to(shardings["embed_tokens"]["embedding"], emb.ndim)


# ----------------------------------------------------------------------------- bitsandbytes checkpoints


def _check_against_bnb(model, qparams, hf, portable=False):
  """Every record holds bitsandbytes' stored arrays, and dequantizes to bitsandbytes' values.

  Under jit XLA fuses double quantization's ``code * scale + offset`` into one
  fused multiply-add, which can move a block maximum by one float32 ulp (two in
  the product); the eager, op-by-op `dequantize_array` is bit-exact
  (tests/test_quantize.py), and without double quantization so is jit.
  """
  recs = Q.records(qparams)
  kernels = _dequantize(recs)
  mods = bc.linear_modules(hf)
  assert len(mods) == len(recs) * model.config.num_hidden_layers
  for name, mod in mods.items():
    path, layer = jaxlora.models.hub.flax_module_path(model.config, name)
    rec = jax.tree.map(lambda x: np.asarray(x)[layer], recs["/".join(path)])
    got = np.asarray(kernels["/".join(path)])[layer]
    if isinstance(mod, bnb.nn.Linear8bitLt):
      np.testing.assert_array_equal(rec.packed, mod.weight.data.numpy().T)
      np.testing.assert_array_equal(rec.absmax, mod.weight.SCB.numpy())
      want = bnb.functional.int8_vectorwise_dequant(mod.weight.data, mod.weight.SCB).numpy().T
      np.testing.assert_array_equal(got, want, err_msg=name)
      continue
    qs = mod.weight.quant_state
    assert (rec.qtype, rec.block_size, rec.dtype) == (qs.quant_type, qs.blocksize, np.float32)
    np.testing.assert_array_equal(rec.packed, mod.weight.data.numpy().reshape(-1))
    np.testing.assert_array_equal(rec.absmax, qs.absmax.numpy())
    np.testing.assert_array_equal(rec.quant_map, qs.code.numpy())
    assert rec.double_quant == qs.nested
    if qs.nested:
      np.testing.assert_array_equal(rec.nested_absmax, qs.state2.absmax.numpy())
      np.testing.assert_array_equal(rec.nested_quant_map, qs.state2.code.numpy())
      assert rec.offset == qs.offset.item()
    want = (bc.portable_dequantize_4bit(mod.weight) if portable else
            bnb.functional.dequantize_4bit(mod.weight.data, qs)).numpy().T
    if not qs.nested:
      np.testing.assert_array_equal(got, want, err_msg=name)
    else:
      np.testing.assert_array_max_ulp(got, want, maxulp=2)  # 1 ulp in absmax


def test_bnb_nf4_checkpoint(bnb_nf4, nf4_load, float_dir):
  path, hf = bnb_nf4
  model, qparams = nf4_load
  assert json.load(open(os.path.join(path, "config.json")))["quantization_config"]["load_in_4bit"]
  assert model.config.extra == jaxlora.models.from_pretrained(float_dir)[0].config.extra
  rec = qparams["layers"]["self_attn"]["q_proj"]["kernel"]
  assert rec.qtype == "nf4" and rec.double_quant and rec.block_size == 64
  _check_against_bnb(model, qparams, hf)
  # Op by op (no fused multiply-add), the dequantization is bitsandbytes' to the bit.
  eager = np.asarray(Q.dequantize_array(rec))
  for i, layer in enumerate(hf.model.layers):
    w = layer.self_attn.q_proj.weight
    np.testing.assert_array_equal(
        eager[i], bnb.functional.dequantize_4bit(w.data, w.quant_state).numpy().T)
  _close(_logits(model, qparams), _torch_logits(hf), 1e-4)
  # quantize= the stored type loads the same tree.
  _leaves_equal(jaxlora.models.from_pretrained(path, quantize="nf4")[1], qparams)


def test_bnb_fp4_checkpoint_without_double_quant(root, float_dir):
  path = str(root / "fp4")
  hf = bc.make_bnb(float_dir, path, quant_type="fp4", double_quant=False)
  model, qparams = jaxlora.models.from_pretrained(path)
  rec = qparams["layers"]["mlp"]["up_proj"]["kernel"]
  assert rec.qtype == "fp4" and not rec.double_quant
  _check_against_bnb(model, qparams, hf)
  _close(_logits(model, qparams), _torch_logits(hf), 1e-4)


def test_bnb_4bit_straddling_blocks_match_the_portable_kernel(root, odd_dir):
  path = str(root / "odd-nf4")
  hf = bc.make_bnb(odd_dir, path)
  model, qparams = jaxlora.models.from_pretrained(path)
  _check_against_bnb(model, qparams, hf, portable=True)


def test_gpt2_conv1d_checkpoints(root):
  """GPT-2 stores Conv1D weights (in, out); bitsandbytes quantizes them as (out, in) Linears."""
  float_path, path = str(root / "gpt2"), str(root / "gpt2-nf4")
  torch.manual_seed(0)
  transformers.GPT2LMHeadModel(transformers.GPT2Config(
      vocab_size=96, n_embd=64, n_layer=2, n_head=4, n_positions=64, bos_token_id=0,
      eos_token_id=0)).save_pretrained(float_path)
  model, params = jaxlora.models.from_pretrained(float_path)
  _leaves_equal(jaxlora.models.from_pretrained(float_path, quantize="nf4")[1],
                jaxlora.quantize(params, "nf4", layout=model))
  hf = bc.make_bnb(float_path, path)
  model, qparams = jaxlora.models.from_pretrained(path)
  assert sorted(Q.records(qparams)) == ["h/attn/c_attn", "h/attn/c_proj", "h/mlp/c_fc",
                                        "h/mlp/c_proj"]
  _close(_logits(model, qparams), _torch_logits(hf), 1e-4)


def test_bnb_int8_checkpoint(root, float_dir):
  path = str(root / "int8")
  hf = bc.make_bnb(float_dir, path, load_in_8bit=True)
  model, qparams = jaxlora.models.from_pretrained(path, quantize="int8")
  rec = qparams["layers"]["mlp"]["down_proj"]["kernel"]
  assert rec.qtype == "int8" and rec.packed.dtype == jnp.int8
  _check_against_bnb(model, qparams, hf)
  # LLM.int8() also quantizes activations, so the transformers model is only close.
  _close(_logits(model, qparams), _torch_logits(hf), 0.1)


# ----------------------------------------------------------------------------- PEFT QLoRA adapters


def test_peft_qlora_adapter_loads_onto_the_bnb_base(bnb_nf4, nf4_load, tmp_path):
  path, _ = bnb_nf4
  model, qparams = nf4_load
  torch.manual_seed(3)
  pm = peft.get_peft_model(bc.load_bnb(path), peft.LoraConfig(
      r=4, lora_alpha=8, lora_dropout=0.0, target_modules=LINEAR))
  with torch.no_grad():
    for name, p in pm.named_parameters():
      if "lora_" in name:
        p.normal_(0, 0.2)
  pm.eval()
  want = _torch_logits(pm)
  pm.save_pretrained(str(tmp_path))
  tree = jaxlora.peft.load(str(tmp_path), qparams, model=model)
  assert len(jaxlora.summary(tree).layers) == 7
  got = _logits(model, tree)
  _close(got, want, 1e-4)
  assert np.abs(got - _logits(model, qparams)).max() > 1e-2  # the adapter matters


def test_jaxlora_adapter_on_the_bnb_base_serves_in_peft(bnb_nf4, nf4_load, tmp_path):
  path, _ = bnb_nf4
  model, qparams = nf4_load
  # (an RBG key: threefry's initialisation compiles for seconds per adapter shape on 2 cores)
  tree = jaxlora.wrap(qparams, rank=4, alpha=8, targets="all-linear", layout=model,
                      key=jax.random.key(0, impl="unsafe_rbg"))
  tree = _randomize_adapters(tree, 1)
  jaxlora.peft.save(str(tmp_path), tree, model=model)
  pm = bc.float32_compute(peft.PeftModel.from_pretrained(bc.load_bnb(path), str(tmp_path)).eval())
  got = _logits(model, tree)
  _close(got, _torch_logits(pm), 1e-4)
  assert np.abs(got - _logits(model, qparams)).max() > 1e-2


# ----------------------------------------------------------------------------- errors


def _copy(src, dst, *, config=None, tensors=None):
  shutil.copytree(src, dst)
  if config is not None:
    with open(os.path.join(dst, "config.json")) as f:
      cfg = json.load(f)
    config(cfg)
    with open(os.path.join(dst, "config.json"), "w") as f:
      json.dump(cfg, f)
  if tensors is not None:
    st = safetensors_io.SafetensorsFile(os.path.join(dst, "model.safetensors"))
    all_t = {k: st.read(k) for k in st.keys()}
    tensors(all_t)
    safetensors_io.save_file(all_t, os.path.join(dst, "model.safetensors"), st.metadata)
  return str(dst)


def test_bad_quantized_checkpoints_and_arguments(bnb_nf4, float_dir, tmp_path):
  path, _ = bnb_nf4
  with pytest.raises(ValueError, match=r"'nf3'.*\('nf4', 'fp4', 'int8'\)"):
    jaxlora.models.from_pretrained(float_dir, quantize="nf3")
  with pytest.raises(ValueError, match=r"block_size=3"):
    jaxlora.models.from_pretrained(float_dir, quantize="nf4", block_size=3)

  def gptq(cfg):
    cfg["quantization_config"] = {"quant_method": "gptq", "bits": 4}
  with pytest.raises(ValueError, match=r"quant_method is 'gptq'.*bitsandbytes"):
    jaxlora.models.from_pretrained(_copy(float_dir, tmp_path / "gptq", config=gptq))

  for other in ("fp4", "int8"):
    with pytest.raises(ValueError, match=rf"quantize='{other}'.*as 'nf4' \(quantization_config"
                                         r"\.bnb_4bit_quant_type\)"):
      jaxlora.models.from_pretrained(path, quantize=other)
  # Without the config entry, the tensors tell.
  bare = _copy(path, tmp_path / "bare", config=lambda c: c.pop("quantization_config"))
  with pytest.raises(ValueError, match=r"quantize='fp4'.*'model\.layers\.0\..*\.weight'.*as 'nf4'"):
    jaxlora.models.from_pretrained(bare, quantize="fp4")

  key = "model.layers.1.mlp.up_proj.weight.quant_state.bitsandbytes__nf4"

  def corrupt(t):
    t[key] = np.frombuffer(b'{"quant_type": "nf4", "blocksize"', np.uint8).copy()
  bad = _copy(path, tmp_path / "corrupt", tensors=corrupt)
  with pytest.raises(ValueError, match=rf"{key.replace('.', '[.]')}.*not a valid bitsandbytes "
                                       "quant state.*corrupt"):
    jaxlora.models.from_pretrained(bad)

  def drop_absmax(t):
    del t["model.layers.0.self_attn.k_proj.weight.absmax"]
  bad = _copy(path, tmp_path / "no-absmax", tensors=drop_absmax)
  with pytest.raises(ValueError, match=r"lacks tensor 'model\.layers\.0\.self_attn\.k_proj"
                                       r"\.weight\.absmax'"):
    jaxlora.models.from_pretrained(bad)

  model, qparams = jaxlora.models.from_pretrained(float_dir, quantize="nf4")
  with pytest.raises(ValueError, match=r"quantized kernels.*jaxlora\.dequantize"):
    jaxlora.models.save_pretrained(str(tmp_path / "out"), model, qparams)
