"""Describes the machine a benchmark ran on (shared by the benchmark scripts)."""

import os
import platform


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
