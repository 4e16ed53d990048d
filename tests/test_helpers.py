"""The shared private helpers: atomic writes (jaxlora._files) and tree paths and roles (_tree)."""

import os

import numpy as np
import pytest
from etils import epath

from jaxlora import _files
from jaxlora import _tree
from jaxlora.errors import InputError
from jaxlora.models import safetensors_io


class Boom(Exception):
  pass


def _names(d):
  return sorted(os.listdir(d))


@pytest.mark.parametrize("path, remote", [
    ("gs://bucket/run", True), ("s3://b/k", True), ("runs/demo", False), ("/abs/dir", False),
    ("file:///tmp/x", True), ("a:b", False)])
def test_is_remote(path, remote):
  assert _files.is_remote(path) is remote
  assert _files.is_remote(epath.Path(path) if not remote else path) is remote


def test_atomic_write_replaces_whole_file(tmp_path):
  p = tmp_path / "f.bin"
  p.write_bytes(b"old")
  with _files.atomic_write(p) as f:
    f.write(b"new ")
    f.write(b"content")
  assert p.read_bytes() == b"new content"
  assert _names(tmp_path) == ["f.bin"]


def test_atomic_write_keeps_old_file_when_writer_raises(tmp_path):
  p = tmp_path / "f.txt"
  p.write_text("old")
  with pytest.raises(Boom):
    with _files.atomic_write(p, "w") as f:
      f.write("half of the new")
      raise Boom()
  assert p.read_text() == "old"
  assert _names(tmp_path) == ["f.txt"]  # no temporary file left behind


def test_atomic_write_creates_nothing_when_writer_raises(tmp_path):
  with pytest.raises(Boom):
    with _files.atomic_write(tmp_path / "new.txt", "w"):
      raise Boom()
  assert _names(tmp_path) == []


def test_atomic_write_gives_the_usual_permissions(tmp_path):
  mask = os.umask(0o022)
  try:
    with _files.atomic_write(tmp_path / "f", "w") as f:
      f.write("x")
  finally:
    os.umask(mask)
  assert os.stat(tmp_path / "f").st_mode & 0o777 == 0o644


def test_safetensors_save_keeps_old_file_on_bad_tensor(tmp_path):
  p = str(tmp_path / "w.safetensors")
  safetensors_io.save_file({"a": np.arange(3, dtype=np.float32)}, p)
  with pytest.raises(InputError):
    safetensors_io.save_file({"a": np.array(["not", "numbers"])}, p)
  assert _names(tmp_path) == ["w.safetensors"]
  back = safetensors_io.SafetensorsFile(p)
  np.testing.assert_array_equal(back.get("a"), [0.0, 1.0, 2.0])


def test_staging_dir_publishes_in_order_and_cleans_up(tmp_path):
  dest = tmp_path / "out" / "adapter"
  with _files.staging_dir(dest, prefix=".tmp-x-") as stage:
    assert os.path.dirname(stage) == str(tmp_path / "out")  # beside: publishing renames
    for name in ("w", "config"):
      (epath.Path(stage) / name).write_text(name * 2)
    _files.publish(stage, dest, ["w", "config"])
  assert _names(tmp_path / "out") == ["adapter"]
  assert {n: (dest / n).read_text() for n in _names(dest)} == {"config": "configconfig", "w": "ww"}


def test_staging_dir_removed_and_target_untouched_when_writer_raises(tmp_path):
  dest = tmp_path / "adapter"
  dest.mkdir()
  (dest / "config").write_text("old")
  with pytest.raises(Boom):
    with _files.staging_dir(dest) as stage:
      (epath.Path(stage) / "config").write_text("new")
      raise Boom()
  assert _names(tmp_path) == ["adapter"]
  assert (dest / "config").read_text() == "old"


def test_replace_dir_swaps_whole_directory(tmp_path):
  root = epath.Path(tmp_path)
  old, new = root / "ckpt", root / ".ckpt.tmp"
  old.mkdir()
  (old / "a").write_text("1")
  (old / "b").write_text("2")
  new.mkdir()
  (new / "a").write_text("3")
  _files.replace_dir(new, old, aside=root / ".ckpt.old")
  assert _names(tmp_path) == ["ckpt"]
  assert _names(tmp_path / "ckpt") == ["a"]  # nothing of the old directory survives
  assert (old / "a").read_text() == "3"


def test_replace_dir_into_a_new_place(tmp_path):
  root = epath.Path(tmp_path)
  (root / "src").mkdir()
  (root / "src" / "x").write_text("x")
  _files.replace_dir(root / "src", root / "dst", aside=root / "unused")
  assert _names(tmp_path) == ["dst"]


TREE = {"a": {"b": {"kernel": 1}, "c": 2}}


@pytest.mark.parametrize("path, want", [
    ((), TREE), (("a",), TREE["a"]), (("a", "b"), {"kernel": 1}), (("a", "b", "kernel"), 1),
    (("a", "c"), 2)])
def test_lookup_finds(path, want):
  assert _tree.lookup(TREE, path) == want


@pytest.mark.parametrize("path", [("x",), ("a", "x"), ("a", "c", "d"), ("a", "b", "kernel", "y")])
def test_lookup_default_where_path_leaves_tree(path):
  sentinel = object()
  assert _tree.lookup(TREE, path, sentinel) is sentinel
  assert _tree.lookup(TREE, path, None) is None


def test_lookup_error_names_the_path_and_missing_key():
  with pytest.raises(InputError, match=r"Nothing at 'a/b/q': 'a/b' has no entry 'q'"):
    _tree.lookup(TREE, ("a", "b", "q"))
  with pytest.raises(InputError, match=r"Nothing at 'z': the tree has no entry 'z'"):
    _tree.lookup(TREE, ("z",))
  with pytest.raises(InputError, match=r"'a/c' has no entry 'd'"):  # a leaf, not a dict
    _tree.lookup(TREE, ("a", "c", "d"))


WRAPPED = {
    "emb": {"embedding": "E"},
    "blk": {
        "q": {"kernel": "Kq", "bias": "bq", "lora_a": "Aq", "lora_b": "Bq", "lora_scale": "Sq"},
        "o": {"kernel": "Ko"},
    },
}


def test_is_adapter_key():
  assert [k for k in ("kernel", "lora_a", "lora_b", "lora_scale", "bias", None, 0)
          if _tree.is_adapter_key(k)] == ["lora_a", "lora_b", "lora_scale"]


def test_adapter_leaves():
  assert _tree.adapter_leaves(WRAPPED) == {
      "blk": {"q": {"lora_a": "Aq", "lora_b": "Bq", "lora_scale": "Sq"}}}


def test_base_leaves():
  base = {"emb": {"embedding": "E"}, "blk": {"q": {"kernel": "Kq", "bias": "bq"},
                                             "o": {"kernel": "Ko"}}}
  assert _tree.base_leaves(WRAPPED, prune=True) == base
  assert _tree.base_leaves({"m": {"lora_a": 1}, "n": {}}, prune=True) == {}
  assert _tree.base_leaves({"m": {"lora_a": 1}, "n": {}}, prune=False) == {"m": {}, "n": {}}


def test_module_base_is_shallow():
  mod = {"kernel": 1, "lora_a": 2, "lora_b": 3, "lora_scale": 4, "child": {"lora_a": 5}}
  assert _tree.module_base(mod) == {"kernel": 1, "child": {"lora_a": 5}}


def test_trainable_and_frozen_leaves():
  assert _tree.trainable_leaves(WRAPPED) == {"blk": {"q": {"lora_a": "Aq", "lora_b": "Bq"}}}
  assert _tree.frozen_leaves(WRAPPED) == {
      "emb": {"embedding": "E"},
      "blk": {"q": {"kernel": "Kq", "bias": "bq", "lora_scale": "Sq"}, "o": {"kernel": "Ko"}}}
  # The two halves hold every leaf once.
  assert _tree.merge_trees(_tree.trainable_leaves(WRAPPED),
                           _tree.frozen_leaves(WRAPPED)) == WRAPPED
