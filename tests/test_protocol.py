"""The model protocols of `jaxlora.model_api`: a user's own linen model gets shardings and plans.

The core (`jaxlora.sharding`, `jaxlora.generate`, `jaxlora.peft`) knows models only through
`jaxlora.model_api`. Here a small linen model that is not the Decoder, with logical axis
names on its params, gets `param_shardings` on 8 simulated CPU devices and a `memory_plan`;
both are checked against shard shapes and byte counts worked out by hand from the shapes.
"""

import ast
import math
import os
import warnings

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

import jaxlora
from jaxlora import model_api
from jaxlora.errors import InputTypeError

RANK = 4
D, H, HEADS, HD, VOCAB = 32, 64, 4, 16, 10


def _named(axes, init=nn.initializers.lecun_normal()):
  return nn.with_logical_partitioning(init, axes)


class Net(nn.Module):
  """Embedding, a Dense, a 3-D DenseGeneral and a DenseGeneral over two axes; logical names."""

  @nn.compact
  def __call__(self, ids):
    x = nn.Embed(VOCAB, D, embedding_init=_named(("vocab", "embed")), name="embed")(ids)
    h = nn.Dense(H, kernel_init=_named(("embed", "mlp")),
                 bias_init=_named(("mlp",), nn.initializers.zeros), name="up")(x)
    h = nn.DenseGeneral((HEADS, HD), kernel_init=_named(("mlp", None, None)), use_bias=False,
                        name="proj")(nn.relu(h))
    h = nn.LayerNorm(scale_init=_named(("norm",), nn.initializers.ones), use_bias=False,
                     name="norm")(h)
    return nn.DenseGeneral(D, axis=(-2, -1), kernel_init=_named(("heads", None, "embed")),
                           use_bias=False, name="out")(h)


IDS = jnp.zeros((2, 5), jnp.int32)


class SelfDescribingNet(Net):
  """The same model implementing the protocols itself, as a user might write it."""

  def abstract_variables(self):
    return jax.eval_shape(lambda: self.init(jax.random.key(0), IDS))

  def lora_layout(self, params):
    return jaxlora.trace_layout(self.apply, {"params": jaxlora._tree.get_params(params)}, IDS)


# Shapes and logical names of every param, written out by hand.
PARAMS = {
    ("embed", "embedding"): ((VOCAB, D), ("vocab", "embed")),
    ("up", "kernel"): ((D, H), ("embed", "mlp")),
    ("up", "bias"): ((H,), ("mlp",)),
    ("proj", "kernel"): ((H, HEADS, HD), ("mlp", None, None)),
    ("norm", "scale"): ((HD,), ("norm",)),
    ("out", "kernel"): ((HEADS, HD, D), ("heads", None, "embed")),
}
# Adapters (targets='.*'): A = (*input axes, r), B = (r, *output axes); the names of the
# kernel's input axes go to A and its output axes' to B, the rank axis is unsharded.
ADAPTERS = {
    "up": (((D, RANK), ("embed", None)), ((RANK, H), (None, "mlp"))),
    "proj": (((H, RANK), ("mlp", None)), ((RANK, HEADS, HD), (None, None, None))),
    "out": (((HEADS, HD, RANK), ("heads", None, None)), ((RANK, D), (None, "embed"))),
}

MESHES = {  # name: (mesh sizes, rules)
    "fsdp8": ({"fsdp": 8}, jaxlora.sharding.FSDP_RULES),
    "fsdp4-tp2": ({"fsdp": 4, "tensor": 2}, jaxlora.sharding.FSDP_TP_RULES),
}

needs_8_devices = pytest.mark.skipif(jax.device_count() < 8,
                                     reason="needs 8 (simulated) devices, as in CI")


def _axes_size(sizes, rules, name, dim):
  """How many ways `rules` split a dim named `name` of size `dim` (1 if they do not divide it)."""
  axes = dict(rules).get(name)
  axes = (axes,) if isinstance(axes, str) else tuple(axes or ())
  n = math.prod(sizes.get(a, 1) for a in axes)
  return n if dim % n == 0 else 1


def _shard_shape(shape, names, sizes, rules):
  return tuple(d // _axes_size(sizes, rules, n, d) if n else d for d, n in zip(shape, names))


def _bytes(shape, names, sizes, rules, itemsize=4):
  return int(np.prod(_shard_shape(shape, names, sizes, rules), dtype=np.int64)) * itemsize


@needs_8_devices
@pytest.mark.parametrize("mesh_name", sorted(MESHES))
@pytest.mark.parametrize("make", [lambda: model_api.LinenModel(Net(), (IDS,)),
                                  SelfDescribingNet], ids=["LinenModel", "own-methods"])
def test_param_shardings_of_a_custom_model(mesh_name, make):
  sizes, rules = MESHES[mesh_name]
  model = make()
  assert isinstance(model, model_api.AbstractModel) and isinstance(model, model_api.LayoutProvider)
  mesh = jaxlora.sharding.make_mesh(**sizes)
  sh = jaxlora.sharding.param_shardings(model, mesh, rules)
  flat = {tuple(k.key for k in path): s
          for path, s in jax.tree_util.tree_flatten_with_path(sh)[0]}
  assert set(flat) == set(PARAMS)
  params = nn.unbox(Net().init(jax.random.key(0), IDS))["params"]
  placed = jax.device_put(params, sh)
  for path, (shape, names) in PARAMS.items():
    want = _shard_shape(shape, names, sizes, rules)
    assert flat[path].shard_shape(shape) == want, path
    leaf = placed[path[0]][path[1]]
    assert {s.data.shape for s in leaf.addressable_shards} == {want}, path
    np.testing.assert_array_equal(np.asarray(leaf), np.asarray(params[path[0]][path[1]]))
  # The hand-worked specs of two kernels, to make sure the names reached the mesh.
  if mesh_name == "fsdp8":
    assert flat[("up", "kernel")].spec == P("fsdp", None)
    assert flat[("out", "kernel")].spec == P(None, None, "fsdp")
  else:
    assert flat[("up", "kernel")].spec == P("fsdp", "tensor")
    assert flat[("out", "kernel")].spec == P("tensor", None, "fsdp")


@needs_8_devices
@pytest.mark.parametrize("mesh_name", sorted(MESHES))
def test_memory_plan_of_a_custom_model(mesh_name):
  sizes, rules = MESHES[mesh_name]
  mesh = jaxlora.sharding.make_mesh(**sizes)
  model = model_api.LinenModel(Net(), (IDS,))
  plan = jaxlora.sharding.memory_plan(model, mesh, rank=RANK, targets=".*", rules=rules)
  base = sum(_bytes(s, n, sizes, rules) for s, n in PARAMS.values())
  adapter = sum(_bytes(s, n, sizes, rules) for a, b in ADAPTERS.values() for s, n in (a, b))
  adapter += 4 * len(ADAPTERS)  # one float32 lora_scale per (unstacked) kernel, replicated
  ab = adapter - 4 * len(ADAPTERS)  # what trains: A and B
  optimizer = 2 * ab + 4  # adamw: two moments per trained value and an int32 step count
  assert plan == {"base": base, "adapter": adapter, "optimizer": optimizer,
                  "total": base + adapter + optimizer}
  # The model implementing the protocols itself plans the same.
  assert jaxlora.sharding.memory_plan(SelfDescribingNet(), mesh, rank=RANK, targets=".*",
                                      rules=rules) == plan


def test_wrap_layout_model_asks_the_model():
  params = nn.unbox(Net().init(jax.random.key(0), IDS))["params"]
  model = model_api.LinenModel(Net(), (IDS,))
  by_model = jaxlora.wrap(params, rank=RANK, targets=".*", layout=model)
  traced = jaxlora.trace_layout(Net().apply, {"params": params}, IDS)
  by_layout = jaxlora.wrap(params, rank=RANK, targets=".*", layout=traced)
  assert model.lora_layout(params) == traced
  jax.tree.map(np.testing.assert_array_equal, by_model, by_layout)
  assert by_model["out"]["lora_a"].shape == ADAPTERS["out"][0][0]


@pytest.mark.parametrize("bad, hint", [
    (nn.Dense(3), "LinenModel"),
    (Net().apply, "trace_layout"),
    ("attention", "got str"),
])
def test_wrap_layout_rejects_what_is_neither(bad, hint):
  params = {"kernel": jnp.ones((4, 3))}
  with pytest.raises(InputTypeError, match=hint) as e:
    jaxlora.wrap(params, rank=2, layout=bad)
  assert "jaxlora.Layout" in str(e.value) and "lora_layout(params)" in str(e.value)


def test_trace_layout_old_name_warns():
  params = Net().init(jax.random.key(0), IDS)
  with pytest.warns(DeprecationWarning, match="trace_layout"):
    old = jaxlora.layout(Net().apply, params, IDS)
  assert old == jaxlora.trace_layout(Net().apply, params, IDS)


def test_missing_capabilities_are_named():
  mesh = jaxlora.sharding.make_mesh(fsdp=-1)
  model = model_api.LinenModel(Net(), (IDS,))
  with pytest.raises(InputTypeError, match=r"param_shardings needs .*abstract_variables.*LinenModel"):
    jaxlora.sharding.param_shardings(object(), mesh)
  with pytest.raises(InputTypeError, match=r"activation_bytes.*without batch and seq"):
    jaxlora.sharding.memory_plan(model, mesh, rank=2, batch=8, seq=4)
  params = nn.unbox(Net().init(jax.random.key(0), IDS))["params"]
  with pytest.raises(InputTypeError, match=r"generate needs .*init_cache"):
    jaxlora.generate(model, params, IDS)
  tree = jaxlora.wrap(params, rank=2, targets="up", layout=model)
  with pytest.raises(InputTypeError, match=r"jaxlora.peft.save needs .*hf_module_name"):
    jaxlora.peft.save("unused", tree, model=model)
  with pytest.raises(InputTypeError, match=r"LinenModel.*inputs=\(x,\)"):
    model_api.LinenModel(Net(), IDS)


def test_decoder_implements_every_protocol():
  cfg = jaxlora.models.ModelConfig(
      model_type="llama", vocab_size=32, hidden_size=16, num_hidden_layers=2,
      num_attention_heads=4, num_key_value_heads=2, head_dim=4, intermediate_size=32,
      max_position_embeddings=64, norm_eps=1e-6, tie_word_embeddings=False)
  model = jaxlora.models.Decoder(cfg, attention="splash")
  for protocol in (model_api.AbstractModel, model_api.LayoutProvider,
                   model_api.ActivationPlanner, model_api.HubNames, model_api.CachedLM):
    assert isinstance(model, protocol), protocol.__name__
  boxed = model.abstract_variables()
  want = jax.eval_shape(lambda: nn.unbox(jaxlora.models.Decoder(cfg).init(
      jax.random.key(0), jnp.zeros((1, 1), jnp.int32))))
  assert jax.tree.map(lambda x: (x.shape, x.dtype), nn.unbox(boxed)) == \
      jax.tree.map(lambda x: (x.shape, x.dtype), want)
  assert (model.fan_in_fan_out, model.max_positions) == (False, None)
  assert model.init_cache(2, 8)["k"].shape == (2, 2, 8, 2, 4)


def test_core_does_not_import_the_model_zoo():
  root = os.path.dirname(os.path.dirname(os.path.abspath(jaxlora.__file__)))
  for name in ("generation", "peft", "sharding", "kernel_layout", "model_api", "targets",
               "transform"):
    with open(os.path.join(root, "jaxlora", f"{name}.py")) as f:
      tree = ast.parse(f.read())
    for node in ast.walk(tree):
      if isinstance(node, ast.ImportFrom):
        mods = [node.module or ""] + [f"{node.module}.{a.name}" for a in node.names]
      elif isinstance(node, ast.Import):
        mods = [a.name for a in node.names]
      else:
        continue
      assert not any(m.startswith("jaxlora.models") for m in mods), (name, mods)


def test_no_warnings_from_the_new_names():
  params = Net().init(jax.random.key(0), IDS)
  with warnings.catch_warnings():
    warnings.simplefilter("error", DeprecationWarning)
    jaxlora.trace_layout(Net().apply, params, IDS)
