"""Two processes on localhost (jax.distributed, CPU collectives), four devices each.

They train, checkpoint, are killed together, resume (on another mesh), and
must end where one process with eight devices ends.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

pytest.importorskip("transformers")

import jaxlora  # noqa: E402
from conftest import TRAINED_RUN_ARGS, cli_args  # noqa: E402

HERE = os.path.dirname(__file__)
STEPS = 6  # trained_run's train.steps


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def _launch(args, slow_after="-1"):
  """Both processes of one job; returns their Popen objects."""
  port = _free_port()
  # Four devices each, and otherwise this process's XLA flags (conftest's cheaper compiles).
  flags = [f for f in os.environ.get("XLA_FLAGS", "").split()
           if not f.startswith("--xla_force_host_platform_device_count")]
  env = {**os.environ,
         "XLA_FLAGS": " ".join(["--xla_force_host_platform_device_count=4", *flags])}
  return [subprocess.Popen(
      [sys.executable, os.path.join(HERE, "multihost_train.py"), str(slow_after), *args,
       "distributed.initialize=true", f"distributed.coordinator_address=localhost:{port}",
       "distributed.num_processes=2", f"distributed.process_id={i}"],
      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env) for i in range(2)]


def _finish(procs):
  outs = [p.communicate(timeout=300) for p in procs]
  for p, (_, err) in zip(procs, outs):
    assert p.returncode == 0, err[-3000:]
  return outs


def _losses(run):
  recs = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
  return ([r["step"] for r in recs if "loss" in r], [r["loss"] for r in recs if "loss" in r],
          [r["eval_loss"] for r in recs if "eval_loss" in r])


@pytest.mark.slow
@pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 (simulated) devices, as in CI")
def test_two_processes_train_get_killed_resume_and_match_one_process(model_dir, data_dir,
                                                                     trained_run, tmp_path):
  # The reference is the shared `trained_run`: this process, eight devices, the same global
  # mesh (fsdp=8), the same arguments (checkpoints at steps 4 and 6).
  args = lambda out: cli_args(model_dir, data_dir / "pc.jsonl", out, *TRAINED_RUN_ARGS)[1:]
  ref = trained_run
  assert f"train.steps={STEPS}" in TRAINED_RUN_ARGS

  run = tmp_path / "two"
  # Steps 5 and 6 wait 5 s each for their batch: the kill comes after step 4's checkpoint.
  procs = _launch(["train", *args(run)], slow_after="4:5")
  ckpts = run / "checkpoints"
  deadline = time.time() + 240
  while time.time() < deadline and all(p.poll() is None for p in procs):
    if ckpts.exists() and "4" in os.listdir(ckpts):
      break
    time.sleep(0.05)
  for p in procs:
    p.send_signal(signal.SIGKILL)
  for p in procs:
    p.communicate(timeout=60)
    assert p.returncode == -signal.SIGKILL, "the job ended before it could be killed"
  assert not (run / "adapter").exists()
  killed_at = max(int(s) for s in os.listdir(ckpts) if s.isdigit())
  assert killed_at == 4

  # Resume on another mesh (as on a recreated slice): tensor parallel over all eight devices,
  # so the batch is replicated and each process feeds all of its rows.
  (out0, err0), (out1, _) = _finish(_launch(["train", *args(run), "mesh.fsdp=1", "mesh.tensor=8",
                                             "mesh.rules=fsdp_tp"]))
  assert f"resuming {run} from step {killed_at}" in err0
  # Process 0 alone prints the result (gloo's connection notes aside).
  assert json.loads(out0[out0.index("{\n"):])["steps"] == STEPS and "{" not in out1
  steps, two_loss, two_eval = _losses(run)
  _, one_loss, one_eval = _losses(ref)
  assert steps == list(range(2, STEPS + 1, 2)) and two_eval
  np.testing.assert_allclose(two_loss, one_loss, rtol=1e-5)
  np.testing.assert_allclose(two_eval, one_eval, rtol=1e-5)

  model, params = jaxlora.models.from_pretrained(model_dir)
  one = jaxlora.adapter(jaxlora.load(str(ref / "adapter"), params))
  two = jaxlora.adapter(jaxlora.load(str(run / "adapter"), params))
  for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(two)[0], jax.tree.leaves(one)):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    err = np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-12)
    assert err < 1e-5, (jax.tree_util.keystr(path), err)
  peft_two = jaxlora.peft.load(str(run / "adapter_peft"), params, model=model)
  for a, b in zip(jax.tree.leaves(jaxlora.adapter(peft_two)), jax.tree.leaves(two)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
