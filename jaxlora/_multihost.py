"""What writers need in multi-process runs: host copies, one writer, barriers.

Every function is a no-op beyond the single-process case when
``jax.process_count() == 1``. The collective ones must be called by every
process in the same order.
"""

from __future__ import annotations

import secrets
from typing import Any

import jax
import numpy as np


def is_writer() -> bool:
  """Process 0 writes shared files (records, exports); the others only take part in collectives."""
  return jax.process_index() == 0


def host_value(x: Any) -> np.ndarray:
  """The whole value of `x` as a NumPy array (collective if `x` spans several processes)."""
  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    if x.is_fully_replicated:
      return np.asarray(x.addressable_data(0))
    from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
  return np.asarray(jax.device_get(x))


def barrier(name: str) -> None:
  """Waits until every process has reached the barrier called `name`."""
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
    multihost_utils.sync_global_devices(name)


def shared_token() -> str:
  """A random hex token that every process agrees on (process 0 draws it)."""
  token = np.frombuffer(secrets.token_bytes(8), np.uint32)
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
    token = np.asarray(multihost_utils.broadcast_one_to_all(token))
  return "".join(f"{int(v):08x}" for v in token)
