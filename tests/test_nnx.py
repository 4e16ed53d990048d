"""jaxlora.nnx: LoRA on Flax NNX models, against the linen path, NumPy and PEFT."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import jaxlora
from conftest import f64, randomize_adapters


class NNXBlock(nnx.Module):
  """Linear, LinearGeneral and Einsum layers, as the linen `LinenBlock`."""

  def __init__(self, rngs):
    self.up = nnx.Linear(8, 16, rngs=rngs)
    self.heads = nnx.LinearGeneral(16, (2, 4), rngs=rngs)
    self.mix = nnx.Einsum("bthd,hdo->bto", (2, 4, 8), (8,), rngs=rngs)
    self.head = nnx.Linear(8, 5, rngs=rngs)

  def __call__(self, x):
    return self.head(self.mix(self.heads(jax.nn.gelu(self.up(x)))))


class LinenBlock(nn.Module):

  @nn.compact
  def __call__(self, x):
    h = jax.nn.gelu(nn.Dense(16, name="up")(x))
    z = nn.DenseGeneral((2, 4), name="heads")(h)
    return nn.Dense(5, name="head")(nn.Einsum((2, 4, 8), "bthd,hdo->bto", name="mix")(z))


def _pair():
  model = NNXBlock(nnx.Rngs(0))
  params = {name: {"kernel": getattr(model, name).kernel[...],
                   "bias": getattr(model, name).bias[...]} for name in ("up", "heads", "mix",
                                                                       "head")}
  return model, params


X = jax.random.normal(jax.random.key(7), (2, 3, 8))


def test_one_training_step_equals_the_linen_path():
  model, params = _pair()
  linen = LinenBlock()
  np.testing.assert_allclose(model(X), linen.apply({"params": params}, X), rtol=1e-6, atol=1e-6)
  before = model(X)
  kw = dict(rank=2, alpha=4.0, targets="all-linear", key=jax.random.key(3))
  model = jaxlora.nnx.wrap(model, **kw)
  np.testing.assert_array_equal(model(X), before)  # B starts at zero: the base model
  assert type(model.head).__name__ == "Linear"  # 'all-linear' leaves the output head alone
  lay = jaxlora.trace_layout(linen.apply, {"params": params}, X)
  tree = jaxlora.wrap(params, layout=lay, **kw)
  for name in ("up", "heads", "mix"):  # the same factors from the same key
    np.testing.assert_array_equal(getattr(model, name).lora_a[...], tree[name]["lora_a"])
  # Random factors on both, then one adamw step each.
  tree = randomize_adapters(tree, jax.random.key(4))
  for name in ("up", "heads", "mix"):
    getattr(model, name).lora_a[...] = tree[name]["lora_a"]
    getattr(model, name).lora_b[...] = tree[name]["lora_b"]
  tx = optax.adamw(1e-2)

  trainable, frozen = jaxlora.split(tree)
  fwd = jaxlora.apply(linen.apply)
  loss_l = lambda t: jnp.mean(fwd({"params": jaxlora.combine(t, frozen)}, X) ** 2)
  value_l, g = jax.jit(jax.value_and_grad(loss_l))(trainable)
  upd, _ = tx.update(g, tx.init(trainable), trainable)
  trained = optax.apply_updates(trainable, upd)

  opt = nnx.Optimizer(model, tx, wrt=jaxlora.nnx.LoRAParam)

  @nnx.jit
  def step(model, opt):
    value, grads = nnx.value_and_grad(lambda m: jnp.mean(m(X) ** 2),
                                      argnums=nnx.DiffState(0, jaxlora.nnx.LoRAParam))(model)
    opt.update(model, grads)
    return value

  base = {n: np.asarray(getattr(model, n).base_layer.kernel[...]) for n in ("up", "mix")}
  value_n = step(model, opt)
  np.testing.assert_allclose(value_n, value_l, rtol=1e-6)
  for name in ("up", "heads", "mix"):
    for k in ("lora_a", "lora_b"):
      np.testing.assert_allclose(getattr(getattr(model, name), k)[...], trained[name][k],
                                 rtol=1e-5, atol=1e-7)
  for n, w in base.items():  # only the adapters trained
    np.testing.assert_array_equal(getattr(model, n).base_layer.kernel[...], w)
  # The split NNX users write: the LoRA state alone is what differentiates.
  _, lora_state, _ = nnx.split(model, jaxlora.nnx.LoRAParam, ...)
  assert sorted(nnx.to_pure_dict(lora_state)) == ["heads", "mix", "up"]


def test_factored_forward_matches_numpy_and_merge_unmerge():
  model, params = _pair()
  model = jaxlora.nnx.wrap(model, rank=3, targets=("up", "heads", "mix"), key=jax.random.key(1))
  for name in ("up", "heads", "mix"):
    layer = getattr(model, name)
    layer.lora_b[...] = 0.3 * jax.random.normal(jax.random.key(5), layer.lora_b[...].shape)
  x = f64(X)
  s = lambda n: float(getattr(model, n).lora_scale[...])
  w = lambda n, k: f64(getattr(getattr(model, n), k)[...])
  h = x @ f64(params["up"]["kernel"]) + f64(params["up"]["bias"])
  h = h + s("up") * (x @ w("up", "lora_a")) @ w("up", "lora_b")
  g = np.asarray(jax.nn.gelu(h))
  z = np.einsum("bti,ihd->bthd", g, f64(params["heads"]["kernel"])) + f64(params["heads"]["bias"])
  z = z + s("heads") * np.einsum("btr,rhd->bthd", g @ w("heads", "lora_a"), w("heads", "lora_b"))
  o = np.einsum("bthd,hdo->bto", z, f64(params["mix"]["kernel"])) + f64(params["mix"]["bias"])
  # 'bthd,hdo->bto' contracts h and d: A is (h, d, r), B (r, o).
  o = o + s("mix") * np.einsum("bthd,hdr->btr", z, w("mix", "lora_a")) @ w("mix", "lora_b")
  ref = o @ f64(params["head"]["kernel"]) + f64(params["head"]["bias"])
  out = model(X)
  np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-5)
  merged = jaxlora.nnx.merge(model)
  np.testing.assert_allclose(merged(X), out, rtol=1e-5, atol=1e-6)
  restored = jaxlora.nnx.unmerge(merged)
  np.testing.assert_allclose(restored.up.base_layer.kernel[...], params["up"]["kernel"],
                             atol=1e-6)
  np.testing.assert_allclose(restored(X), out, rtol=1e-5, atol=1e-6)


def test_orbax_save_load_and_errors(tmp_path):
  model, _ = _pair()
  model = jaxlora.nnx.wrap(model, rank=2, rank_pattern={"mix": 1}, key=jax.random.key(2))
  model.up.lora_b[...] = jnp.ones_like(model.up.lora_b[...])
  jaxlora.nnx.save(str(tmp_path / "adapter"), model)
  fresh, _ = _pair()
  back = jaxlora.nnx.load(str(tmp_path / "adapter"), fresh)
  np.testing.assert_array_equal(back(X), model(X))
  assert back.mix.lora_a[...].shape == (2, 4, 1)
  # A model that does not fit: the error names the path and shapes.
  class Other(nnx.Module):
    def __init__(self):
      self.up = nnx.Linear(8, 12, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="layer 'heads' that the base params do not have"):
    jaxlora.nnx.load(str(tmp_path / "adapter"), Other())
  with pytest.raises(ValueError, match=r"matched none of the layers of NNXBlock: \['head', "
                                       r"'heads', 'mix', 'up'\]"):
    jaxlora.nnx.wrap(_pair()[0], targets="q_proj")
  with pytest.raises(ValueError, match="already holds LoRA layers"):
    jaxlora.nnx.wrap(model)


@pytest.mark.slow  # torch and PEFT; the fast tier checks the NNX path against linen
def test_peft_round_trip_when_names_map(tmp_path):
  torch = pytest.importorskip("torch")
  peft = pytest.importorskip("peft")

  class TorchMLP(torch.nn.Module):
    def __init__(self):
      super().__init__()
      self.up = torch.nn.Linear(8, 16)
      self.down = torch.nn.Linear(16, 8)

    def forward(self, x):
      return self.down(torch.nn.functional.gelu(self.up(x), approximate="tanh"))

  class MLP(nnx.Module):
    def __init__(self):
      self.up = nnx.Linear(8, 16, rngs=nnx.Rngs(0))
      self.down = nnx.Linear(16, 8, rngs=nnx.Rngs(0))

    def __call__(self, x):
      return self.down(jax.nn.gelu(self.up(x), approximate=True))

  torch.manual_seed(0)
  ref = TorchMLP()
  model = MLP()
  for name in ("up", "down"):
    getattr(model, name).kernel[...] = jnp.asarray(getattr(ref, name).weight.detach().numpy().T)
    getattr(model, name).bias[...] = jnp.asarray(getattr(ref, name).bias.detach().numpy())
  pm = peft.get_peft_model(ref, peft.LoraConfig(r=2, lora_alpha=4, target_modules=["up", "down"],
                                                init_lora_weights=False))
  pm.save_pretrained(str(tmp_path / "peft"))
  x = np.random.default_rng(0).normal(size=(3, 8)).astype(np.float32)
  with torch.no_grad():
    want = pm(torch.tensor(x)).numpy()
  # The NNX attribute names are the torch module names ('up', 'down'): the default naming.
  back = jaxlora.nnx.from_peft(str(tmp_path / "peft"), model)
  assert type(back.up).__name__ == "LoRA"
  np.testing.assert_allclose(back(x), want, atol=1e-5)
  jaxlora.nnx.to_peft(str(tmp_path / "ours"), back, task_type=None)  # a custom torch module
  torch.manual_seed(0)  # the same base weights again
  served = peft.PeftModel.from_pretrained(TorchMLP(), str(tmp_path / "ours"))
  with torch.no_grad():
    np.testing.assert_allclose(served(torch.tensor(x)).numpy(), want, atol=1e-5)


@pytest.mark.slow
def test_example_trains_an_nnx_model_end_to_end(tmp_path):
  import importlib.util
  import os
  path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples",
                      "train_nnx.py")
  spec = importlib.util.spec_from_file_location("train_nnx", path)
  example = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(example)
  out = example.main(["--steps", "80", "--out", str(tmp_path / "adapter")])
  assert out["before"] < 0.2 and out["after"] > 0.9, out
  assert out["reloaded_equal"] and out["merged_close"]
