"""What `jaxlora` prints and returns when a command fails: the user's error, or a bug."""

import errno
import logging
import os

import pytest

import jaxlora
from jaxlora_cli import main as main_lib
from jaxlora_cli.main import main
from conftest import cli_args as _args

REPORT = "this is a bug in jaxlora"


def _err_lines(capsys) -> list[str]:
  return capsys.readouterr().err.strip().splitlines()


def test_a_bad_config_value_is_one_line_with_exit_2(capsys):
  assert main(["train", "--no-progress", "lora.dropout=1.5"]) == 2
  assert _err_lines(capsys) == ["error: config key 'lora.dropout' must be in [0, 1), got 1.5"]


@pytest.mark.parametrize("exc", [ValueError("an internal value"), KeyError("q_proj"),
                                 TypeError("an internal type")])
def test_a_bug_prints_the_traceback_and_asks_for_a_report(monkeypatch, capsys, tmp_path, exc):
  def broken(run_dir):
    raise exc

  monkeypatch.setattr("jaxlora_cli.reporting.plot", broken)
  assert main(["plot", str(tmp_path)]) == 1
  err = _err_lines(capsys)
  assert err[0] == "Traceback (most recent call last):"
  assert any(line.startswith(f"{type(exc).__name__}: ") for line in err)
  assert "in broken" in "\n".join(err)  # the frame where it went wrong
  assert REPORT in err[-1] and "command line and the traceback above" in err[-1]


def test_a_bug_inside_training_is_not_the_users_error(model_dir, data_dir, tmp_path, monkeypatch,
                                                      capsys):
  def tokenize(*args, **kwargs):
    raise ValueError("not the user's fault")

  monkeypatch.setattr("jaxlora_cli.data.tokenize", tokenize)
  assert main(_args(model_dir, data_dir / "pc.jsonl", tmp_path / "r", "train.steps=1")) == 1
  err = capsys.readouterr().err
  assert "Traceback" in err and "ValueError: not the user's fault" in err and REPORT in err


@pytest.mark.parametrize("target", ["jaxlora.wrap", "jaxlora.models.from_pretrained"])
def test_a_bug_while_loading_or_wrapping_is_not_a_config_error(model_dir, data_dir, tmp_path,
                                                               monkeypatch, capsys, target):
  def broken(*args, **kwargs):
    raise ValueError("an internal value")

  monkeypatch.setattr(target, broken)
  assert main(_args(model_dir, data_dir / "pc.jsonl", tmp_path / "r", "train.steps=1")) == 1
  err = capsys.readouterr().err
  assert "ValueError: an internal value" in err and REPORT in err


def test_jaxlora_errors_and_machine_errors_are_one_line(monkeypatch, capsys, tmp_path):
  def bad_input(run_dir):
    raise jaxlora.errors.CheckpointError(f"{run_dir} holds no adapter; train one first")

  monkeypatch.setattr("jaxlora_cli.reporting.plot", bad_input)
  assert main(["plot", str(tmp_path)]) == 2
  assert _err_lines(capsys) == [f"error: {tmp_path} holds no adapter; train one first"]

  def no_permission(run_dir):
    raise PermissionError(errno.EACCES, "Permission denied", run_dir)

  monkeypatch.setattr("jaxlora_cli.reporting.plot", no_permission)
  assert main(["plot", str(tmp_path)]) == 2
  assert _err_lines(capsys) == [f"error: [Errno 13] Permission denied: '{tmp_path}'"]


def test_diverged_exits_3_and_debug_reraises(monkeypatch, capsys, tmp_path):
  from jaxlora_cli import trainer

  def diverged(run_dir):
    raise trainer.TrainingDiverged("the loss became nan at step 3")

  monkeypatch.setattr("jaxlora_cli.reporting.plot", diverged)
  assert main(["plot", str(tmp_path)]) == main_lib.EXIT_DIVERGED == 3
  assert _err_lines(capsys) == ["error: the loss became nan at step 3"]
  monkeypatch.setattr("jaxlora_cli.reporting.plot", lambda run_dir: {}["x"])
  with pytest.raises(KeyError):
    main(["--debug", "plot", str(tmp_path)])


@pytest.mark.parametrize("under", [False, True])
def test_output_dir_that_is_a_file_is_one_line_and_writes_nothing(model_dir, data_dir, tmp_path,
                                                                  capsys, under):
  f = tmp_path / "notes.txt"
  f.write_text("mine")
  out = f / "run" if under else f
  assert main(_args(model_dir, data_dir / "pc.jsonl", out, "train.steps=1")) == 2
  err = _err_lines(capsys)
  assert len(err) == 1 and err[0].startswith(f"error: output_dir {out}") and "is a file" in err[0]
  assert f.read_text() == "mine" and os.listdir(tmp_path) == ["notes.txt"]


@pytest.mark.parametrize("name,text,cause", [
    ("bad.jsonl", '{"prompt": "a", "completion": "b"}\n{"prompt": \n', "JSON parse error"),
    ("bad.csv", "prompt,completion\na,b\n1,2,3,4\n", "Expected 2 fields in line 3, saw 4"),
])
def test_a_bad_data_file_is_one_line_without_datasets_log(model_dir, data_dir, tmp_path, capfd,
                                                         caplog, name, text, cause):
  path = tmp_path / name
  path.write_text(text)
  level = logging.getLogger("datasets").level
  with caplog.at_level(logging.DEBUG):
    assert main(_args(model_dir, path, tmp_path / "r", "train.steps=1")) == 2
  # `datasets` logs no ERROR line of its own, and its logger's level is restored.
  assert [r.getMessage() for r in caplog.records
          if r.name.startswith("datasets") and r.levelno >= logging.WARNING] == []
  assert logging.getLogger("datasets").level == level
  err = capfd.readouterr().err.strip().splitlines()
  assert len(err) == 1, err
  assert err[0].startswith(f"error: data file {path} is not valid ") and cause in err[0]


def test_an_unreadable_config_file_is_one_line(tmp_path, capsys):
  bad = tmp_path / "bad.yaml"
  bad.write_text("lora: [1\n")
  for path, message in ((tmp_path, "could not be read"), (bad, "is not valid YAML"),
                        (tmp_path / "none.yaml", "not found")):
    assert main(["train", "--config", str(path)]) == 2
    err = _err_lines(capsys)
    assert len(err) == 1 and err[0].startswith(f"error: config file {path} {message}"), err


@pytest.mark.parametrize("command", [["export", "RUN", "--format", "peft"],
                                     ["export", "RUN", "--format", "hf"], ["merge", "RUN"],
                                     ["demo", "--steps", "1"]])
def test_an_out_that_is_a_file_is_refused_first(tmp_path, capsys, command):
  f = tmp_path / "notes.txt"
  f.write_text("mine")
  argv = [str(tmp_path / "no-run") if a == "RUN" else a for a in command]
  assert main([*argv, "--out", str(f)]) == 2
  assert _err_lines(capsys) == [f"error: --out {f} is a file, not a directory; give a directory "
                                "path (a new one is created)"]
  assert f.read_text() == "mine" and os.listdir(tmp_path) == ["notes.txt"]


def test_out_of_device_memory_is_a_setting_to_change(monkeypatch, capsys, tmp_path):
  import jax

  def oom(run_dir):
    raise jax.errors.JaxRuntimeError("RESOURCE_EXHAUSTED: Out of memory allocating 9.00GiB.\nmore")

  monkeypatch.setattr("jaxlora_cli.reporting.plot", oom)
  assert main(["plot", str(tmp_path)]) == 2
  [line] = _err_lines(capsys)
  assert line.startswith("error: the device ran out of memory (RESOURCE_EXHAUSTED: Out of memory")
  assert "train.batch_size" in line
