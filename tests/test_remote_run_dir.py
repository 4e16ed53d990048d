"""`jaxlora train` with a gs:// run directory, against an in-memory stand-in for GCS.

The stand-in is an fsspec memory filesystem registered for gs:// that, like
GCS, cannot append to an object. Everything the command line writes itself
(config, metrics, report, plot, result, PEFT export, adapter record) goes
through it. Orbax writes arrays with TensorStore's own GCS driver, which no
fsspec filesystem can stand in for, so here its checkpoints are redirected to
a local directory.
"""

import json

import fsspec
import jax
import numpy as np
import pytest
from fsspec.implementations.memory import MemoryFileSystem

pytest.importorskip("transformers")

import jaxlora  # noqa: E402
from conftest import cli_args  # noqa: E402
from jaxlora_cli import config as config_lib  # noqa: E402
from jaxlora_cli import reporting  # noqa: E402
from jaxlora_cli.main import main  # noqa: E402

URL = "gs://bucket/runs/r1"


class FakeGCS(MemoryFileSystem):
  protocol = ("gs", "gcs")
  root_marker = ""
  store: dict = {}
  pseudo_dirs = [""]

  def _open(self, path, mode="rb", **kwargs):
    if "a" in mode:
      raise NotImplementedError("GCS objects cannot be appended to")
    return super()._open(path, mode, **kwargs)


class Board:
  """Records what would go to TensorBoard (tensorboardX needs google-cloud-storage for gs://)."""
  logdirs, scalars = [], []

  def __init__(self, logdir):
    self.logdirs.append(logdir)

  def add_scalar(self, tag, value, step):
    self.scalars.append((tag, step))

  def flush(self):
    pass

  def close(self):
    pass


@pytest.fixture
def gcs(monkeypatch, tmp_path):
  FakeGCS.store, FakeGCS.pseudo_dirs = {}, [""]
  for name in ("gs", "gcs"):
    fsspec.register_implementation(name, FakeGCS, clobber=True)
  import tensorboardX
  monkeypatch.setattr(tensorboardX, "SummaryWriter", Board)
  Board.logdirs, Board.scalars = [], []
  # Orbax's arrays go to a local directory instead of GCS (see the module docstring).
  local = lambda url: str(tmp_path / "orbax" / str(url).replace("gs://", ""))
  real_mgr, real_save = jaxlora.CheckpointManager, jaxlora.save

  class Manager(real_mgr):
    def __init__(self, directory, **kw):
      assert str(directory).startswith(URL)
      super().__init__(local(directory), **kw)

  def save(path, tree, **kw):
    assert str(path).startswith(URL)
    real_save(local(path), tree, **kw)
    # The record lands in the run directory, as jaxlora.save writes it there last.
    fsspec.filesystem("gs").pipe(f"{path}/jaxlora.json",
                                 open(f"{local(path)}/jaxlora.json", "rb").read())

  monkeypatch.setattr(jaxlora, "CheckpointManager", Manager)
  monkeypatch.setattr(jaxlora, "save", save)
  yield FakeGCS.store, local
  for name in ("gs", "gcs"):
    fsspec.register_implementation(name, fsspec.get_filesystem_class("memory"), clobber=True)


def _read(store, name):
  return store[f"{URL}/{name}"].getvalue().decode()


@pytest.mark.slow
def test_train_and_resume_in_a_gs_run_directory(gcs, model_dir, data_dir, tmp_path, capsys):
  store, local = gcs
  args = lambda steps: cli_args(model_dir, data_dir / "pc.jsonl", URL, f"train.steps={steps}",
                                "data.eval_fraction=0.2")
  assert main(args(4)) == 0
  files = sorted(k[len(URL) + 1:] for k in store)
  for name in ("config.yaml", "metrics.jsonl", "result.json", "report.md", "loss.png",
               "adapter/jaxlora.json", "adapter_peft/adapter_config.json",
               "adapter_peft/adapter_model.safetensors"):
    assert name in files, (name, files)
  assert not [f for f in files if "tmp" in f]
  assert config_lib.load(f"{URL}/config.yaml").output_dir == URL
  assert Board.logdirs == [f"{URL}/tensorboard"] and ("train/loss", 4) in Board.scalars
  assert store[f"{URL}/loss.png"].getvalue()[:4] == b"\x89PNG"

  # The same command with more steps resumes from the checkpoint; metrics are rewritten whole.
  assert main(args(8)) == 0
  assert f"resuming {URL} from step 4" in capsys.readouterr().err
  recs = [json.loads(l) for l in _read(store, "metrics.jsonl").splitlines()]
  assert [r["step"] for r in recs if "loss" in r] == [2, 4, 6, 8]
  assert json.loads(_read(store, "result.json"))["steps"] == 8

  # The PEFT export in the bucket holds the same factors as the Orbax adapter.
  peft_dir = tmp_path / "peft"
  peft_dir.mkdir()
  for name in ("adapter_config.json", "adapter_model.safetensors"):
    (peft_dir / name).write_bytes(store[f"{URL}/adapter_peft/{name}"].getvalue())
  model, params = jaxlora.models.from_pretrained(model_dir)
  orbax = jaxlora.load(local(f"{URL}/adapter"), params)
  peft = jaxlora.peft.load(str(peft_dir), params, model=model)
  for a, b in zip(jax.tree.leaves(jaxlora.adapter(peft)), jax.tree.leaves(jaxlora.adapter(orbax))):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))

  # Another run's settings in the same gs:// directory are refused, and nothing is touched.
  before = dict((k, v.getvalue()) for k, v in store.items())
  assert main(args(8) + ["lora.rank=2"]) == 2
  assert "holds a different run (differs in lora.rank)" in capsys.readouterr().err
  assert dict((k, v.getvalue()) for k, v in store.items()) == before


def test_metrics_on_gs_truncate_and_continue(gcs):
  store, _ = gcs
  m = reporting.Metrics(URL)
  for step in (1, 2, 3):
    m.write({"step": step, "loss": float(step)})
  reporting.Metrics(URL).truncate(2)
  m = reporting.Metrics(URL)
  m.write({"step": 3, "loss": 0.5})
  assert [json.loads(l) for l in _read(store, "metrics.jsonl").splitlines()] == [
      {"step": 1, "loss": 1.0}, {"step": 2, "loss": 2.0}, {"step": 3, "loss": 0.5}]
  assert reporting.plot(URL) == f"{URL}/loss.png"
