"""`jaxlora demo`: the shipped base model, the task and the whole pipeline."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

pytest.importorskip("transformers")
pytest.importorskip("datasets")

import jaxlora  # noqa: E402
from jaxlora_cli import demo, trainer  # noqa: E402


@pytest.mark.slow
def test_shipped_base_model_is_a_pretrained_language_model():
  model, params = jaxlora.models.from_pretrained(demo.DEMO_BASE)
  tok = trainer.load_tokenizer(demo.DEMO_BASE)
  text = "Return the number of items in the list."
  ids = np.array([tok(text)["input_ids"]])
  logits = np.asarray(model.apply({"params": params}, ids), np.float64)
  logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) \
      - logits.max(-1, keepdims=True)
  nll = -np.mean([logp[0, t, ids[0, t + 1]] for t in range(ids.shape[1] - 1)])
  assert nll < 2.5  # nats per character; a uniform guess over the vocabulary is 4.6
  with open(os.path.join(demo.DEMO_BASE, "words.json")) as f:
    words = json.load(f)
  assert len(words) > 500 and all(len(w) == 5 and w.isalpha() for w in words)


def test_task_split_and_answers(tmp_path):
  train, evals = demo.write_task(str(tmp_path), seed=0)
  assert not set(train) & set(evals) and len(evals) == 200
  assert demo.rot13("hello") == "uryyb" and demo.rot13(demo.rot13("lorax")) == "lorax"
  rows = [json.loads(l) for l in open(tmp_path / "eval.jsonl")]
  assert rows[0] == {"prompt": f"rot13: {evals[0]} =>", "completion": " " + demo.rot13(evals[0])}


def test_grpo_prompts_are_other_words(tmp_path):
  n = demo.write_rl_prompts(str(tmp_path / "rl.jsonl"))
  rows = [json.loads(l) for l in open(tmp_path / "rl.jsonl")]
  words = [r["prompt"].split()[1] for r in rows]
  with open(os.path.join(demo.DEMO_BASE, "words.json")) as f:
    assert n == len(rows) > 200 and not set(words) & set(json.load(f))
  assert all(r["completion"] == " " + demo.rot13(w) for r, w in zip(rows, words))


@pytest.mark.slow
def test_demo_end_to_end(tmp_path):
  # The README's main job, as a fresh machine runs it: its own process on the one CPU device
  # (the suite's 8 simulated devices would shard the demo 8 ways on 2 cores, 5x slower).
  # With --grpo the same process goes on to GRPO after the SFT demo (one GRPO step here).
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  proc = subprocess.run([sys.executable, "-m", "jaxlora_cli", "demo", "--out",
                         str(tmp_path / "demo"), "--no-progress", "--grpo", "--grpo-steps", "1"],
                        env=env, capture_output=True, text=True, timeout=1200, check=False)
  assert proc.returncode == 0, proc.stderr[-2000:]
  out = proc.stdout
  res = json.loads((tmp_path / "demo" / "demo.json").read_text())
  assert res["exact_match_before"] == 0.0
  assert res["exact_match_after"] >= 0.5, res
  assert res["merged_factored_agreement"] == 1.0
  assert res["adapter_bytes"] < res["base_bytes"]
  assert "exact match on 200 unseen words" in out and "run directory" in out
  # The printed score is the adapter's: recompute it independently from the saved adapter.
  model, params = jaxlora.models.from_pretrained(demo.DEMO_BASE)
  tok = trainer.load_tokenizer(demo.DEMO_BASE)
  tree = jaxlora.load(str(tmp_path / "demo" / "run" / "adapter"), params)
  evals = [json.loads(l)["prompt"].split()[1] for l in open(tmp_path / "demo" / "data" / "eval.jsonl")]
  ids = np.array([tok(demo.prompt(w))["input_ids"] for w in evals[:50]])
  gen = np.asarray(jaxlora.generate(model, tree, ids, max_new_tokens=6))
  right = [tok.decode(g, skip_special_tokens=True).strip() == demo.rot13(w) for g, w in zip(gen, evals[:50])]
  assert abs(np.mean(right) - res["exact_match_after"]) < 0.2

  # GRPO from that SFT adapter, scored before and after on the same unseen words.
  assert "jaxlora demo --grpo" in out and "SFT " in out
  rl = json.loads((tmp_path / "demo" / "demo_grpo.json").read_text())
  assert rl["exact_match_sft"] == res["exact_match_after"]
  assert rl["eval_reward_before"] is not None and rl["steps"] == 1
  metrics = [json.loads(l) for l in open(tmp_path / "demo" / "grpo" / "metrics.jsonl")]
  assert any("rewards/jaxlora_cli.demo:char_match" in r for r in metrics)
  # The GRPO adapter sits on the base with the SFT adapter merged in.
  tuned = jaxlora.load(str(tmp_path / "demo" / "grpo" / "adapter"), jaxlora.merge(tree))
  gen = np.asarray(jaxlora.generate(model, tuned, ids, max_new_tokens=6))
  right = [tok.decode(g, skip_special_tokens=True).strip() == demo.rot13(w)
           for g, w in zip(gen, evals[:50])]
  assert abs(np.mean(right) - rl["exact_match_grpo"]) < 0.2
