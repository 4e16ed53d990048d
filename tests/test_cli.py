"""The `jaxlora` command line end to end on a tiny checkpoint."""

import json
import os
import shutil
import signal
import subprocess
import sys

import jax
import numpy as np
import pytest

pytest.importorskip("transformers")
pytest.importorskip("datasets")

import jaxlora  # noqa: E402
from jaxlora_cli import config as config_lib  # noqa: E402
from jaxlora_cli.main import main  # noqa: E402
from conftest import TRAINED_RUN_ARGS, cli_args as _args  # noqa: E402

def test_train_writes_every_output(trained_run):
  out = trained_run
  result = json.loads((out / "result.json").read_text())
  assert result["eval_loss_after"] < result["eval_loss_before"]
  for name in ("config.yaml", "metrics.jsonl", "loss.png", "report.md", "adapter/jaxlora.json",
               "adapter_peft/adapter_config.json"):
    assert (out / name).exists(), name
  assert any(f.startswith("events") for f in os.listdir(out / "tensorboard"))
  assert "trainable parameters" in (out / "report.md").read_text()


@pytest.mark.slow
def test_rerun_with_more_steps_resumes(model_dir, data_dir, trained_run, tmp_path, capsys):
  out = tmp_path / "run"
  shutil.copytree(trained_run, out)
  config = out / "config.yaml"  # the copy is the same run in another place
  config.write_text(config.read_text().replace(str(trained_run), str(out)))
  capsys.readouterr()
  extra = [a for a in TRAINED_RUN_ARGS if not a.startswith("train.steps=")]
  # Rerunning with more steps continues from the last checkpoint.
  assert main(_args(model_dir, data_dir / "pc.jsonl", out, "train.steps=10", *extra)) == 0
  err = capsys.readouterr().err
  assert "resuming" in err and "from step 6" in err
  steps = [r["step"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
           if "loss" in r]
  assert steps == [2, 4, 6, 8, 10]


def test_export_matches_the_librarys_loaders(model_dir, trained_run, tmp_path):
  out = trained_run
  # Export both ways and check the files against the library's own loaders.
  assert main(["export", str(out), "--format", "peft", "--out", str(tmp_path / "peft")]) == 0
  assert main(["export", str(out), "--format", "hf", "--out", str(tmp_path / "hf")]) == 0
  model, params = jaxlora.models.from_pretrained(model_dir)
  tree = jaxlora.load(str(out / "adapter"), params)
  from_peft = jaxlora.peft.load(str(tmp_path / "peft"), params, model=model)
  for a, b in zip(jax.tree.leaves(jaxlora.adapter(tree)), jax.tree.leaves(jaxlora.adapter(from_peft))):
    np.testing.assert_allclose(a, b, rtol=1e-6)
  _, merged = jaxlora.models.from_pretrained(str(tmp_path / "hf"))
  ids = np.array([[1, 5, 9, 30, 41]])
  np.testing.assert_allclose(model.apply({"params": merged}, ids),
                             jaxlora.apply(model.apply)({"params": tree}, ids), atol=1e-5)
  assert os.path.exists(tmp_path / "hf" / "tokenizer.json")


def test_generate_factored_and_merged_agree(trained_run, capsys):
  out = trained_run
  capsys.readouterr()
  assert main(["generate", str(out), "--prompt", "reverse: fox ->", "--prompt", "reverse: abc ->",
               "--max-new-tokens", "4"]) == 0
  lines = [json.loads(l) for l in capsys.readouterr().out.splitlines()]
  assert [l["prompt"] for l in lines] == ["reverse: fox ->", "reverse: abc ->"]
  assert main(["generate", str(out), "--prompt", "reverse: fox ->", "--merged",
               "--max-new-tokens", "4"]) == 0
  merged_line = json.loads(capsys.readouterr().out.splitlines()[0])
  assert merged_line["completion"] == lines[0]["completion"]


def test_eval_and_plot(trained_run, tmp_path, capsys):
  out = trained_run
  capsys.readouterr()
  assert main(["eval", str(out)]) == 0
  ev = json.loads(capsys.readouterr().out)
  assert ev["eval_loss"] == pytest.approx(json.loads((out / "result.json").read_text())
                                          ["eval_loss_after"], rel=1e-4)
  assert ev["base_eval_loss"] > ev["eval_loss"]
  copy = tmp_path / "run"  # plot rewrites loss.png: not in the shared run
  shutil.copytree(out, copy)
  (copy / "loss.png").unlink()
  assert main(["plot", str(copy)]) == 0
  assert (copy / "loss.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.slow
@pytest.mark.parametrize("fmt,file", [("text", "text.txt"), ("text", "text.csv"),
                                      ("text", "text.parquet"), ("chat", "chat.jsonl")])
def test_data_formats(model_dir, data_dir, tmp_path, fmt, file):
  args = _args(model_dir, data_dir / file, tmp_path / "r", "train.steps=2")
  args[args.index("data.format=prompt_completion")] = f"data.format={fmt}"
  assert main(args) == 0
  assert json.loads((tmp_path / "r" / "result.json").read_text())["final_loss"] > 0


def test_chat_loss_covers_assistant_turns_only(model_dir, data_dir):
  from jaxlora_cli import data as data_lib
  from jaxlora_cli import trainer
  tok = trainer.load_tokenizer(model_dir)
  cfg = config_lib.load(None, ["data.format=chat", "data.max_length=64"]).data
  rows = data_lib.read_rows(str(data_dir / "chat.jsonl"))
  ex = data_lib.tokenize(rows, cfg, tok, "chat.jsonl")[0]
  target_text = tok.decode(ex.ids[ex.targets == 1])
  assert target_text == "cba<|end|>"  # the reply and its end marker, nothing of the prompt
  pc = config_lib.load(None, ["data.format=prompt_completion"]).data
  ex = data_lib.tokenize(data_lib.read_rows(str(data_dir / "pc.jsonl")), pc, tok, "pc")[0]
  assert tok.decode(ex.ids[ex.targets == 1]).endswith("</s>")
  assert tok.decode(ex.ids[ex.targets == 0]).startswith("<s>reverse:")


def test_batches_are_deterministic_and_resumable():
  from jaxlora_cli import data as data_lib
  ex = [data_lib.Example(np.arange(i + 2, dtype=np.int32), np.ones(i + 2, np.float32))
        for i in range(10)]
  a = data_lib.Batcher(ex, 3, 32, seed=1, pad_id=0)
  first = [a.next()["input_ids"] for _ in range(5)]
  b = data_lib.Batcher(ex, 3, 32, seed=1, pad_id=0)
  b.next(), b.next()
  c = data_lib.Batcher(ex, 3, 32, seed=1, pad_id=0, state=b.state)
  for want in first[2:]:
    np.testing.assert_array_equal(c.next()["input_ids"], want)
  assert data_lib.bucket(17, 512) == 32 and data_lib.bucket(3, 512) == 16
  assert data_lib.bucket(300, 256) == 256


@pytest.mark.parametrize("override,message", [
    (["model.path=/nonexistent/model"], "error: model directory /nonexistent/model not found"),
    (["data.train_file=/nonexistent.jsonl"], "error: data file /nonexistent.jsonl not found"),
    (["data.train_file=@empty.jsonl"], "holds no rows"),
    (["data.train_file=@nofield.jsonl"], "row 0 has no field 'completion'"),
    (["data.train_file=@long.jsonl"], "longer than data.max_length=32"),
    (["data.max_length=4096"], "exceeds the model's context of 128"),
    (["train.learning_rate=1"], "unknown config key 'train.learning_rate'"),
    (["lora.rank=four"], "config key 'lora.rank' must be int"),
    (["lora.targets=nothing_matches"], "matched no kernel"),
])
def test_bad_input_gives_one_line(model_dir, data_dir, tmp_path, capsys, override, message):
  args = _args(model_dir, data_dir / "pc.jsonl", tmp_path / "r", "train.steps=2")
  for o in override:
    key = o.split("=")[0]
    args = [a for a in args if not a.startswith(key + "=")] + [o.replace("@", f"{data_dir}/")]
  assert main(args) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and message in err[0], err
  assert not os.path.exists(tmp_path / "r" / "adapter")


@pytest.mark.slow
def test_output_dir_of_another_run_is_not_touched(model_dir, data_dir, tmp_path, capsys):
  out = tmp_path / "run"
  assert main(_args(model_dir, data_dir / "pc.jsonl", out, "train.steps=2")) == 0
  before = {p: os.path.getmtime(os.path.join(r, p)) for r, _, fs in os.walk(out) for p in fs}
  capsys.readouterr()
  assert main(_args(model_dir, data_dir / "pc.jsonl", out, "train.steps=2", "lora.rank=2")) == 2
  assert "holds a different run (differs in lora.rank)" in capsys.readouterr().err
  after = {p: os.path.getmtime(os.path.join(r, p)) for r, _, fs in os.walk(out) for p in fs}
  assert before == after
  (tmp_path / "other").mkdir()
  (tmp_path / "other" / "notes.txt").write_text("mine")
  assert main(_args(model_dir, data_dir / "pc.jsonl", tmp_path / "other", "train.steps=2")) == 2
  assert (tmp_path / "other" / "notes.txt").read_text() == "mine"


@pytest.mark.slow
def test_nan_stops_and_keeps_the_last_good_checkpoint(model_dir, data_dir, tmp_path, capsys):
  out = tmp_path / "run"
  assert main(_args(model_dir, data_dir / "pc.jsonl", out, "train.steps=4")) == 0
  capsys.readouterr()
  # lr=1e30 blows the adapter up at once; the run stops before writing a bad checkpoint.
  args = _args(model_dir, data_dir / "pc.jsonl", out, "train.steps=12")
  args = [a for a in args if not a.startswith("train.lr=")] + ["train.lr=1e30"]
  cfg_text = (out / "config.yaml").read_text().replace("lr: 0.003", "lr: 1.0e+30")
  (out / "config.yaml").write_text(cfg_text)
  assert main(args) == 3
  err = capsys.readouterr().err
  assert "loss became nan" in err or "loss became inf" in err
  assert "last good checkpoint (step 4)" in err
  assert sorted(int(s) for s in os.listdir(out / "checkpoints") if s.isdigit())[-1] == 4


def _metrics(run):
  return [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_sigkill_then_resume_is_bit_identical(model_dir, data_dir, trained_run, tmp_path,
                                               capsys):
  # The reference is the shared uninterrupted run; the same run is killed (SIGKILL, in a
  # process of its own, with this process's XLA flags) after its checkpoint of step 4 and
  # resumed here, where `trained_run` was trained.
  args = _args(model_dir, data_dir / "pc.jsonl", tmp_path / "killed", *TRAINED_RUN_ARGS)
  # Steps 5 and 6 wait 5 s each for their batch: the kill comes before the end (and before
  # a checkpoint of step 6).
  proc = subprocess.Popen([sys.executable, os.path.join(os.path.dirname(__file__),
                                                        "multihost_train.py"), "4:5", *args],
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  ckpts = tmp_path / "killed" / "checkpoints"
  import time
  deadline = time.time() + 300
  while time.time() < deadline and proc.poll() is None:  # kill once step 4 is checkpointed
    if ckpts.exists() and "4" in os.listdir(ckpts):
      break
    time.sleep(0.05)
  proc.send_signal(signal.SIGKILL)
  _, err = proc.communicate(timeout=60)
  assert proc.returncode == -signal.SIGKILL, err[-3000:]
  assert not (tmp_path / "killed" / "adapter").exists()
  assert max(int(s) for s in os.listdir(ckpts) if s.isdigit()) == 4
  capsys.readouterr()
  assert main(args) == 0
  assert "from step 4" in capsys.readouterr().err
  model, params = jaxlora.models.from_pretrained(model_dir)
  a = jaxlora.load(str(trained_run / "adapter"), params)
  b = jaxlora.load(str(tmp_path / "killed" / "adapter"), params)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(np.asarray(x).view(np.uint8), np.asarray(y).view(np.uint8))
  # The losses logged before the kill and after the resume are the uninterrupted run's.
  ref, got = _metrics(trained_run), _metrics(tmp_path / "killed")
  key = lambda r: (r["step"], "loss" in r)
  want = {key(r): (r.get("loss"), r.get("eval_loss")) for r in ref}
  have = {key(r): (r.get("loss"), r.get("eval_loss")) for r in got}
  assert sorted(have) == sorted(want) and have == want


def test_module_entry_point_passes_the_exit_status(tmp_path):
  r = subprocess.run([sys.executable, "-m", "jaxlora_cli", "plot", str(tmp_path / "none")],
                     capture_output=True, text=True, timeout=300)
  assert r.returncode == 2, r.stderr
  assert r.stderr.strip().splitlines() == [f"error: {tmp_path / 'none'} has no metrics.jsonl yet"]


def test_shipped_presets_load():
  root = os.path.join(os.path.dirname(os.path.dirname(__file__)), "configs")
  names = sorted(f for f in os.listdir(root) if f.endswith(".yaml"))
  assert names
  for name in names:
    cfg = config_lib.load(os.path.join(root, name))
    assert cfg.model.path and cfg.data.train_file, name


def test_every_config_key_is_documented(capsys):
  keys = set()
  def walk(d, prefix=""):
    for k, v in d.items():
      if isinstance(v, dict) and k not in ("rank_pattern", "alpha_pattern"):
        walk(v, prefix + k + ".")
      else:
        keys.add(prefix + k)
  walk(config_lib.Config().to_dict())
  assert keys == set(config_lib.DOCS)
  with pytest.raises(SystemExit):
    main(["train", "--help"])
  out = capsys.readouterr().out
  assert all(k in out for k in keys)


@pytest.mark.slow
def test_bf16_compute_dropout_and_periodic_eval(model_dir, data_dir, tmp_path):
  out = tmp_path / "r"
  assert main(_args(model_dir, data_dir / "pc.jsonl", out, "train.steps=4", "model.dtype=bfloat16",
                    "lora.dropout=0.1", "data.eval_fraction=0.1", "train.eval_every=2")) == 0
  recs = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
  assert [r["step"] for r in recs if "eval_loss" in r] == [0, 2, 4]
  assert all(np.isfinite(r.get("loss", 0.0)) for r in recs)
  rec = jaxlora.checkpoint.info(str(out / "adapter"))
  assert all(l["dtype"] == "float32" for l in rec["layers"].values())  # fp32 adapters, bf16 compute


@pytest.mark.slow
@pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 (simulated) devices, as in CI")
def test_mesh_options_shard_the_run_and_agree(model_dir, data_dir, tmp_path):
  runs = {"fsdp8": ["mesh.fsdp=8"],
          "dp2_fsdp2_tp2": ["mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2", "mesh.rules=fsdp_tp"]}
  adapters = {}
  for name, extra in runs.items():
    assert main(_args(model_dir, data_dir / "pc.jsonl", tmp_path / name, "train.steps=2",
                      *extra)) == 0
    model, params = jaxlora.models.from_pretrained(model_dir)
    adapters[name] = jaxlora.load(str(tmp_path / name / "adapter"), params)
  losses = [[r["loss"] for r in map(json.loads, (tmp_path / n / "metrics.jsonl").read_text()
                                    .splitlines()) if "loss" in r] for n in runs]
  np.testing.assert_allclose(losses[0], losses[1], rtol=1e-5)
  for a, b in zip(*(jax.tree.leaves(jaxlora.adapter(t)) for t in adapters.values())):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    assert np.linalg.norm(a - b) <= 1e-4 * max(np.linalg.norm(b), 1e-12)


def test_mesh_errors(model_dir, data_dir, tmp_path, capsys):
  args = _args(model_dir, data_dir / "pc.jsonl", tmp_path / "r", "train.steps=1", "mesh.data=3",
               "mesh.fsdp=1")
  assert main(args) == 2
  assert "error: mesh:" in capsys.readouterr().err
  if jax.device_count() >= 8:
    args = _args(model_dir, data_dir / "pc.jsonl", tmp_path / "r", "train.steps=1",
                 "train.batch_size=4", "mesh.fsdp=8")
    assert main(args) == 2
    assert "multiple of mesh.data x mesh.fsdp = 8" in capsys.readouterr().err
