"""Adapter checkpoints (Orbax) and training resume after SIGKILL."""

import json
import os
import signal
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

import jaxlora
from conftest import randomize_adapters
from models import MLP, Stack

KEY = jax.random.key(0)
HERE = os.path.dirname(__file__)


def _wrapped(dtype=None):
  m = Stack()
  x = jnp.zeros((2, 5), jnp.int32)
  v = m.init(KEY, x)
  w = jaxlora.wrap(v, rank=3, key=KEY, layout=jaxlora.trace_layout(m.apply, v, x), dtype=dtype,
                   rank_pattern={"up": 2}, alpha_pattern={"down": 5.0})
  return v, randomize_adapters(w, jax.random.key(1))


def _bits(x):
  return np.asarray(x).view(np.uint8)


@pytest.mark.parametrize("dtype", [jnp.float32,
                                   pytest.param(jnp.bfloat16, marks=pytest.mark.slow)])
def test_round_trip_is_bit_exact(tmp_path, dtype):
  v, w = _wrapped(dtype)
  jaxlora.save(str(tmp_path / "a"), w, metadata={"lr": 1e-3, "note": "x"})
  back = jaxlora.load(str(tmp_path / "a"), v)
  assert jax.tree.structure(back) == jax.tree.structure(w)
  for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(w)):
    assert a.dtype == b.dtype
    np.testing.assert_array_equal(_bits(a), _bits(b))
  rec = jaxlora.checkpoint.info(str(tmp_path / "a"))
  assert rec["metadata"] == {"lr": 1e-3, "note": "x"}
  assert rec["layers"]["layers/up"]["rank"] == 2
  assert rec["layers"]["layers/down"]["scale"] == [float(np.float32(5.0 / 3))] * 3
  assert rec["base_fingerprint"] == jaxlora.checkpoint.fingerprint(v)
  assert rec["jaxlora_version"] == jaxlora.__version__
  # Only the adapter is on disk: the files are about the size of A and B, not the base.
  size = sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(tmp_path / "a") for f in fs)
  adapter_bytes = sum(x.nbytes for x in jax.tree.leaves(jaxlora.adapter(w)))
  assert size < adapter_bytes + 200_000


def test_load_onto_a_base_that_does_not_fit(tmp_path):
  v, w = _wrapped()
  jaxlora.save(str(tmp_path / "a"), w)
  other = Stack(d=12).init(KEY, jnp.zeros((2, 5), jnp.int32))
  with pytest.raises(ValueError, match=r"'layers/attn/k'.*\(3, 8, 2, 4\).*\(3, 12, 2, 4\)"):
    jaxlora.load(str(tmp_path / "a"), other)
  mlp = MLP().init(KEY, jnp.ones((1, 4)))
  with pytest.raises(ValueError, match="'layers/attn/k' that the base params do not have"):
    jaxlora.load(str(tmp_path / "a"), mlp)
  with pytest.raises(ValueError, match="already hold an adapter"):
    jaxlora.load(str(tmp_path / "a"), w)


def test_missing_and_corrupt_checkpoints(tmp_path):
  v, w = _wrapped()
  with pytest.raises(FileNotFoundError, match="No adapter checkpoint"):
    jaxlora.load(str(tmp_path / "nope"), v)
  jaxlora.save(str(tmp_path / "a"), w)
  os.remove(tmp_path / "a" / "jaxlora.json")
  with pytest.raises(ValueError, match="jaxlora.json is missing"):
    jaxlora.load(str(tmp_path / "a"), v)
  jaxlora.save(str(tmp_path / "b"), w)
  (tmp_path / "b" / "jaxlora.json").write_text("{not json")
  with pytest.raises(ValueError, match="jaxlora.json is corrupt"):
    jaxlora.load(str(tmp_path / "b"), v)
  jaxlora.save(str(tmp_path / "c"), w)
  import shutil
  shutil.rmtree(tmp_path / "c" / "adapter")
  with pytest.raises(ValueError, match="Could not read the adapter arrays in .*c/adapter"):
    jaxlora.load(str(tmp_path / "c"), v)


def test_interrupted_save_leaves_nothing_and_keeps_the_old_checkpoint(tmp_path, monkeypatch):
  v, w = _wrapped()
  jaxlora.save(str(tmp_path / "a"), w)
  w2 = randomize_adapters(w, jax.random.key(9))

  def boom(*args, **kwargs):
    raise KeyboardInterrupt("killed mid-save")

  monkeypatch.setattr(ocp.StandardCheckpointer, "wait_until_finished", boom)
  with pytest.raises(KeyboardInterrupt):
    jaxlora.save(str(tmp_path / "a"), w2)
  with pytest.raises(KeyboardInterrupt):
    jaxlora.save(str(tmp_path / "new"), w2)
  monkeypatch.undo()
  assert sorted(os.listdir(tmp_path)) == ["a"]  # no temporary or half-written directories
  back = jaxlora.load(str(tmp_path / "a"), v)
  for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(w)):
    np.testing.assert_array_equal(a, b)
  jaxlora.save(str(tmp_path / "a"), w2)  # a completed save replaces it
  back = jaxlora.load(str(tmp_path / "a"), v)
  for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(w2)):
    np.testing.assert_array_equal(a, b)
  assert sorted(os.listdir(tmp_path)) == ["a"]


@pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 (simulated) devices, as in CI")
def test_load_onto_a_sharded_base_places_adapter_shards(tmp_path):
  v, w = _wrapped()
  jaxlora.save(str(tmp_path / "a"), w)
  mesh = jax.make_mesh((4, 2), ("fsdp", "tensor"), axis_types=(jax.sharding.AxisType.Auto,) * 2)

  def place(kp, x):
    if kp[-1].key == "kernel" and x.ndim == 3:  # (layers, in, out)
      return jax.device_put(x, NamedSharding(mesh, P(None, "fsdp", "tensor")))
    return jax.device_put(x, NamedSharding(mesh, P()))

  sharded = jax.tree_util.tree_map_with_path(place, v)
  back = jaxlora.load(str(tmp_path / "a"), sharded)
  up = back["params"]["layers"]["up"]
  assert up["lora_a"].sharding.spec == P(None, "fsdp", None)
  assert up["lora_b"].sharding.spec == P(None, None, "tensor")
  assert {s.data.shape for s in up["lora_a"].addressable_shards} == {(3, 2, 2)}  # 8/4 rows each
  np.testing.assert_array_equal(up["lora_a"], w["params"]["layers"]["up"]["lora_a"])
  # Explicit shardings win.
  repl = jax.tree.map(lambda _: NamedSharding(mesh, P()), jaxlora.adapter(w))
  back = jaxlora.load(str(tmp_path / "a"), sharded, shardings=repl)
  assert back["params"]["layers"]["up"]["lora_a"].sharding.spec == P()


def _run(run_dir, steps, sleep=0.0, sleep_after=0):
  # The environment as it is (XLA flags included), so that the subprocess compiles the same
  # program as `resumable_train.train` in this process.
  return subprocess.Popen([sys.executable, os.path.join(HERE, "resumable_train.py"), str(run_dir),
                           str(steps), "--sleep", str(sleep), "--sleep-after", str(sleep_after)],
                          stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True)


@pytest.mark.slow
def test_resume_after_sigkill_is_bit_identical(tmp_path):
  import resumable_train
  steps = 12
  # Only the killed run needs a process of its own: the reference and the resume run here.
  ref = []
  resumable_train.train(str(tmp_path / "ref"), steps, log=ref.append)
  # Steps 1 to 7 at full speed, then 2 s after each: the kill comes well before the end.
  proc = _run(tmp_path / "killed", steps, sleep=2.0, sleep_after=6)
  seen = []
  for line in proc.stdout:
    seen.append(line)
    if line.startswith("step 7 "):
      proc.send_signal(signal.SIGKILL)
      break
  proc.wait(timeout=60)
  assert proc.returncode == -signal.SIGKILL, "".join(seen)
  assert not os.path.exists(tmp_path / "killed" / "final")
  resumed = []
  resumable_train.train(str(tmp_path / "killed"), steps, log=resumed.append)
  assert resumed[0].startswith("resumed at ") and int(resumed[0].split()[2]) in (4, 6), resumed
  _, base = resumable_train.base()
  a = jaxlora.load(str(tmp_path / "ref" / "final"), base)
  b = jaxlora.load(str(tmp_path / "killed" / "final"), base)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(_bits(x), _bits(y))
  # Only the newest two checkpoints are kept.
  steps_kept = sorted(int(d) for d in os.listdir(tmp_path / "killed" / "ckpt") if d.isdigit())
  assert steps_kept == [10, 12]
  # Losses before the kill (the killed process's) and after the resume equal the uninterrupted
  # run's, step by step.
  losses = lambda lines: dict(l.strip().split(" loss ") for l in lines if l.startswith("step"))
  ref_losses, killed_losses, res_losses = losses(ref), losses(seen), losses(resumed)
  assert len(ref_losses) == steps and "step 7" in killed_losses and "step 12" in res_losses
  assert all(ref_losses[k] == v for k, v in {**killed_losses, **res_losses}.items())
