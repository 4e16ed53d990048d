"""SIGTERM to a running `jaxlora train`: it finishes the step in flight, checkpoints it and
exits 75; rerunning resumes from that step and ends bit-identical to an uninterrupted run."""

import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

pytest.importorskip("transformers")

import jaxlora  # noqa: E402
from conftest import cli_args  # noqa: E402
from jaxlora_cli import config as config_lib  # noqa: E402
from jaxlora_cli import data, preemption, trainer  # noqa: E402
from jaxlora_cli.main import main  # noqa: E402

STEPS = 8

# `jaxlora train` with every batch 0.3 s slower, so that a signal lands mid-run.
SLOW_TRAIN = """
import sys, time
from jaxlora_cli import data
from jaxlora_cli.main import main

plain = data.Batcher.next
def next_batch(self, *args, **kwargs):
  time.sleep(0.3)
  return plain(self, *args, **kwargs)
data.Batcher.next = next_batch
sys.exit(main(sys.argv[1:]))
"""


def _loss_steps(run):
  path = run / "metrics.jsonl"
  if not path.exists():
    return []
  recs = [json.loads(l) for l in path.read_text().splitlines() if l.strip()]
  return [r["step"] for r in recs if "loss" in r]


def _checkpoints(run):
  path = run / "checkpoints"
  return sorted(int(s) for s in os.listdir(path) if s.isdigit()) if path.exists() else []


@pytest.mark.slow
def test_sigterm_checkpoints_the_step_in_flight_and_resumes_exactly(model_dir, data_dir,
                                                                   tmp_path, capsys):
  # Orbax saves the first step; no other checkpoint falls due before the end, so one mid-run
  # can only come from the signal.
  args = lambda out: cli_args(model_dir, data_dir / "pc.jsonl", out, f"train.steps={STEPS}",
                              "train.save_every=100", "train.log_every=1")
  assert main(args(tmp_path / "ref")) == 0  # the uninterrupted run, in this process

  run = tmp_path / "run"
  # The same devices and compiler flags as this process, so both runs compute the same programs.
  flags = [f for f in os.environ.get("XLA_FLAGS", "").split()
           if not f.startswith("--xla_force_host_platform_device_count")]
  flags.append(f"--xla_force_host_platform_device_count={jax.local_device_count()}")
  env = {**os.environ, "XLA_FLAGS": " ".join(flags)}
  proc = subprocess.Popen([sys.executable, "-c", SLOW_TRAIN, *args(run)], env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  deadline = time.time() + 300
  while time.time() < deadline and proc.poll() is None and len(_loss_steps(run)) < 2:
    time.sleep(0.05)
  proc.send_signal(signal.SIGTERM)
  _, err = proc.communicate(timeout=300)
  assert proc.returncode == preemption.EXIT_CODE == 75, err[-3000:]

  done = _loss_steps(run)
  assert done == list(range(1, len(done) + 1)) and 2 <= done[-1] < STEPS, done
  stopped_at = done[-1]
  # The step in flight was finished and checkpointed, and nothing after it was started.
  assert _checkpoints(run) == [1, stopped_at]
  assert f"stopped on SIGTERM after step {stopped_at} of {STEPS}" in err
  assert not (run / "adapter").exists()

  capsys.readouterr()
  assert main(args(run)) == 0
  # It resumed from the step it stopped after: no step ran twice.
  assert f"resuming {run} from step {stopped_at}" in capsys.readouterr().err
  assert _loss_steps(run) == list(range(1, STEPS + 1))
  losses = lambda r: [json.loads(l).get("loss") for l in (r / "metrics.jsonl").read_text()
                      .splitlines()]
  assert losses(run) == losses(tmp_path / "ref")

  _, params = jaxlora.models.from_pretrained(model_dir)
  a = jaxlora.load(str(tmp_path / "ref" / "adapter"), params)
  b = jaxlora.load(str(run / "adapter"), params)
  for x, y in zip(jax.tree.leaves(jaxlora.adapter(a)), jax.tree.leaves(jaxlora.adapter(b)),
                  strict=True):
    np.testing.assert_array_equal(np.asarray(x).view(np.uint8), np.asarray(y).view(np.uint8))


def test_a_signal_mid_step_stops_after_it_in_process(model_dir, data_dir, tmp_path,
                                                      monkeypatch):
  """The fast version: SIGTERM while step 3 draws its batch, in this process."""
  out = tmp_path / "run"
  cfg = config_lib.load(None, cli_args(model_dir, data_dir / "pc.jsonl", out, "train.steps=6",
                                       "train.save_every=100", "train.log_every=1")[2:])
  plain, drawn = data.Batcher.next, []

  def next_batch(self, *args, **kwargs):
    drawn.append(1)
    if len(drawn) == 3:
      os.kill(os.getpid(), signal.SIGTERM)
    return plain(self, *args, **kwargs)

  monkeypatch.setattr(data.Batcher, "next", next_batch)
  before = signal.getsignal(signal.SIGTERM)
  logs = []
  with pytest.raises(preemption.TrainingPreempted) as stop:
    trainer.train(cfg, progress=False, log=logs.append, handle_signals=True)
  assert stop.value.step == 3 and stop.value.signal_name == "SIGTERM"
  assert stop.value.exit_code == 75
  assert logs[-1] == str(stop.value) and "stopped on SIGTERM after step 3 of 6" in logs[-1]
  assert len(drawn) == 3 and _loss_steps(out) == [1, 2, 3] and _checkpoints(out) == [1, 3]
  assert signal.getsignal(signal.SIGTERM) == before  # the previous handler is back


@pytest.mark.slow
@pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 (simulated) devices, as in CI")
def test_sigterm_to_one_process_stops_all_at_the_same_step(model_dir, data_dir, tmp_path):
  """Two processes (jax.distributed on localhost): the one that gets the signal tells the other,
  both finish the same step, write its checkpoint together and exit 75."""
  from test_multihost import _launch  # pylint: disable=import-outside-toplevel

  run = tmp_path / "two"
  procs = _launch(cli_args(model_dir, data_dir / "pc.jsonl", run, "train.steps=10",
                           "train.save_every=100", "train.log_every=1"), slow_after=2)
  deadline = time.time() + 300
  while time.time() < deadline and all(p.poll() is None for p in procs) \
      and len(_loss_steps(run)) < 2:
    time.sleep(0.05)
  procs[1].send_signal(signal.SIGTERM)
  outs = [p.communicate(timeout=300) for p in procs]
  for p, (_, err) in zip(procs, outs):
    assert p.returncode == 75, err[-3000:]
  done = _loss_steps(run)
  assert done == list(range(1, len(done) + 1)) and 2 <= done[-1] < 10, done
  assert _checkpoints(run) == [1, done[-1]]
  assert f"stopped on SIGTERM after step {done[-1]} of 10" in outs[1][1]
  assert f"stopped on a signal to another process after step {done[-1]}" in outs[0][1]
