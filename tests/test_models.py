"""jaxlora.models against PyTorch transformers: logits, generation, checkpoint round trips."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxlora
from conftest import randomize_adapters

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

SMALL = dict(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
             num_attention_heads=4, max_position_embeddings=128, initializer_range=0.1)
ARCHS = {
    "gpt2": ("GPT2Config", "GPT2LMHeadModel",
             dict(vocab_size=96, n_embd=32, n_layer=2, n_head=4, n_positions=128,
                  initializer_range=0.1, bos_token_id=1, eos_token_id=2)),
    "llama_gqa_llama3_rope": ("LlamaConfig", "LlamaForCausalLM", dict(
        SMALL, num_key_value_heads=2, eos_token_id=2,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                      "high_freq_factor": 4.0, "original_max_position_embeddings": 8})),
    "llama_linear_rope_tied": ("LlamaConfig", "LlamaForCausalLM", dict(
        SMALL, num_key_value_heads=4, tie_word_embeddings=True, attention_bias=True,
        rope_scaling={"rope_type": "linear", "factor": 2.0}, rope_theta=500.0)),
    "mistral_sliding": ("MistralConfig", "MistralForCausalLM", dict(
        SMALL, num_key_value_heads=1, sliding_window=4)),
    "qwen2_bias_tied": ("Qwen2Config", "Qwen2ForCausalLM", dict(
        SMALL, num_key_value_heads=2, tie_word_embeddings=True)),
    "qwen3_qk_norm": ("Qwen3Config", "Qwen3ForCausalLM", dict(
        SMALL, num_key_value_heads=2, head_dim=16)),
}


def _hf_model(name):
  cfg_cls, model_cls, kw = ARCHS[name]
  torch.manual_seed(0)
  cfg = getattr(transformers, cfg_cls)(**kw)
  model = getattr(transformers, model_cls)(cfg).eval()
  with torch.no_grad():  # random biases and norm scales, so that they are tested too
    for n, p in model.named_parameters():
      if n.endswith("bias") or "norm" in n or "ln_" in n:
        p.add_(0.1 * torch.randn_like(p))
  return model


@pytest.fixture(scope="module", params=sorted(ARCHS))
def checkpoint(request, tmp_path_factory):
  hf = _hf_model(request.param)
  path = str(tmp_path_factory.mktemp(request.param))
  hf.save_pretrained(path)
  return request.param, hf, path


def _batch(vocab, left=True):
  rng = np.random.default_rng(0)
  ids = rng.integers(3, vocab, size=(3, 10))
  mask = np.ones_like(ids)
  if left:
    mask[1, :4] = 0
    mask[2, :1] = 0
  else:
    mask[1, 6:] = 0
    mask[2, 9:] = 0
  ids[mask == 0] = 0
  return ids, mask


def _hf_logits(hf, ids, mask):
  pos = np.maximum(np.cumsum(mask, -1) - 1, 0)
  with torch.no_grad():
    return hf(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
              position_ids=torch.tensor(pos)).logits.numpy()


@pytest.mark.parametrize("left", [True, False])
def test_logits_match_transformers(checkpoint, left):
  name, hf, path = checkpoint
  model, params = jaxlora.models.from_pretrained(path)
  ids, mask = _batch(model.config.vocab_size, left)
  ref = _hf_logits(hf, ids, mask)
  out = np.asarray(jax.jit(model.apply)({"params": params}, ids, attention_mask=mask))
  valid = mask.astype(bool)
  assert np.abs(out - ref)[valid].max() < 1e-4, name
  assert np.abs(ref).max() > 0.5  # the comparison is not between near-zero logits


def test_greedy_generation_matches_transformers(checkpoint):
  name, hf, path = checkpoint
  model, params = jaxlora.models.from_pretrained(path)
  ids, mask = _batch(model.config.vocab_size, left=True)
  with torch.no_grad():
    ref = hf.generate(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                      max_new_tokens=20, do_sample=False, pad_token_id=0).numpy()[:, ids.shape[1]:]
  out = np.asarray(jaxlora.generate(model, params, ids, attention_mask=mask, max_new_tokens=20,
                                    pad_token_id=0))
  assert out.shape == ref.shape == (3, 20)
  np.testing.assert_array_equal(out, ref)
  assert len(np.unique(out)) > 3  # not a degenerate repetition


def test_save_pretrained_loads_in_transformers(checkpoint, tmp_path):
  name, hf, path = checkpoint
  model, params = jaxlora.models.from_pretrained(path)
  jaxlora.models.save_pretrained(str(tmp_path), model, params)
  back = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path)).eval()
  ids, mask = _batch(model.config.vocab_size)
  np.testing.assert_allclose(_hf_logits(back, ids, mask), _hf_logits(hf, ids, mask), atol=1e-6)
  _, params2 = jaxlora.models.from_pretrained(str(tmp_path))
  for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(params2)):
    np.testing.assert_array_equal(a, b)


# The fast tier checks a merged export in test_cli (export --format hf).
@pytest.mark.slow
def test_lora_merged_export_matches_factored(checkpoint, tmp_path):
  name, hf, path = checkpoint
  model, params = jaxlora.models.from_pretrained(path)
  tree = jaxlora.wrap(params, rank=4, targets=("attention", "mlp"), layout=model,
                      key=jax.random.key(0))
  assert len(jaxlora.summary(tree).layers) == (4 if name == "gpt2" else 7)
  tree = randomize_adapters(tree, jax.random.key(1), scale=0.3)
  ids, mask = _batch(model.config.vocab_size)
  factored = np.asarray(jaxlora.apply(model.apply)({"params": tree}, ids, attention_mask=mask))
  jaxlora.models.save_pretrained(str(tmp_path), model, jaxlora.merge(tree))
  back = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path)).eval()
  ref = _hf_logits(back, ids, mask)
  valid = mask.astype(bool)
  assert np.abs(factored - ref)[valid].max() < 1e-4
  assert np.abs(factored - _hf_logits(hf, ids, mask))[valid].max() > 1e-2  # LoRA changed it
  # Generation runs on the wrapped tree through the factored path, and equals the merged one.
  g1 = jaxlora.generate(model, tree, ids, attention_mask=mask, max_new_tokens=5)
  g2 = jaxlora.generate(model, jaxlora.merge(tree), ids, attention_mask=mask, max_new_tokens=5)
  np.testing.assert_array_equal(g1, g2)


def test_sharded_and_bf16_checkpoints(tmp_path):
  hf = _hf_model("llama_gqa_llama3_rope")
  hf.save_pretrained(str(tmp_path / "sharded"), max_shard_size="20KB")
  assert os.path.exists(tmp_path / "sharded" / "model.safetensors.index.json")
  model, params = jaxlora.models.from_pretrained(str(tmp_path / "sharded"))
  ids, mask = _batch(96)
  out = np.asarray(model.apply({"params": params}, ids, attention_mask=mask))
  assert np.abs(out - _hf_logits(hf, ids, mask))[mask.astype(bool)].max() < 1e-4
  hf.to(torch.bfloat16).save_pretrained(str(tmp_path / "bf16"))
  model, params = jaxlora.models.from_pretrained(str(tmp_path / "bf16"), param_dtype=jnp.bfloat16)
  k = params["layers"]["self_attn"]["q_proj"]["kernel"]
  assert k.dtype == jnp.bfloat16
  ref = hf.model.layers[1].self_attn.q_proj.weight.detach().float().numpy().T
  np.testing.assert_array_equal(np.asarray(k[1], np.float32), ref)
  # Writing shards works too, and transformers reads them.
  jaxlora.models.save_pretrained(str(tmp_path / "out"), model, params, max_shard_bytes=10_000)
  assert os.path.exists(tmp_path / "out" / "model.safetensors.index.json")
  back = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "out"))
  assert back.model.layers[1].self_attn.q_proj.weight.dtype == torch.bfloat16


@pytest.mark.slow
def test_remat_and_bf16_compute_run():
  from jaxlora.models.decoder import REMAT_POLICIES  # pylint: disable=import-outside-toplevel
  hf = _hf_model("qwen3_qk_norm")
  cfg = jaxlora.models.ModelConfig.from_hf(hf.config.to_dict())
  ids, mask = _batch(96)
  ref = None
  params = jaxlora.models.init(jaxlora.models.Decoder(cfg), jax.random.key(0))
  # Every policy (host offload included: a no-op on CPU) changes what is saved, not the result.
  for remat in (None, *REMAT_POLICIES):
    model = jaxlora.models.Decoder(cfg, remat=remat)
    g = jax.jit(jax.grad(
        lambda p: model.apply({"params": p}, ids, attention_mask=mask).sum()))(params)
    leaf = g["layers"]["mlp"]["up_proj"]["kernel"]
    ref = leaf if ref is None else ref
    np.testing.assert_allclose(leaf, ref, rtol=1e-5, atol=1e-6)
  model = jaxlora.models.Decoder(cfg, dtype=jnp.bfloat16)
  assert model.apply({"params": params}, ids).dtype == jnp.bfloat16


def _write(path, cfg=None, tensors=None):
  os.makedirs(path, exist_ok=True)
  if cfg is not None:
    with open(os.path.join(path, "config.json"), "w") as f:
      json.dump(cfg, f)
  if tensors is not None:
    from jaxlora.models import safetensors_io
    safetensors_io.save_file(tensors, os.path.join(path, "model.safetensors"))


def test_loading_errors(tmp_path):
  hf = _hf_model("gpt2")
  good = str(tmp_path / "good")
  hf.save_pretrained(good)
  from jaxlora.models import safetensors_io
  f = safetensors_io.SafetensorsFile(os.path.join(good, "model.safetensors"))
  tensors = {k: np.array(f.get(k)) for k in f.keys()}
  cfg = json.load(open(os.path.join(good, "config.json")))

  with pytest.raises(FileNotFoundError, match="does not exist"):
    jaxlora.models.from_pretrained(str(tmp_path / "nope"))
  _write(str(tmp_path / "nocfg"), tensors=tensors)
  with pytest.raises(FileNotFoundError, match="config.json not found"):
    jaxlora.models.from_pretrained(str(tmp_path / "nocfg"))
  _write(str(tmp_path / "type"), dict(cfg, model_type="bert"), tensors)
  with pytest.raises(ValueError, match="model_type 'bert' is not supported"):
    jaxlora.models.from_pretrained(str(tmp_path / "type"))
  missing = {k: v for k, v in tensors.items() if k != "transformer.h.1.mlp.c_fc.weight"}
  _write(str(tmp_path / "missing"), cfg, missing)
  with pytest.raises(ValueError, match=r"lacks tensor 'transformer.h.1.mlp.c_fc.weight'.*\(32, 128\)"):
    jaxlora.models.from_pretrained(str(tmp_path / "missing"))
  _write(str(tmp_path / "extra"), cfg, dict(tensors, **{"transformer.h.2.ln_1.weight": np.ones(32, np.float32)}))
  with pytest.raises(ValueError, match=r"does not use: \['transformer.h.2.ln_1.weight'\]"):
    jaxlora.models.from_pretrained(str(tmp_path / "extra"))
  bad = dict(tensors)
  bad["transformer.wpe.weight"] = np.zeros((64, 32), np.float32)
  _write(str(tmp_path / "shape"), cfg, bad)
  with pytest.raises(ValueError, match=r"'transformer.wpe.weight'.*\(64, 32\).*\(128, 32\)"):
    jaxlora.models.from_pretrained(str(tmp_path / "shape"))
  _write(str(tmp_path / "bin"), cfg)
  open(tmp_path / "bin" / "pytorch_model.bin", "wb").close()
  with pytest.raises(FileNotFoundError, match="pytorch_model.bin.*safetensors only"):
    jaxlora.models.from_pretrained(str(tmp_path / "bin"))
  _write(str(tmp_path / "trunc"), cfg)
  data = open(os.path.join(good, "model.safetensors"), "rb").read()
  open(tmp_path / "trunc" / "model.safetensors", "wb").write(data[: len(data) // 2])
  with pytest.raises(ValueError, match="truncated"):
    jaxlora.models.from_pretrained(str(tmp_path / "trunc"))
  _write(str(tmp_path / "rope"), dict(json.load(open(os.path.join(good, "config.json"))),
                                       model_type="llama", hidden_size=32, intermediate_size=8,
                                       num_hidden_layers=1, num_attention_heads=4,
                                       rope_scaling={"rope_type": "yarn", "factor": 2.0}))
  with pytest.raises(ValueError, match="rope_type 'yarn' is not supported"):
    jaxlora.models.from_pretrained(str(tmp_path / "rope"))


def test_save_pretrained_refuses_wrapped_params(tmp_path):
  cfg = jaxlora.models.ModelConfig("llama", 32, 16, 2, 4, 2, 4, 32, 64, 1e-6, False)
  model = jaxlora.models.Decoder(cfg)
  params = jaxlora.models.init(model, jax.random.key(0))
  tree = jaxlora.wrap(params, rank=2, layout=model, key=jax.random.key(1))
  with pytest.raises(ValueError, match="merge"):
    jaxlora.models.save_pretrained(str(tmp_path), model, tree)
  assert not os.listdir(tmp_path)
  boxed = model.init(jax.random.key(0), jnp.zeros((1, 1), jnp.int32))
  with pytest.raises(TypeError, match="unbox"):
    jaxlora.wrap(boxed, rank=2, layout=model, key=jax.random.key(1))


def test_generation_arguments_and_sampling():
  cfg = jaxlora.models.ModelConfig("llama", 32, 16, 2, 4, 2, 4, 32, 64, 1e-6, False,
                                   eos_token_id=None)
  model = jaxlora.models.Decoder(cfg)
  params = jaxlora.models.init(model, jax.random.key(0))
  ids = jnp.array([[1, 2, 3], [4, 5, 6]])
  a = jaxlora.generate(model, params, ids, max_new_tokens=6, temperature=1.0, key=jax.random.key(0))
  b = jaxlora.generate(model, params, ids, max_new_tokens=6, temperature=1.0, key=jax.random.key(0))
  np.testing.assert_array_equal(a, b)
  # top_p close to 0 keeps only the most likely token: sampling becomes greedy.
  greedy = jaxlora.generate(model, params, ids, max_new_tokens=6)
  nucleus = jaxlora.generate(model, params, ids, max_new_tokens=6, temperature=1.0, top_p=1e-6,
                             key=jax.random.key(3))
  np.testing.assert_array_equal(greedy, nucleus)
  # After EOS a row is padded.
  eos = int(greedy[0, 1])
  out = jaxlora.generate(model, params, ids, max_new_tokens=6, eos_token_id=eos, pad_token_id=31)
  assert int(out[0, 1]) == eos and (np.asarray(out[0, 2:]) == 31).all()
  with pytest.raises(ValueError, match="PRNG key"):
    jaxlora.generate(model, params, ids, temperature=0.5)
  with pytest.raises(ValueError, match="max_new_tokens"):
    jaxlora.generate(model, params, ids, max_new_tokens=0)


def test_sliding_window_is_applied(tmp_path):
  import dataclasses
  _hf_model("mistral_sliding").save_pretrained(str(tmp_path))
  model, params = jaxlora.models.from_pretrained(str(tmp_path))
  assert model.config.sliding_window == 4
  full = jaxlora.models.Decoder(dataclasses.replace(model.config, sliding_window=None))
  ids, mask = _batch(96)
  a = model.apply({"params": params}, ids, attention_mask=mask)
  b = full.apply({"params": params}, ids, attention_mask=mask)
  assert np.abs(np.asarray(a) - np.asarray(b))[:, 5:].max() > 1e-3  # beyond the window
  np.testing.assert_allclose(np.asarray(a)[0, :4], np.asarray(b)[0, :4], atol=1e-6)

