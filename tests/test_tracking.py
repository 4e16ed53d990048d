"""report_to: TensorBoard, Weights & Biases (offline, no network) and metrics.jsonl."""

import glob
import json
import struct

import pytest

from conftest import cli_args
from jaxlora_cli import config as config_lib
from jaxlora_cli import reporting


def wandb_records(path):
  """The records of a W&B transaction log (``run-<id>.wandb``): a LevelDB-style log of
  protobuf `Record`s after a 7-byte file header, in 32 KiB blocks of chunks, each with a
  7-byte header (crc32, length, type: 1 full, 2 first, 3 middle, 4 last)."""
  from wandb.proto import wandb_internal_pb2 as pb
  with open(path, "rb") as f:
    data = f.read()
  assert data[:4] == b":W&B", data[:7]
  i, buf, block = 7, b"", 32768
  while i + 7 <= len(data):
    if block - i % block < 7:  # a block's tail too short for a header is padding
      i += block - i % block
      continue
    _, n, kind = struct.unpack("<IHB", data[i:i + 7])
    buf += data[i + 7:i + 7 + n]
    i += 7 + n
    if kind in (1, 4):
      record = pb.Record()
      record.ParseFromString(buf)
      yield record
      buf = b""


def _key(item):
  return ".".join(item.nested_key) or item.key


def read_offline_run(run_dir):
  """(run record, history rows, summary) of the one offline W&B run under `run_dir`."""
  path, = glob.glob(str(run_dir / "wandb" / "offline-run-*" / "run-*.wandb"))
  run, history, summary = None, [], {}
  for r in wandb_records(path):
    kind = r.WhichOneof("record_type")
    if kind == "run":
      run = r.run
    elif kind == "history":
      history.append({_key(i): json.loads(i.value_json) for i in r.history.item})
    elif kind == "summary":
      summary.update({_key(u): json.loads(u.value_json) for u in r.summary.update})
  return run, history, summary


@pytest.mark.slow  # a whole run; the fast tier checks the pieces
def test_wandb_offline_run_logs_the_jsonl_records(model_dir, data_dir, tmp_path, monkeypatch):
  pytest.importorskip("wandb")
  from jaxlora_cli.main import main
  for k, v in {"WANDB_MODE": "offline", "WANDB_SILENT": "true", "WANDB_CONSOLE": "off",
               "WANDB_DIR": str(tmp_path / "wandb-default")}.items():
    monkeypatch.setenv(k, v)
  out = tmp_path / "myrun"
  assert main(cli_args(model_dir, data_dir / "pc.jsonl", out, "train.steps=2",
                       "train.log_every=1", "data.eval_fraction=0.2",
                       "report_to=[wandb,jsonl]", "wandb.project=tests")) == 0
  records = reporting.read(out / "metrics.jsonl")
  train = [r for r in records if "loss" in r]
  assert [r["step"] for r in train] == [1, 2]
  assert not (out / "tensorboard").exists()  # not in report_to

  run, history, summary = read_offline_run(out)  # wandb.init(dir=<run dir>)
  assert run.display_name == "myrun" and run.project == "tests"
  config = {u.key: json.loads(u.value_json) for u in run.config.update}
  assert config["lora"]["rank"] == 4 and config["report_to"] == ["wandb", "jsonl"]
  assert config["output_dir"] == str(out)
  logged = {}
  for row in history:  # rows of one step may come as several history records
    logged.setdefault(row["_step"], {}).update(row)
  for r in records:
    for k, v in r.items():
      if k != "step":
        assert logged[r["step"]][k] == pytest.approx(v), (r, logged[r["step"]])
  assert summary["loss"] == pytest.approx(train[-1]["loss"])
  assert summary["eval_loss"] == pytest.approx(records[-1]["eval_loss"])
  assert summary["_step"] == 2


@pytest.mark.parametrize("value,words", [
    ("[tensorboard,mlflow,jsonl]", "unknown reporter 'mlflow'; use a list of tensorboard, "
                                   "wandb, jsonl"),
    ("[wandb]", "must include jsonl"),
    ("wandbx", "unknown reporter 'wandbx'"),
])
def test_bad_report_to_is_one_line(value, words):
  with pytest.raises(config_lib.ConfigError) as e:
    config_lib.load(None, [f"report_to={value}"])
  assert words in str(e.value) and "\n" not in str(e.value), str(e.value)


def test_report_to_defaults_and_one_name():
  assert config_lib.load(None).report_to == ["tensorboard", "jsonl"]
  assert config_lib.load(None, ["report_to=jsonl"]).report_to == ["jsonl"]
  cfg = config_lib.load(None, ["wandb.mode=disabled", "wandb.entity=team"])
  assert (cfg.wandb.mode, cfg.wandb.entity, cfg.wandb.run_name) == ("disabled", "team", None)
  with pytest.raises(config_lib.ConfigError, match="wandb.mode"):
    config_lib.load(None, ["wandb.mode=later"])


def test_bad_report_to_on_the_command_line(tmp_path, capsys):
  from jaxlora_cli.main import main
  assert main(["train", f"output_dir={tmp_path / 'r'}", "report_to=[tb]"]) == 2
  err = capsys.readouterr().err.strip()
  assert err.startswith("error: config key 'report_to' has unknown reporter 'tb'"), err
  assert "\n" not in err
