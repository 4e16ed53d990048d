"""DoRA against PEFT (logits both ways) and NumPy/torch float64 references."""

import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxlora
from conftest import f64, randomize_adapters
from jaxlora import kernel_layout as layout_lib
from models import MLP, Attention, EinsumNet, Stack

KEY = jax.random.key(0)


def _randomize(tree, key, scale=0.5):
  """Random non-zero A, B and magnitudes (magnitudes near their initial norms)."""
  tree = randomize_adapters(tree, key, scale)
  leaves, treedef = jax.tree_util.tree_flatten_with_path(tree)
  keys = jax.random.split(jax.random.fold_in(key, 1), len(leaves))
  out = []
  for k, (path, leaf) in zip(keys, leaves):
    if getattr(path[-1], "key", None) == "lora_magnitude":
      leaf = leaf * jax.random.uniform(k, leaf.shape, leaf.dtype, 0.5, 1.5)
    out.append(leaf)
  return jax.tree.unflatten(treedef, out)


def _np_dora_kernel(mod, roles):
  """The DoRA-merged kernel m * V / ||V||, V = W + s*A@B, in NumPy float64 (kernel layout)."""
  w, a, b = f64(mod["kernel"]), f64(mod["lora_a"]), f64(mod["lora_b"])
  s = f64(mod["lora_scale"])
  letters = "abcdefgh"[:len(roles)]
  shared = "".join(c for c, r in zip(letters, roles) if r in ("stack", "batch"))
  ins = "".join(c for c, r in zip(letters, roles) if r == "in")
  outs = "".join(c for c, r in zip(letters, roles) if r == "out")
  delta = np.einsum(f"{shared}{ins}z,{shared}z{outs}->{letters}", a, b)
  stack = sum(r == "stack" for r in roles)
  v = w + s.reshape(s.shape + (1,) * (w.ndim - stack)) * delta
  in_axes = tuple(i for i, r in enumerate(roles) if r == "in")
  norm = np.sqrt((v * v).sum(axis=in_axes, keepdims=True))
  return _units_to_kernel(f64(mod["lora_magnitude"]), roles, norm.shape) * v / norm


def _units_to_kernel(m, roles, shape):
  """A magnitude (*stacked, *batch, *out) as the kernel's non-input axes, in kernel order."""
  kept = [i for i, r in enumerate(roles) if r != "in"]
  order = ([i for i in kept if roles[i] in ("stack", "batch")]
           + [i for i in kept if roles[i] == "out"])
  return np.transpose(m, np.argsort(order)).reshape(shape)


def _np_merge(tree, lay):
  """Plain params whose kernels are the DoRA-merged kernels (NumPy float64, then float32)."""
  p = tree["params"] if "params" in tree else tree
  out = jax.tree.map(lambda x: x, p)

  def walk(node, path):
    for k, v in list(node.items()):
      if isinstance(v, dict):
        if "lora_a" in v:
          merged = _np_dora_kernel(v, lay["/".join(path + (k,))].roles)
          node[k] = {kk: vv for kk, vv in v.items() if not kk.startswith("lora_")}
          node[k]["kernel"] = jnp.asarray(merged, jnp.float32)
        else:
          walk(v, path + (k,))

  walk(out, ())
  return {"params": out}


CASES = {
    "mlp": (MLP(), lambda: jnp.linspace(-1, 1, 24).reshape(2, 3, 4)),
    "dense_general": (Attention(), lambda: jnp.linspace(-1, 1, 30).reshape(1, 5, 6)),
    "einsum": (EinsumNet(), lambda: jnp.linspace(-1, 1, 36).reshape(2, 3, 6)),
    "scan_remat": (Stack(), lambda: jnp.arange(10).reshape(2, 5) % 11),
}


# Dense and scanned DenseGeneral kernels in the fast tier; plain DenseGeneral and Einsum in the
# full suite.
@pytest.mark.parametrize("name", [n if n in ("mlp", "scan_remat") else
                                  pytest.param(n, marks=pytest.mark.slow) for n in sorted(CASES)])
def test_forward_equals_numpy_dora_merged_model(name):
  """Dense, DenseGeneral, Einsum (batch letters, interleaved axes) and scanned kernels."""
  model, make_x = CASES[name]
  x = make_x()
  v = model.init(KEY, x)
  lay = jaxlora.trace_layout(model.apply, v, x)
  targets = ".*" if name != "scan_remat" else r"(attn/\w|up|down)$"
  tree = jaxlora.wrap(v, rank=2, alpha=3, targets=targets, layout=lay, use_dora=True,
                      key=jax.random.key(1))
  tree = _randomize(tree, jax.random.key(2))
  mods = jaxlora.summary(tree).layers
  assert mods and all(l.params > 0 for l in mods)
  # Jitted: one compile each instead of eager op-by-op dispatch (much cheaper on CPU).
  y = jax.jit(jaxlora.apply(model.apply))(tree, x)
  plain = jax.jit(model.apply)
  ref = plain(_np_merge(tree, lay), x)
  assert np.abs(f64(y) - f64(ref)).max() < 1e-5 * max(1.0, np.abs(f64(ref)).max())
  # merge folds DoRA the same way (and differs from plain LoRA's merge).
  merged = plain(jaxlora.merge(tree), x)
  np.testing.assert_allclose(merged, ref, atol=1e-5, rtol=1e-5)
  if name == "mlp":  # the magnitudes matter: plain LoRA on the same factors differs
    lora_only = jax.tree.map(lambda l: l, tree)
    for _, mod in jaxlora._tree.adapter_modules(lora_only["params"]):
      del mod["lora_magnitude"]
    assert np.abs(f64(jax.jit(jaxlora.apply(model.apply))(lora_only, x)) - f64(ref)).max() > 1e-3


def test_magnitude_shapes_and_initial_identity():
  model = Stack()
  x = jnp.zeros((2, 5), jnp.int32)
  v = model.init(KEY, x)
  lay = jaxlora.trace_layout(model.apply, v, x)
  tree = jaxlora.wrap(v, rank=2, targets=r"attn/(q|o)$", layout=lay, use_dora=True)
  attn = tree["params"]["layers"]["attn"]
  # q: (L, d, heads, head_dim) -> (L, heads, head_dim); o: (L, heads, head_dim, d) -> (L, d).
  assert attn["q"]["lora_magnitude"].shape == (3, 2, 4)
  assert attn["o"]["lora_magnitude"].shape == (3, 8)
  w = f64(attn["q"]["kernel"])
  np.testing.assert_allclose(attn["q"]["lora_magnitude"], np.sqrt((w * w).sum(1)), rtol=1e-6)
  # B = 0: the wrapped model is the base model (g = 1).
  np.testing.assert_allclose(jaxlora.apply(model.apply)(tree, x), model.apply(v, x), atol=1e-6)
  s = jaxlora.summary(tree)
  assert s.layers[0].params == 3 * (8 * 2 + 2 * 8 + 2 * 4)  # o: A, B and m per layer
  trainable, _ = jaxlora.split(tree)
  assert "lora_magnitude" in trainable["params"]["layers"]["attn"]["q"]


def test_factored_norm_equals_dense_norm_float64():
  rng = np.random.default_rng(0)
  with jax.enable_x64(True):
    for shape, roles in [((7, 5), ("in", "out")), ((3, 6, 2, 4), ("stack", "in", "out", "out")),
                         ((3, 4, 2, 5), ("out", "in", "batch", "out"))]:
      w = rng.normal(size=shape)
      r = 3
      a_shape, b_shape, s_shape = layout_lib.adapter_shapes(shape, roles, r)
      a, b = rng.normal(size=a_shape), rng.normal(size=b_shape)
      s = rng.uniform(0.5, 2, size=s_shape)
      got = jaxlora.dora.column_norm(jnp.asarray(w), jnp.asarray(a), jnp.asarray(b),
                                     jnp.asarray(s), roles)
      assert got.dtype == np.float64
      letters = "abcdefgh"[:len(roles)]
      shared = "".join(c for c, q in zip(letters, roles) if q in ("stack", "batch"))
      ins = "".join(c for c, q in zip(letters, roles) if q == "in")
      outs = "".join(c for c, q in zip(letters, roles) if q == "out")
      delta = np.einsum(f"{shared}{ins}z,{shared}z{outs}->{letters}", a, b)
      n_stack = sum(q == "stack" for q in roles)
      full = w + s.reshape(s.shape + (1,) * (w.ndim - n_stack)) * delta
      in_axes = tuple(i for i, q in enumerate(roles) if q == "in")
      ref = np.sqrt((full * full).sum(axis=in_axes, keepdims=True))
      got_k = _units_to_kernel(np.asarray(got), roles, ref.shape)
      np.testing.assert_allclose(got_k, ref, rtol=1e-12)


def _torch_grads(x, w, bias, a, b, s, m, cot, *, detach):
  torch = pytest.importorskip("torch")
  t = lambda z, g=False: torch.tensor(np.asarray(z, np.float64), requires_grad=g)
  x_, w_, bias_, cot_ = t(x), t(w), t(bias), t(cot)
  a_, b_, m_ = t(a, True), t(b, True), t(m, True)
  norm = torch.linalg.norm(w_ + s * a_ @ b_, dim=0)
  if detach:
    norm = norm.detach()
  g = m_ / norm
  base = x_ @ w_
  y = base + bias_ + (g - 1) * base + g * s * ((x_ @ a_) @ b_)
  (y * cot_).sum().backward()
  return y.detach().numpy(), a_.grad.numpy(), b_.grad.numpy(), m_.grad.numpy()


def test_dense_gradients_equal_float64_torch_with_the_norm_detached():
  model = nn.Dense(6)
  x = jax.random.normal(jax.random.key(3), (2, 5, 4))
  v = model.init(KEY, x)
  tree = _randomize(jaxlora.wrap(v, rank=3, alpha=5, targets=".*", use_dora=True,
                                 key=jax.random.key(1)), jax.random.key(2))
  cot = np.asarray(jax.random.normal(jax.random.key(4), (2, 5, 6)), np.float64)
  trainable, frozen = jaxlora.split(tree)
  fwd = jaxlora.apply(model.apply)
  loss = lambda t: jnp.sum(fwd(jaxlora.combine(t, frozen), x) * cot.astype(np.float32))
  grads = jax.jit(jax.grad(loss))(trainable)["params"]
  p = tree["params"]
  args = (f64(x), f64(p["kernel"]), f64(p["bias"]), f64(p["lora_a"]), f64(p["lora_b"]),
          float(p["lora_scale"]), f64(p["lora_magnitude"]), cot)
  y_ref, ga, gb, gm = _torch_grads(*args, detach=True)
  np.testing.assert_allclose(fwd(tree, x), y_ref, atol=1e-5)
  for got, ref in ((grads["lora_a"], ga), (grads["lora_b"], gb), (grads["lora_magnitude"], gm)):
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())
  # Had the norm been differentiated, A and B would get other gradients.
  _, ga_live, gb_live, _ = _torch_grads(*args, detach=False)
  assert np.abs(ga_live - ga).max() > 1e-2 * np.abs(ga).max()
  assert np.abs(gb_live - gb).max() > 1e-2 * np.abs(gb).max()


def test_dropout_recomputes_the_base_product_on_the_dropped_input():
  """PEFT with active dropout: base(x) + (g - 1) * (xd @ W) + g * s * (xd @ A) @ B."""
  model = nn.Dense(4)
  x = jax.random.normal(jax.random.key(3), (3, 4))
  v = model.init(KEY, x)
  rngs = {"dropout": jax.random.key(7)}
  # The dropped-out input itself, read through an identity adapter (same key, same mask).
  probe = jaxlora.wrap(v, rank=4, targets=".*", key=KEY)
  probe["params"]["lora_a"] = jnp.eye(4)
  probe["params"]["lora_b"] = jnp.eye(4)
  fwd = jaxlora.apply(model.apply, dropout=0.5)
  xd = f64(fwd(probe, x, rngs=rngs) - model.apply(v, x))
  assert (xd == 0).any() and np.allclose(xd[xd != 0], 2 * f64(x)[xd != 0], atol=1e-6)
  tree = _randomize(jaxlora.wrap(v, rank=2, targets=".*", use_dora=True, key=KEY),
                    jax.random.key(2))
  p = jax.tree.map(f64, tree["params"])
  g = p["lora_magnitude"] / np.linalg.norm(p["kernel"] + p["lora_scale"] * p["lora_a"] @
                                           p["lora_b"], axis=0)
  ref = (f64(x) @ p["kernel"] + p["bias"] + (g - 1) * (xd @ p["kernel"])
         + g * p["lora_scale"] * ((xd @ p["lora_a"]) @ p["lora_b"]))
  np.testing.assert_allclose(fwd(tree, x, rngs=rngs), ref, atol=1e-5)


def test_unmerge_round_trip_and_its_norms():
  model = Stack()
  x = jnp.zeros((2, 5), jnp.int32)
  v = model.init(KEY, x)
  lay = jaxlora.trace_layout(model.apply, v, x)
  tree = _randomize(jaxlora.wrap(v, rank=2, layout=lay, targets=r"(attn/\w|up|down)$",
                                 use_dora=True, key=jax.random.key(1)), jax.random.key(2))
  norms = jaxlora.dora.weight_norms(tree)
  merged = jaxlora.merge(tree)
  back = jaxlora.unmerge(merged, jaxlora.adapter(tree), norms=norms)
  for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(tree)):
    np.testing.assert_allclose(a, b, atol=2e-6, rtol=1e-5)
  assert jax.tree.structure(back) == jax.tree.structure(tree)
  with pytest.raises(jaxlora.errors.InputError, match="weight_norms"):
    jaxlora.unmerge(merged, jaxlora.adapter(tree))


def test_qdora_equals_dora_on_the_dequantized_tree():
  cfg = jaxlora.models.ModelConfig.tiny("llama")
  model = jaxlora.models.Decoder(cfg)
  params = jaxlora.models.init(model, KEY)
  q = jaxlora.quantize(params, "nf4", layout=model)
  tree = jaxlora.wrap(q, rank=2, layout=model, use_dora=True, key=jax.random.key(1))
  # The magnitudes are the column norms of the dequantized kernels (B = 0).
  deq = jaxlora.dequantize(q)
  for path, mod in jaxlora._tree.adapter_modules(tree):
    w = f64(jaxlora._tree.lookup(deq, path)["kernel"])  # (layers, in, out)
    np.testing.assert_allclose(mod["lora_magnitude"], np.sqrt((w * w).sum(1)), rtol=1e-5)
  tree = _randomize(tree, jax.random.key(2), scale=0.1)
  floats = jaxlora.dequantize(tree)
  ids = jnp.arange(12).reshape(2, 6) % cfg.vocab_size
  fwd = jax.jit(jaxlora.apply(model.apply))
  y, ref = fwd({"params": tree}, ids), fwd({"params": floats}, ids)
  assert np.abs(f64(y) - f64(ref)).max() <= 1e-5 * np.abs(f64(ref)).max()


@pytest.mark.slow
def test_qdora_gradients_equal_dora_on_the_dequantized_tree():
  cfg = jaxlora.models.ModelConfig.tiny("llama")
  model = jaxlora.models.Decoder(cfg)
  q = jaxlora.quantize(jaxlora.models.init(model, KEY), "nf4", layout=model)
  tree = _randomize(jaxlora.wrap(q, rank=2, layout=model, use_dora=True, key=jax.random.key(1)),
                    jax.random.key(2), scale=0.1)
  floats = jaxlora.dequantize(tree)
  ids = jnp.arange(12).reshape(2, 6) % cfg.vocab_size
  trainable, frozen = jaxlora.split(tree)
  _, f_frozen = jaxlora.split(floats)
  loss = lambda t, f: jnp.sum(jnp.sin(jaxlora.apply(model.apply)(
      {"params": jaxlora.combine(t, f)}, ids)))
  g, g_ref = (jax.jit(jax.grad(loss))(trainable, f) for f in (frozen, f_frozen))
  for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(g_ref)):
    assert np.abs(f64(a) - f64(b)).max() <= 1e-4 * np.abs(f64(b)).max()


def test_sharding_follows_the_kernels_output_axes():
  from jax.sharding import NamedSharding, PartitionSpec as P
  mesh = jaxlora.sharding.make_mesh(fsdp=-1)
  out = 4 * jax.device_count()  # divisible by the fsdp axis however many devices there are
  kernel = jax.device_put(jnp.ones((3, 8, out)), NamedSharding(mesh, P("data", None, "fsdp")))
  lay = jaxlora.Layout({"d": layout_lib.KernelLayout("Dense", ("stack", "in", "out"))})
  tree = jaxlora.wrap({"d": {"kernel": kernel}}, rank=2, layout=lay, use_dora=True)
  sh = jaxlora.sharding.adapter_shardings(tree)["d"]
  assert sh["lora_magnitude"].spec == P("data", "fsdp")
  assert sh["lora_b"].spec == P("data", None, "fsdp")


def test_banks_combinations_and_per_row_ids_refuse_dora():
  model = MLP()
  x = jnp.ones((2, 4))
  v = model.init(KEY, x)
  dora = jaxlora.wrap(v, rank=2, targets="fc", use_dora=True)
  plain = jaxlora.wrap(v, rank=2, targets="fc")
  with pytest.raises(jaxlora.errors.InputError, match="fc1.*DoRA"):
    jaxlora.stack({"a": plain, "b": dora})
  with pytest.raises(jaxlora.errors.InputError, match="fc1.*DoRA"):
    jaxlora.merge_adapters([dora, plain], [0.5, 0.5])
  with pytest.raises(jaxlora.errors.InputError, match="fc1.*adapter_ids"):
    jaxlora.apply(model.apply)(dora, x, adapter_ids=jnp.zeros((2,), jnp.int32))


def test_einsum_with_an_ellipsis_is_refused():
  model = nn.Einsum((4, 3), "...d,df->...f")
  x = jnp.ones((2, 4))
  v = model.init(KEY, x)
  tree = jaxlora.wrap(v, rank=2, targets=".*", use_dora=True,
                      layout=jaxlora.trace_layout(model.apply, v, x))
  with pytest.raises(jaxlora.errors.InputError, match="ellipsis"):
    jaxlora.apply(model.apply)(tree, x)


def test_orbax_round_trip(tmp_path):
  model = MLP()
  v = model.init(KEY, jnp.ones((1, 4)))
  tree = _randomize(jaxlora.wrap(v, rank=2, targets="fc", use_dora=True), jax.random.key(2))
  jaxlora.save(str(tmp_path / "ckpt"), tree)
  back = jaxlora.load(str(tmp_path / "ckpt"), v)
  assert jax.tree.structure(back) == jax.tree.structure(tree)
  for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(tree)):
    np.testing.assert_array_equal(a, b)


# ------------------------------------------------------------------------------ PEFT parity

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")


def _batch():
  ids = np.random.default_rng(1).integers(0, 96, size=(2, 10))
  return ids, np.ones_like(ids)


def _peft_logits(pm, ids, mask):
  with torch.no_grad():
    return pm(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask)).logits.numpy()


def test_jaxlora_dora_serves_in_peft(hf_llama, tmp_path):
  path, model, params = hf_llama
  tree = jaxlora.wrap(params, rank=4, alpha=8, targets="all-linear", layout=model,
                      use_dora=True, key=jax.random.key(0))
  tree = _randomize(tree, jax.random.key(1), scale=0.2)
  jaxlora.peft.save(str(tmp_path), tree, model=model)
  cfg = json.load(open(tmp_path / "adapter_config.json"))
  assert cfg["use_dora"] is True
  hf = transformers.AutoModelForCausalLM.from_pretrained(path)
  pm = peft.PeftModel.from_pretrained(hf, str(tmp_path)).eval()
  names = [n for n, _ in pm.named_parameters() if "lora_magnitude_vector" in n]
  assert len(names) == 2 * 7
  ids, mask = _batch()
  ref = _peft_logits(pm, ids, mask)
  out = np.asarray(jaxlora.apply(model.apply)({"params": tree}, ids, attention_mask=mask))
  assert np.abs(out - ref).max() < 1e-4
  plain = np.asarray(model.apply({"params": params}, ids, attention_mask=mask))
  assert np.abs(plain - ref).max() > 1e-2
  back = jaxlora.peft.load(str(tmp_path), params, model=model)
  for a, b in zip(jax.tree.leaves(jaxlora.adapter(back)), jax.tree.leaves(jaxlora.adapter(tree))):
    np.testing.assert_allclose(a, b, rtol=1e-6)


def test_peft_dora_loads_in_jaxlora(hf_llama, tmp_path):
  path, model, params = hf_llama
  torch.manual_seed(1)
  hf = transformers.AutoModelForCausalLM.from_pretrained(path)
  cfg = peft.LoraConfig(r=4, lora_alpha=16, target_modules=["q_proj", "v_proj", "down_proj"],
                        init_lora_weights=False, use_dora=True,
                        rank_pattern={"model.layers.1.self_attn.q_proj": 2})
  pm = peft.get_peft_model(hf, cfg).eval()
  with torch.no_grad():
    for n, p in pm.named_parameters():
      if "lora_magnitude_vector" in n:
        p.mul_(torch.rand_like(p) + 0.5)
  pm.save_pretrained(str(tmp_path))
  ids, mask = _batch()
  ref = _peft_logits(pm, ids, mask)
  tree = jaxlora.peft.load(str(tmp_path), params, model=model)
  q = tree["layers"]["self_attn"]["q_proj"]
  assert q["lora_magnitude"].shape == (2, 32)
  out = np.asarray(jaxlora.apply(model.apply)({"params": tree}, ids, attention_mask=mask))
  assert np.abs(out - ref).max() < 1e-4
  # merge folds DoRA as PEFT's merge_and_unload does.
  merged = np.asarray(model.apply({"params": jaxlora.merge(tree)}, ids, attention_mask=mask))
  with torch.no_grad():
    ref_merged = pm.merge_and_unload()(input_ids=torch.tensor(ids),
                                       attention_mask=torch.tensor(mask)).logits.numpy()
  assert np.abs(merged - ref_merged).max() < 1e-4


def test_peft_format_errors(hf_llama, tmp_path):
  path, model, params = hf_llama
  mixed = jaxlora.wrap(params, rank=2, targets="q_proj", layout=model, use_dora=True)
  other = jaxlora.wrap(params, rank=2, targets="v_proj", layout=model)
  mixed["layers"]["self_attn"]["v_proj"] = other["layers"]["self_attn"]["v_proj"]
  with pytest.raises(jaxlora.errors.InputError, match="use_dora"):
    jaxlora.peft.save(str(tmp_path / "mixed"), mixed, model=model)
  tree = jaxlora.wrap(params, rank=2, targets="q_proj", layout=model, use_dora=True)
  jaxlora.peft.save(str(tmp_path / "a"), tree, model=model)
  cfg_path = tmp_path / "a" / "adapter_config.json"
  cfg = json.load(open(cfg_path))
  cfg["use_dora"] = False
  json.dump(cfg, open(cfg_path, "w"))
  with pytest.raises(jaxlora.errors.InputError, match="use_dora=false"):
    jaxlora.peft.load(str(tmp_path / "a"), params, model=model)


@pytest.mark.slow
def test_gpt2_conv1d_dora_serves_in_peft(tmp_path):
  """GPT-2's Conv1D (fan_in_fan_out): the magnitude is still one value per output unit."""
  torch.manual_seed(0)
  hf = transformers.GPT2LMHeadModel(transformers.GPT2Config(
      vocab_size=96, n_embd=32, n_layer=2, n_head=4, n_positions=64, initializer_range=0.1))
  hf.save_pretrained(str(tmp_path / "base"))
  model, params = jaxlora.models.from_pretrained(str(tmp_path / "base"))
  tree = _randomize(jaxlora.wrap(params, rank=4, alpha=8, layout=model, use_dora=True,
                                 key=jax.random.key(0)), jax.random.key(1), scale=0.2)
  jaxlora.peft.save(str(tmp_path / "a"), tree, model=model)
  hf = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "base"))
  pm = peft.PeftModel.from_pretrained(hf, str(tmp_path / "a")).eval()
  ids, mask = _batch()
  ref = _peft_logits(pm, ids, mask)
  out = np.asarray(jaxlora.apply(model.apply)({"params": tree}, ids, attention_mask=mask))
  assert np.abs(out - ref).max() < 1e-4
