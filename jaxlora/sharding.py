"""Shardings for adapter leaves that follow their kernel's sharding."""

from __future__ import annotations

from typing import Any

import jax
from jax.sharding import NamedSharding, PartitionSpec

from jaxlora import _tree
from jaxlora import kernel_layout as layout_lib
from jaxlora._tree import A_KEY, B_KEY, KERNEL_KEY, SCALE_KEY


def _spec_for(kernel_spec: tuple, roles: tuple[str, ...], which: str) -> PartitionSpec:
  spec = tuple(kernel_spec) + (None,) * (len(roles) - len(kernel_spec))
  shared = [s for s, r in zip(spec, roles) if r in (layout_lib.STACK, layout_lib.BATCH)]
  if which == A_KEY:
    return PartitionSpec(*shared, *[s for s, r in zip(spec, roles) if r == layout_lib.IN], None)
  if which == B_KEY:
    return PartitionSpec(*shared, None, *[s for s, r in zip(spec, roles) if r == layout_lib.OUT])
  return PartitionSpec(*[s for s, r in zip(spec, roles) if r == layout_lib.STACK])


def adapter_shardings(tree: Any) -> Any:
  """Shardings for the adapter leaves of a wrapped tree, derived from each kernel's.

  ``lora_a`` takes the kernel's stacked and input-axis shardings plus an
  unsharded rank axis; ``lora_b`` an unsharded rank axis plus the output-axis
  shardings; ``lora_scale`` the stacked axes'. Kernels that are not
  `NamedSharding`-sharded give their own sharding (e.g. one device) to the
  adapter. Works on abstract trees whose kernels carry a ``sharding``.

  Args:
    tree: a wrapped tree (arrays or ShapeDtypeStructs with shardings).

  Returns:
    A tree like `jaxlora.adapter(tree)` holding shardings.

  >>> import jax, jax.numpy as jnp, numpy as np, jaxlora
  >>> from jax.sharding import NamedSharding, PartitionSpec as P
  >>> mesh = jax.make_mesh((jax.device_count(),), ("fsdp",),
  ...                      axis_types=(jax.sharding.AxisType.Auto,))
  >>> kernel = jax.device_put(jnp.ones((8, 4)), NamedSharding(mesh, P("fsdp", None)))
  >>> tree = jaxlora.wrap({"d": {"kernel": kernel}}, rank=2, key=jax.random.key(0))
  >>> adapter_shardings(tree)["d"]["lora_a"].spec == P("fsdp", None)
  True
  """
  p = _tree.get_params(tree)
  new = {}
  for path_t, mod in _tree.adapter_modules(p):
    kernel = mod[KERNEL_KEY]
    sharding = getattr(kernel, "sharding", None)
    scale_ndim = len(getattr(mod[SCALE_KEY], "shape", ()))
    roles = layout_lib.roles_from_shapes(_tree.join(path_t), kernel.shape, mod[A_KEY].shape,
                                         mod[B_KEY].shape, scale_ndim)
    out = {}
    for k in _tree.ADAPTER_KEYS:
      if isinstance(sharding, NamedSharding):
        out[k] = NamedSharding(sharding.mesh, _spec_for(sharding.spec, roles, k))
      else:
        out[k] = sharding
    new[path_t] = out
  adapter_only = _tree.filter_tree(p, lambda k: k in _tree.ADAPTER_KEYS, prune=True)
  result = _tree.replace_modules(adapter_only, new)
  return _tree.with_params(tree, result) if _tree.is_variables(tree) else result
