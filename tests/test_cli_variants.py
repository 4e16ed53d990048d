"""The LoRA variants through `jaxlora train`: DoRA, inits, LoRA+, train_extra, tokens, bias."""

import json

import numpy as np
import pytest

pytest.importorskip("transformers")
pytest.importorskip("datasets")
torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")

import transformers  # noqa: E402

import jaxlora  # noqa: E402
from jaxlora_cli.main import main  # noqa: E402
from conftest import cli_args  # noqa: E402


def test_variant_keys_train_export_and_serve_in_peft(model_dir, data_dir, tmp_path):
  out = tmp_path / "run"
  args = cli_args(model_dir, data_dir / "pc.jsonl", out, "train.steps=2", "lora.use_dora=true",
                  "lora.loraplus_ratio=16", "lora.train_extra=^norm$", "lora.bias=all",
                  "lora.trainable_tokens=[3, 5]", "lora.init=gaussian",
                  "lora.targets=attention")
  assert main(args) == 0
  cfg = json.loads((out / "adapter_peft" / "adapter_config.json").read_text())
  assert cfg["use_dora"] is True and cfg["modules_to_save"] == ["model.norm"]
  assert sorted(cfg["trainable_token_indices"]) == [3, 5] or cfg["trainable_token_indices"] == {
      "embed_tokens": [3, 5]}
  model, params = jaxlora.models.from_pretrained(model_dir)
  tree = jaxlora.load(str(out / "adapter"), params)
  trainable = jaxlora.split(tree)[0]
  assert "lora_magnitude" in trainable["layers"]["self_attn"]["q_proj"]
  assert "lora_token_rows" in trainable["embed_tokens"]
  assert not np.array_equal(trainable["norm"]["scale"], params["norm"]["scale"])
  # The run's merged export computes in PyTorch what the adapter computes here.
  ids = np.array([[1, 7, 9, 3, 5, 11]])
  ours = np.asarray(jaxlora.apply(model.apply)({"params": tree}, ids))
  assert main(["export", str(out), "--format", "hf", "--out", str(tmp_path / "hf")]) == 0
  hf = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf"))
  with torch.no_grad():
    merged = hf(input_ids=torch.tensor(ids)).logits.numpy()
  assert np.abs(ours - merged).max() < 1e-4
  # And PEFT serves the run's PEFT adapter on the base with the same logits.
  base = transformers.AutoModelForCausalLM.from_pretrained(model_dir)
  pm = peft.PeftModel.from_pretrained(base, str(out / "adapter_peft")).eval()
  with torch.no_grad():
    served = pm(input_ids=torch.tensor(ids)).logits.numpy()
  assert np.abs(ours - served).max() < 1e-4
