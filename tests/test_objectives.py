"""`train.objective`: the DPO family, SimPO, ORPO and GRPO in the trainer and the command line."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxlora
from conftest import cli_args, f64, randomize_adapters
from jaxlora_cli import config as config_lib
from jaxlora_cli import data as data_lib
from jaxlora_cli import objectives
from jaxlora_cli import rl
from jaxlora_cli.main import main

BETA, SMOOTH, GAMMA = 0.3, 0.1, 0.4


# ------------------------------------------------------------------ reward functions for the runs

def length_reward(prompts, completions, answer, **columns):
  """Varies between completions of one prompt, so every group has an advantage."""
  assert len(prompts) == len(completions) == len(answer)
  return [min(len(c), 12) / 12 + (c.strip() == a) for c, a in zip(completions, answer)]


def broken_reward(prompts, completions, **columns):
  raise RuntimeError("the grader is down")


def nan_reward(prompts, completions, **columns):
  return [float("nan")] + [0.0] * (len(completions) - 1)


FAILURE = {"mode": None}  # set by a test: how switchable_reward fails


def switchable_reward(prompts, completions, **columns):
  if FAILURE["mode"] == "raise":
    broken_reward(prompts, completions)
  if FAILURE["mode"] == "nan":
    return nan_reward(prompts, completions)
  return [len(c) / 10 for c in completions]


# ------------------------------------------------------------------ float64 references

def _logsoftmax64(logits):
  x = f64(logits)
  m = x.max(-1, keepdims=True)
  return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))


def _row_logps(model, params, ids, mask, targets):
  """Per-token target log-probs (rows, seq - 1) in float64, from plain `model.apply` logits."""
  logits = model.apply({"params": params}, jnp.asarray(ids), attention_mask=jnp.asarray(mask))
  lp = _logsoftmax64(logits)[:, :-1]
  picked = np.take_along_axis(lp, np.asarray(ids)[:, 1:, None], -1)[..., 0]
  w = f64(targets)[:, 1:] * f64(mask)[:, 1:]
  return picked * w, w


def _logsig(x):
  return -np.logaddexp(0.0, -x)


def _reference_pair_loss(name, pc, pr, rc, rr, nc, nr):
  """TRL's definitions, written out in NumPy (pc/pr: policy sums, rc/rr: reference sums,
  nc/nr: completion lengths)."""
  d = (pc - rc) - (pr - rr)
  ac, ar = pc / nc, pr / nr
  if name == "dpo":
    return -_logsig(BETA * d).mean(), BETA * (pc - rc), BETA * (pr - rr)
  if name == "hinge":
    return np.maximum(0, 1 - BETA * d).mean(), BETA * (pc - rc), BETA * (pr - rr)
  if name == "ipo":
    x = (pc - rc) / nc - (pr - rr) / nr
    return ((x - 1 / (2 * BETA)) ** 2).mean(), BETA * (pc - rc), BETA * (pr - rr)
  if name == "robust":
    loss = ((1 - SMOOTH) * -_logsig(BETA * d) - SMOOTH * -_logsig(-BETA * d)) / (1 - 2 * SMOOTH)
    return loss.mean(), BETA * (pc - rc), BETA * (pr - rr)
  if name == "simpo":
    return -_logsig(BETA * (ac - ar) - GAMMA).mean(), BETA * ac, BETA * ar
  # orpo: the chosen NLL (token mean) plus the odds-ratio term
  log_odds = (ac - ar) - (np.log1p(-np.exp(ac)) - np.log1p(-np.exp(ar)))
  nll = -pc.sum() / nc.sum()
  return nll - BETA * _logsig(log_odds).mean(), BETA * ac, BETA * ar


# ------------------------------------------------------------------ the tiny model and its batches

@pytest.fixture(scope="module")
def tiny():
  model = jaxlora.models.Decoder(jaxlora.models.ModelConfig.tiny("llama"))
  params = jaxlora.models.init(model, jax.random.key(0))
  tree = randomize_adapters(jaxlora.wrap(params, rank=2, layout=model, key=jax.random.key(1)),
                            jax.random.key(2), scale=0.3)
  return model, params, tree


def _side(rng, pairs, length, prompt_len):
  ids = rng.integers(3, 32, (pairs, length)).astype(np.int32)
  mask = np.zeros((pairs, length), np.int32)
  targets = np.zeros((pairs, length), np.float32)
  for i in range(pairs):
    n = int(rng.integers(prompt_len + 2, length + 1))
    mask[i, :n] = 1
    targets[i, prompt_len:n] = 1
  return ids, mask, targets


def _pairs(accum=2, pairs=3, length=12, seed=0):
  rng = np.random.default_rng(seed)
  out = {}
  for prefix in ("", "rejected_"):
    ids, mask, targets = _side(rng, accum * pairs, length, prompt_len=4)
    for k, v in (("input_ids", ids), ("attention_mask", mask), ("targets", targets)):
      out[prefix + k] = v.reshape(accum, pairs, length)
  out["rejected_input_ids"][..., :4] = out["input_ids"][..., :4]  # one prompt per pair
  return out


def _flat(batch):
  return {k: v.reshape(1, -1, *v.shape[2:]) for k, v in batch.items()}


def _reference_sums(model, params, tree, batch):
  merged = jaxlora.merge(tree)  # the policy as plain weights; the reference is `params`
  flat = _flat(batch)
  sums = []
  for prefix in ("", "rejected_"):
    args = [flat[prefix + k][0] for k in ("input_ids", "attention_mask", "targets")]
    pol, w = _row_logps(model, merged, *args)
    ref, _ = _row_logps(model, params, *args)
    sums.append((pol.sum(1), ref.sum(1), w.sum(1)))
  return sums


def test_pair_objectives_match_a_float64_reference(tiny):
  model, params, tree = tiny
  batch = _pairs()
  (pc, rc, nc), (pr, rr, nr) = _reference_sums(model, params, tree, batch)
  fwd = jaxlora.apply(model.apply)
  flat = {k: v[0] for k, v in _flat(batch).items()}
  for name in ("dpo", "ipo", "hinge", "robust", "simpo", "orpo"):
    obj = objectives.PairObjective(name, BETA, SMOOTH if name == "robust" else 0.0, GAMMA)
    loss, m = jax.jit(lambda t, mb, o=obj: objectives.pair_loss(
        o, fwd, model, t, mb, None, jnp.float32(6), jnp.float32(nc.sum())))(tree, flat)
    expected, chosen_r, rejected_r = _reference_pair_loss(name, pc, pr, rc, rr, nc, nr)
    np.testing.assert_allclose(float(loss), expected, rtol=2e-5, err_msg=name)
    np.testing.assert_allclose(float(m["rewards/margins"]), (chosen_r - rejected_r).mean(),
                               rtol=2e-4, atol=1e-6, err_msg=name)
    assert float(m["rewards/accuracies"]) == pytest.approx((chosen_r > rejected_r).mean())


@pytest.mark.parametrize("name", ["dpo", "orpo"])
def test_pair_step_is_the_same_for_any_micro_batches_and_head_chunks(tiny, name):
  """The step's gradient is the gradient of the step's mean: two micro-batches of three pairs
  with full logits equal one of six with the head in chunks (ORPO also normalises its NLL by
  the step's chosen tokens)."""
  model, params, tree = tiny
  obj = objectives.PairObjective(name, BETA)
  batch = _pairs()
  trainable, frozen = jaxlora.split(tree)
  g, m = jax.jit(objectives.make_pair_grads(model, obj, loss_chunk_size=0))(
      trainable, frozen, batch, jax.random.key(0))
  (pc, rc, nc), (pr, rr, nr) = _reference_sums(model, params, tree, batch)
  np.testing.assert_allclose(float(m["loss"]), _reference_pair_loss(name, pc, pr, rc, rr, nc,
                                                                    nr)[0], rtol=2e-5)
  assert float(m["pairs"]) == 6 and float(m["tokens"]) == nc.sum() + nr.sum()
  g1, m1 = jax.jit(objectives.make_pair_grads(model, obj, loss_chunk_size=4))(
      trainable, frozen, _flat(batch), jax.random.key(0))
  np.testing.assert_allclose(float(m1["loss"]), float(m["loss"]), rtol=1e-5)
  for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(g1)):
    np.testing.assert_allclose(f64(a), f64(b), rtol=1e-4, atol=1e-7)
  assert any(float(jnp.abs(x).max()) > 0 for x in jax.tree.leaves(g))


def test_grpo_update_matches_a_float64_reference(tiny):
  model, params, tree = tiny
  rng = np.random.default_rng(1)
  ids, mask, targets = _side(rng, 8, 12, prompt_len=5)
  adv = rng.normal(size=8).astype(np.float32)
  batch = {"input_ids": ids, "attention_mask": mask, "targets": targets,
           "advantages": adv[:, None]}
  trainable, frozen = jaxlora.split(tree)
  obj = objectives.GrpoObjective(beta=0.2, loss_type="dapo")
  split2 = {k: v.reshape(2, 4, *v.shape[1:]) for k, v in batch.items()}
  g, m = jax.jit(objectives.make_grpo_grads(model, obj, loss_chunk_size=0))(
      trainable, frozen, split2, jax.random.key(0))

  pol, w = _row_logps(model, jaxlora.merge(tree), ids, mask, targets)
  ref, _ = _row_logps(model, params, ids, mask, targets)
  # One update per rollout: the ratio is 1, so each token's loss is -A plus beta times k3's KL.
  kl = (np.exp(ref - pol) - (ref - pol) - 1) * w
  expected = ((-f64(adv)[:, None] + 0.2 * kl) * w).sum() / w.sum()
  np.testing.assert_allclose(float(m["loss"]), expected, rtol=2e-5)
  np.testing.assert_allclose(float(m["kl"]), kl.sum() / w.sum(), rtol=1e-4)
  assert float(m["tokens"]) == w.sum()

  g1, m1 = jax.jit(objectives.make_grpo_grads(model, obj, loss_chunk_size=4))(
      trainable, frozen, {k: v[None] for k, v in batch.items()}, jax.random.key(0))
  np.testing.assert_allclose(float(m1["loss"]), float(m["loss"]), rtol=1e-5)
  for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(g1)):
    np.testing.assert_allclose(f64(a), f64(b), rtol=1e-4, atol=1e-7)


# ------------------------------------------------------------------ data

def _tokenizer(model_dir):
  from jaxlora_cli import trainer
  return trainer.load_tokenizer(model_dir)


def test_preference_rows_plain_chat_and_implicit_prompt(model_dir):
  tok = _tokenizer(model_dir)
  cfg = config_lib.load(None, ["data.format=preference", "train.objective=dpo",
                               "data.max_length=64"]).data
  user = [{"role": "user", "content": "reverse abc"}]
  rows = [{"prompt": "reverse: abc ->", "chosen": " cba", "rejected": " abc"},
          {"prompt": user, "chosen": [{"role": "assistant", "content": "cba"}],
           "rejected": [{"role": "assistant", "content": "bca"}]},
          {"chosen": user + [{"role": "assistant", "content": "cba"}],
           "rejected": user + [{"role": "assistant", "content": "bca"}]}]
  plain, chat, implicit = data_lib.tokenize(rows, cfg, tok, "pairs.jsonl")
  prompt = tok("reverse: abc ->", add_special_tokens=False)["input_ids"]
  assert list(plain.ids) == [tok.bos_token_id] + prompt + \
      tok(" cba", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
  assert plain.targets[:len(prompt) + 1].sum() == 0 and plain.targets[len(prompt) + 1:].all()
  rendered = tok.apply_chat_template(user + [{"role": "assistant", "content": "bca"}],
                                     tokenize=False)
  assert list(chat.rejected.ids) == tok(rendered, add_special_tokens=False)["input_ids"]
  n_prompt = len(tok(tok.apply_chat_template(user, tokenize=False, add_generation_prompt=True),
                     add_special_tokens=False)["input_ids"])
  assert chat.targets[:n_prompt].sum() == 0 and chat.targets[n_prompt:].all()
  np.testing.assert_array_equal(implicit.ids, chat.ids)
  np.testing.assert_array_equal(implicit.rejected.targets, chat.rejected.targets)
  batch = data_lib.collate([plain, chat], 1, 64, 0)
  assert batch["rejected_input_ids"].shape == batch["input_ids"].shape == (1, 2, 16)
  np.testing.assert_array_equal(batch["rejected_targets"][0, 1, :len(chat.rejected.ids)],
                                chat.rejected.targets)


@pytest.mark.parametrize("row, message", [
    ({"prompt": "a", "chosen": "b"}, "row 0 has no field 'rejected'"),
    ({"prompt": "a", "chosen": " ", "rejected": "c"}, "row 0: 'chosen' is an empty completion"),
    ({"prompt": "a", "chosen": "b", "rejected": [{"role": "assistant", "content": "c"}]},
     "must both be text or both be lists of messages"),
])
def test_bad_preference_rows_name_the_row(model_dir, row, message):
  cfg = config_lib.load(None, ["data.format=preference", "train.objective=dpo"]).data
  with pytest.raises(config_lib.ConfigError, match=message):
    data_lib.tokenize([row], cfg, _tokenizer(model_dir), "pairs.jsonl")


def test_objective_and_format_must_agree():
  for overrides, message in (
      (["train.objective=dpo"], "trains on data.format=preference"),
      (["data.format=prompts"], "needs a matching train.objective"),
      (["train.objective=grpo", "data.format=prompts"], "needs a reward"),
      (["train.objective=orpo", "data.format=preference", "data.packing=true"],
       "data.packing=false"),
      (["train.objective=grpo", "data.format=prompts", "reward.fn=[exact_match]",
        "reward.weights=[1,2]"], "one weight per reward.fn"),
      (["train.objective=dpo", "data.format=preference", "lora.train_extra=lm_head$"],
       "the reference would see their trained values")):
    with pytest.raises(config_lib.ConfigError, match=message):
      config_lib.load(None, overrides)


def test_rewards_score_and_refuse_bad_values():
  rewards = rl.load_rewards(["exact_match", "test_objectives:length_reward"], [2.0, 1.0],
                            "answer")
  total, means = rl.score(rewards, ["p", "p"], [" cba", "x"], [{"answer": "cba"}] * 2, [0, 0])
  np.testing.assert_allclose(total, [2 + 4 / 12 + 1, 1 / 12])
  assert means["rewards/exact_match"] == 0.5
  with pytest.raises(rl.RewardError, match="'test_objectives:broken_reward' raised "
                     "RuntimeError: the grader is down"):
    rl.score(rl.load_rewards("test_objectives:broken_reward", None, "answer"), ["p"], ["c"],
             [{}], [7])
  with pytest.raises(rl.RewardError, match="returned nan for the completion 'c' of data row 7"):
    rl.score(rl.load_rewards("test_objectives:nan_reward", None, "answer"), ["p"], ["c"],
             [{}], [7])
  with pytest.raises(rl.RewardError, match="has no function 'nope'"):
    rl.load_rewards("test_objectives:nope", None, "answer")


# ------------------------------------------------------------------ the command line

@pytest.fixture(scope="module")
def pair_files(tmp_path_factory):
  from conftest import WORDS
  d = tmp_path_factory.mktemp("pairs")
  rng = np.random.default_rng(0)
  with open(d / "pairs.jsonl", "w") as f:
    for i in range(48):
      w = WORDS[rng.integers(len(WORDS))]
      if i % 2:
        row = {"prompt": [{"role": "user", "content": f"reverse {w}"}],
               "chosen": [{"role": "assistant", "content": w[::-1]}],
               "rejected": [{"role": "assistant", "content": w}]}
      else:
        row = {"prompt": f"reverse: {w} ->", "chosen": " " + w[::-1], "rejected": " " + w}
      f.write(json.dumps(row) + "\n")
  with open(d / "prompts.jsonl", "w") as f:
    for w in WORDS * 2:
      f.write(json.dumps({"prompt": f"reverse: {w} ->", "answer": w[::-1]}) + "\n")
  return d


def _load(run):
  from jaxlora_cli import trainer
  art = trainer.load_run(str(run))
  return jaxlora.adapter(art.tree)


def _resumes_bit_identically(args, tmp_path):
  """Two steps in one go equal one step, then a rerun to two (constant learning rate)."""
  const = ["train.min_lr_ratio=1.0", "train.save_every=1"]
  assert main([*args(tmp_path / "once"), "train.steps=2", *const]) == 0
  assert main([*args(tmp_path / "twice"), "train.steps=1", *const]) == 0
  assert main([*args(tmp_path / "twice"), "train.steps=2", *const]) == 0
  once, twice = _load(tmp_path / "once"), _load(tmp_path / "twice")
  for a, b in zip(jax.tree.leaves(once), jax.tree.leaves(twice)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  return [json.loads(line) for line in (tmp_path / "once" / "metrics.jsonl").read_text()
          .splitlines()]


@pytest.fixture(scope="module")
def sft_adapter(model_dir, tmp_path_factory):
  """A saved adapter with random factors on the tiny checkpoint, as jaxlora and PEFT write it
  (as an SFT run leaves it)."""
  model, params = jaxlora.models.from_pretrained(model_dir)
  tree = randomize_adapters(jaxlora.wrap(params, rank=4, layout=model, key=jax.random.key(5)),
                            jax.random.key(6), scale=0.2)
  d = tmp_path_factory.mktemp("sft")
  jaxlora.save(str(d / "adapter"), tree)
  jaxlora.peft.save(str(d / "adapter_peft"), tree, model=model, base_model_name_or_path=model_dir)
  return d


def test_dpo_run_logs_rewards_exports_and_resumes_bit_identically(model_dir, pair_files,
                                                                  sft_adapter, tmp_path):
  """DPO after SFT: the SFT adapter merged into the base, so that the reference (the adapters
  off) is the SFT model and a fresh adapter trains on top."""
  sft = sft_adapter / "adapter"
  args = lambda out: cli_args(model_dir, pair_files / "pairs.jsonl", out,
                              "data.format=preference", "train.objective=dpo",
                              "data.eval_fraction=0.25", "train.grad_accum=2",
                              f"model.merge_adapter={sft}")
  recs = _resumes_bit_identically(args, tmp_path)
  from jaxlora_cli import trainer
  art = trainer.load_run(str(tmp_path / "once"))
  merged = jaxlora.merge(jaxlora.load(str(sft), jaxlora.models.from_pretrained(model_dir)[1]))
  for a, b in zip(jax.tree.leaves(art.params), jax.tree.leaves(merged)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  # Served in PEFT: the SFT and DPO adapters both active give the same logits.
  torch = pytest.importorskip("torch")
  peft = pytest.importorskip("peft")
  import transformers
  hf = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
  served = peft.PeftModel.from_pretrained(hf, str(sft_adapter / "adapter_peft"),
                                          adapter_name="sft")
  served.load_adapter(str(tmp_path / "once" / "adapter_peft"), adapter_name="dpo")
  served.base_model.set_adapter(["sft", "dpo"])
  ids = np.array([[1, 5, 9, 14, 3, 7, 22, 8]], np.int32)
  with torch.no_grad():
    want = served(input_ids=torch.tensor(ids, dtype=torch.long)).logits.numpy()
  got = jaxlora.apply(art.model.apply)({"params": art.tree}, ids)
  assert any(float(np.abs(np.asarray(x)).max()) > 0  # the DPO adapter's B moved off zero
             for p, x in jax.tree_util.tree_flatten_with_path(art.tree)[0]
             if getattr(p[-1], "key", None) == "lora_b")
  np.testing.assert_allclose(np.asarray(got), want, atol=1e-4, rtol=1e-4)
  steps = [r for r in recs if "loss" in r]
  evals = [r for r in recs if "eval_loss" in r]
  assert [r["step"] for r in steps] == [2]
  assert all(r["pairs"] == 16 and 0 <= r["rewards/accuracies"] <= 1 for r in steps)
  assert evals[0]["eval_loss"] == pytest.approx(np.log(2), rel=1e-5)  # the adapter starts at 0
  assert evals[-1]["eval_rewards/margins"] > 0
  result = json.loads((tmp_path / "once" / "result.json").read_text())
  assert result["objective"] == "dpo" and result["eval_loss_after"] < np.log(2)
  assert (tmp_path / "once" / "adapter_peft" / "adapter_config.json").exists()


def test_grpo_run_samples_scores_and_resumes_bit_identically(model_dir, pair_files, tmp_path):
  args = lambda out: cli_args(model_dir, pair_files / "prompts.jsonl", out,
                              "data.format=prompts", "train.objective=grpo",
                              "reward.fn=[exact_match,test_objectives:length_reward]",
                              "grpo.num_generations=4", "grpo.max_completion_length=6",
                              "data.eval_fraction=0.2",
                              "train.eval_batches=1")
  recs = _resumes_bit_identically(args, tmp_path)
  steps = [r for r in recs if "loss" in r]
  assert steps and all(r["reward_std"] > 0 and "kl" in r and "rewards/exact_match" in r
                       and 1 <= r["completions/mean_length"] <= 6 for r in steps)
  result = json.loads((tmp_path / "once" / "result.json").read_text())
  assert result["objective"] == "grpo" and result["eval_reward_after"] is not None
  assert "eval reward" in (tmp_path / "once" / "report.md").read_text()


def test_a_failing_reward_stops_the_run_untouched(model_dir, pair_files, tmp_path, capsys,
                                                  monkeypatch):
  out = tmp_path / "run"
  base = cli_args(model_dir, pair_files / "prompts.jsonl", out, "data.format=prompts",
                  "train.objective=grpo", "reward.fn=test_objectives:switchable_reward",
                  "grpo.num_generations=2", "grpo.max_completion_length=4",
                  "train.save_every=1")
  assert main([*base, "train.steps=1"]) == 0
  before = sorted(os.listdir(out / "checkpoints"))
  metrics = (out / "metrics.jsonl").read_text()
  for mode, message in (
      ("raise", "reward function 'test_objectives:switchable_reward' raised RuntimeError: the "
       "grader is down"),
      ("nan", "returned nan for the completion")):
    capsys.readouterr()
    monkeypatch.setitem(FAILURE, "mode", mode)
    assert main([*base, "train.steps=3"]) == 2
    err = capsys.readouterr().err
    assert message in err and "step 2" in err and "last checkpoint: step 1" in err, err
    assert sorted(os.listdir(out / "checkpoints")) == before
    assert (out / "metrics.jsonl").read_text() == metrics
