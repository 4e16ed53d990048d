"""Gemma 1/2/3, Phi-3 and the mixture-of-experts families against PyTorch transformers."""

import jax
import numpy as np
import pytest

import jaxlora
from test_models import _batch, _hf_logits

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

BASE = dict(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
            initializer_range=0.1, bos_token_id=1, eos_token_id=2, pad_token_id=0)
FAMILIES = {
    "gemma": ("GemmaConfig", dict(BASE, head_dim=16)),
    "gemma2": ("Gemma2Config", dict(BASE, head_dim=16, sliding_window=4,
                                    query_pre_attn_scalar=16, attn_logit_softcapping=2.0,
                                    final_logit_softcapping=3.0)),
    "gemma3": ("Gemma3TextConfig", dict(
        BASE, head_dim=16, sliding_window=4, query_pre_attn_scalar=16,
        layer_types=["sliding_attention", "full_attention"],
        rope_parameters={"full_attention": {"rope_type": "linear", "factor": 2.0,
                                            "rope_theta": 1e6},
                         "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}})),
    "phi3": ("Phi3Config", dict(BASE)),
    "phi3_sliding": ("Phi3Config", dict(BASE, sliding_window=4)),
}


def _hf_model(name):
  cfg_cls, kw = FAMILIES[name]
  torch.manual_seed(0)
  cfg = getattr(transformers, cfg_cls)(**kw)
  model = transformers.AutoModelForCausalLM.from_config(cfg).eval()
  with torch.no_grad():  # random norm scales (Gemma's start at zero) and routers
    for n, p in model.named_parameters():
      if "norm" in n or n.endswith("bias"):
        p.add_(0.3 * torch.randn_like(p))
  return model


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family(request, tmp_path_factory):
  hf = _hf_model(request.param)
  path = str(tmp_path_factory.mktemp(request.param))
  hf.save_pretrained(path)
  model, params = jaxlora.models.from_pretrained(path)
  return request.param, hf, path, model, params


def test_logits_match_transformers_left_padded(family):
  name, hf, _, model, params = family
  ids, mask = _batch(model.config.vocab_size, left=True)
  ref = _hf_logits(hf, ids, mask)
  out = np.asarray(jax.jit(model.apply)({"params": params}, ids, attention_mask=mask))
  valid = mask.astype(bool)
  assert np.abs(out - ref)[valid].max() < 1e-4, name
  assert np.abs(ref).max() > 0.5


@pytest.mark.slow
def test_greedy_generation_matches_transformers(family):
  name, hf, _, model, params = family
  ids, mask = _batch(model.config.vocab_size, left=True)
  with torch.no_grad():
    ref = hf.generate(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                      max_new_tokens=12, do_sample=False, pad_token_id=0,
                      eos_token_id=None).numpy()[:, ids.shape[1]:]
  out = np.asarray(jaxlora.generate(model, params, ids, attention_mask=mask, max_new_tokens=12,
                                    pad_token_id=0, eos_token_id=None))
  np.testing.assert_array_equal(out, ref, err_msg=name)
  assert len(np.unique(out)) > 2


@pytest.mark.slow
def test_save_pretrained_round_trip(family, tmp_path):
  name, hf, _, model, params = family
  jaxlora.models.save_pretrained(str(tmp_path), model, params)
  back = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path)).eval()
  ids, mask = _batch(model.config.vocab_size)
  np.testing.assert_allclose(_hf_logits(back, ids, mask), _hf_logits(hf, ids, mask), atol=1e-6,
                             err_msg=name)


@pytest.mark.parametrize("family", ["phi3"], indirect=True)
def test_phi3_fused_modules_round_trip_with_peft(family, tmp_path):
  """PEFT's LoRA on Phi-3's fused qkv_proj and gate_up_proj, both ways."""
  _, _, path, model, params = family
  peft = pytest.importorskip("peft")
  torch.manual_seed(1)
  hf = transformers.AutoModelForCausalLM.from_pretrained(path)
  pm = peft.get_peft_model(hf, peft.LoraConfig(
      r=4, lora_alpha=8, target_modules=["qkv_proj", "gate_up_proj"],
      init_lora_weights=False)).eval()
  pm.save_pretrained(str(tmp_path / "peft"))
  ids, mask = _batch(model.config.vocab_size)
  pos = np.maximum(np.cumsum(mask, -1) - 1, 0)
  with torch.no_grad():
    ref = pm(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
             position_ids=torch.tensor(pos)).logits.numpy()
  tree = jaxlora.peft.load(str(tmp_path / "peft"), params, model=model)
  assert tree["layers"]["self_attn"]["qkv_proj"]["lora_b"].shape == (2, 4, 64)
  fwd = jax.jit(jaxlora.apply(model.apply))
  out = np.asarray(fwd({"params": tree}, ids, attention_mask=mask))
  valid = mask.astype(bool)
  assert np.abs(out - ref)[valid].max() < 1e-4
  plain = np.asarray(model.apply({"params": params}, ids, attention_mask=mask))
  assert np.abs(plain - ref)[valid].max() > 1e-2  # the adapter changes the logits
  jaxlora.peft.save(str(tmp_path / "back"), tree, model=model)
  again = peft.PeftModel.from_pretrained(transformers.AutoModelForCausalLM.from_pretrained(path),
                                         str(tmp_path / "back")).eval()
  with torch.no_grad():
    back = again(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                 position_ids=torch.tensor(pos)).logits.numpy()
  np.testing.assert_allclose(back[valid], ref[valid], atol=1e-5)


@pytest.mark.parametrize("change, message", [
    ({"layer_types": ["sliding_attention", "chunked_attention"]},
     r"layer_types\[1\] is 'chunked_attention'"),
    ({"rope_parameters": {"rope_type": "yarn", "factor": 2.0}}, r"rope_type 'yarn'"),
    ({"use_bidirectional_attention": True}, "use_bidirectional_attention"),
    ({"model_type": "gemma3", "text_config": {}}, "vision tower"),
    ({"model_type": "phi3", "rope_parameters": {"partial_rotary_factor": 0.5}},
     "partial_rotary_factor 0.5"),
    ({"model_type": "qwen2_moe", "num_experts": 4, "num_experts_per_tok": 2,
      "decoder_sparse_step": 2}, "decoder_sparse_step=2"),
    ({"model_type": "mixtral", "num_local_experts": 4, "num_experts_per_tok": 2,
      "router_jitter_noise": 0.1}, "router_jitter_noise=0.1"),
    ({"model_type": "qwen3_moe", "num_experts_per_tok": 2}, "'num_experts'"),
])
def test_unsupported_features_are_refused_with_the_key(change, message):
  base = dict(model_type="gemma2", vocab_size=32, hidden_size=16, num_hidden_layers=2,
              num_attention_heads=2, intermediate_size=32, sliding_window=4)
  with pytest.raises(ValueError, match=message):
    jaxlora.models.ModelConfig.from_hf(dict(base, **change))


def test_memory_plan_counts_the_base(family):
  name, _, _, model, params = family
  mesh = jaxlora.sharding.make_mesh(fsdp=1, devices=jax.devices()[:1])
  plan = jaxlora.sharding.memory_plan(model, mesh, rank=4, batch=2, seq=16)
  assert plan["base"] == sum(x.nbytes for x in jax.tree.leaves(params)), name
  assert plan["activations"] > 0 and plan["total"] > plan["base"] + plan["adapter"]
