"""Stopping `jaxlora train` cleanly on SIGTERM or SIGINT (a preemption notice, Ctrl-C).

A Spot TPU VM or a SLURM job gets SIGTERM some seconds before it is killed. The
handler only records the signal; the training loop asks `StopSignals.requested`
after each step, and on True checkpoints that step and raises
`TrainingPreempted`. The command then exits with `EXIT_CODE`, which
tpu_scripts/babysit.sh treats as "rerun the same command" (it resumes).
"""

from __future__ import annotations

import signal
import threading
from typing import Any

import jax
import numpy as np

# EX_TEMPFAIL of sysexits.h: a temporary failure, the same command may be run again.
EXIT_CODE = 75


class TrainingPreempted(Exception):
  """Training stopped on a signal after checkpointing the step it had finished.

  Attributes:
    step: the step of the checkpoint written (rerunning resumes from it).
    signal_name: the signal that asked to stop, e.g. ``"SIGTERM"``.
  """

  exit_code = EXIT_CODE

  def __init__(self, message: str, *, step: int, signal_name: str):
    super().__init__(message)
    self.step = step
    self.signal_name = signal_name


class StopSignals:
  """Turns SIGTERM and SIGINT into a flag that the training loop reads between steps.

  A context manager: entering installs the handlers (in the main thread only,
  where Python can install them; elsewhere it does nothing), leaving restores
  the previous ones. A second signal of a kind already received falls back to
  the previous handler (Ctrl-C twice interrupts at once).

  >>> import os, signal
  >>> with StopSignals() as stops:
  ...   os.kill(os.getpid(), signal.SIGTERM)
  ...   stops.requested(), stops.signal_name
  (True, 'SIGTERM')
  >>> signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
  True
  """

  SIGNALS = (signal.SIGTERM, signal.SIGINT)

  def __init__(self):
    self.received: int | None = None
    self._previous: dict[int, Any] = {}

  @property
  def signal_name(self) -> str | None:
    return None if self.received is None else signal.Signals(self.received).name

  def __enter__(self) -> StopSignals:
    if threading.current_thread() is threading.main_thread():
      for sig in self.SIGNALS:
        self._previous[sig] = signal.signal(sig, self._handle)
    return self

  def __exit__(self, *exc) -> None:
    self._restore()

  def _restore(self) -> None:
    for sig, previous in self._previous.items():
      # None: a handler installed outside Python, which Python cannot put back.
      signal.signal(sig, signal.SIG_DFL if previous is None else previous)
    self._previous.clear()

  def _handle(self, signum: int, frame: Any) -> None:
    if self.received is None:
      self.received = signum
      return
    # Asked again: do at once what the signal would have done without us.
    previous = self._previous.get(signum, signal.SIG_DFL)
    self._restore()
    if callable(previous):
      previous(signum, frame)
    elif previous != signal.SIG_IGN:
      signal.raise_signal(signum)

  def requested(self) -> bool:
    """Whether to stop after the current step.

    On multi-process runs this is collective and every process gets the same
    answer: every process must call it after the same steps. A signal that
    reached any process stops all of them at the same step, so they write one
    checkpoint together.
    """
    stop = self.received is not None
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
      stop = bool(np.any(multihost_utils.process_allgather(np.int32(stop))))
    return stop
