"""jaxlora.merge_adapters against PEFT's add_weighted_adapter on a tiny Llama, every method."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxlora
from jaxlora import _tree

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from peft.tuners.lora.model import LoraModel  # noqa: E402

W2, W3 = [0.7, -0.4], [0.7, -0.4, 0.5]
RANK = 16  # merged adapters are zero-padded to this rank (exact): one compiled forward pass
# Two layer shapes, in > out and in < out (each shape compiles its own combination).
TARGETS = r"(k_proj|up_proj)$"


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
  root = tmp_path_factory.mktemp("merge_adapters")
  torch.manual_seed(0)
  hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(
      vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
      num_attention_heads=4, num_key_value_heads=2, initializer_range=0.1)).eval()
  base = str(root / "base")
  hf.save_pretrained(base)
  model, params = jaxlora.models.from_pretrained(base)
  layout = model.lora_layout(params)
  trees = {}
  # b's k_proj scale differs from its up_proj's; c has another rank.
  specs = {"a": dict(rank=4, alpha=8), "b": dict(rank=4, alpha=4, alpha_pattern={"k_proj": 6.0}),
           "c": dict(rank=2, alpha=3)}
  for i, (name, kw) in enumerate(specs.items()):
    t = jaxlora.wrap(params, targets=TARGETS, layout=layout, key=jax.random.key(i), **kw)
    trees[name] = _randomized(t, np.random.default_rng(10 + i))
    jaxlora.peft.save(str(root / name), trees[name], model=model, base_model_name_or_path=base)
  pm = peft.PeftModel.from_pretrained(transformers.AutoModelForCausalLM.from_pretrained(base),
                                      str(root / "a"), adapter_name="a").eval()
  pm.load_adapter(str(root / "b"), adapter_name="b")
  pm.load_adapter(str(root / "c"), adapter_name="c")
  ids = np.random.default_rng(1).integers(0, 96, size=(2, 10))
  fwd = jax.jit(jaxlora.apply(model.apply))

  def logits(tree):
    """jaxlora's logits with the adapter's ranks zero-padded to RANK (exact)."""
    def pad(path, x):
      name = path[-1].key
      if name not in ("lora_a", "lora_b"):
        return x
      axis = x.ndim - 1 if name == "lora_a" else 1  # stacked layers lead
      widths = [(0, 0)] * x.ndim
      widths[axis] = (0, RANK - x.shape[axis])
      return jnp.pad(x, widths)
    return np.asarray(fwd({"params": jax.tree_util.tree_map_with_path(pad, tree)}, ids))

  zero_b = jax.tree_util.tree_map_with_path(
      lambda p, x: jnp.zeros_like(x) if p[-1].key == "lora_b" else x, trees["a"])
  plain = logits(zero_b)  # the base model's logits, through the same compiled function
  return dict(root=root, base=base, model=model, params=params, trees=trees, pm=pm, ids=ids,
              logits=logits, plain=plain, layout=layout, count=[0])


def _randomized(tree, rng):
  """Random non-zero A and B (conftest.randomize_adapters, drawn with NumPy: no compiles)."""
  def draw(path, x):
    if path[-1].key not in ("lora_a", "lora_b"):
      return x
    return jnp.asarray((0.3 * rng.standard_normal(x.shape)).astype(x.dtype))
  return jax.tree_util.tree_map_with_path(draw, tree)


def _peft_logits(setup, names, weights, method, **kw):
  pm = setup["pm"]
  setup["count"][0] += 1
  new = f"merged{setup['count'][0]}"
  pm.add_weighted_adapter(names, weights, new, combination_type=method, **kw)
  pm.set_adapter(new)
  with torch.no_grad():
    return pm(input_ids=torch.tensor(setup["ids"])).logits.numpy()


def _fixed_sign_svd(svd):
  """torch.linalg.svd with jaxlora's sign per singular pair (largest entry of U positive)."""
  def run(m, full_matrices=True, driver=None):
    u, s, vh = svd(m, full_matrices=full_matrices, driver=driver)
    k = s.shape[-1]
    u, vh = u.clone(), vh.clone()
    peak = u[:, :k].gather(0, u[:, :k].abs().argmax(0, keepdim=True))
    sign = torch.where(peak < 0, -1.0, 1.0)
    u[:, :k] *= sign
    vh[:k] *= sign.T
    return u, s, vh
  return run


DETERMINISTIC = [
    ("linear", "ab", {}),
    ("cat", "abc", {}),
    ("svd", "abc", {}),
    ("svd", "abc", dict(svd_rank=3, svd_clamp=0.9, svd_full_matrices=False)),
    ("ties", "ab", dict(density=0.5)),
    ("ties_svd", "abc", dict(density=0.4, majority_sign_method="frequency")),
    ("magnitude_prune", "ab", dict(density=0.3)),
    ("magnitude_prune_svd", "abc", dict(density=0.6, svd_rank=2)),
    ("ties", "c", dict(density=0.5)),  # one adapter: PEFT (and jaxlora) combine it linearly
]


@pytest.mark.parametrize("method,names,kw", DETERMINISTIC,
                         ids=[f"{m}-{n}-{'-'.join(map(str, kw.values()))}"
                              for m, n, kw in DETERMINISTIC])
def test_matches_peft(setup, method, names, kw, monkeypatch):
  names = list(names)
  weights = {1: [0.6], 2: W2, 3: W3}[len(names)]
  if "svd_clamp" in kw:  # the clamp quantile depends on the SVD's sign choices: fix them
    monkeypatch.setattr(torch.linalg, "svd", _fixed_sign_svd(torch.linalg.svd))
  ref = _peft_logits(setup, names, weights, method, **kw)
  merged = jaxlora.merge_adapters({n: setup["trees"][n] for n in names}, weights, method=method,
                                  **kw)
  out = setup["logits"](merged)
  diff = np.abs(out - ref).max()
  print(f"{method} {kw}: max logit difference vs PEFT {diff:.2e}")
  assert diff < 1e-4
  assert np.abs(ref - setup["plain"]).max() > 0.1  # the merged adapter does something
  for _, mod in _tree.adapter_modules(merged):  # weights and scales live in the factors
    assert np.all(np.asarray(mod["lora_scale"]) == 1)
  mod = merged["layers"]["self_attn"]["k_proj"]
  if len(names) == 1:
    want = 2
  elif method == "cat":
    want = 4 + 4 + 2
  elif method.endswith("svd"):
    want = kw.get("svd_rank", 4)  # default: the largest rank
  else:
    want = 4
  assert mod["lora_a"].shape[-1] == want


def test_cat_is_exact(setup):
  t = setup["trees"]
  merged = jaxlora.merge_adapters([t["a"], t["c"]], [0.5, 2.0], method="cat")
  for path in (("layers", "mlp", "up_proj"), ("layers", "self_attn", "k_proj")):
    def delta(tree):
      m = tree
      for k in path:
        m = m[k]
      scale = np.asarray(m["lora_scale"])[:, None, None]
      return scale * np.einsum("lir,lro->lio", np.asarray(m["lora_a"], np.float64),
                               np.asarray(m["lora_b"], np.float64))
    np.testing.assert_allclose(delta(merged), 0.5 * delta(t["a"]) + 2.0 * delta(t["c"]),
                               atol=1e-5)


DARE = [("dare_linear", "ab"), ("dare_ties", "ab"), ("dare_linear_svd", "abc"),
        ("dare_ties_svd", "abc")]


@pytest.mark.parametrize("method,names", DARE, ids=[m for m, _ in DARE])
def test_dare_equals_peft_given_its_masks(setup, method, names, monkeypatch):
  """PEFT draws its masks with torch.bernoulli; given the same masks jaxlora computes the same."""
  names = list(names)
  weights = W2 if len(names) == 2 else W3
  pm, cfg = setup["pm"], setup["model"].config
  module_names = {id(m): n for n, m in pm.base_model.model.named_modules()}
  current, draws = [None], []
  bernoulli = torch.bernoulli

  def record(x, *a, **k):
    out = bernoulli(x, *a, **k)
    draws.append((current[0], out.numpy().copy()))
    return out

  for attr in ("_generalized_task_arithmetic_weighted_adapter",
               "_svd_generalized_task_arithmetic_weighted_adapter"):
    orig = getattr(LoraModel, attr)

    def wrapped(self, combination_type, adapters, weights, *rest, _orig=orig,
                _svd=attr.startswith("_svd"), **kw):
      target = rest[1] if _svd else rest[0]  # the LoRA layer being combined
      current[0] = module_names[id(target)]
      return _orig(self, combination_type, adapters, weights, *rest, **kw)

    monkeypatch.setattr(LoraModel, attr, wrapped)
  monkeypatch.setattr(torch, "bernoulli", record)
  ref = _peft_logits(setup, names, weights, method, density=0.6)
  monkeypatch.undo()

  # Calls per module: A of each adapter, then B of each (non-svd); the product of each (svd).
  svd = method.endswith("svd")
  masks = [{} for _ in names]
  by_module = {}
  for module, m in draws:
    by_module.setdefault(module, []).append(m)
  assert len(by_module) == 2 * 2  # layers x targets
  for module, ms in by_module.items():
    path_t, layer = jaxlora.models.hub.flax_module_path(cfg, module)
    mod = setup["trees"]["a"]
    for k in path_t:
      mod = mod[k]
    for i, name in enumerate(names):
      tree_mod = setup["trees"][name]
      for k in path_t:
        tree_mod = tree_mod[k]
      node = masks[i]
      for k in path_t:
        node = node.setdefault(k, {})
      if svd:
        node.setdefault("delta", np.zeros(mod["kernel"].shape, bool))[layer] = ms[i].T
      else:
        node.setdefault("lora_a", np.zeros(tree_mod["lora_a"].shape, bool))[layer] = ms[i].T
        node.setdefault("lora_b", np.zeros(tree_mod["lora_b"].shape, bool))[layer] = \
            ms[len(names) + i].T
  merged = jaxlora.merge_adapters([setup["trees"][n] for n in names], weights, method=method,
                                  density=0.6, masks=masks)
  diff = np.abs(setup["logits"](merged) - ref).max()
  print(f"{method}: max logit difference vs PEFT with PEFT's masks {diff:.2e}")
  assert diff < 1e-4


def test_dare_masks_keep_density_and_rescale(setup):
  t = setup["trees"]
  d = 0.3
  # Weight 0 on b: the result is a's factors times mask / density (times sqrt(scale)).
  merged = jaxlora.merge_adapters([t["a"], t["b"]], [1.0, 0.0], method="dare_linear", density=d,
                                  key=jax.random.key(3))
  ratios = []
  for path, mod in _tree.adapter_modules(merged):
    src = t["a"]
    for k in path:
      src = src[k]
    root = np.sqrt(np.asarray(src["lora_scale"]))[:, None, None]
    ratios.append((np.asarray(mod["lora_a"]) / (root * np.asarray(src["lora_a"]))).ravel())
    ratios.append((np.asarray(mod["lora_b"]) / (root * np.asarray(src["lora_b"]))).ravel())
  ratios = np.concatenate(ratios)
  kept = ratios != 0
  assert ratios.size == 1024
  assert abs(kept.mean() - d) < 0.05, kept.mean()
  np.testing.assert_allclose(ratios[kept], 1 / d, rtol=1e-5)
  # The same key gives the same masks, another key others.
  again = jaxlora.merge_adapters([t["a"], t["b"]], [1.0, 0.0], method="dare_linear", density=d,
                                 key=jax.random.key(3))
  other = jaxlora.merge_adapters([t["a"], t["b"]], [1.0, 0.0], method="dare_linear", density=d,
                                 key=jax.random.key(4))
  q = lambda tree: np.asarray(tree["layers"]["mlp"]["up_proj"]["lora_a"])
  np.testing.assert_array_equal(q(again), q(merged))
  assert not np.array_equal(q(other), q(merged))

  # The svd variants prune the product: with a rank that keeps everything, A @ B is
  # mask * delta / density.
  merged = jaxlora.merge_adapters([t["a"], t["b"]], [1.0, 0.0], method="dare_linear_svd",
                                  density=d, key=jax.random.key(5), svd_rank=48)
  mod, src = merged["layers"]["mlp"]["up_proj"], t["a"]["layers"]["mlp"]["up_proj"]
  prod = lambda m: np.einsum("lir,lro->lio", np.asarray(m["lora_a"], np.float64),
                             np.asarray(m["lora_b"], np.float64)) * np.asarray(
                                 m["lora_scale"], np.float64)[:, None, None]
  ratio = (prod(mod) / prod(src)).ravel()
  big = np.abs(prod(src)).ravel() > 0.05
  kept = np.abs(ratio[big] * d - 1) < 1e-3
  assert np.all(kept | (np.abs(ratio[big]) < 1e-3))
  assert abs(kept.mean() - d) < 0.05, kept.mean()


def test_nd_kernels_and_kernel_shaped_masks():
  """Einsum kernels (an einsum-batch axis; interleaved axes): deltas in the kernel's layout."""
  from models import EinsumNet  # pylint: disable=import-outside-toplevel
  m, x = EinsumNet(), jnp.ones((1, 2, 6))
  rng = np.random.default_rng(0)
  v = jax.tree.map(lambda s: jnp.asarray(rng.standard_normal(s.shape), s.dtype),  # no init compile
                   jax.eval_shape(m.init, jax.random.key(0), x))
  layout = jaxlora.trace_layout(m.apply, v, x)
  targets = "per_head|interleaved"  # an einsum-batch axis; output, input, output axes
  t1 = _randomized(jaxlora.wrap(v, rank=2, targets=targets, layout=layout,
                                key=jax.random.key(1)), rng)
  t2 = _randomized(jaxlora.wrap(v, rank=3, alpha=5.0, targets=targets, layout=layout,
                                key=jax.random.key(2)), rng)

  def deltas(tree):  # per module, merged kernel minus base kernel: the delta in kernel layout
    merged = jaxlora.merge(tree)["params"]
    return {k: np.asarray(merged[k]["kernel"], np.float64) - np.asarray(v["params"][k]["kernel"])
            for k in ("per_head", "interleaved")}

  d1, d2 = deltas(t1), deltas(t2)
  cat = deltas(jaxlora.merge_adapters([t1, t2], [0.6, -0.3], method="cat"))
  for k in d1:
    np.testing.assert_allclose(cat[k], 0.6 * d1[k] - 0.3 * d2[k], atol=1e-5)
  masks = [{k: {"delta": rng.random(d1[k].shape) < 0.5} for k in d1} for _ in range(2)]
  svd = deltas(jaxlora.merge_adapters([t1, t2], [0.6, -0.3], method="dare_linear_svd",
                                      density=0.5, masks=masks, svd_rank=64))  # exact rank
  for k in d1:
    want = (0.6 * masks[0][k]["delta"] * d1[k] - 0.3 * masks[1][k]["delta"] * d2[k]) / 0.5
    np.testing.assert_allclose(svd[k], want, atol=1e-5, err_msg=k)


def test_bad_inputs(setup):
  t, params, layout = setup["trees"], setup["params"], setup["layout"]
  ab = {"a": t["a"], "b": t["b"]}
  with pytest.raises(ValueError, match="Unknown method 'tie'.*linear, cat, svd, ties"):
    jaxlora.merge_adapters(ab, W2, method="tie")
  with pytest.raises(ValueError, match="method='linear' does not take `density`.*ties"):
    jaxlora.merge_adapters(ab, W2, density=0.5)
  with pytest.raises(ValueError, match="method='ties' does not take `svd_rank`"):
    jaxlora.merge_adapters(ab, W2, method="ties", density=0.5, svd_rank=2)
  with pytest.raises(ValueError, match="method='svd' does not take `majority_sign_method`"):
    jaxlora.merge_adapters(ab, W2, method="svd", majority_sign_method="frequency")
  with pytest.raises(ValueError, match="method='ties' does not take `key`.*dare_linear"):
    jaxlora.merge_adapters(ab, W2, method="ties", density=0.5, key=jax.random.key(0))
  with pytest.raises(ValueError, match="method='ties' needs `density`"):
    jaxlora.merge_adapters(ab, W2, method="ties")
  with pytest.raises(ValueError, match=r"`density` must be a number in \(0, 1\], got 1.5"):
    jaxlora.merge_adapters(ab, W2, method="magnitude_prune", density=1.5)
  with pytest.raises(ValueError, match="'total' or 'frequency'"):
    jaxlora.merge_adapters(ab, W2, method="ties", density=0.5, majority_sign_method="sum")
  with pytest.raises(ValueError, match="dare_ties.*at random: pass a PRNG key"):
    jaxlora.merge_adapters(ab, W2, method="dare_ties", density=0.5)
  with pytest.raises(ValueError, match="either `key`.*or `masks`"):
    jaxlora.merge_adapters(ab, W2, method="dare_ties", density=0.5, key=jax.random.key(0),
                           masks=[{}, {}])
  with pytest.raises(ValueError, match=r"masks for trees\[0\] have no entry for the layer"):
    jaxlora.merge_adapters([t["a"], t["b"]], W2, method="dare_linear", density=0.5,
                           masks=[{}, {}])
  bad = {"layers": {"mlp": {"up_proj": {"lora_a": np.ones((2, 32, 3)),
                                        "lora_b": np.ones((2, 3, 48))}}}}
  with pytest.raises(ValueError, match=r"'lora_a' mask for trees\['a'\] at 'layers/mlp/up_"
                     r"proj' has shape \(2, 32, 3\); dare_linear needs \(2, 32, 4\)"):
    jaxlora.merge_adapters(ab, W2, method="dare_linear", density=0.5, masks={"a": bad, "b": bad})
  with pytest.raises(ValueError, match=r"Got 3 weights for 2 adapters \(trees\['a'\], "):
    jaxlora.merge_adapters(ab, W3)
  with pytest.raises(ValueError, match="weights must be finite"):
    jaxlora.merge_adapters(ab, [1.0, float("nan")])
  # Ranks: entry-wise methods need equal ones, and say which layer and adapters differ.
  with pytest.raises(ValueError, match=r"At 'layers/mlp/up_proj' trees\['c'\] has rank 2 and "
                     r"trees\['a'\] rank 4.*method='cat'"):
    jaxlora.merge_adapters({"a": t["a"], "c": t["c"]}, W2, method="ties", density=0.5)
  # Different targets, shapes and bases.
  attn = jaxlora.wrap(params, rank=4, targets="k_proj", layout=layout, key=jax.random.key(0))
  with pytest.raises(ValueError, match=r"adapt different layers: only trees\['a'\] has an "
                     "adapter at 'layers/mlp/up_proj'"):
    jaxlora.merge_adapters({"a": t["a"], "attn": attn}, W2)
  other = jax.tree_util.tree_map_with_path(
      lambda p, x: x + 1 if p[-1].key == "kernel" and p[-2].key == "k_proj" else x, t["b"])
  with pytest.raises(ValueError, match=r"trees\['b'\] and trees\['a'\] have different base "
                     "kernels at 'layers/self_attn/k_proj/kernel'"):
    jaxlora.merge_adapters({"a": t["a"], "b": other}, W2)
  # Adapter-only trees skip the base check.
  jaxlora.merge_adapters({"a": t["a"], "b": jaxlora.adapter(t["b"])}, W2)
  small = jaxlora.wrap({"d": {"kernel": jnp.zeros((4, 3))}}, rank=2, key=jax.random.key(0))
  wide = jaxlora.wrap({"d": {"kernel": jnp.zeros((5, 3))}}, rank=2, key=jax.random.key(0))
  with pytest.raises(ValueError, match=r"trees\[1\] and trees\[0\] have different bases at 'd'"):
    jaxlora.merge_adapters([small, wide], W2)
  with pytest.raises(TypeError, match="looks like a single param tree"):
    jaxlora.merge_adapters(small, [1.0])
  plain = next(k for k in params if k != "layers")
  with pytest.raises(ValueError, match=rf"trees\['{plain}'\] holds no adapter"):
    jaxlora.merge_adapters({plain: params[plain], "a": t["a"]}, W2)


def test_cli_merge_adapters(setup, tmp_path, capsys):
  from jaxlora_cli.main import main  # pylint: disable=import-outside-toplevel
  root = setup["root"]
  out = tmp_path / "merged"
  assert main(["merge-adapters", "--adapters", f"a={root / 'a'},b={root / 'b'}", "--weights", "0.7,-0.4",
                   "--method", "ties", "--density", "0.5", "--out", str(out)]) == 0
  assert "ties combination of a, b" in capsys.readouterr().err
  cfg = json.loads((out / "adapter_config.json").read_text())
  assert cfg["r"] == 4 and cfg["lora_alpha"] == 4
  assert cfg["base_model_name_or_path"] == setup["base"]
  back = jaxlora.peft.load(str(out), setup["params"], model=setup["model"])
  want = jaxlora.merge_adapters([setup["trees"]["a"], setup["trees"]["b"]], W2, method="ties",
                                density=0.5)
  for x, y in zip(jax.tree.leaves(jaxlora.adapter(back)), jax.tree.leaves(jaxlora.adapter(want))):
    np.testing.assert_allclose(x, y, rtol=1e-6)
  assert main(["merge-adapters", "--adapters", f"a={root / 'a'},b={root / 'b'}", "--weights", "1",
                   "--out", str(tmp_path / "x")]) == 2
  assert "--weights has 1 values for 2 adapters" in capsys.readouterr().err
  assert main(["merge-adapters", "--adapters", f"a={root / 'a'},c={root / 'c'}", "--weights", "1,1",
                   "--method", "linear", "--out", str(tmp_path / "x")]) == 2
  assert "need equal ranks" in capsys.readouterr().err
