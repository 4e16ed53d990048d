"""The pieces of `jaxlora train` alone: setup, one step, eval, checkpoint and restore,
export, the progress lines of a non-terminal, load_run's named result, stop signals."""

import dataclasses
import io
import os
import signal

import jax
import jax.numpy as jnp
import numpy as np
import pytest

pytest.importorskip("transformers")

import jaxlora  # noqa: E402
from conftest import cli_args  # noqa: E402
from jaxlora_cli import config as config_lib  # noqa: E402
from jaxlora_cli import preemption, reporting, trainer  # noqa: E402


def _cfg(model_dir, data_dir, out, *extra):
  return config_lib.load(None, cli_args(model_dir, data_dir / "pc.jsonl", out, *extra)[2:])


def _bits(tree):
  return [np.atleast_1d(np.asarray(x)).view(np.uint8) for x in jax.tree.leaves(tree)]


def _assert_same(a, b):
  for x, y in zip(_bits(a), _bits(b), strict=True):
    np.testing.assert_array_equal(x, y)


@pytest.fixture(scope="module")
def base(model_dir, data_dir, tmp_path_factory):
  """One run set up (step 0), shared: compiling its step is what costs."""
  out = tmp_path_factory.mktemp("pieces") / "run"
  cfg = _cfg(model_dir, data_dir, out, "train.steps=3", "train.save_every=100",
             "data.eval_fraction=0.1")
  mesh = trainer.make_mesh(cfg)
  logs = []
  with jax.set_mesh(mesh):
    run, state = trainer.setup(cfg, mesh, resume=False, log=logs.append)
  assert not logs  # nothing to resume
  yield run, state, run.batcher.state
  run.ckpt.close()


@pytest.fixture
def pieces(base):
  """The shared run and its step-0 state, with the data position rewound."""
  run, state, position = base
  run.batcher.state = position
  return run, state


def test_setup(pieces):
  run, state = pieces
  assert state.step == 0 and run.bank is None and run.names is None
  assert os.path.isfile(os.path.join(run.out, "config.yaml"))
  assert 0 < run.n_trainable < run.n_total
  assert run.evaluator and len(run.train_examples) == 108 and len(run.eval_examples) == 12


def test_steps_are_deterministic(pieces):
  run, state = pieces
  positions = [run.batcher.state]
  for expected in (1, 2):
    state, m = trainer.train_step(run, state)
    one = state if expected == 1 else one
    assert state.step == expected and np.isfinite(m["loss"]) and m["tokens"] > 0
    assert m["grad_norm"] > 0
    positions.append(run.batcher.state)
  assert positions[0] != positions[1] != positions[2]  # each step draws the next batch

  # The state and the data position determine the step, bit for bit.
  run.batcher.state = positions[1]
  again, _ = trainer.train_step(run, one)
  _assert_same(again.trainable, state.trainable)
  _assert_same(again.opt_state, state.opt_state)
  _assert_same(jax.random.key_data(again.rng), jax.random.key_data(state.rng))


def test_checkpoint_restore_then_step_matches(pieces):
  run, start = pieces
  state, _ = trainer.train_step(run, start)
  assert trainer.save_checkpoint(run, state, force=True)  # step 1 is not on train.save_every
  run.metrics.write({"step": 1, "loss": 1.0})
  run.metrics.write({"step": 2, "loss": 1.0})  # a record past the checkpoint: dropped on resume
  run.ckpt.wait()
  after, _ = trainer.train_step(run, state)

  resumed = trainer.restore(run, start)  # onto the shardings of a fresh state
  assert resumed.step == 1
  _assert_same(resumed.trainable, state.trainable)
  _assert_same(resumed.opt_state, state.opt_state)
  assert [r["step"] for r in reporting.read(os.path.join(run.out, "metrics.jsonl"))] == [1]
  again, _ = trainer.train_step(run, resumed)  # the data position was restored too
  _assert_same(again.trainable, after.trainable)


def test_a_nan_loss_raises_and_leaves_the_state(pieces):
  run, state = pieces
  nan_step = lambda t, o, f, b, k: (t, o, {"loss": jnp.nan, "tokens": 1.0, "grad_norm": 0.0})
  with pytest.raises(trainer.TrainingDiverged, match=r"loss became nan at step 1"):
    trainer.train_step(dataclasses.replace(run, step_fn=nan_step), state)
  assert state.step == 0


def test_evaluator_and_its_records(pieces):
  run, state = pieces
  loss = run.evaluator(state.trainable, run.frozen)
  assert 0 < loss < 20
  assert run.evaluator.record(0, loss) == {"step": 0, "eval_loss": loss}

  # A bank's loss is the mean over its adapters'; the record names each.
  bank = trainer.Evaluator(lambda t, f, b: {"a": 1.0, "b": 3.0}, batches=[{}], bank=True)
  assert bank(None, None) == 2.0
  assert bank.record(5, 2.0) == {"step": 5, "eval_loss": 2.0, "eval_loss/a": 1.0,
                                 "eval_loss/b": 3.0}
  assert not trainer.Evaluator(None, batches=[])


def test_throughput_leaves_out_the_first_step():
  speed = trainer.Throughput()
  assert speed.update(500.0, now=30.0) == 0.0  # compiling
  assert speed.update(100.0, now=31.0) == 100.0
  assert speed.update(300.0, now=33.0) == 400.0 / 3
  assert speed.tokens == 900.0


def test_export_and_load_run(pieces):
  run, state = pieces
  state, _ = trainer.train_step(run, state)
  assert trainer.export(run, state.trainable) == os.path.join(run.out, "adapter")
  assert os.path.isfile(os.path.join(run.out, "adapter_peft", "adapter_config.json"))

  loaded = trainer.load_run(run.out)
  assert isinstance(loaded, trainer.RunArtifacts)
  assert loaded.cfg.train.steps == 3 and loaded.tokenizer is not None
  _assert_same(jaxlora.adapter(loaded.tree),
               jaxlora.adapter(jaxlora.combine(state.trainable, run.frozen)))
  with pytest.warns(DeprecationWarning, match="unpacking load_run"):
    cfg, model, tok, params, tree = loaded  # the old 5-tuple, for one release
  assert cfg is loaded.cfg and tree is loaded.tree and params is loaded.params


# --- progress on a terminal and elsewhere ----------------------------------------------------


class _Clock:
  def __init__(self):
    self.now = 0.0

  def __call__(self):
    return self.now


def test_progress_prints_plain_lines_when_not_a_terminal():
  out, clock = io.StringIO(), _Clock()
  bar = reporting.Progress(100, 0, stream=out, every=10, interval=30.0, clock=clock)
  clock.now = 20.0  # the first step compiles
  bar.update(1, 3.0, 0.0)
  for step in range(2, 31):  # one second a step
    clock.now += 1.0
    bar.update(step, 3.0 - step / 100, 2000.0)
  for step in range(31, 34):  # slow steps: a line once 30 s passed since the last (step 30)
    clock.now += 12.0
    bar.update(step, 2.5, 500.0)
  clock.now += 1.0
  bar.update(100, 2.0, 1000.0)  # the last step always gets a line
  bar.close()
  text = out.getvalue()
  assert "\r" not in text
  lines = text.splitlines()
  assert [int(l.split()[1].split("/")[0]) for l in lines] == [10, 20, 30, 33, 100]
  # step 10: 9 steps in 9 s since step 1, 90 to go
  assert lines[0] == ("step 10/100 (10%), loss 2.9000, 2,000 tok/s, elapsed 0:00:29, "
                      "ETA 0:01:30")
  assert lines[3].startswith("step 33/100 (33%), loss 2.5000, 500 tok/s, elapsed 0:01:25, ")
  assert lines[4].endswith("ETA 0:00:00")


def test_progress_resumed_and_disabled():
  out, clock = io.StringIO(), _Clock()
  bar = reporting.Progress(20, 10, stream=out, every=5, clock=clock)
  for step in range(11, 21):
    clock.now += 2.0
    bar.update(step, 1.0, 10.0)
  assert [l.split(",")[0] for l in out.getvalue().splitlines()] == ["step 15/20 (75%)",
                                                                     "step 20/20 (100%)"]
  quiet = io.StringIO()
  bar = reporting.Progress(20, 0, enabled=False, stream=quiet, every=1)
  bar.update(1, 1.0, 1.0)
  assert quiet.getvalue() == ""


def test_progress_on_a_terminal_is_a_bar():
  class Tty(io.StringIO):
    def isatty(self):
      return True

  out = Tty()
  bar = reporting.Progress(10, 0, stream=out, every=1)
  bar.update(5, 1.0, 100.0)
  bar.close()
  assert "\r" in out.getvalue() and "loss 1.0000" in out.getvalue()


def test_train_logs_plain_progress_lines_when_stderr_is_not_a_terminal(
    model_dir, data_dir, tmp_path, capsys, monkeypatch):
  cfg = _cfg(model_dir, data_dir, tmp_path / "r", "train.steps=5", "train.log_every=2")
  installed = []
  original = signal.signal
  monkeypatch.setattr(signal, "signal", lambda *a: installed.append(a) or original(*a))
  result = trainer.train(cfg, progress=True, log=lambda s: None)
  assert result["steps"] == 5
  assert not installed  # without handle_signals, train leaves the signal handlers alone
  err = capsys.readouterr().err
  assert "\r" not in err
  lines = [l for l in err.splitlines() if l.startswith("step ")]
  assert [l.split(",")[0] for l in lines] == ["step 2/5 (40%)", "step 4/5 (80%)",
                                              "step 5/5 (100%)"]
  assert all(" tok/s, " in l and "ETA " in l for l in lines)


# --- stop signals ------------------------------------------------------------------------------


def test_stop_signals_set_a_flag_and_restore_the_handlers():
  before = {s: signal.getsignal(s) for s in preemption.StopSignals.SIGNALS}
  with preemption.StopSignals() as stops:
    assert not stops.requested()
    os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C: no KeyboardInterrupt, a flag
    assert stops.requested() and stops.signal_name == "SIGINT"
    with pytest.raises(KeyboardInterrupt):  # twice: the previous handler's way, at once
      os.kill(os.getpid(), signal.SIGINT)
  assert {s: signal.getsignal(s) for s in preemption.StopSignals.SIGNALS} == before
