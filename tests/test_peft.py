"""jaxlora.peft against Hugging Face PEFT on PyTorch: both directions, bit-exact round trips."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxlora
from conftest import randomize_adapters

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

BASES = {
    "gpt2": lambda: transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=96, n_embd=32, n_layer=2, n_head=4, n_positions=64, initializer_range=0.1)),
    "llama": lambda: transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=2, initializer_range=0.1)),
}


# The fast tier serves llama; GPT-2 (Conv1D kernels) runs in the full suite.
@pytest.fixture(scope="module", params=[
    n if n == "llama" else pytest.param(n, marks=pytest.mark.slow) for n in sorted(BASES)])
def base(request, tmp_path_factory):
  torch.manual_seed(0)
  hf = BASES[request.param]().eval()
  path = str(tmp_path_factory.mktemp(f"base-{request.param}"))
  hf.save_pretrained(path)
  model, params = jaxlora.models.from_pretrained(path)
  return request.param, path, model, params


def _batch():
  rng = np.random.default_rng(1)
  ids = rng.integers(0, 96, size=(2, 12))
  mask = np.ones_like(ids)
  mask[1, :3] = 0
  return ids, mask


def _peft_logits(base_path, adapter_path, ids, mask):
  hf = transformers.AutoModelForCausalLM.from_pretrained(base_path)
  pm = peft.PeftModel.from_pretrained(hf, adapter_path).eval()
  pos = np.maximum(np.cumsum(mask, -1) - 1, 0)
  with torch.no_grad():
    return pm(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
              position_ids=torch.tensor(pos)).logits.numpy()


def _train(model, tree, steps=5):
  ids, mask = _batch()
  trainable, frozen = jaxlora.split(tree)
  tx = optax.adamw(3e-2)
  state = tx.init(trainable)
  fwd = jaxlora.apply(model.apply)

  @jax.jit
  def step(t, state, frozen):
    def loss(t):
      logits = fwd({"params": jaxlora.combine(t, frozen)}, ids[:, :-1], attention_mask=mask[:, :-1])
      return optax.softmax_cross_entropy_with_integer_labels(logits, ids[:, 1:]).mean()
    g = jax.grad(loss)(t)
    u, state = tx.update(g, state, t)
    return optax.apply_updates(t, u), state

  for _ in range(steps):
    trainable, state = step(trainable, state, frozen)
  return jaxlora.combine(trainable, frozen)


@pytest.mark.parametrize("variant", ["plain", pytest.param("patterns", marks=pytest.mark.slow),
                                     pytest.param("rslora", marks=pytest.mark.slow)])
def test_jaxlora_adapter_serves_in_peft(base, variant, tmp_path):
  name, base_path, model, params = base
  kw = dict(rank=4, alpha=8, targets="all-linear")
  if variant == "patterns":
    attn = "c_attn" if name == "gpt2" else r"q_proj"
    kw.update(rank_pattern={attn: 2}, alpha_pattern={"mlp": 3.0}, targets=("attention", "mlp"))
  if variant == "rslora":
    kw.update(use_rslora=True)
  tree = jaxlora.wrap(params, layout=model, key=jax.random.key(0), **kw)
  tree = _train(model, tree)
  assert not np.all(np.asarray(tree["layers" if name != "gpt2" else "h"]["mlp"][
      "c_fc" if name == "gpt2" else "up_proj"]["lora_b"]) == 0)
  jaxlora.peft.save(str(tmp_path), tree, model=model, use_rslora=variant == "rslora",
                    base_model_name_or_path=base_path)
  ids, mask = _batch()
  ref = _peft_logits(base_path, str(tmp_path), ids, mask)
  out = np.asarray(jaxlora.apply(model.apply)({"params": tree}, ids, attention_mask=mask))
  valid = mask.astype(bool)
  assert np.abs(out - ref)[valid].max() < 1e-4
  # And the round trip through the files is bit-exact.
  back = jaxlora.peft.load(str(tmp_path), params, model=model)
  for (kp, a), b in zip(jax.tree_util.tree_flatten_with_path(back)[0], jax.tree.leaves(tree)):
    if kp[-1].key in ("lora_a", "lora_b"):
      np.testing.assert_array_equal(a, b)
    elif kp[-1].key == "lora_scale":
      np.testing.assert_allclose(a, b, rtol=1e-6)
  cfg = json.load(open(tmp_path / "adapter_config.json"))
  assert cfg["use_rslora"] == (variant == "rslora") and cfg["fan_in_fan_out"] == (name == "gpt2")
  if variant == "patterns":
    assert cfg["rank_pattern"] and cfg["alpha_pattern"]


def test_peft_adapter_loads_in_jaxlora(base, tmp_path):
  name, base_path, model, params = base
  torch.manual_seed(1)
  hf = transformers.AutoModelForCausalLM.from_pretrained(base_path)
  targets = ["c_attn", "c_fc"] if name == "gpt2" else ["q_proj", "v_proj", "down_proj"]
  layer1 = "transformer.h.1.attn.c_attn" if name == "gpt2" else "model.layers.1.self_attn.q_proj"
  cfg = peft.LoraConfig(r=4, lora_alpha=16, target_modules=targets, init_lora_weights=False,
                        rank_pattern={layer1: 2}, alpha_pattern={layer1: 5})
  pm = peft.get_peft_model(hf, cfg).eval()  # init_lora_weights=False: random non-zero A and B
  pm.save_pretrained(str(tmp_path))
  ids, mask = _batch()
  pos = np.maximum(np.cumsum(mask, -1) - 1, 0)
  with torch.no_grad():
    ref = pm(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
             position_ids=torch.tensor(pos)).logits.numpy()
  tree = jaxlora.peft.load(str(tmp_path), params, model=model)
  out = np.asarray(jaxlora.apply(model.apply)({"params": tree}, ids, attention_mask=mask))
  valid = mask.astype(bool)
  assert np.abs(out - ref)[valid].max() < 1e-4
  plain = np.asarray(model.apply({"params": params}, ids, attention_mask=mask))
  assert np.abs(plain - ref)[valid].max() > 1e-2
  scan = "h" if name == "gpt2" else "layers"
  mod = tree[scan]["attn" if name == "gpt2" else "self_attn"]["c_attn" if name == "gpt2" else "q_proj"]
  assert mod["lora_a"].shape[-1] == 4  # layer 1's rank 2 is zero-padded to the stack's 4
  np.testing.assert_allclose(mod["lora_scale"], [4.0, 2.5] + [4.0] * (len(mod["lora_scale"]) - 2))
  np.testing.assert_array_equal(mod["lora_a"][1, :, 2:], 0)
  # Round trip: export again and PEFT computes the same logits.
  jaxlora.peft.save(str(tmp_path / "again"), tree, model=model)
  np.testing.assert_allclose(_peft_logits(base_path, str(tmp_path / "again"), ids, mask)[valid],
                             ref[valid], atol=1e-5)


def test_target_modules_regex_when_names_are_ambiguous(tmp_path):
  torch.manual_seed(0)
  hf = BASES["gpt2"]().eval()
  hf.save_pretrained(str(tmp_path / "base"))
  model, params = jaxlora.models.from_pretrained(str(tmp_path / "base"))
  tree = jaxlora.wrap(params, rank=2, targets=r"attn/c_proj$", layout=model, key=jax.random.key(0))
  tree = randomize_adapters(tree, jax.random.key(1))
  jaxlora.peft.save(str(tmp_path / "a"), tree, model=model)
  cfg = json.load(open(tmp_path / "a" / "adapter_config.json"))
  assert isinstance(cfg["target_modules"], str)  # "c_proj" alone would also hit mlp.c_proj
  ids, mask = _batch()
  ref = _peft_logits(str(tmp_path / "base"), str(tmp_path / "a"), ids, mask)
  out = np.asarray(jaxlora.apply(model.apply)({"params": tree}, ids, attention_mask=mask))
  assert np.abs(out - ref)[mask.astype(bool)].max() < 1e-4


def test_bin_adapter_through_weights_only_torch_load(base, tmp_path):
  name, base_path, model, params = base
  hf = transformers.AutoModelForCausalLM.from_pretrained(base_path)
  targets = ["c_attn"] if name == "gpt2" else ["q_proj"]
  pm = peft.get_peft_model(hf, peft.LoraConfig(r=2, target_modules=targets,
                                                init_lora_weights=False))
  pm.save_pretrained(str(tmp_path), safe_serialization=False)
  assert os.path.exists(tmp_path / "adapter_model.bin")
  tree = jaxlora.peft.load(str(tmp_path), params, model=model)
  st = pm.state_dict()
  key = [k for k in st if "lora_A" in k and (".1." in k)][0]
  layer_a = np.asarray(tree["h" if name == "gpt2" else "layers"]["attn" if name == "gpt2" else
                                                                  "self_attn"][targets[0]]["lora_a"][1])
  np.testing.assert_array_equal(layer_a, st[key].numpy().T)


def test_unsupported_and_broken_adapters(tmp_path):
  torch.manual_seed(0)
  hf = BASES["llama"]().eval()
  hf.save_pretrained(str(tmp_path / "base"))
  model, params = jaxlora.models.from_pretrained(str(tmp_path / "base"))
  # What jaxlora cannot compute is refused with PEFT's key named.
  pm = peft.get_peft_model(transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "base")),
                           peft.LoraConfig(r=2, target_modules=["q_proj"], lora_bias=True))
  pm.save_pretrained(str(tmp_path / "lora_bias"))
  with pytest.raises(ValueError, match="lora_bias"):
    jaxlora.peft.load(str(tmp_path / "lora_bias"), params, model=model)
  replicated = json.load(open(tmp_path / "lora_bias" / "adapter_config.json"))
  replicated.update(lora_bias=False, layer_replication=[[0, 2], [1, 3]])
  (tmp_path / "lora_bias" / "adapter_config.json").write_text(json.dumps(replicated))
  with pytest.raises(ValueError, match="layer_replication"):
    jaxlora.peft.load(str(tmp_path / "lora_bias"), params, model=model)
  with pytest.raises(FileNotFoundError, match="adapter_config.json"):
    jaxlora.peft.load(str(tmp_path / "base"), params, model=model)
  # An adapter for another model names the mismatching tensor.
  other = BASES["gpt2"]()
  other.save_pretrained(str(tmp_path / "gbase"))
  gmodel, gparams = jaxlora.models.from_pretrained(str(tmp_path / "gbase"))
  gtree = jaxlora.wrap(gparams, rank=2, targets="attention", layout=gmodel, key=jax.random.key(0))
  jaxlora.peft.save(str(tmp_path / "g"), gtree, model=gmodel)
  with pytest.raises(ValueError, match="targets 'transformer.h.0.attn.c_attn'.*does not have"):
    jaxlora.peft.load(str(tmp_path / "g"), params, model=model)
  wide = jaxlora.models.Decoder(jaxlora.models.ModelConfig.from_hf(
      dict(json.load(open(tmp_path / "base" / "config.json")), hidden_size=64)))
  wparams = jaxlora.models.init(wide, jax.random.key(0))
  tree = jaxlora.wrap(params, rank=2, targets="q_proj", layout=model, key=jax.random.key(0))
  jaxlora.peft.save(str(tmp_path / "q"), tree, model=model)
  with pytest.raises(ValueError, match=r"q_proj' has lora_A \(2, 32\).*\[r, 64\]"):
    jaxlora.peft.load(str(tmp_path / "q"), wparams, model=wide)
  with pytest.raises(ValueError, match="already hold an adapter"):
    jaxlora.peft.load(str(tmp_path / "q"), tree, model=model)
