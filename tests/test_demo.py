"""`jaxlora demo`: the shipped base model, the task and the whole pipeline."""

import json
import os

import jax
import numpy as np
import pytest

pytest.importorskip("transformers")
pytest.importorskip("datasets")

import jaxlora  # noqa: E402
from jaxlora_cli import demo, trainer  # noqa: E402
from jaxlora_cli.main import main  # noqa: E402


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


@pytest.mark.slow
def test_demo_end_to_end(tmp_path, capsys):
  assert main(["demo", "--out", str(tmp_path / "demo"), "--no-progress"]) == 0
  out = capsys.readouterr().out
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
