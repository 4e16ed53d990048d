"""Hugging Face Hub ids for model.path / from_pretrained and data.train_file, offline.

Everything is local: a Hub cache in huggingface_hub's layout (``models--org--name/snapshots/
<commit>/`` and ``refs/main``) holding the tiny test checkpoint, and a `datasets` cache holding a
dataset as an earlier online ``load_dataset("org/data")`` would have left it. Both libraries read
HF_HUB_OFFLINE and their cache paths when imported, so their module constants are patched too.
"""

import glob
import json
import os
import shutil

import jax
import numpy as np
import pytest

import jaxlora
from jaxlora.errors import NotFoundError

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def make_hub_cache(cache, repo_id, src, commit=COMMIT):
  """`src`'s files as the snapshot `commit` of model repo `repo_id`, `main` pointing at it."""
  org, name = repo_id.split("/")
  repo = cache / f"models--{org}--{name}"
  shutil.copytree(src, repo / "snapshots" / commit)
  (repo / "refs").mkdir(parents=True)
  (repo / "refs" / "main").write_text(commit)


@pytest.fixture
def hub(tmp_path, monkeypatch, model_dir):
  """An offline Hub cache holding the tiny checkpoint as ``org/tiny``; its path."""
  import huggingface_hub.constants as constants
  cache = tmp_path / "hub"
  make_hub_cache(cache, "org/tiny", model_dir)
  monkeypatch.setenv("HF_HUB_CACHE", str(cache))
  monkeypatch.setenv("HF_HUB_OFFLINE", "1")
  monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
  monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
  monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
  return cache


@pytest.fixture
def hub_data(tmp_path, monkeypatch, hub, data_dir):
  """A `datasets` cache holding pc.jsonl as the Hub dataset ``org/data``, offline."""
  import datasets
  from datasets.packaged_modules.json.json import Json
  datasets.disable_progress_bars()
  build, cache = tmp_path / "ds-build", tmp_path / "ds-cache"
  # What loading a Hub dataset online leaves: <cache>/<org>___<name>/<config>/<version>/<hash>/
  # with dataset_info.json and <name>-<split>.arrow.
  Json(cache_dir=str(build), dataset_name="data", config_name="default", hash="0" * 16,
       data_files={"train": str(data_dir / "pc.jsonl")}).download_and_prepare()
  src, = (p for p in glob.glob(str(build / "data" / "*" / "*" / "*")) if os.path.isdir(p))
  shutil.copytree(src, cache / "org___data" / "default" / "0.0.0" / ("0" * 16))
  monkeypatch.setenv("HF_DATASETS_CACHE", str(cache))
  monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", cache)
  monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
  return cache


@pytest.mark.parametrize("path,is_id", [
    ("org/name", True), ("HuggingFaceTB/SmolLM2-135M", True), ("a.b/c_d-1.5", True),
    ("gpt2", False), ("/abs/path", False), ("./rel/x", False), ("~/x/y", False),
    ("a/b/c", False), ("../x", False), ("org/..", False), ("org/", False)])
def test_is_repo_id(path, is_id):
  assert jaxlora.models.is_repo_id(path) is is_id


def test_from_pretrained_hub_id_equals_local_dir(hub, model_dir):
  _, ref = jaxlora.models.from_pretrained(model_dir)
  snapshot = hub / "models--org--tiny" / "snapshots" / COMMIT
  assert jaxlora.models.resolve("org/tiny") == str(snapshot)
  for revision in (None, COMMIT, "main"):
    _, params = jaxlora.models.from_pretrained("org/tiny", revision=revision)
    assert jax.tree.structure(params) == jax.tree.structure(ref)
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(ref)):
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize("path,revision,words", [
    ("org/missing", None, ["'org/missing'", "hf download org/missing --include '*.json' "
                           "--include '*.safetensors' --include 'tokenizer*'", "HF_HUB_OFFLINE"]),
    ("org/tiny", "v2", ["org/tiny at revision 'v2'", "hf download org/tiny --revision v2"]),
])
def test_missing_id_offline_is_one_line_naming_it(hub, path, revision, words):
  with pytest.raises(NotFoundError) as e:
    jaxlora.models.from_pretrained(path, revision=revision)
  msg = str(e.value)
  assert "\n" not in msg and "not in the local cache" in msg, msg
  for w in words:
    assert w in msg, msg


def test_revision_with_a_local_dir_is_refused(model_dir):
  with pytest.raises(jaxlora.errors.InputError, match="leave the revision out"):
    jaxlora.models.resolve(model_dir, revision="main")


def test_hub_dataset_rows_equal_the_jsonl_file(hub_data, data_dir):
  from jaxlora_cli import data
  rows = data.read_rows("org/data")
  with open(data_dir / "pc.jsonl") as f:
    expected = [json.loads(line) for line in f]
  assert [dict(r) for r in rows] == expected


def test_missing_hub_dataset_offline_is_one_line_naming_it(hub_data):
  from jaxlora_cli import data
  from jaxlora_cli.config import ConfigError
  with pytest.raises(ConfigError) as e:
    data.read_rows("org/nodata")
  msg = str(e.value)
  assert "\n" not in msg, msg
  assert "Hub dataset org/nodata" in msg and "load_dataset('org/nodata'" in msg, msg


@pytest.mark.slow  # a whole run; the fast tier checks the pieces
def test_cli_trains_on_a_hub_model_and_dataset(hub_data, tmp_path, capsys):
  from conftest import cli_args
  from jaxlora_cli.main import main
  out = tmp_path / "run"
  assert main(cli_args("org/tiny", "org/data", out, "train.steps=1",
                       f"model.revision={COMMIT}")) == 0
  assert "model:\n  path: org/tiny" in (out / "config.yaml").read_text()
  with open(out / "adapter_peft" / "adapter_config.json") as f:
    assert json.load(f)["base_model_name_or_path"] == "org/tiny"
  capsys.readouterr()
  assert main(cli_args("org/none", "org/data", tmp_path / "run2", "train.steps=1")) == 2
  err = capsys.readouterr().err.strip()
  assert err.startswith("error: model.path: ") and "org/none" in err and "\n" not in err, err
