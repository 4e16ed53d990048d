"""train_extra (PEFT's modules_to_save) and bias='all'|'lora_only': trained in full beside LoRA."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxlora
from conftest import hf_checkpoint, randomize_adapters

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")


@pytest.fixture(scope="module")
def base(tmp_path_factory):
  """A tiny Llama with attention biases, so that both bias modes have something to train."""
  torch.manual_seed(0)
  hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(
      vocab_size=64, hidden_size=16, intermediate_size=24, num_hidden_layers=2,
      num_attention_heads=2, num_key_value_heads=1, attention_bias=True,
      initializer_range=0.2)).eval()
  for name, p in hf.named_parameters():  # non-trivial biases and norms
    if name.endswith("bias") or "norm" in name:
      p.data.uniform_(-0.5, 1.5)
  return hf_checkpoint(tmp_path_factory.mktemp("base-bias"), hf)


def _batch():
  ids = np.random.default_rng(1).integers(0, 64, size=(2, 7))
  return ids, np.ones_like(ids)


def _perturb(tree, key):
  """Random adapters, and every fully trained leaf moved away from the base."""
  tree = randomize_adapters(tree, key)
  trainable, frozen = jaxlora.split(tree)
  leaves, treedef = jax.tree.flatten(trainable)
  keys = jax.random.split(jax.random.fold_in(key, 1), len(leaves))
  leaves = [x + 0.3 * jax.random.normal(k, x.shape, x.dtype) for x, k in zip(leaves, keys)]
  return jaxlora.combine(jax.tree.unflatten(treedef, leaves), frozen)


def _peft_logits(base_path, adapter_path, ids):
  hf = transformers.AutoModelForCausalLM.from_pretrained(base_path)
  pm = peft.PeftModel.from_pretrained(hf, adapter_path).eval()
  with torch.no_grad():
    return pm(input_ids=torch.tensor(ids)).logits.numpy()


def test_split_marks_exactly_the_requested_leaves(base):
  _, model, params = base
  tree = jaxlora.wrap(params, rank=2, targets=r"(q|v)_proj$", layout=model,
                      train_extra=r"(lm_head|^norm)$", bias="lora_only")
  trainable, frozen = jaxlora.split(tree)
  names = {jax.tree_util.keystr(kp) for kp, _ in jax.tree_util.tree_flatten_with_path(trainable)[0]}
  attn = "['layers']['self_attn']"
  assert names == {"['lm_head']['kernel']", "['norm']['scale']"} | {
      f"{attn}['{m}']['{k}']" for m in ("q_proj", "v_proj") for k in ("lora_a", "lora_b", "bias")}
  # Markers are frozen and shaped like the stacked axes (nn.scan slices them per layer).
  assert frozen["layers"]["self_attn"]["q_proj"]["lora_bias"].shape == (2,)
  assert frozen["lm_head"]["lora_extra"].shape == ()
  every = jaxlora.wrap(params, rank=2, targets=r"q_proj$", layout=model, bias="all")
  biased = {jax.tree_util.keystr(kp) for kp, _ in
            jax.tree_util.tree_flatten_with_path(jaxlora.split(every)[0])[0] if kp[-1].key == "bias"}
  assert biased == {f"{attn}['{m}']['bias']" for m in ("q_proj", "k_proj", "v_proj", "o_proj")}


def test_training_moves_only_the_trained_leaves_and_checkpoints_them(base, tmp_path):
  _, model, params = base
  tree = jaxlora.wrap(params, rank=2, targets=r"q_proj$", layout=model,
                      train_extra=r"post_attention_layernorm$", bias="all")
  ids, mask = _batch()
  tx = jaxlora.optimizer(optax.adam(1e-1), tree)
  fwd = jaxlora.apply(model.apply)

  def loss(t):
    return optax.softmax_cross_entropy_with_integer_labels(fwd({"params": t}, ids), ids).mean()

  trainable, frozen = jaxlora.split(tree)
  state = tx.init(tree)
  for _ in range(2):
    g = jax.grad(lambda t: loss(jaxlora.combine(t, frozen)))(trainable)
    updates, state = tx.update(g, state, trainable)
    trainable = optax.apply_updates(trainable, updates)
  trained = jaxlora.combine(trainable, frozen)
  changed = {jax.tree_util.keystr(kp) for (kp, a), b in zip(
      jax.tree_util.tree_flatten_with_path(trained)[0], jax.tree.leaves(tree))
      if not np.array_equal(a, b)}
  ln = "['layers']['post_attention_layernorm']['scale']"
  assert ln in changed and "['layers']['self_attn']['k_proj']['bias']" in changed
  assert changed <= {jax.tree_util.keystr(kp) for kp, _ in
                     jax.tree_util.tree_flatten_with_path(trainable)[0]}
  assert "['layers']['self_attn']['k_proj']['kernel']" not in changed
  # Orbax: the adapter checkpoint holds the trained leaves and restores them bit for bit.
  d = str(tmp_path / "adapter")
  jaxlora.save(d, trained)
  back = jaxlora.load(d, params)
  for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(trained)):
    np.testing.assert_array_equal(a, b)
  assert jax.tree.structure(back) == jax.tree.structure(trained)
  # A base whose trained leaf has another shape is refused, naming the leaf.
  other = jax.tree.map(lambda x: x, params)
  other["layers"]["post_attention_layernorm"] = {"scale": jnp.ones((2, 8))}
  with pytest.raises(ValueError, match="post_attention_layernorm/scale"):
    jaxlora.load(d, other)


def test_merge_keeps_trained_values_and_unmerge_restores_markers(base):
  _, model, params = base
  tree = _perturb(jaxlora.wrap(params, rank=2, targets=r"v_proj$", layout=model,
                               train_extra=r"lm_head$", bias="lora_only"), jax.random.key(3))
  ids, _ = _batch()
  want = jaxlora.apply(model.apply)({"params": tree}, ids)
  merged = jaxlora.merge(tree)
  assert not any(k.startswith("lora_") for kp, _ in jax.tree_util.tree_flatten_with_path(merged)[0]
                 for k in [kp[-1].key])
  np.testing.assert_allclose(model.apply({"params": merged}, ids), want, atol=2e-5)
  back = jaxlora.unmerge(merged, jaxlora.adapter(tree))
  assert jax.tree.structure(back) == jax.tree.structure(tree)
  assert jax.tree.structure(jaxlora.split(back)[0]) == jax.tree.structure(jaxlora.split(tree)[0])


@pytest.mark.parametrize("bias", ["lora_only", "all"])
def test_exported_adapter_matches_peft(base, bias, tmp_path):
  path, model, params = base
  tree = _perturb(jaxlora.wrap(params, rank=2, targets=r"(q|v)_proj$", layout=model,
                               train_extra=r"(lm_head|input_layernorm)$", bias=bias),
                  jax.random.key(1))
  jaxlora.peft.save(str(tmp_path), tree, model=model)
  cfg = json.load(open(tmp_path / "adapter_config.json"))
  assert cfg["bias"] == bias and "lm_head" in cfg["modules_to_save"]
  ids, mask = _batch()
  ref = _peft_logits(path, str(tmp_path), ids)
  out = np.asarray(jaxlora.apply(model.apply)({"params": tree}, ids, attention_mask=mask))
  plain = np.asarray(model.apply({"params": params}, ids))
  assert np.abs(plain - ref).max() > 1e-2
  assert np.abs(out - ref).max() < 1e-4
  back = jaxlora.peft.load(str(tmp_path), params, model=model)
  assert jax.tree.structure(back) == jax.tree.structure(tree)
  for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(tree)):
    np.testing.assert_allclose(a, b, rtol=1e-6)


def test_peft_modules_to_save_and_bias_load(base, tmp_path):
  path, model, params = base
  torch.manual_seed(2)
  hf = transformers.AutoModelForCausalLM.from_pretrained(path)
  cfg = peft.LoraConfig(r=2, target_modules=["k_proj"], modules_to_save=["lm_head", "norm"],
                        bias="all", init_lora_weights=False)
  pm = peft.get_peft_model(hf, cfg).eval()
  with torch.no_grad():
    for name, p in pm.named_parameters():
      if p.requires_grad and "lora_" not in name:
        p.add_(0.3 * torch.randn_like(p))
  pm.save_pretrained(str(tmp_path))
  ids, mask = _batch()
  with torch.no_grad():
    ref = pm(input_ids=torch.tensor(ids)).logits.numpy()
  tree = jaxlora.peft.load(str(tmp_path), params, model=model)
  out = np.asarray(jaxlora.apply(model.apply)({"params": tree}, ids, attention_mask=mask))
  assert np.abs(out - ref).max() < 1e-4
  trainable = jaxlora.split(tree)[0]
  # PEFT's suffix rule: 'norm' names the final norm and every layer's layer norms.
  assert {"input_layernorm", "post_attention_layernorm"} <= set(trainable["layers"])
  assert set(trainable) >= {"lm_head", "norm"}


def test_bad_input(base):
  _, model, params = base
  with pytest.raises(ValueError, match="matched no module"):
    jaxlora.wrap(params, rank=2, layout=model, train_extra="no_such_module")
  with pytest.raises(ValueError, match="both adapted"):
    jaxlora.wrap(params, rank=2, targets="q_proj", layout=model, train_extra="q_proj")
  with pytest.raises(ValueError, match="`bias` must be one of"):
    jaxlora.wrap(params, rank=2, layout=model, bias="some")
  with pytest.raises(TypeError, match="train_extra"):
    jaxlora.wrap(params, rank=2, layout=model, train_extra=3)


def test_banks_and_adapter_merges_refuse_fully_trained_leaves(base):
  _, model, params = base
  plain = jaxlora.wrap(params, rank=2, targets="q_proj", layout=model)
  extra = jaxlora.wrap(params, rank=2, targets="q_proj", layout=model, bias="lora_only")
  with pytest.raises(ValueError, match="q_proj' trains its bias.*a bank"):
    jaxlora.stack({"a": plain, "b": extra})
  with pytest.raises(ValueError, match="q_proj' trains its bias.*merge_adapters"):
    jaxlora.merge_adapters([plain, extra], weights=[0.5, 0.5])


def test_summary_counts_fully_trained_leaves_once(base):
  _, model, params = base
  plain = jaxlora.summary(jaxlora.wrap(params, rank=2, targets="q_proj", layout=model))
  s = jaxlora.summary(jaxlora.wrap(params, rank=2, targets="q_proj", layout=model,
                                   train_extra=r"^norm$", bias="lora_only"))
  q_bias = params["layers"]["self_attn"]["q_proj"]["bias"].size
  assert s.trainable == plain.trainable + params["norm"]["scale"].size + q_bias
  assert s.total == plain.total
