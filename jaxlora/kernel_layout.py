"""Which kernel axes are inputs, outputs or stacked, found by tracing the model once."""

from __future__ import annotations

import dataclasses
import itertools
import math
import re
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxlora import _tree
from jaxlora import experts
from jaxlora.errors import InputError, InputTypeError

# Roles of a kernel axis. 'stack': added by a lifted transform such as `nn.scan`
# (one slice per layer). 'batch': an einsum letter shared by input, kernel and
# output (e.g. per-head weights). Both are kept on A and B; the rank axis sits
# between the input and output axes.
STACK, BATCH, IN, OUT = "stack", "batch", "in", "out"

DENSE, DENSE_GENERAL, EINSUM = "Dense", "DenseGeneral", "Einsum"
EXPERT_DENSE = "ExpertDense"

_HEAD_NAME = re.compile(r"(^|/)(lm_head|head|logits|output_head|classifier|score)$")


def is_head(path: str) -> bool:
  """Whether a module path names an output head by its name, as ``'all-linear'`` reads it.

  A traced `Layout` also marks modules whose output is the model's output; this is the name
  rule alone, for layers known by path only.

  >>> is_head("lm_head"), is_head("model/score"), is_head("layers_0/attn/head_proj")
  (True, True, False)
  """
  return bool(_HEAD_NAME.search(path))


@dataclasses.dataclass(frozen=True)
class KernelLayout:
  """How one kernel is used: the layer kind and the role of each kernel axis."""
  kind: str
  roles: tuple[str, ...]
  is_head: bool = False

  @property
  def n_stack(self) -> int:
    return sum(r == STACK for r in self.roles)


@dataclasses.dataclass(frozen=True)
class Layout:
  """Per-module kernel layouts keyed by '/'-joined module path, as `trace_layout` records them.

  Pass one to ``jaxlora.wrap(..., layout=...)`` and ``jaxlora.quantize``.

  >>> import jax, jax.numpy as jnp, flax.linen as nn, jaxlora
  >>> model = nn.Dense(2)
  >>> lay = jaxlora.trace_layout(model.apply, model.init(jax.random.key(0), jnp.ones((1, 3))),
  ...                            jnp.ones((1, 3)))
  >>> lay[""].roles, len(lay)
  (('in', 'out'), 1)
  """
  kernels: Mapping[str, KernelLayout]
  # Stacked (e.g. `nn.scan`) leading axes of every module that owns params, by path.
  stacks: Mapping[str, int] = dataclasses.field(default_factory=dict, compare=False)

  def stack_depth(self, path: str) -> int:
    """How many leading stacked axes the leaves of the module at `path` have.

    A module the trace did not see directly takes the depth of a module below
    it (a container of layers inside a scan), else 0.

    >>> lay = Layout({"layers/mlp/up": KernelLayout("Dense", ("stack", "in", "out"))},
    ...              {"layers/norm": 1, "norm": 0})
    >>> lay.stack_depth("layers/norm"), lay.stack_depth("layers/mlp"), lay.stack_depth("head")
    (1, 1, 0)
    """
    if path in self.stacks:
      return self.stacks[path]
    for p in (self.stacks, {k: v.n_stack for k, v in self.kernels.items()}):
      below = [d for k, d in p.items() if k.startswith(path + "/") or not path]
      if below:
        return min(below)
    return 0

  def __getitem__(self, path: str) -> KernelLayout:
    return self.kernels[path]

  def __contains__(self, path: object) -> bool:
    return path in self.kernels

  def __len__(self) -> int:
    return len(self.kernels)

  def __repr__(self) -> str:
    body = ", ".join(f"{p!r}: {k.kind}{k.roles}" for p, k in sorted(self.kernels.items()))
    return f"Layout({{{body}}})"


def einsum_parts(einsum_str: str) -> tuple[str, str, str]:
  """Splits 'lhs,kernel->out' into its three subscripts (spaces removed)."""
  s = einsum_str.replace(" ", "")
  lhs, rest = s.split(",")
  rhs, out = rest.split("->")
  return lhs, rhs, out


def einsum_roles(einsum_str: str) -> tuple[str, ...]:
  """Roles of the kernel axes of an `nn.Einsum` equation."""
  lhs, rhs, out = einsum_parts(einsum_str)
  if "." in rhs:
    raise InputError(
        f"nn.Einsum equation {einsum_str!r} has an ellipsis in the kernel operand; "
        "LoRA needs every kernel axis named. Rewrite the equation with letters.")
  roles = []
  for c in rhs:
    if c in lhs and c in out:
      roles.append(BATCH)
    elif c in lhs:
      roles.append(IN)
    elif c in out:
      roles.append(OUT)
    else:
      raise InputError(
          f"nn.Einsum equation {einsum_str!r}: kernel axis {c!r} appears in neither the "
          "input nor the output, so it is neither an input nor an output axis of the "
          "layer. Exclude this layer from `targets`.")
  return tuple(roles)


def local_roles(module: nn.Module, args: Sequence[Any], kwargs: Mapping[str, Any]):
  """Kernel axis roles for a Dense-like module call, or None if unsupported."""
  if isinstance(module, nn.Dense):
    return DENSE, (IN, OUT)
  if isinstance(module, nn.DenseGeneral):
    if module.batch_dims:
      return None  # kernels with batch_dims are not supported (yet)
    axis = module.axis if isinstance(module.axis, Sequence) else (module.axis,)
    feats = module.features if isinstance(module.features, Sequence) else (module.features,)
    return DENSE_GENERAL, (IN,) * len(axis) + (OUT,) * len(feats)
  if isinstance(module, nn.Einsum):
    eq = kwargs.get("einsum_str", args[1] if len(args) > 1 else None) or module.einsum_str
    if eq is None:  # flax's own call raises: the equation must be given somewhere
      return None
    return EINSUM, einsum_roles(eq)
  if isinstance(module, experts.ExpertDense):
    # The expert axis is shared like an einsum batch axis: one A and B per expert.
    return EXPERT_DENSE, (BATCH, IN, OUT)
  return None


def trace_layout(apply_fn: Callable[..., Any], variables: Mapping, *args: Any,
                 **kwargs: Any) -> Layout:
  """Traces `apply_fn` abstractly once and records how each kernel is used.

  Nothing is computed: the model runs under `jax.eval_shape`, so `variables`
  and the example inputs may be `jax.ShapeDtypeStruct`s. For every
  `nn.Dense`, `nn.DenseGeneral` and `nn.Einsum` call the layout records, per
  kernel axis, whether it is an input, output, einsum-batch or stacked (e.g.
  `nn.scan` layer) axis, and whether the layer produces the model's output
  (the head, which the `'all-linear'` preset leaves out).

  Args:
    apply_fn: usually `model.apply`.
    variables: the variables `apply_fn` takes, e.g. `{'params': params}`.
    *args: example inputs, as for `apply_fn` (arrays or ShapeDtypeStructs).
    **kwargs: passed to `apply_fn` unchanged (e.g. `method=`, `train=False`).

  Returns:
    A `Layout` to pass as `jaxlora.wrap(..., layout=...)`.

  Raises:
    ValueError: if a kernel's stored shape does not extend the shape the layer
      uses by leading stacked axes.

  >>> import jax, jax.numpy as jnp, flax.linen as nn, jaxlora
  >>> model = nn.DenseGeneral(features=(2, 3), axis=-1)
  >>> x = jnp.ones((1, 4))
  >>> params = model.init(jax.random.key(0), x)
  >>> jaxlora.trace_layout(model.apply, params, x)
  Layout({'': DenseGeneral('in', 'out', 'out')})
  """
  if not isinstance(variables, Mapping):
    raise InputTypeError(f"`variables` must be a dict such as {{'params': params}}, got "
                         f"{type(variables).__name__}.")
  from jaxlora import quantization  # pylint: disable=import-outside-toplevel
  # Quantized kernels are traced as the float kernels they stand for.
  variables = jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype) if quantization.is_quantized(x) else x,
      variables, is_leaf=quantization.is_quantized)
  seen: dict[str, tuple[str, tuple[str, ...], tuple[int, ...]]] = {}
  owners: dict[str, dict[str, tuple[int, ...]]] = {}  # module path -> its own leaves' shapes
  outputs: dict[str, list[Any]] = {}

  def interceptor(next_fun, a, kw, context):
    out = next_fun(*a, **kw)
    module = context.module
    own = module.variables.get("params", {}) if module.scope is not None else {}
    local = {k: tuple(np.shape(v)) for k, v in own.items() if not isinstance(v, Mapping)}
    if local:
      owners[_tree.join(module.path)] = local
    if context.method_name == "__call__" and module.has_variable("params", _tree.KERNEL_KEY):
      found = local_roles(module, a, kw)
      if found is not None:
        path = _tree.join(module.path)
        kernel = module.get_variable("params", _tree.KERNEL_KEY)
        seen[path] = (found[0], found[1], tuple(np.shape(kernel)))
        outputs.setdefault(path, []).append(out)
    return out

  leaves, treedef = jax.tree.flatten(args)
  is_arr = [hasattr(x, "shape") and hasattr(x, "dtype") for x in leaves]

  def run(v, arrays):
    it = iter(arrays)
    full = [next(it) if a else x for x, a in zip(leaves, is_arr)]
    with nn.intercept_methods(interceptor):
      result = apply_fn(v, *jax.tree.unflatten(treedef, full), **kwargs)
    # Layers whose result is returned as is: the output head.
    out_ids = {id(x) for x in jax.tree.leaves(result)}
    heads = {p for p, outs in outputs.items() if any(id(o) in out_ids for o in outs)}
    seen_heads.update(heads)
    return result

  seen_heads: set[str] = set()
  jax.eval_shape(run, variables, [x for x, a in zip(leaves, is_arr) if a])

  params = _tree.get_params(variables)
  kernels = {}
  for path, (kind, roles, local_shape) in seen.items():
    node = _tree.lookup(params, tuple(path.split("/")) if path else ())
    full_shape = tuple(np.shape(node[_tree.KERNEL_KEY]))
    n_stack = len(full_shape) - len(local_shape)
    if n_stack < 0 or full_shape[n_stack:] != local_shape:
      raise InputError(
          f"Kernel '{path}/kernel' is stored with shape {full_shape} but the layer uses "
          f"{local_shape}; jaxlora supports stacked layers (nn.scan, nn.vmap) only with "
          "the stacked axes leading (variable_axes={'params': 0}).")
    is_head = path in seen_heads or bool(_HEAD_NAME.search(path))
    kernels[path] = KernelLayout(kind, (STACK,) * n_stack + roles, is_head)
  stacks = {}
  for path, local in owners.items():
    node = _tree.lookup(params, tuple(path.split("/")) if path else (), None)
    if isinstance(node, Mapping):
      name, shape = next(iter(local.items()))
      full = tuple(np.shape(node[name])) if name in node else shape
      stacks[path] = max(len(full) - len(shape), 0)
  return Layout(kernels, stacks)


def layout(apply_fn: Callable[..., Any], variables: Mapping, *args: Any,
           **kwargs: Any) -> Layout:
  """Deprecated name of `trace_layout` (removed in the next release).

  >>> import warnings, jax, jax.numpy as jnp, flax.linen as nn, jaxlora
  >>> model = nn.Dense(2)
  >>> x = jnp.ones((1, 4))
  >>> params = model.init(jax.random.key(0), x)
  >>> with warnings.catch_warnings(record=True) as caught:
  ...   warnings.simplefilter("always")
  ...   lay = jaxlora.layout(model.apply, params, x)
  >>> caught[0].category.__name__, lay == jaxlora.trace_layout(model.apply, params, x)
  ('DeprecationWarning', True)
  """
  warnings.warn("jaxlora.layout is deprecated; call jaxlora.trace_layout (same arguments).",
                DeprecationWarning, stacklevel=2)
  return trace_layout(apply_fn, variables, *args, **kwargs)


def adapter_shapes(kernel_shape: Sequence[int], roles: Sequence[str],
                   rank: int) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
  """Shapes of A, B and the scale for a kernel with the given axis roles."""
  shared = tuple(d for d, r in zip(kernel_shape, roles) if r in (STACK, BATCH))
  ins = tuple(d for d, r in zip(kernel_shape, roles) if r == IN)
  outs = tuple(d for d, r in zip(kernel_shape, roles) if r == OUT)
  stack = tuple(d for d, r in zip(kernel_shape, roles) if r == STACK)
  return shared + ins + (rank,), shared + (rank,) + outs, stack


def _consistent(kernel_shape, a_shape, b_shape, roles) -> bool:
  r = a_shape[-1]
  a, b, _ = adapter_shapes(kernel_shape, roles, r)
  return a == tuple(a_shape) and b == tuple(b_shape)


def _canonical(kernel_shape, a_shape, b_shape, n_stack) -> tuple[str, ...] | None:
  """Roles [stack, batch..., in..., out...] implied by the shapes, if they fit."""
  n_shared = len(a_shape) + len(b_shape) - 2 - len(kernel_shape)
  n_in = len(a_shape) - 1 - n_shared
  n_out = len(b_shape) - 1 - n_shared
  if min(n_shared - n_stack, n_in, n_out) < 0:
    return None
  roles = (STACK,) * n_stack + (BATCH,) * (n_shared - n_stack) + (IN,) * n_in + (OUT,) * n_out
  return roles if _consistent(kernel_shape, a_shape, b_shape, roles) else None


def infer_roles(kernel_shape, a_shape, b_shape, n_stack: int) -> list[tuple[str, ...]]:
  """All axis-role assignments consistent with the shapes of a kernel and its A, B.

  The canonical order (stacked, batch, input then output axes) is tried first:
  every Dense and DenseGeneral kernel and most einsum kernels use it. `wrap`
  refuses a kernel whose roles could not be recovered this way, so that merge
  and export need nothing but the tree.
  """
  kernel_shape, a_shape, b_shape = tuple(kernel_shape), tuple(a_shape), tuple(b_shape)
  canon = _canonical(kernel_shape, a_shape, b_shape, n_stack)
  if canon is not None:
    return [canon]
  n_shared = len(a_shape) + len(b_shape) - 2 - len(kernel_shape)
  n_in = len(a_shape) - 1 - n_shared
  n_out = len(b_shape) - 1 - n_shared
  if min(n_shared - n_stack, n_in, n_out) < 0:
    return []
  found = []
  base = (BATCH,) * (n_shared - n_stack) + (IN,) * n_in + (OUT,) * n_out
  for perm in sorted(set(itertools.permutations(base))):
    roles = (STACK,) * n_stack + perm
    if len(roles) == len(kernel_shape) and _consistent(kernel_shape, a_shape, b_shape, roles):
      found.append(roles)
  return found


def roles_from_shapes(path: str, kernel_shape, a_shape, b_shape, n_stack: int) -> tuple[str, ...]:
  """The unique role assignment for an adapted kernel, or a ValueError."""
  found = infer_roles(kernel_shape, a_shape, b_shape, n_stack)
  if len(found) != 1:
    raise InputError(
        f"Adapter at '{path}' does not fit its kernel: kernel {tuple(kernel_shape)}, "
        f"lora_a {tuple(a_shape)}, lora_b {tuple(b_shape)}. Expected lora_a = "
        "(*stacked, *input axes, rank) and lora_b = (*stacked, rank, *output axes); "
        "was the adapter made for another model?")
  return found[0]


def fan_in(kernel_shape, roles) -> int:
  return math.prod(d for d, r in zip(kernel_shape, roles) if r == IN)


def as_matrices(w: Any, roles: Sequence[str]) -> tuple[Any, Callable[[Any], Any]]:
  """A kernel as ``(slices, n_in, n_out)`` matrices (one per stacked/batch slice), and the
  function that undoes it.

  >>> m, back = as_matrices(np.zeros((3, 4, 5)), ("stack", "in", "out"))
  >>> m.shape, back(m).shape
  ((3, 4, 5), (3, 4, 5))
  """
  shape = tuple(w.shape)
  shared = [i for i, r in enumerate(roles) if r in (STACK, BATCH)]
  ins = [i for i, r in enumerate(roles) if r == IN]
  outs = [i for i, r in enumerate(roles) if r == OUT]
  perm = shared + ins + outs
  n_in = math.prod(shape[i] for i in ins)
  n_out = math.prod(shape[i] for i in outs)
  m = jnp.transpose(w, perm).reshape((-1, n_in, n_out))
  permuted = tuple(shape[i] for i in perm)
  inverse = tuple(int(i) for i in np.argsort(perm))

  def back(mats: jax.Array) -> jax.Array:
    return jnp.transpose(mats.reshape(permuted), inverse)

  return m, back
