"""How `jaxlora.wrap` initialises A and B (and, for some schemes, the base kernel)."""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp

from jaxlora import kernel_layout as layout_lib
from jaxlora.errors import InputError

INITS = ("kaiming", "gaussian")


def check(init: Any) -> None:
  """Raises an `InputError` naming the choices when `init` is not a known scheme.

  >>> check("kaiming")
  """
  if init not in INITS:
    raise InputError(f"`init` must be one of {list(INITS)}, got {init!r}.")


def factors(init: str, key: jax.Array, path: str, kernel: Any, roles: tuple[str, ...],
            rank: int, scale: float, dtype: Any) -> tuple[Any, jax.Array, jax.Array]:
  """``(kernel, A, B)`` for one kernel; `kernel` comes back unchanged unless the scheme
  moves part of it into the factors.

  >>> k, a, b = factors("kaiming", jax.random.key(0), "d", jnp.ones((4, 3)),
  ...                   ("in", "out"), 2, 1.0, jnp.float32)
  >>> a.shape, b.shape, float(abs(b).max())
  ((4, 2), (2, 3), 0.0)
  """
  shape = tuple(kernel.shape)
  a_shape, b_shape, _ = layout_lib.adapter_shapes(shape, roles, rank)
  if init == "kaiming":  # PEFT's default: A ~ U(-1/sqrt(fan_in), 1/sqrt(fan_in))
    bound = 1.0 / math.sqrt(layout_lib.fan_in(shape, roles))
    lora_a = jax.random.uniform(key, a_shape, dtype, -bound, bound)
  else:  # 'gaussian', as PEFT: A ~ N(0, 1/r)
    lora_a = jax.random.normal(key, a_shape, dtype) / rank
  return kernel, lora_a, jnp.zeros(b_shape, dtype)
