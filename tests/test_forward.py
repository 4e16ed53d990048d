"""The factored forward pass against merge and an independent float64 NumPy reference."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxlora
from conftest import f64, randomize_adapters
from models import MLP, Attention, EinsumNet, ScanDense, Stack


def _setup(model, x, targets="all-linear", rank=2, **kw):
  v = model.init(jax.random.key(0), x)
  lay = jaxlora.trace_layout(model.apply, v, x)
  w = jaxlora.wrap(v, rank=rank, targets=targets, key=jax.random.key(1), layout=lay, **kw)
  return v, randomize_adapters(w, jax.random.key(2))


def _rel(a, b):
  a, b = f64(a), f64(b)
  return np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30)


def _gelu(z):  # flax's default nn.gelu is the tanh approximation
  return 0.5 * z * (1 + np.tanh(np.sqrt(2 / np.pi) * (z + 0.044715 * z**3)))


def _lin(h, m):
  out = h @ m["kernel"] + m["bias"]
  if "lora_a" in m:
    out = out + m["lora_scale"] * ((h @ m["lora_a"]) @ m["lora_b"])
  return out


def _mlp_reference(x, p):
  """float64 NumPy forward of models.MLP with its adapters."""
  return _lin(_gelu(_lin(_gelu(_lin(f64(x), p["fc1"])), p["fc2"])), p["head"])


CASES = {
    "dense": (MLP(), lambda: jnp.asarray(np.random.default_rng(0).normal(size=(3, 4)), jnp.float32)),
    "dense_general": (Attention(), lambda: jnp.asarray(
        np.random.default_rng(0).normal(size=(2, 5, 6)), jnp.float32)),
    "einsum": (EinsumNet(), lambda: jnp.asarray(
        np.random.default_rng(0).normal(size=(2, 3, 6)), jnp.float32)),
    "scan_remat": (Stack(), lambda: jnp.asarray(
        np.random.default_rng(0).integers(0, 11, size=(2, 5)), jnp.int32)),
}


@pytest.mark.parametrize("name", [  # the scanned stack compiles longest: full suite only
    n if n != "scan_remat" else pytest.param(n, marks=pytest.mark.slow) for n in sorted(CASES)])
def test_identity_at_init_bit_for_bit(name):
  model, make_x = CASES[name]
  x = make_x()
  v = model.init(jax.random.key(0), x)
  lay = jaxlora.trace_layout(model.apply, v, x)
  w = jaxlora.wrap(v, rank=2, targets=".*", key=jax.random.key(1), layout=lay)
  assert len(jaxlora.summary(w).layers) == len(lay)
  base = jax.jit(model.apply)(v, x)
  wrapped = jax.jit(jaxlora.apply(model.apply))(w, x)
  np.testing.assert_array_equal(np.asarray(wrapped), np.asarray(base))


@pytest.mark.parametrize("name", [  # the scanned stack compiles longest: full suite only
    n if n != "scan_remat" else pytest.param(n, marks=pytest.mark.slow) for n in sorted(CASES)])
def test_factored_equals_merged(name):
  model, make_x = CASES[name]
  x = make_x()
  v, w = _setup(model, x, targets=".*")
  factored = jax.jit(jaxlora.apply(model.apply))(w, x)
  merged = jax.jit(model.apply)(jaxlora.merge(w), x)
  base = model.apply(v, x)
  assert _rel(factored, merged) < 1e-5
  assert _rel(factored, base) > 1e-3  # the adapters really contribute


def test_dense_mlp_matches_numpy_float64():
  model, make_x = CASES["dense"]
  x = make_x()
  _, w = _setup(model, x, targets=r"fc\d", rank=3, alpha=5.0)
  p = jax.tree.map(f64, w["params"])
  ref = _mlp_reference(x, p)
  assert p["fc1"]["lora_scale"] == np.float32(5.0 / 3)
  assert _rel(jaxlora.apply(model.apply)(w, x), ref) < 1e-5
  assert _rel(model.apply(jaxlora.merge(w), x), ref) < 1e-5


def test_dense_general_matches_numpy_float64():
  x = jnp.asarray(np.random.default_rng(1).normal(size=(2, 3, 4, 5)), jnp.float32)
  model = nn.DenseGeneral(features=(2, 7), axis=(-2, -1))  # 2 input axes, 2 output axes
  v, w = _setup(model, x, targets=".*", rank=3)
  p = jax.tree.map(f64, w["params"])
  assert p["lora_a"].shape == (4, 5, 3) and p["lora_b"].shape == (3, 2, 7)
  xf = f64(x)
  ref = (np.tensordot(xf, p["kernel"], axes=2) + p["bias"]
         + p["lora_scale"] * np.tensordot(np.tensordot(xf, p["lora_a"], axes=2),
                                          p["lora_b"], axes=1))
  assert _rel(jaxlora.apply(model.apply)(w, x), ref) < 1e-5
  assert _rel(model.apply(jaxlora.merge(w), x), ref) < 1e-5


@pytest.mark.parametrize("eq,shape,a_sub,b_sub", [
    ("btd,dnh->btnh", (6, 2, 4), "dr", "rnh"),          # one input, two output axes
    ("btnh,nhe->btne", (2, 4, 5), "nhr", "nre"),        # n is shared: per-head weights
    ("btf,nfh->btnh", (3, 6, 4), "fr", "rnh"),          # output, input, output: interleaved
])
def test_einsum_matches_numpy_float64(eq, shape, a_sub, b_sub):
  lhs = eq.split(",")[0]
  dims = dict(zip(eq.split(",")[1].split("-")[0], shape))
  dims.update(b=2, t=3)
  x = jnp.asarray(np.random.default_rng(2).normal(size=[dims[c] for c in lhs]), jnp.float32)
  model = nn.Einsum(shape, eq)
  v, w = _setup(model, x, targets=".*", rank=2)
  p = jax.tree.map(f64, w["params"])
  out = eq.split("->")[1]
  hsub = "".join(c for c in lhs if c not in a_sub or c in b_sub) + "r"  # keep shared letters
  xf = f64(x)
  ref = (np.einsum(eq, xf, p["kernel"]) + p["bias"]
         + p["lora_scale"] * np.einsum(f"{hsub},{b_sub}->{out}",
                                       np.einsum(f"{lhs},{a_sub}->{hsub}", xf, p["lora_a"]),
                                       p["lora_b"]))
  assert _rel(jaxlora.apply(model.apply)(w, x), ref) < 1e-5
  assert _rel(model.apply(jaxlora.merge(w), x), ref) < 1e-5


def test_scanned_remat_stack_matches_numpy_float64():
  x = jnp.asarray(np.random.default_rng(3).normal(size=(4, 6)), jnp.float32)
  model = ScanDense(layers=3, d=6)
  v, w = _setup(model, x, targets=".*", rank=2, rank_pattern={"dense": 3})
  p = jax.tree.map(f64, w["params"]["layers"]["dense"])
  assert p["lora_a"].shape == (3, 6, 3) and p["lora_scale"].shape == (3,)
  h = f64(x)
  for l in range(3):
    h = np.tanh(h @ p["kernel"][l] + p["bias"][l]
                + p["lora_scale"][l] * (h @ p["lora_a"][l]) @ p["lora_b"][l])
  assert _rel(jax.jit(jaxlora.apply(model.apply))(w, x), h) < 1e-5
  assert _rel(jax.jit(model.apply)(jaxlora.merge(w), x), h) < 1e-5


def test_per_layer_scale_inside_scan():
  """Each scanned layer sees its own slice of lora_scale."""
  x = jnp.asarray(np.random.default_rng(4).normal(size=(4, 6)), jnp.float32)
  model = ScanDense(layers=3, d=6)
  _, w = _setup(model, x, targets=".*", rank=2)
  w["params"]["layers"]["dense"]["lora_scale"] = jnp.array([0.0, 2.0, -1.0])
  p = jax.tree.map(f64, w["params"]["layers"]["dense"])
  h = f64(x)
  for l in range(3):
    h = np.tanh(h @ p["kernel"][l] + p["bias"][l]
                + p["lora_scale"][l] * (h @ p["lora_a"][l]) @ p["lora_b"][l])
  assert _rel(jaxlora.apply(model.apply)(w, x), h) < 1e-5


def test_bf16_base_with_fp32_adapters():
  x = jnp.asarray(np.random.default_rng(5).normal(size=(3, 4)), jnp.bfloat16)
  model = MLP(dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
  v = model.init(jax.random.key(0), x)
  w = jaxlora.wrap(v, rank=2, key=jax.random.key(1), targets=".*")
  assert w["params"]["fc1"]["kernel"].dtype == jnp.bfloat16
  assert w["params"]["fc1"]["lora_a"].dtype == jnp.float32
  np.testing.assert_array_equal(jaxlora.apply(model.apply)(w, x), model.apply(v, x))
  w = randomize_adapters(w, jax.random.key(2))
  y = jax.jit(jaxlora.apply(model.apply))(w, x)
  assert y.dtype == jnp.bfloat16  # the LoRA term is computed in the layer's compute dtype
  # Reference: float64 of the same bf16 inputs; bf16 compute allows ~1% error.
  ref = _mlp_reference(x, jax.tree.map(f64, w["params"]))
  assert _rel(y, ref) < 3e-2
  # The gradient reaches the fp32 adapters in fp32.
  t, fz = jaxlora.split(w)
  g = jax.grad(lambda t: jnp.sum(jaxlora.apply(model.apply)(jaxlora.combine(t, fz), x)
                                 .astype(jnp.float32)))(t)
  assert g["params"]["fc1"]["lora_a"].dtype == jnp.float32
  assert float(jnp.abs(g["params"]["fc1"]["lora_a"]).sum()) > 0


def test_library_works_under_strict_dtype_promotion():
  x = jnp.ones((3, 4), jnp.bfloat16)
  model = MLP(dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
  with jax.numpy_dtype_promotion("strict"):
    v = model.init(jax.random.key(0), x)
    w = randomize_adapters(jaxlora.wrap(v, rank=2, key=jax.random.key(1)), jax.random.key(2))
    y = jaxlora.apply(model.apply, dropout=0.1)(w, x, rngs={"dropout": jax.random.key(3)})
    merged = jaxlora.merge(w)
    back = jaxlora.unmerge(merged, w)
  assert y.dtype == jnp.bfloat16 and merged["params"]["fc1"]["kernel"].dtype == jnp.bfloat16
  assert back["params"]["fc1"]["kernel"].dtype == jnp.bfloat16


def test_dropout_uses_the_dropout_rng():
  x = jnp.ones((64, 4))
  model = MLP()
  _, w = _setup(model, x, targets="fc1", rank=2)
  fwd = jaxlora.apply(model.apply, dropout=0.5)
  no_rng = fwd(w, x)
  np.testing.assert_array_equal(no_rng, jaxlora.apply(model.apply)(w, x))  # eval: no dropout
  a = fwd(w, x, rngs={"dropout": jax.random.key(0)})
  b = fwd(w, x, rngs={"dropout": jax.random.key(0)})
  c = fwd(w, x, rngs={"dropout": jax.random.key(1)})
  np.testing.assert_array_equal(a, b)
  assert not np.allclose(a, c) and not np.allclose(a, no_rng)
  # Dropout acts on the LoRA input only: with B = 0 the output is the base output.
  w0 = jax.tree_util.tree_map_with_path(
      lambda p, l: jnp.zeros_like(l) if getattr(p[-1], "key", "") == "lora_b" else l, w)
  np.testing.assert_array_equal(fwd(w0, x, rngs={"dropout": jax.random.key(0)}),
                                model.apply(jaxlora.merge(w0), x))


class _Body(nn.Module):
  """tanh(Dense) layers under an nn.scan that does not pass the dropout stream on."""

  @nn.compact
  def __call__(self, x):
    scan = nn.scan(_Tanh, variable_axes={"params": 0}, split_rngs={"params": True}, length=2)
    return scan(name="layers")(x, None)[0]


class _Tanh(nn.Module):
  @nn.compact
  def __call__(self, x, _):
    return jnp.tanh(nn.Dense(4, name="dense")(x)), None


def test_dropout_reaches_scanned_layers_or_says_why_not():
  """LoRA dropout inside nn.scan: the Decoder's layers draw masks (one key per layer); a scan
  that does not pass the dropout stream on is an error naming the layer, not a silent no-op."""
  model = jaxlora.models.Decoder(jaxlora.models.ModelConfig.tiny("llama"))
  params = jaxlora.models.init(model, jax.random.key(0))
  tree = randomize_adapters(jaxlora.wrap(params, rank=2, layout=model, key=jax.random.key(1)),
                            jax.random.key(2))
  ids = jnp.ones((2, 6), jnp.int32)
  fwd = jaxlora.apply(model.apply, dropout=0.3)
  a = fwd({"params": tree}, ids, rngs={"dropout": jax.random.key(0)})
  b = fwd({"params": tree}, ids, rngs={"dropout": jax.random.key(1)})
  plain = jaxlora.apply(model.apply)({"params": tree}, ids)
  assert not np.allclose(a, b) and not np.allclose(a, plain)
  np.testing.assert_array_equal(fwd({"params": tree}, ids), plain)  # no rng: evaluation

  x = jnp.ones((3, 4))
  bare = _Body()
  variables = bare.init(jax.random.key(0), x)
  w = jaxlora.wrap(variables, rank=2, targets=".*dense", key=jax.random.key(1),
                   layout=jaxlora.trace_layout(bare.apply, variables, x))
  with pytest.raises(ValueError, match=r"layer 'layers/dense' does not see it.*'dropout': True"):
    jaxlora.apply(bare.apply, dropout=0.1)(w, x, rngs={"dropout": jax.random.key(0)})


def test_dropout_rate_is_validated():
  with pytest.raises(ValueError, match="dropout"):
    jaxlora.apply(MLP().apply, dropout=1.0)


def test_unreached_adapter_is_reported():
  class Custom(nn.Module):
    @nn.compact
    def __call__(self, x):
      k = self.param("kernel", nn.initializers.lecun_normal(), (x.shape[-1], 3))
      return x @ k

  class Net(nn.Module):
    @nn.compact
    def __call__(self, x):
      return Custom(name="custom")(nn.Dense(4, name="dense")(x))

  x = jnp.ones((2, 4))
  v = Net().init(jax.random.key(0), x)
  w = jaxlora.wrap(v, rank=2, targets=".*", key=jax.random.key(1))  # 2-D: no layout needed
  with pytest.raises(ValueError, match=r"\['custom'\].*never reached.*merge"):
    jaxlora.apply(Net().apply)(w, x)
  # Merge on the fly is the documented fallback, and the check can be turned off.
  w = randomize_adapters(w, jax.random.key(2))
  y = Net().apply(jaxlora.merge(w), x)
  y2 = jaxlora.apply(Net().apply, check_reached=False)(w, x)
  assert not np.allclose(y, y2)  # the custom layer's adapter is ignored by the interceptor
  # With a layout, wrap refuses the custom kernel up front.
  lay = jaxlora.trace_layout(Net().apply, v, x)
  with pytest.raises(ValueError, match="custom/kernel.*was not used by any nn.Dense"):
    jaxlora.wrap(v, rank=2, targets="custom", key=jax.random.key(1), layout=lay)
