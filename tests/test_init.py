"""LoRA initialisations (PiSSA, OLoRA, Gaussian) and PiSSA/OLoRA -> LoRA conversion, against
float64 NumPy and Hugging Face PEFT."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxlora
import models
from conftest import f64

_JITTED = {}


def _forward(model):
  """`jaxlora.apply(model.apply)`, jitted once per model (trees of one form compile once)."""
  if model not in _JITTED:
    _JITTED[model] = jax.jit(lambda tree, ids: jaxlora.apply(model.apply)({"params": tree}, ids))
  return _JITTED[model]


_STACK = models.Stack()


def _stack():
  m = _STACK
  tok = jnp.array([[1, 2, 3, 4, 5]])
  params = m.init(jax.random.key(0), tok)["params"]
  return m, tok, params, jaxlora.trace_layout(m.apply, {"params": params}, tok)


def _ref_product(init, w, rank, scale):
  """scale * A @ B of PEFT's recipe in float64: best rank-r part (PiSSA) or s * Q_r R_r (OLoRA)."""
  if init == "olora":
    q, r = np.linalg.qr(w.T)  # PEFT decomposes the torch weight (out, in)
    return scale * (q[:, :rank] @ r[:rank]).T
  u, s, vh = np.linalg.svd(w, full_matrices=False)
  return (u[:, :rank] * s[:rank]) @ vh[:rank]


@pytest.mark.parametrize("init", ["pissa", pytest.param("pissa_niter_3", marks=pytest.mark.slow),
                                  pytest.param("olora", marks=pytest.mark.slow)])
def test_wrapped_model_equals_base_and_factors_match_numpy(init):
  model, tok, params, lay = _stack()
  tree = jaxlora.wrap(params, rank=2, alpha=3.0, targets=".*", exclude="lm_head", init=init,
                      layout=lay, key=jax.random.key(5))
  base = np.asarray(model.apply({"params": params}, tok))
  out = np.asarray(_forward(model)(tree, tok))
  assert np.abs(out - base).max() < 1e-5 * max(1.0, np.abs(base).max())
  # Per stacked layer and per matrix of an N-D kernel: residual + scale * A @ B is W, and
  # scale * A @ B is PEFT's rank-r part, computed here in float64.
  for path, (kernel_path, in_ax, out_ax) in {"q": (("layers", "attn", "q"), 1, 2),
                                              "o": (("layers", "attn", "o"), 2, 1),
                                              "up": (("layers", "up"), 1, 1)}.items():
    mod = jaxlora._tree.lookup(tree, kernel_path)
    w = f64(jaxlora._tree.lookup(params, kernel_path)["kernel"])
    for layer in range(w.shape[0]):
      wl = w[layer].reshape(int(np.prod(w.shape[1:1 + in_ax])), -1)
      a = f64(mod["lora_a"][layer]).reshape(wl.shape[0], -1)
      b = f64(mod["lora_b"][layer]).reshape(a.shape[1], -1)
      s = float(mod["lora_scale"][layer])
      res = f64(mod["kernel"][layer]).reshape(wl.shape)
      np.testing.assert_allclose(res + s * a @ b, wl, atol=2e-6, err_msg=path)
      ref = _ref_product(init, wl, 2, s)
      if init.startswith("pissa_niter"):
        # A random projection of W onto r directions (of its tall side), not the best rank-r
        # part when the spectrum has no gap: s A B is W projected onto A's columns (or B's
        # rows), and no better than the optimum (Eckart-Young).
        pa = a @ np.linalg.pinv(a)
        pb = np.linalg.pinv(b) @ b
        prod = s * a @ b
        assert min(np.abs(prod - pa @ wl).max(), np.abs(prod - wl @ pb).max()) < 1e-5
        best = np.linalg.norm(wl - ref)
        assert best - 1e-6 <= np.linalg.norm(wl - prod) < 1.5 * best, (path, layer)
      else:
        assert np.abs(s * a @ b - ref).max() < 2e-5 * np.abs(wl).max(), (path, layer)


def test_randomized_svd_converges_to_the_exact_svd():
  rng = np.random.default_rng(0)
  u, _ = np.linalg.qr(rng.normal(size=(40, 40)))
  v, _ = np.linalg.qr(rng.normal(size=(24, 24)))
  sv = np.concatenate([[10, 7, 5, 3], np.geomspace(0.3, 0.01, 20)])
  w = (u[:, :24] * sv) @ v.T  # (in=40, out=24): a gap after the 4th singular value
  errs = []
  for niter in (0, 1, 3):
    k, a, b = jaxlora.initialisation.factors(f"pissa_niter_{niter}", jax.random.key(1), "w",
                                             jnp.asarray(w, jnp.float32), ("in", "out"), 4, 2.0,
                                             jnp.float32)
    errs.append(np.abs(2.0 * f64(a) @ f64(b) - _ref_product("pissa", w, 4, 2.0)).max())
  assert errs[0] > errs[1] > errs[2] and errs[2] < 1e-4, errs
  # Wide matrices go through the transposed (tall) orientation.
  k, a, b = jaxlora.initialisation.factors("pissa_niter_3", jax.random.key(1), "w",
                                           jnp.asarray(w.T, jnp.float32), ("in", "out"), 4, 1.0,
                                           jnp.float32)
  assert np.abs(f64(a) @ f64(b) - _ref_product("pissa", w.T, 4, 1.0)).max() < 1e-4


@pytest.mark.parametrize("init", ["pissa", pytest.param("olora", marks=pytest.mark.slow)])
def test_quantized_kernels_requantize_the_residual(init):
  rng = np.random.default_rng(0)
  params = {"d": {"kernel": jnp.asarray(rng.normal(size=(64, 32)), jnp.float32)}}
  q = jaxlora.quantize(params, "nf4", targets=".*")
  tree = jaxlora.wrap(q, rank=4, alpha=8, init=init)
  old, new = q["d"]["kernel"], tree["d"]["kernel"]
  assert jaxlora.quantization.is_quantized(new)
  settings = lambda q: (q.qtype, q.block_size, q.double_quant)
  assert settings(new) == settings(old)
  # The factors come from the dequantized kernel; the residual is that minus them, quantized.
  w = f64(jaxlora.dequantize(q)["d"]["kernel"])
  s = float(tree["d"]["lora_scale"])
  delta = s * f64(tree["d"]["lora_a"]) @ f64(tree["d"]["lora_b"])
  np.testing.assert_allclose(delta, _ref_product(init, w, 4, s), atol=2e-5 * np.abs(w).max())
  resid = w - delta
  back = f64(jaxlora.quantization.dequantize_array(new))
  # NF4's widest code gap is 0.28 of a block's absmax: no value can be further than half that.
  assert np.abs(back - resid).max() <= 0.15 * np.abs(resid).max()
  requant = f64(jaxlora.quantization.dequantize_array(
      jaxlora.quantization.requantize_like(resid.astype(np.float32), old)))
  assert np.mean(back == requant) > 0.99  # the same quantizer up to rounding-boundary ties
  with pytest.raises(jaxlora.errors.InputError, match="host"):
    jax.eval_shape(lambda p: jaxlora.wrap(p, rank=4, init=init), q)


def test_init_names_and_errors():
  for bad in ("svd", "pissa_niter_", "pissa_niter_x", "PiSSA", True, None):
    with pytest.raises(jaxlora.errors.InputError, match="'pissa_niter_K'"):
      jaxlora.wrap({"d": {"kernel": jnp.ones((4, 4))}}, rank=2, init=bad)
  with pytest.raises(jaxlora.errors.InputError, match="kaiming"):
    jaxlora.wrap({"d": {"kernel": jnp.ones((4, 4))}}, rank=2, init=True)
  with pytest.raises(jaxlora.errors.InputError, match="LoftQ.*not implemented"):
    jaxlora.wrap({"d": {"kernel": jnp.ones((4, 4))}}, rank=2, init="loftq")
  with pytest.raises(jaxlora.errors.InputError, match="positive scale"):
    jaxlora.wrap({"d": {"kernel": jnp.ones((4, 4))}}, rank=2, alpha=-1.0, init="pissa")


# ----------------------------------------------------------------------------- against PEFT

try:
  import peft
  import torch
  import transformers
except ImportError:  # the tests above still run
  peft = torch = transformers = None
needs_peft = pytest.mark.skipif(peft is None, reason="needs torch, transformers and peft")


@needs_peft
def test_gaussian_and_kaiming_draw_like_peft():
  torch.manual_seed(0)
  lin = torch.nn.Sequential(torch.nn.Linear(256, 128))
  stats = {}
  for init, peft_init in (("gaussian", "gaussian"), ("kaiming", True)):
    pm = peft.get_peft_model(lin, peft.LoraConfig(r=8, target_modules=["0"],
                                                  init_lora_weights=peft_init))
    a_t = pm.base_model.model[0].lora_A["default"].weight.detach().numpy()
    tree = jaxlora.wrap({"l": {"kernel": jnp.zeros((256, 128))}}, rank=8, init=init)
    a_j = np.asarray(tree["l"]["lora_a"])
    assert not np.asarray(tree["l"]["lora_b"]).any()
    stats[init] = (a_t.std(), a_j.std(), np.abs(a_t).max(), np.abs(a_j).max())
    pm.unload()
  t_std, j_std, _, _ = stats["gaussian"]
  assert abs(t_std - 1 / 8) < 0.01 and abs(j_std - 1 / 8) < 0.01  # std 1/r, 2048 draws each
  t_std, j_std, t_max, j_max = stats["kaiming"]  # U(-1/16, 1/16): std 1/(16 sqrt 3)
  assert abs(t_std - j_std) < 0.002 and t_max <= 1 / 16 and j_max <= 1 / 16 and j_max > 0.06


def _hf(path):
  return transformers.AutoModelForCausalLM.from_pretrained(path).eval()


def _ids():
  return np.random.default_rng(1).integers(0, 96, size=(2, 10))


def _torch_logits(m, ids):
  with torch.no_grad():
    return m(input_ids=torch.tensor(ids)).logits.numpy()


def _jax_logits(model, tree, ids):
  return np.asarray(_forward(model)(tree, ids))


def _layers(model, tree):
  """(hf module name, A (in, r), B (r, out), scale, kernel (in, out)) per adapted layer."""
  for path_t, mod in jaxlora._tree.adapter_modules(tree):
    for i in range(mod["lora_a"].shape[0]):
      yield (model.hf_module_name(path_t, i), f64(mod["lora_a"][i]), f64(mod["lora_b"][i]),
             float(mod["lora_scale"][i]), f64(mod["kernel"][i]))


@needs_peft
@pytest.mark.parametrize("init,rslora", [
    ("pissa", False), ("olora", False), pytest.param("olora", True, marks=pytest.mark.slow)])
def test_product_and_residual_equal_peft(hf_llama, init, rslora):
  path, model, params = hf_llama
  tree = jaxlora.wrap(params, rank=4, alpha=6, use_rslora=rslora, init=init, layout=model)
  pm = peft.get_peft_model(_hf(path), peft.LoraConfig(
      r=4, lora_alpha=6, use_rslora=rslora, target_modules="all-linear", init_lora_weights=init))
  n = 0
  worst = [0.0, 0.0]
  for name, a, b, s, kernel in _layers(model, tree):
    layer = pm.base_model.model.get_submodule(name)
    assert layer.scaling["default"] == pytest.approx(s)
    ba = (layer.lora_B["default"].weight @ layer.lora_A["default"].weight).detach().double().numpy()
    w_res = layer.base_layer.weight.detach().double().numpy()
    worst[0] = max(worst[0], np.abs(s * (a @ b).T - s * ba).max())
    worst[1] = max(worst[1], np.abs(kernel.T - w_res).max())
    n += 1
  assert n == 14 and worst[0] < 2e-5 and worst[1] < 2e-5, worst
  ids = _ids()
  np.testing.assert_allclose(_jax_logits(model, tree, ids), _torch_logits(pm, ids), atol=1e-5)


def _train_like(tree, key):
  """A 'trained' adapter: the factors moved away from their init."""
  leaves, treedef = jax.tree_util.tree_flatten_with_path(tree)
  keys = jax.random.split(key, len(leaves))
  out = [x + 0.05 * jax.random.normal(k, x.shape, x.dtype)
         if getattr(p[-1], "key", None) in ("lora_a", "lora_b") else x
         for k, (p, x) in zip(keys, leaves)]
  return jax.tree.unflatten(treedef, out)


@needs_peft
@pytest.mark.parametrize("init", ["pissa", pytest.param("olora", marks=pytest.mark.slow)])
def test_convert_to_lora_equals_peft_conversion(hf_llama, tmp_path, init):
  path, model, params = hf_llama
  start = jaxlora.wrap(params, rank=4, alpha=8, init=init, layout=model,
                       targets=("q_proj", "v_proj", "down_proj"))
  initial = jaxlora.adapter(start)
  trained = _train_like(start, jax.random.key(3))
  ids = _ids()
  ref = _jax_logits(model, trained, ids)

  lora = jaxlora.peft.convert_to_lora(trained, initial)
  base = jaxlora.peft.original_base(trained, initial)
  for a, b in zip(jax.tree.leaves(base), jax.tree.leaves(params)):
    np.testing.assert_allclose(a, b, atol=1e-6)
  out = _jax_logits(model, jaxlora.combine(lora, base), ids)
  on_orig = _jax_logits(model, jaxlora.combine(lora, params), ids)
  assert np.abs(out - ref).max() < 1e-5 and np.abs(on_orig - ref).max() < 1e-5

  # PEFT's own conversion of the same adapters: the trained one saved as PEFT saves a PiSSA
  # adapter (init_lora_weights=init: PEFT rebuilds the residual from the original base when it
  # loads), the initial one with init_lora_weights=True, as PEFT requires.
  jaxlora.peft.save(str(tmp_path / "trained"), trained, model=model, init_lora_weights=init)
  # (Without the initial factors the wrap keeps: with them, save would convert it too.)
  def strip(d):
    return {k: strip(v) if isinstance(v, dict) else v for k, v in d.items()
            if not k.startswith("lora_init_")}
  plain = strip(start)
  jaxlora.peft.save(str(tmp_path / "init"), plain, model=model)
  assert json.load(open(tmp_path / "trained" / "adapter_config.json"))["init_lora_weights"] == init
  pm = peft.PeftModel.from_pretrained(_hf(path), str(tmp_path / "trained")).eval()
  # PEFT's residual comes from torch's SVD (it differs from ours by ~2e-6 in float32).
  np.testing.assert_allclose(_torch_logits(pm, ids), ref, atol=3e-5)
  pm.save_pretrained(str(tmp_path / "converted"),
                     path_initial_model_for_weight_conversion=str(tmp_path / "init"))
  jaxlora.peft.save(str(tmp_path / "ours"), jaxlora.combine(lora, base), model=model)
  theirs = jaxlora.safetensors_io.SafetensorsFile(str(tmp_path / "converted" /
                                                      "adapter_model.safetensors"))
  ours = jaxlora.safetensors_io.SafetensorsFile(str(tmp_path / "ours" /
                                                    "adapter_model.safetensors"))
  assert sorted(theirs.keys()) == sorted(ours.keys())
  for k in ours.keys():
    np.testing.assert_array_equal(ours.get(k), theirs.get(k), err_msg=k)
  cfg_t = json.load(open(tmp_path / "converted" / "adapter_config.json"))
  cfg_o = json.load(open(tmp_path / "ours" / "adapter_config.json"))
  assert (cfg_o["r"], cfg_o["lora_alpha"]) == (cfg_t["r"], cfg_t["lora_alpha"]) == (8, 16)
  assert cfg_t["init_lora_weights"] is True and cfg_o["init_lora_weights"] is True
  conv = peft.PeftModel.from_pretrained(_hf(path), str(tmp_path / "converted")).eval()
  np.testing.assert_allclose(_torch_logits(conv, ids), ref, atol=1e-5)


@needs_peft
def test_peft_pissa_adapter_loads_on_the_original_base(hf_llama, tmp_path):
  path, model, params = hf_llama
  torch.manual_seed(2)
  pm = peft.get_peft_model(_hf(path), peft.LoraConfig(
      r=4, lora_alpha=4, target_modules=["k_proj", "up_proj"], init_lora_weights="pissa",
      rank_pattern={"model.layers.1.mlp.up_proj": 2}))
  with torch.no_grad():  # "train": move the factors away from their init
    for n, p in pm.named_parameters():
      if "lora_" in n:
        p.add_(0.05 * torch.randn_like(p))
  pm.save_pretrained(str(tmp_path))
  assert json.load(open(tmp_path / "adapter_config.json"))["init_lora_weights"] == "pissa"
  ids = _ids()
  ref = _torch_logits(pm.eval(), ids)
  tree = jaxlora.peft.load(str(tmp_path), params, model=model)
  np.testing.assert_allclose(_jax_logits(model, tree, ids), ref, atol=1e-5)
  res = np.asarray(tree["layers"]["mlp"]["up_proj"]["kernel"][1]).T
  w_res = pm.base_model.model.model.layers[1].mlp.up_proj.base_layer.weight.detach().numpy()
  np.testing.assert_allclose(res, w_res, atol=2e-5)
  # Loaded as a plain adapter (no residual), it computes something else.
  cfg = json.load(open(tmp_path / "adapter_config.json"))
  json.dump(dict(cfg, init_lora_weights=True), open(tmp_path / "adapter_config.json", "w"))
  plain = jaxlora.peft.load(str(tmp_path), params, model=model)
  assert np.abs(_jax_logits(model, plain, ids) - ref).max() > 1e-3
  for bad in ("loftq", "corda"):
    json.dump(dict(cfg, init_lora_weights=bad), open(tmp_path / "adapter_config.json", "w"))
    with pytest.raises(jaxlora.errors.InputError, match=f"init_lora_weights='{bad}'"):
      jaxlora.peft.load(str(tmp_path), params, model=model)
  with pytest.raises(jaxlora.errors.InputError, match="'pissa_niter_K'"):
    jaxlora.peft.save(str(tmp_path / "x"), tree, model=model, init_lora_weights="loftq")


def test_convert_to_lora_errors_and_scales():
  base = {"d": {"kernel": jax.random.normal(jax.random.key(0), (6, 5))},
          "e": {"kernel": jax.random.normal(jax.random.key(1), (5, 5))}}
  start = jaxlora.wrap(base, rank=2, init="pissa")
  initial = jaxlora.adapter(start)
  with pytest.raises(jaxlora.errors.InputError, match="'e' is only in `initial`"):
    jaxlora.peft.convert_to_lora({"d": start["d"]}, initial)
  # A changed scale after init is folded into the initial part (PEFT assumes equal scales).
  trained = _train_like(start, jax.random.key(2))
  trained["d"] = dict(trained["d"], lora_scale=jnp.float32(0.5))
  lora = jaxlora.peft.convert_to_lora(trained, initial)
  x = np.random.default_rng(0).normal(size=(3, 6))
  want = x @ f64(jaxlora.merge(trained)["d"]["kernel"])
  got = x @ f64(jaxlora.merge(jaxlora.combine(lora, jaxlora.peft.original_base(trained, initial)))
                ["d"]["kernel"])
  np.testing.assert_allclose(got, want, atol=1e-5)
  # From the adapters alone (no kernels) the rank axes are read from the shapes.
  alone = jaxlora.peft.convert_to_lora(jaxlora.adapter(trained), initial)
  for x, y in zip(jax.tree.leaves(alone), jax.tree.leaves(lora)):
    np.testing.assert_array_equal(x, y)
  with pytest.raises(jaxlora.errors.InputError, match="residual kernels"):
    jaxlora.peft.original_base(jaxlora.adapter(trained), initial)
  dora = dict(trained, d=dict(trained["d"], lora_magnitude=jnp.ones(5)))
  with pytest.raises(jaxlora.errors.InputError, match="DoRA"):
    jaxlora.peft.convert_to_lora(dora, initial)


@needs_peft
def test_pissa_checkpoint_and_default_peft_export_work_on_the_original_base(hf_llama, tmp_path):
  path, model, params = hf_llama
  start = jaxlora.wrap(params, rank=4, alpha=8, init="pissa_niter_2", layout=model,
                       targets=("q_proj", "down_proj"), key=jax.random.key(5))
  trained = _train_like(start, jax.random.key(6))
  ids = _ids()
  ref = _jax_logits(model, trained, ids)
  # The Orbax adapter checkpoint keeps the initial factors: loaded onto the ORIGINAL base it
  # rebuilds the residual kernels bit for bit (a randomized SVD's draw included).
  jaxlora.save(str(tmp_path / "ckpt"), trained)
  back = jaxlora.load(str(tmp_path / "ckpt"), params)
  assert jax.tree.structure(back) == jax.tree.structure(trained)
  for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(trained)):
    np.testing.assert_array_equal(a, b)
  # peft.save converts by default: PEFT serves it on the original base with the same logits.
  jaxlora.peft.save(str(tmp_path / "peft"), trained, model=model)
  cfg = json.load(open(tmp_path / "peft" / "adapter_config.json"))
  assert cfg["r"] == 8 and cfg["init_lora_weights"] is True
  pm = peft.PeftModel.from_pretrained(_hf(path), str(tmp_path / "peft")).eval()
  np.testing.assert_allclose(_torch_logits(pm, ids), ref, atol=1e-5)
  # Without the kept factors nothing can be converted, and the error says what to pass.
  with pytest.raises(ValueError, match="pass the adapter at init as `initial`"):
    jaxlora.peft.convert_to_lora(jaxlora.wrap(params, rank=2, layout=model))
