"""Sharded LoRA training on meshes of 8 simulated CPU devices, against one device."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

import jaxlora
from conftest import randomize_adapters

pytestmark = pytest.mark.skipif(jax.device_count() < 8,
                                reason="needs 8 (simulated) devices, as in CI")

CFG = jaxlora.models.ModelConfig("llama", vocab_size=96, hidden_size=32, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                                 intermediate_size=64, max_position_embeddings=64, norm_eps=1e-6,
                                 tie_word_embeddings=False)


def _setup():
  model = jaxlora.models.Decoder(CFG)
  params = jaxlora.models.init(model, jax.random.key(0))
  tree = jaxlora.wrap(params, rank=4, layout=model, key=jax.random.key(1))
  tree = randomize_adapters(tree, jax.random.key(2), scale=0.1)
  ids = jax.random.randint(jax.random.key(3), (8, 17), 0, 96)
  return model, params, tree, ids


def _train(model, tree, ids, mesh=None, rules=jaxlora.sharding.FSDP_RULES, steps=3):
  # SGD with momentum: stateful like adam, but it does not amplify last-bit differences of
  # near-zero gradients (adam's normalisation does), so the comparison stays meaningful.
  tx = optax.sgd(0.5, momentum=0.9)
  trainable, frozen = jaxlora.split(tree)
  fwd = jaxlora.apply(model.apply)

  def step(t, opt, f, ids):
    def loss(t):
      logits = fwd({"params": jaxlora.combine(t, f)}, ids[:, :-1])
      return optax.softmax_cross_entropy_with_integer_labels(logits, ids[:, 1:]).mean()
    l, g = jax.value_and_grad(loss)(t)
    u, opt = tx.update(g, opt, t)
    return optax.apply_updates(t, u), opt, l

  opt = tx.init(trainable)
  if mesh is None:
    jstep = jax.jit(step)
  else:
    sh = jaxlora.sharding.tree_shardings(tree, jaxlora.sharding.param_shardings(model, mesh, rules))
    t_sh, f_sh = jaxlora.split(sh)
    o_sh = jaxlora.sharding.opt_state_shardings(tx, trainable, t_sh, mesh)
    b_sh = NamedSharding(mesh, P(("data", "fsdp"), None))
    rep = NamedSharding(mesh, P())
    trainable, frozen = jax.device_put(trainable, t_sh), jax.device_put(frozen, f_sh)
    opt, ids = jax.device_put(opt, o_sh), jax.device_put(ids, b_sh)
    jstep = jax.jit(step, in_shardings=(t_sh, o_sh, f_sh, b_sh), out_shardings=(t_sh, o_sh, rep))
  losses = []
  for _ in range(steps):
    trainable, opt, l = jstep(trainable, opt, frozen, ids)
    losses.append(float(l))
  return losses, trainable, frozen, opt


MESHES = {"fsdp8": dict(fsdp=8), "fsdp4_tp2": dict(fsdp=4, tensor=2),
          "dp2_fsdp4": dict(data=2, fsdp=4)}


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(MESHES))
def test_sharded_training_matches_one_device(name):
  model, params, tree, ids = _setup()
  ref_losses, ref_t, _, _ = _train(model, tree, ids)
  mesh = jaxlora.sharding.make_mesh(**MESHES[name])
  rules = jaxlora.sharding.FSDP_TP_RULES if "tp" in name else jaxlora.sharding.FSDP_RULES
  losses, t, frozen, opt = _train(model, tree, ids, mesh, rules)
  np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
  for a, b in zip(jax.tree.leaves(t), jax.tree.leaves(ref_t)):  # relative error of each tensor
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    assert np.linalg.norm(a - b) / np.linalg.norm(b) < 1e-5
  # What each device holds, read from the arrays' shards.
  dev = jax.devices()[0]
  held = lambda tree: sum(s.data.nbytes for x in jax.tree.leaves(tree)
                          for s in x.addressable_shards if s.device == dev)
  total = lambda tree: sum(x.nbytes for x in jax.tree.leaves(tree))
  base = [v for k, v in jax.tree_util.tree_flatten_with_path(frozen)[0]
          if k[-1].key != "lora_scale"]
  fraction = held(base) / total(base)
  n_shards = MESHES[name].get("fsdp", 1) * MESHES[name].get("tensor", 1)
  assert fraction <= 1.15 / n_shards, fraction  # norms and small tensors stay whole
  up = frozen["layers"]["mlp"]["up_proj"]["kernel"]
  assert {s.data.shape for s in up.addressable_shards} == {
      (2, 32 // MESHES[name].get("fsdp", 1), 64 // (2 if "tp" in name else 1))}
  a = t["layers"]["mlp"]["up_proj"]["lora_a"]
  assert a.sharding.spec == P(None, "fsdp", None)
  # The plan computed from shapes equals what the arrays hold.
  plan = jaxlora.sharding.memory_plan(model, mesh, rank=4, rules=rules, tx=optax.sgd(0.5, momentum=0.9))
  assert plan["base"] == held(base)
  assert plan["adapter"] == held(jaxlora.adapter(jaxlora.combine(t, frozen)))
  assert plan["optimizer"] == held(opt)
  assert plan["total"] == plan["base"] + plan["adapter"] + plan["optimizer"]


def test_sharded_checkpoint_load_and_loading_into_shards(tmp_path):
  model, params, tree, ids = _setup()
  mesh = jaxlora.sharding.make_mesh(fsdp=4, tensor=2)
  base_sh = jaxlora.sharding.param_shardings(model, mesh, jaxlora.sharding.FSDP_TP_RULES)
  jaxlora.models.save_pretrained(str(tmp_path / "base"), model, params)
  _, sharded = jaxlora.models.from_pretrained(str(tmp_path / "base"), shardings=base_sh)
  k = sharded["layers"]["self_attn"]["q_proj"]["kernel"]
  assert k.sharding.spec == P(None, "fsdp", "tensor")
  np.testing.assert_array_equal(k, params["layers"]["self_attn"]["q_proj"]["kernel"])
  jaxlora.save(str(tmp_path / "adapter"), tree)
  back = jaxlora.load(str(tmp_path / "adapter"), sharded)
  b = back["layers"]["self_attn"]["q_proj"]["lora_b"]
  assert b.sharding.spec == P(None, None, "tensor")
  np.testing.assert_array_equal(b, tree["layers"]["self_attn"]["q_proj"]["lora_b"])


def test_make_mesh_errors():
  with pytest.raises(ValueError, match="at most one -1"):
    jaxlora.sharding.make_mesh(data=-1, fsdp=-1)
  with pytest.raises(ValueError, match="3 x fsdp=1 x tensor=1 = 3 devices, but 8"):
    jaxlora.sharding.make_mesh(data=3, fsdp=1)
  with pytest.raises(ValueError, match="cannot be split"):
    jaxlora.sharding.make_mesh(data=3, fsdp=-1)
