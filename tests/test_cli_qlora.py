"""QLoRA through the command line: `model.quantize` on the tiny checkpoint."""

import json

import jax
import numpy as np
import pytest

pytest.importorskip("transformers")
pytest.importorskip("datasets")

import jaxlora  # noqa: E402
from jaxlora_cli.main import main  # noqa: E402
from conftest import cli_args as _args  # noqa: E402


def _metrics(out):
  return [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_qlora_train_resume_eval_export(model_dir, data_dir, tmp_path, capsys):
  import torch
  import transformers

  out = tmp_path / "run"
  args = lambda steps, *extra: _args(model_dir, data_dir / "pc.jsonl", out, f"train.steps={steps}",
                                     "model.quantize=nf4", "train.save_every=2", *extra)
  assert main(args(4)) == 0
  result = json.loads((out / "result.json").read_text())
  losses = [m["loss"] for m in _metrics(out) if "loss" in m]
  assert np.all(np.isfinite(losses)) and losses[-1] != losses[0]  # learning: see eval below
  # The base is held quantized (4-bit codes and 8-bit block maxima beside float embeddings).
  model, params = jaxlora.models.from_pretrained(model_dir)
  assert result["base_bytes"] < 0.8 * sum(x.nbytes for x in jax.tree.leaves(params))

  # The saved adapter loads onto the quantized base; rerunning with more steps resumes it
  # (the checkpoint holds adapter and optimizer state only; the base is read and quantized again).
  qparams = jaxlora.quantize(params, "nf4", layout=model)
  tree = jaxlora.load(str(out / "adapter"), qparams)
  assert set(jaxlora.quantization.records(tree)) == set(jaxlora.quantization.records(qparams))
  capsys.readouterr()
  assert main(args(6)) == 0
  assert "from step 4" in capsys.readouterr().err
  assert [m["step"] for m in _metrics(out) if "loss" in m] == [2, 4, 6]
  # Any other change to the run, the quantization included, is refused.
  assert main(args(8, "model.quantize=int8")) == 2
  assert "model.quantize" in capsys.readouterr().err

  # eval: with and without the adapter, both on the quantized base.
  assert main(["eval", str(out), "--data", str(data_dir / "pc.jsonl")]) == 0
  ev = json.loads(capsys.readouterr().out)
  assert ev["quantize"] == "nf4" and ev["examples"] == 120
  assert ev["base_eval_loss"] > ev["eval_loss"]

  # export --format hf: a float checkpoint (dequantized base + merged adapter) for transformers.
  tree = jaxlora.load(str(out / "adapter"), qparams)
  assert main(["export", str(out), "--format", "hf", "--out", str(tmp_path / "hf")]) == 0
  hf = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf"),
                                                         torch_dtype=torch.float32)
  ids = np.array([[1, 5, 9, 30, 41, 7]])
  with torch.no_grad():
    got = hf(torch.tensor(ids)).logits.numpy()
  base = jax.jit(jaxlora.dequantize)(qparams)
  want = jax.jit(jaxlora.apply(model.apply))(  # one program (op by op compiles each op)
      {"params": jaxlora.combine(jaxlora.adapter(tree), base)}, ids)
  np.testing.assert_allclose(got, want, atol=1e-4)
  # ... with the adapter folded in: the exported q_proj is not the dequantized base's.
  base_q = np.asarray(base["layers"]["self_attn"]["q_proj"]["kernel"][0])
  assert np.abs(hf.model.layers[0].self_attn.q_proj.weight.detach().numpy().T - base_q).max() > 1e-3
  # export --format peft: the adapter alone, unchanged by the quantized base.
  assert main(["export", str(out), "--format", "peft", "--out", str(tmp_path / "peft")]) == 0
  back = jaxlora.peft.load(str(tmp_path / "peft"), params, model=model)
  for a, b in zip(jax.tree.leaves(jaxlora.adapter(tree)), jax.tree.leaves(jaxlora.adapter(back))):
    np.testing.assert_allclose(a, b, rtol=1e-6)


@pytest.mark.parametrize("override,key", [("model.quantize=nf5", "model.quantize"),
                                          ("model.quant_block_size=63", "model.quant_block_size"),
                                          ("model.double_quant=maybe", "model.double_quant")])
def test_qlora_bad_values_name_the_key(model_dir, data_dir, tmp_path, capsys, override, key):
  assert main(_args(model_dir, data_dir / "pc.jsonl", tmp_path / "r", override)) == 2
  err = capsys.readouterr().err.strip()
  assert err.startswith("error: ") and f"'{key}'" in err and len(err.splitlines()) == 1
  assert not (tmp_path / "r").exists()


def test_qlora_keys_in_help(capsys):
  with pytest.raises(SystemExit):
    main(["train", "--help"])
  text = capsys.readouterr().out
  for key in ("model.quantize [None]", "model.quant_block_size [64]", "model.double_quant [True]"):
    assert key in text
