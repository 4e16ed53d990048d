"""Gemma 1/2/3, Phi-3 and the mixture-of-experts families against PyTorch transformers."""

import json
import os

import jax
import numpy as np
import pytest

import jaxlora
from conftest import randomize_adapters
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
    "mixtral": ("MixtralConfig", dict(BASE, num_local_experts=4, num_experts_per_tok=2)),
    "qwen2_moe": ("Qwen2MoeConfig", dict(BASE, num_experts=4, num_experts_per_tok=2,
                                         moe_intermediate_size=24,
                                         shared_expert_intermediate_size=40)),
    "qwen3_moe": ("Qwen3MoeConfig", dict(BASE, num_experts=4, num_experts_per_tok=2,
                                         moe_intermediate_size=24, norm_topk_prob=True,
                                         head_dim=16)),
}


# The fast tier runs the families with distinct features; the others run in the full suite.
FAST = ("gemma2", "gemma3", "mixtral", "phi3")
_tiered = lambda names, fast=FAST: [n if n in fast else pytest.param(n, marks=pytest.mark.slow)
                                    for n in names]


def _hf_model(name):
  cfg_cls, kw = FAMILIES[name]
  torch.manual_seed(0)
  cfg = getattr(transformers, cfg_cls)(**kw)
  model = transformers.AutoModelForCausalLM.from_config(cfg).eval()
  with torch.no_grad():  # random norm scales (Gemma's start at zero) and routers
    for n, p in model.named_parameters():
      if "norm" in n or n.endswith("bias"):
        p.add_(0.3 * torch.randn_like(p))
      if n.endswith("gate.weight"):  # routers start at zero in some families: spread them
        p.copy_(torch.randn_like(p))
  return model


@pytest.fixture(scope="module", params=_tiered(sorted(FAMILIES)))
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


@pytest.mark.parametrize("family", _tiered(sorted(FAMILIES), ("mixtral",)), indirect=True)
def test_memory_plan_counts_the_base(family):
  name, _, _, model, params = family
  mesh = jaxlora.sharding.make_mesh(fsdp=1, devices=jax.devices()[:1])
  plan = jaxlora.sharding.memory_plan(model, mesh, rank=4, batch=2, seq=16)
  assert plan["base"] == sum(x.nbytes for x in jax.tree.leaves(params)), name
  assert plan["activations"] > 0 and plan["total"] > plan["base"] + plan["adapter"]


def _peft_forward(pm, ids, mask):
  pos = np.maximum(np.cumsum(mask, -1) - 1, 0)
  with torch.no_grad():
    return pm(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
              position_ids=torch.tensor(pos)).logits.numpy()


# The fast tier checks PEFT interop through Phi-3's fused modules.
@pytest.mark.slow
@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe"], indirect=True)
def test_expert_lora_round_trips_with_peft_target_parameters(family, tmp_path):
  """PEFT's LoRA on the stacked experts (target_parameters) loads with equal logits, and
  jaxlora's per-expert adapters export to it."""
  name, _, path, model, params = family
  peft = pytest.importorskip("peft")
  torch.manual_seed(1)
  pm = peft.get_peft_model(
      transformers.AutoModelForCausalLM.from_pretrained(path),
      peft.LoraConfig(r=2, lora_alpha=6, target_modules=["q_proj"], init_lora_weights=False,
                      target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]))
  with torch.no_grad():  # PEFT starts B at zero even with init_lora_weights=False here
    for n, prm in pm.named_parameters():
      if "lora_B" in n:
        prm.normal_(0.0, 0.5)
  pm.save_pretrained(str(tmp_path / "peft"))
  ids, mask = _batch(model.config.vocab_size)
  ref = _peft_forward(pm.eval(), ids, mask)
  tree = jaxlora.peft.load(str(tmp_path / "peft"), params, model=model)
  experts = tree["layers"]["mlp"]["experts"]
  assert experts["gate_up_proj"]["lora_a"].shape == (2, 4, 32, 2)
  assert experts["down_proj"]["lora_b"].shape == (2, 4, 2, 32)
  fwd = jax.jit(jaxlora.apply(model.apply))
  out = np.asarray(fwd({"params": tree}, ids, attention_mask=mask))
  valid = mask.astype(bool)
  assert np.abs(out - ref)[valid].max() < 1e-4, name
  plain = np.asarray(model.apply({"params": params}, ids, attention_mask=mask))
  assert np.abs(plain - ref)[valid].max() > 1e-2
  # jaxlora -> PEFT: a wrapped tree with random per-expert factors, written and served by PEFT.
  wrapped = randomize_adapters(jaxlora.wrap(params, rank=3, alpha=6.0, targets="mlp",
                                            layout=model, key=jax.random.key(2)),
                               jax.random.key(3))
  jaxlora.peft.save(str(tmp_path / "ours"), wrapped, model=model)
  served = peft.PeftModel.from_pretrained(transformers.AutoModelForCausalLM.from_pretrained(path),
                                          str(tmp_path / "ours")).eval()
  ours = np.asarray(fwd({"params": wrapped}, ids, attention_mask=mask))
  np.testing.assert_allclose(_peft_forward(served, ids, mask)[valid], ours[valid], atol=1e-4)
  back = jaxlora.peft.load(str(tmp_path / "ours"), params, model=model)
  for k in ("gate_up_proj", "down_proj"):
    np.testing.assert_array_equal(back["layers"]["mlp"]["experts"][k]["lora_a"],
                                  wrapped["layers"]["mlp"]["experts"][k]["lora_a"])


@pytest.fixture(scope="module")
def moe_run_dir(model_dir, tmp_path_factory):
  """The tiny command-line checkpoint's tokenizer with a Qwen3-MoE model of its vocabulary."""
  import shutil
  d = tmp_path_factory.mktemp("tiny-moe")
  for f in os.listdir(model_dir):
    if f.startswith(("tokenizer", "special_tokens")):
      shutil.copy(os.path.join(model_dir, f), d)
  vocab = json.load(open(os.path.join(model_dir, "config.json")))["vocab_size"]
  torch.manual_seed(0)
  transformers.Qwen3MoeForCausalLM(transformers.Qwen3MoeConfig(
      vocab_size=vocab, hidden_size=32, intermediate_size=48, moe_intermediate_size=16,
      num_experts=4, num_experts_per_tok=2, num_hidden_layers=2, num_attention_heads=4,
      num_key_value_heads=2, head_dim=8, max_position_embeddings=128, bos_token_id=1,
      eos_token_id=2, pad_token_id=0)).save_pretrained(str(d))
  return str(d)


def _moe_step_inputs(moe_run_dir):
  model, params = jaxlora.models.from_pretrained(moe_run_dir)
  tree = jaxlora.wrap(params, rank=2, targets="all-linear", train_extra=r"mlp/gate$",
                      layout=model, key=jax.random.key(0))
  tree = randomize_adapters(tree, jax.random.key(1))
  rng = np.random.default_rng(0)
  ids = rng.integers(3, model.config.vocab_size, size=(1, 8, 12)).astype(np.int32)
  mask = np.ones_like(ids)
  mask[0, 1, :5] = 0
  return model, tree, {"input_ids": ids, "attention_mask": mask, "targets": mask}


# The fast tier trains expert LoRA through test_moe; this step (the trainer's loss) is slow.
@pytest.mark.slow
def test_moe_training_step_adds_the_aux_loss_and_trains_the_router(moe_run_dir):
  """One LoRA step of a mixture-of-experts model: the loss is the cross-entropy plus the
  weighted load-balancing loss, and a router trained in full (train_extra) gets its gradient."""
  from jaxlora.models import moe
  from jaxlora_cli import trainer
  model, tree, batch = _moe_step_inputs(moe_run_dir)
  trainable, frozen = jaxlora.split(tree)
  assert "kernel" in trainable["layers"]["mlp"]["gate"]  # the router trains in full
  assert "lora_a" in trainable["layers"]["mlp"]["experts"]["down_proj"]
  coef = 0.5
  g, m = jax.jit(trainer.make_grads(model, loss_chunk_size=0, router_aux_loss_coef=coef))(
      trainable, frozen, batch, jax.random.key(2))
  ids, mask = batch["input_ids"][0], batch["attention_mask"][0]
  logits, state = jax.jit(lambda t: jaxlora.apply(model.apply)(
      {"params": t}, ids, attention_mask=mask, mutable=["intermediates"]))(tree)
  logp = jax.nn.log_softmax(np.asarray(logits, np.float64)[:, :-1], -1)
  nll = -np.take_along_axis(np.asarray(logp), ids[:, 1:, None], -1)[..., 0]
  w = mask[:, 1:] * mask[:, :-1]  # targets of real tokens that follow a real token
  ce = (nll * w).sum() / w.sum()
  aux = moe.load_balancing_loss(state["intermediates"]["layers"]["mlp"]["router_logits"][0],
                                4, 2, mask)
  np.testing.assert_allclose(m["loss"], ce + coef * float(aux), rtol=1e-5)
  assert np.abs(np.asarray(g["layers"]["mlp"]["gate"]["kernel"])).max() > 0


@pytest.mark.slow
def test_moe_expert_parallel_step_matches_one_device(moe_run_dir):
  """EP_RULES split the stacked experts over 'fsdp' (adapters follow); the step's loss and
  gradients equal one device's."""
  from jaxlora_cli import trainer
  if len(jax.devices()) < 4:
    pytest.skip("needs XLA_FLAGS=--xla_force_host_platform_device_count=8 (the test command)")
  model, tree, batch = _moe_step_inputs(moe_run_dir)
  trainable, frozen = jaxlora.split(tree)
  grads = jax.jit(trainer.make_grads(model, loss_chunk_size=0, router_aux_loss_coef=0.5))
  g, m = grads(trainable, frozen, batch, jax.random.key(2))
  mesh = jaxlora.sharding.make_mesh(fsdp=4, devices=jax.devices()[:4])
  base_sh = jaxlora.sharding.param_shardings(model, mesh, jaxlora.sharding.EP_RULES)
  sh = jaxlora.sharding.tree_shardings(tree, base_sh)
  assert tuple(base_sh["layers"]["mlp"]["experts"]["gate_up_proj"]["kernel"].spec) == (
      None, "fsdp", None, None)
  assert tuple(sh["layers"]["mlp"]["experts"]["gate_up_proj"]["lora_a"].spec)[:2] == (
      None, "fsdp")
  assert tuple(base_sh["layers"]["self_attn"]["q_proj"]["kernel"].spec)[1] == "fsdp"
  t_sh, f_sh = jaxlora.split(sh)
  put = lambda x, s: jax.device_put(x, s)
  gs, ms = grads(jax.tree.map(put, trainable, t_sh), jax.tree.map(put, frozen, f_sh), batch,
                 jax.random.key(2))
  np.testing.assert_allclose(ms["loss"], m["loss"], rtol=1e-5)
  for a, b in zip(jax.tree.leaves(gs), jax.tree.leaves(g)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-4, atol=1e-6)


@pytest.mark.slow
def test_moe_cli_run_exports_and_serves_in_peft(moe_run_dir, data_dir, tmp_path):
  """`jaxlora train` on a mixture-of-experts checkpoint (expert parallel rules, auxiliary
  loss, trained routers) and its PEFT adapter served by PEFT with the same logits."""
  peft = pytest.importorskip("peft")
  from conftest import cli_args
  from jaxlora_cli.main import main
  out = tmp_path / "run"
  assert main(cli_args(moe_run_dir, data_dir / "pc.jsonl", out, "train.steps=2",
                       "mesh.rules=ep", "train.router_aux_loss_coef=0.02",
                       "lora.targets=all-linear", "lora.train_extra=mlp/gate$")) == 0
  cfg = json.loads((out / "adapter_peft" / "adapter_config.json").read_text())
  assert cfg["target_parameters"] == ["mlp.experts.down_proj", "mlp.experts.gate_up_proj"]
  assert cfg["modules_to_save"] == ["model.layers.0.mlp.gate", "model.layers.1.mlp.gate"]
  assert cfg["target_modules"] == ["k_proj", "o_proj", "q_proj", "v_proj"]
  model, params = jaxlora.models.from_pretrained(moe_run_dir)
  tree = jaxlora.load(str(out / "adapter"), params)
  ids = np.array([[1, 7, 9, 3, 5, 11]])
  ours = np.asarray(jaxlora.apply(model.apply)({"params": tree}, ids))
  base = transformers.AutoModelForCausalLM.from_pretrained(moe_run_dir)
  pm = peft.PeftModel.from_pretrained(base, str(out / "adapter_peft")).eval()
  with torch.no_grad():
    served = pm(input_ids=torch.tensor(ids)).logits.numpy()
  assert np.abs(ours - served).max() < 1e-4
