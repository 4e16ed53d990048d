"""Describes the machine a benchmark ran on (shared by the benchmark scripts)."""

import os
import platform
import time


def cpu_model() -> str:
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("model name"):
          return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or "unknown CPU"


def ram_gib() -> float:
  try:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
  except (ValueError, OSError, AttributeError):
    return float("nan")


def alternate(timers: dict, reps: int, log=print) -> dict:
  """Calls each timer `reps` times, rotating the order every round so that no variant always
  runs after the same one; returns ``{name: [seconds, ...]}`` (each timer returns seconds)."""
  times = {k: [] for k in timers}
  order = list(timers)
  for rep in range(reps):
    rot = order[rep % len(order):] + order[:rep % len(order)]
    for k in rot:
      times[k].append(timers[k]())
    log(f"  rep {rep + 1}/{reps}: " + " ".join(f"{k}={times[k][-1]:.3f}" for k in order),
        flush=True)
  return times


def flatten(tree, prefix=()) -> dict:
  """A nested dict's leaves keyed by their path tuples."""
  out = {}
  for k, v in tree.items():
    if isinstance(v, dict):
      out.update(flatten(v, prefix + (k,)))
    else:
      out[prefix + (k,)] = v
  return out


def trim_heap() -> None:
  """Returns free heap pages to the system (glibc's ``malloc_trim``); a no-op elsewhere.

  Memory children call it after compiling their step, so that their peak RSS
  measures what the step holds, not what compilation left in the heap.
  """
  import ctypes  # pylint: disable=import-outside-toplevel
  try:
    ctypes.CDLL("libc.so.6").malloc_trim(0)
  except (OSError, AttributeError):
    pass


class Runner:
  """Holds the state of one jitted training variant; `step()` runs one timed step.

  ``fn(*state, *frozen, *data) -> (*state, loss)``; `init()` gives the first state.
  """

  def __init__(self, fn, init, frozen: tuple, data: tuple):
    self.fn, self.frozen, self.data = fn, frozen, data
    self.state = init()

  def compile(self) -> None:
    """Compiles the step ahead of time (for memory children, before `trim_heap`)."""
    self.fn = self.fn.lower(*self.state, *self.frozen, *self.data).compile()

  def step(self) -> float:
    import jax  # pylint: disable=import-outside-toplevel
    t0 = time.perf_counter()
    *self.state, loss = self.fn(*self.state, *self.frozen, *self.data)
    jax.block_until_ready((self.state, loss))
    return time.perf_counter() - t0
