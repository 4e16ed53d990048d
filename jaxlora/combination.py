"""One adapter from several: the combination types of PEFT's ``add_weighted_adapter``.

The semantics follow PEFT 0.21 (``LoraModel.add_weighted_adapter`` and
``peft.utils.merge_utils``); the code is jaxlora's own. Per adapted layer (each
slice of a stacked kernel counts as one layer, as each is one module in PEFT):

* ``linear``, ``ties``, ``dare_linear``, ``dare_ties``, ``magnitude_prune``
  combine the A factors and, separately, the B factors, with
  ``sign(w*s) * sqrt(|w*s|)`` on A and ``sqrt(|w*s|)`` on B (``w`` the weight,
  ``s`` the adapter's scale). All adapters need the same rank on a layer.
* ``cat`` stacks the factors along the rank axis (``w*s`` on A): rank is the
  sum of the ranks and the product is exactly ``sum_i w_i * delta_i``.
* ``svd``, ``ties_svd``, ``dare_linear_svd``, ``dare_ties_svd``,
  ``magnitude_prune_svd`` combine the products ``delta_i = s_i * A_i @ B_i``
  with the weights ``w_i``, then truncate the combination's SVD to ``svd_rank``
  (default: the largest rank among the adapters), optionally clamping the
  factors at a quantile.

The pruning rules: ``magnitude`` keeps the ``int(density * n)`` entries of
largest magnitude of each tensor; ``dare`` keeps each entry with probability
``density`` and divides the survivors by ``density``. ``ties`` elects a sign
per entry from the pruned, unweighted tensors (``'total'``: sign of their sum;
``'frequency'``: the more frequent sign) and averages the weighted entries that
agree with it.

Where jaxlora departs from PEFT on purpose: PEFT's new adapter inherits the first
adapter's ``use_rslora``, which multiplies an rsLoRA combination by ``sqrt(r)``
(jaxlora's scale is always 1); PEFT leaves each singular pair's sign to the SVD
routine, which changes ``svd_clamp``'s quantile of the signed entries (jaxlora
makes the largest entry of each left vector positive); an ``svd_rank`` beyond a
kernel's smallest side breaks PEFT's shapes (jaxlora keeps that side, exactly);
PEFT takes the union of the adapters' layers, jaxlora wants the same layers.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import numbers
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxlora import _tree
from jaxlora import dora
from jaxlora import extras
from jaxlora import kernel_layout as layout_lib
from jaxlora import tokens
from jaxlora._tree import A_KEY, B_KEY, KERNEL_KEY, SCALE_KEY
from jaxlora.errors import InputError, InputTypeError

PyTree = Any

METHODS = ("linear", "cat", "svd", "ties", "ties_svd", "dare_linear", "dare_ties",
           "dare_linear_svd", "dare_ties_svd", "magnitude_prune", "magnitude_prune_svd")
_SVD = frozenset(m for m in METHODS if m.endswith("svd"))
_DENSITY = frozenset(m for m in METHODS if m not in ("linear", "cat", "svd"))
_SIGN = frozenset(("ties", "ties_svd", "dare_ties", "dare_ties_svd"))
_RANDOM = frozenset(m for m in METHODS if m.startswith("dare"))
_SAME_RANK = frozenset(("linear", "ties", "dare_linear", "dare_ties", "magnitude_prune"))
DELTA_KEY = "delta"  # mask key for the product of an `_svd` DARE method


def merge_adapters(trees: Mapping[str, PyTree] | Sequence[PyTree], weights: Sequence[float], *,
                   method: str = "linear", density: float | None = None,
                   majority_sign_method: str = "total", svd_rank: int | None = None,
                   svd_clamp: float | None = None, svd_full_matrices: bool = True,
                   key: jax.Array | None = None,
                   masks: Mapping[str, PyTree] | Sequence[PyTree] | None = None) -> PyTree:
  """Combines several adapters of one base into a new adapter, as PEFT's ``add_weighted_adapter``.

  ``method`` takes PEFT's ``combination_type`` names and semantics (see the
  module docstring). The new adapter carries the weights and scales in its
  factors, so its ``lora_scale`` is 1 (PEFT writes ``lora_alpha = r``); saved
  with `jaxlora.peft.save` it loads in PEFT with the same effect. As in PEFT a
  single adapter is always combined ``linear``ly (``sqrt(|w*s|)`` on both
  factors, no pruning), whatever ``method`` says.

  Args:
    trees: wrapped trees (params or variables) of the same base with the same
      adapted layers, as a list or a ``{name: tree}`` dict (names appear in
      errors). The result keeps the first tree's base; the others may be
      adapter-only trees (`jaxlora.adapter`).
    weights: one float per tree (negative weights subtract); the order of
      ``trees``.
    method: one of ``linear``, ``cat``, ``svd``, ``ties``, ``ties_svd``,
      ``dare_linear``, ``dare_ties``, ``dare_linear_svd``, ``dare_ties_svd``,
      ``magnitude_prune``, ``magnitude_prune_svd``.
    density: fraction of entries kept, in ``(0, 1]``; required by the ``ties``,
      ``dare`` and ``magnitude_prune`` methods (1 keeps everything).
    majority_sign_method: ``'total'`` or ``'frequency'``; ``ties`` methods only.
    svd_rank: rank of the result of an ``_svd``/``svd`` method (default: the
      largest adapter rank); capped per layer at the kernel's smallest side,
      where the truncation is exact.
    svd_clamp: a quantile in ``[0, 1]``: the factors of an SVD method are
      clamped to ``[-q, q]``, ``q`` that quantile of their entries (per layer).
    svd_full_matrices: compute the full SVD (PEFT's default) or the reduced one;
      the truncated result is the same.
    key: PRNG key for the random masks of the ``dare`` methods (required unless
      ``masks`` is given).
    masks: the ``dare`` masks themselves (1 keeps an entry), one tree per
      adapter in the form of ``trees``, holding at each adapted module
      ``lora_a`` and ``lora_b`` masks shaped like the factors
      (``dare_linear``, ``dare_ties``) or a ``delta`` mask shaped like the
      kernel (the ``_svd`` variants).

  Returns:
    A wrapped tree: the first tree with its adapter replaced by the combination.

  Raises:
    ValueError: an unknown method; an argument the method does not take, or a
      missing one; weights that do not match the trees; adapters of different
      layers, shapes or bases; different ranks for a method that needs equal ones.
    TypeError: ``trees`` or ``weights`` of the wrong kind (e.g. a single tree).

  >>> import jax, jax.numpy as jnp, jaxlora
  >>> base = {'dense': {'kernel': jnp.zeros((4, 3))}}
  >>> t1 = jaxlora.wrap(base, rank=2, key=jax.random.key(1))
  >>> t2 = jaxlora.wrap(base, rank=1, alpha=4.0, key=jax.random.key(2))
  >>> t1['dense']['lora_b'] = jnp.ones((2, 3)); t2['dense']['lora_b'] = -jnp.ones((1, 3))
  >>> new = jaxlora.merge_adapters({'a': t1, 'b': t2}, [0.7, 0.3], method='cat')
  >>> new['dense']['lora_a'].shape, float(new['dense']['lora_scale'])
  ((4, 3), 1.0)
  >>> delta = lambda t: t['dense']['lora_scale'] * t['dense']['lora_a'] @ t['dense']['lora_b']
  >>> bool(jnp.allclose(delta(new), 0.7 * delta(t1) + 0.3 * delta(t2), atol=1e-6))
  True
  """
  if method not in METHODS:
    raise InputError(f"Unknown method {method!r}; choose one of {', '.join(METHODS)}.")
  names, tree_list = _named(trees, "trees")
  _check_options(method, density, majority_sign_method, svd_rank, svd_clamp, svd_full_matrices,
                 key, masks)
  ws = _weights(weights, names)
  params = [_tree.get_params(t) for t in tree_list]
  # PEFT combines a single adapter linearly, whatever the combination type.
  effective = "linear" if len(names) == 1 else method
  modules = _matched_modules(names, params, same_rank=effective in _SAME_RANK)
  layers = [_Layer.of(_tree.join(path_t), mods) for path_t, mods in modules]
  given = None
  if masks is not None and effective in _RANDOM:
    mask_trees = [_tree.get_params(m) for m in _masks_like(masks, trees)]
    given = [[_given_masks(effective, i, name, layer, path_t, tree)
              for i, (name, tree) in enumerate(zip(names, mask_trees))]
             for layer, (path_t, _) in zip(layers, modules)]
  new_rank = None
  if effective in _SVD:
    new_rank = int(svd_rank or max(r for layer in layers for r in layer.ranks))
  spec = _Spec(effective, None if density is None else float(density), majority_sign_method,
               new_rank, None if svd_clamp is None else float(svd_clamp), bool(svd_full_matrices))
  draw = effective in _RANDOM and given is None
  new = {}
  for index, ((path_t, mods), layer) in enumerate(zip(modules, layers)):
    factors = [{k: m[k] for k in _tree.LORA_KEYS} for m in mods]
    a, b = _combine_layer(spec, layer, factors, jnp.asarray(ws, np.float32),
                          None if given is None else given[index],
                          jax.random.fold_in(key, index) if draw and key is not None else None)
    out = dict(mods[0])
    out[A_KEY], out[B_KEY] = a, b
    out[SCALE_KEY] = jnp.ones(layer.stack, jnp.float32)
    new[path_t] = out
  return _tree.with_params(tree_list[0], _tree.replace_modules(params[0], new))


# ---------------------------------------------------------------------------- argument checks


def _named(trees: Any, what: str) -> tuple[list[str], list[Any]]:
  """Labels (for errors) and the trees, from a list or a ``{name: tree}`` dict."""
  if isinstance(trees, Mapping):
    if (_tree.is_variables(trees) or any(k in trees for k in _tree.ADAPTER_KEYS + (KERNEL_KEY,))
        or not all(isinstance(v, Mapping) and A_KEY not in v for v in trees.values())):
      raise InputTypeError(f"`{what}` looks like a single param tree; pass several as a list "
                           f"[tree_a, tree_b] or a dict {{'a': tree_a, 'b': tree_b}}.")
    return [f"{what}[{k!r}]" for k in trees], list(trees.values())
  if isinstance(trees, (list, tuple)):
    return [f"{what}[{i}]" for i in range(len(trees))], list(trees)
  raise InputTypeError(f"`{what}` must be a list of wrapped trees or a {{name: tree}} dict, got "
                       f"{type(trees).__name__}.")


def _masks_like(masks: Any, trees: Any) -> list[Any]:
  """The mask trees in the order of `trees` (a dict keyed like it, or a list as long)."""
  if isinstance(trees, Mapping):
    if not isinstance(masks, Mapping) or set(masks) != set(trees):
      got = sorted(masks) if isinstance(masks, Mapping) else type(masks).__name__
      raise InputError(f"`masks` must be a dict with the keys of `trees` ({sorted(trees)}), "
                       f"got {got}.")
    return [masks[k] for k in trees]
  if not isinstance(masks, (list, tuple)) or len(masks) != len(trees):
    raise InputError(f"`masks` must be a list of {len(trees)} mask trees, one per tree.")
  return list(masks)


def _check_options(method, density, majority_sign_method, svd_rank, svd_clamp,
                   svd_full_matrices, key, masks) -> None:
  given = {"density": density is not None, "svd_rank": svd_rank is not None,
           "svd_clamp": svd_clamp is not None, "svd_full_matrices": svd_full_matrices is not True,
           "majority_sign_method": majority_sign_method != "total", "key": key is not None,
           "masks": masks is not None}
  takes = {"density": method in _DENSITY, "svd_rank": method in _SVD,
           "svd_clamp": method in _SVD, "svd_full_matrices": method in _SVD,
           "majority_sign_method": method in _SIGN, "key": method in _RANDOM,
           "masks": method in _RANDOM}
  extra = [name for name in given if given[name] and not takes[name]]
  if extra:
    users = {"density": _DENSITY, "svd_rank": _SVD, "svd_clamp": _SVD, "svd_full_matrices": _SVD,
             "majority_sign_method": _SIGN, "key": _RANDOM, "masks": _RANDOM}[extra[0]]
    raise InputError(f"method={method!r} does not take `{extra[0]}`; it is for "
                     f"{', '.join(m for m in METHODS if m in users)}. Remove it or pick one of "
                     "those.")
  if method in _DENSITY:
    if density is None:
      raise InputError(f"method={method!r} needs `density`, the fraction of entries kept "
                       "(0 < density <= 1), e.g. density=0.5.")
    if (isinstance(density, bool) or not isinstance(density, numbers.Real)
        or not 0 < float(density) <= 1):
      raise InputError(f"`density` must be a number in (0, 1], got {density!r}.")
  if majority_sign_method not in ("total", "frequency"):
    raise InputError("`majority_sign_method` must be 'total' or 'frequency', got "
                     f"{majority_sign_method!r}.")
  if svd_rank is not None and (isinstance(svd_rank, bool)
                               or not isinstance(svd_rank, numbers.Integral) or svd_rank <= 0):
    raise InputError(f"`svd_rank` must be a positive integer, got {svd_rank!r}.")
  if svd_clamp is not None and (isinstance(svd_clamp, bool) or
                                not isinstance(svd_clamp, numbers.Real)
                                or not 0 <= float(svd_clamp) <= 1):
    raise InputError(f"`svd_clamp` is a quantile in [0, 1], got {svd_clamp!r}.")
  if method in _RANDOM:
    if key is None and masks is None:
      raise InputError(f"method={method!r} drops entries at random: pass a PRNG key "
                       "(key=jax.random.key(0)) or the masks themselves (masks=...).")
    if key is not None and masks is not None:
      raise InputError("Pass either `key` (masks drawn at random) or `masks`, not both.")


def _weights(weights: Any, names: list[str]) -> list[float]:
  if (isinstance(weights, (Mapping, str, bytes))
      or not isinstance(weights, (Sequence, np.ndarray, jax.Array))):
    raise InputTypeError(f"`weights` must be a list of floats, one per adapter, got "
                         f"{type(weights).__name__}.")
  ws = list(weights)
  if len(ws) != len(names):
    raise InputError(f"Got {len(ws)} weights for {len(names)} adapters ({', '.join(names)}); "
                     "pass one weight per adapter, in the same order.")
  if not names:
    raise InputError("No adapters to combine; pass at least one wrapped tree.")
  out = []
  for name, w in zip(names, ws):
    try:
      w = float(w)
    except (TypeError, ValueError):
      raise InputTypeError(f"The weight of {name} must be a number, got {w!r}.") from None
    if not math.isfinite(w):
      raise InputError(f"The weight of {name} is {w}; weights must be finite.")
    out.append(w)
  return out


def _matched_modules(names: list[str], params: list[Mapping], *,
                     same_rank: bool) -> list[tuple[tuple[str, ...], list[Mapping]]]:
  """The adapted modules of the first tree, each with its counterpart in every tree."""
  per_tree = []
  for name, p in zip(names, params):
    mods = dict(_tree.adapter_modules(p))
    if not mods:
      raise InputError(f"{name} holds no adapter (no 'lora_a' leaves); pass trees returned by "
                       "jaxlora.wrap or jaxlora.peft.load, as a list or a {name: tree} dict.")
    dora.refuse(mods.items(), f"merge_adapters ({name})")
    tokens.refuse(p, f"merge_adapters ({name})")
    extras.refuse(p, f"merge_adapters ({name})")
    per_tree.append(mods)
  first = per_tree[0]
  for name, mods in zip(names[1:], per_tree[1:]):
    only_first = sorted(set(first) - set(mods))
    only_here = sorted(set(mods) - set(first))
    if only_first or only_here:
      which, path = ((names[0], only_first[0]) if only_first else (name, only_here[0]))
      raise InputError(
          f"{names[0]} and {name} adapt different layers: only {which} has an adapter at "
          f"'{_tree.join(path)}'. Combine adapters made with the same targets (wrap the "
          "missing layer too; zero B factors leave its function unchanged).")
  out = []
  for path_t in sorted(first):
    layer_mods = [m[path_t] for m in per_tree]
    _check_layer(names, _tree.join(path_t), layer_mods, same_rank=same_rank)
    out.append((path_t, layer_mods))
  return out


def _check_layer(names: list[str], path: str, mods: list[Mapping], *, same_rank: bool) -> None:
  ref = mods[0]
  for key_name in (A_KEY, B_KEY, SCALE_KEY):
    for name, m in zip(names, mods):
      if key_name not in m:
        raise InputError(f"{name}: the adapter at '{path}' lacks '{key_name}'.")
  kernel = ref.get(KERNEL_KEY)
  if kernel is None:
    raise InputError(f"{names[0]} has no kernel at '{path}/kernel'; the first tree must be a "
                     "whole wrapped tree (the others may be adapter-only).")
  a0, b0 = ref[A_KEY], ref[B_KEY]
  s0 = jnp.shape(ref[SCALE_KEY])
  roles0 = layout_lib.roles_from_shapes(path, kernel.shape, a0.shape, b0.shape, len(s0))
  for name, m in zip(names[1:], mods[1:]):
    a, b, s = m[A_KEY], m[B_KEY], jnp.shape(m[SCALE_KEY])
    other = m.get(KERNEL_KEY)
    if other is not None:
      if (tuple(other.shape) != tuple(kernel.shape)
          or jnp.dtype(other.dtype) != jnp.dtype(kernel.dtype)):
        raise InputError(
            f"{name} and {names[0]} have different bases at '{path}': kernel "
            f"{tuple(other.shape)} {jnp.dtype(other.dtype)} against {tuple(kernel.shape)} "
            f"{jnp.dtype(kernel.dtype)}. Combine adapters of one base model.")
      if not _same_values(other, kernel):
        raise InputError(
            f"{name} and {names[0]} have different base kernels at '{path}/kernel' (same shape, "
            "other values). Combine adapters of one base model, or pass jaxlora.adapter(tree) "
            "for the others if their bases are meant to be the same.")
    try:
      roles = layout_lib.roles_from_shapes(path, kernel.shape, a.shape, b.shape, len(s))
    except ValueError:
      roles = None
    if roles != roles0 or tuple(s) != tuple(s0):
      raise InputError(
          f"{name}'s adapter at '{path}' (lora_a {tuple(a.shape)}, lora_b {tuple(b.shape)}, "
          f"lora_scale {tuple(s)}) does not fit {names[0]}'s (lora_a {tuple(a0.shape)}, lora_b "
          f"{tuple(b0.shape)}, lora_scale {tuple(s0)}); the adapters belong to different models.")
    if same_rank and a.shape[-1] != a0.shape[-1]:
      raise InputError(
          f"At '{path}' {name} has rank {a.shape[-1]} and {names[0]} rank {a0.shape[-1]}: "
          "linear, ties, dare_linear, dare_ties and magnitude_prune combine the factors "
          "entry by entry and need equal ranks. Use method='cat' or an svd method "
          "('svd', 'ties_svd', ...), which take any ranks.")


def _same_values(x: Any, y: Any) -> bool:
  """False only when both are concrete and differ (tracers and abstract leaves pass)."""
  if x is y:
    return True
  xs, ys = jax.tree.leaves(x), jax.tree.leaves(y)
  if len(xs) != len(ys):
    return False
  concrete = lambda t: (isinstance(t, (np.ndarray, jax.Array))
                        and not isinstance(t, jax.core.Tracer))
  for u, v in zip(xs, ys):
    if u is v:
      continue
    if concrete(u) and concrete(v) and not bool(jnp.array_equal(u, v)):
      return False
  return True


# ------------------------------------------------------------------------------------ layers


class _Spec(NamedTuple):
  """The static options of a combination."""
  method: str
  density: float | None
  sign_method: str
  new_rank: int | None
  clamp: float | None
  full_matrices: bool


@dataclasses.dataclass(frozen=True)
class _Layer:
  """The geometry of one adapted module: its factors as (groups, in, r) and (groups, r, out).

  A group is one slice of the stacked and einsum-batch axes: one PEFT module.
  Hashable, so that layers of one shape share a compiled combination.
  """
  kernel_shape: tuple[int, ...]
  stack: tuple[int, ...]
  ranks: tuple[int, ...]
  shared: tuple[int, ...]
  ins: tuple[int, ...]
  outs: tuple[int, ...]
  perm: tuple[int, ...]  # kernel axes reordered to (shared, in, out), for kernel-shaped masks
  dtype: str  # compute dtype
  out_dtypes: tuple[str, str]  # of the new A and B
  path: str = dataclasses.field(compare=False, hash=False)

  @classmethod
  def of(cls, path: str, mods: list[Mapping]) -> "_Layer":
    ref = mods[0]
    shape = tuple(ref[KERNEL_KEY].shape)
    stack = tuple(jnp.shape(ref[SCALE_KEY]))
    roles = layout_lib.roles_from_shapes(path, shape, ref[A_KEY].shape, ref[B_KEY].shape,
                                         len(stack))
    shared = (layout_lib.STACK, layout_lib.BATCH)
    pick = lambda want: tuple(d for d, r in zip(shape, roles) if r in want)
    order = lambda want: [i for i, r in enumerate(roles) if r in want]
    dtypes = [m[A_KEY].dtype for m in mods] + [m[B_KEY].dtype for m in mods]
    wide = "float64" if any(jnp.dtype(d) == np.float64 for d in dtypes) else "float32"
    return cls(shape, stack, tuple(int(m[A_KEY].shape[-1]) for m in mods), pick(shared),
               pick((layout_lib.IN,)), pick((layout_lib.OUT,)),
               tuple(order(shared) + order((layout_lib.IN,)) + order((layout_lib.OUT,))),
               wide, (str(jnp.dtype(ref[A_KEY].dtype)), str(jnp.dtype(ref[B_KEY].dtype))), path)

  @property
  def groups(self) -> int:
    return math.prod(self.shared)

  @property
  def n_in(self) -> int:
    return math.prod(self.ins)

  @property
  def n_out(self) -> int:
    return math.prod(self.outs)

  def mask_shapes(self, method: str, adapter: int) -> list[tuple[str, tuple[int, ...]]]:
    """The (key, shape) of each DARE mask of one adapter on this layer."""
    if method in _SVD:
      return [(DELTA_KEY, self.kernel_shape)]
    r = self.ranks[adapter]
    return [(A_KEY, self.shared + self.ins + (r,)), (B_KEY, self.shared + (r,) + self.outs)]

  def flatten(self, mods: Sequence[Mapping]) -> tuple[list, list, list]:
    """A, B and the scale of each adapter as (groups, in, r), (groups, r, out), (groups,)."""
    n_batch = len(self.shared) - len(self.stack)
    a = [jnp.asarray(m[A_KEY], self.dtype).reshape(self.groups, self.n_in, -1) for m in mods]
    b = [jnp.asarray(m[B_KEY], self.dtype).reshape(self.groups, -1, self.n_out) for m in mods]
    s = [jnp.broadcast_to(jnp.asarray(m[SCALE_KEY], self.dtype).reshape(
        self.stack + (1,) * n_batch), self.shared).reshape(self.groups) for m in mods]
    return a, b, s

  def flatten_masks(self, method: str, masks: tuple) -> tuple:
    if method in _SVD:  # kernel layout -> (groups, in, out)
      return (jnp.transpose(jnp.asarray(masks[0]), self.perm).reshape(
          self.groups, self.n_in, self.n_out),)
    return (jnp.reshape(masks[0], (self.groups, self.n_in, -1)),
            jnp.reshape(masks[1], (self.groups, -1, self.n_out)))

  def a_out(self, a: jax.Array) -> jax.Array:
    """(groups, in, r) back to the tree's (*shared, *in, r)."""
    return a.reshape(self.shared + self.ins + (a.shape[-1],))

  def b_out(self, b: jax.Array) -> jax.Array:
    return b.reshape(self.shared + (b.shape[1],) + self.outs)


@functools.partial(jax.jit, static_argnums=(0, 1))
def _combine_layer(spec: _Spec, layer: _Layer, mods: Sequence[Mapping], weights: jax.Array,
                   masks: list | None, key: jax.Array | None) -> tuple[jax.Array, jax.Array]:
  """The new (A, B) of one layer, in the tree's layouts and the first adapter's dtypes."""
  a, b, s = layer.flatten(mods)
  ws = [weights[i].astype(layer.dtype) for i in range(len(mods))]
  if masks is not None:
    masks = [layer.flatten_masks(spec.method, m) for m in masks]
  if spec.method == "cat":
    new_a, new_b = _cat(layer, a, b, s, ws)
  elif spec.method in _SVD:
    new_a, new_b = _svd(spec, layer, a, b, s, ws, masks, key)
  else:
    if spec.method in _RANDOM and masks is None:
      assert key is not None and spec.density is not None  # `combine` checked both
      masks = [layer.flatten_masks(spec.method, m)
               for m in _draw_factor_masks(layer, key, spec.density)]
    new_a, new_b = _factors(spec.method, layer, a, b, s, ws, masks, spec.density,
                            spec.sign_method)
  return new_a.astype(layer.out_dtypes[0]), new_b.astype(layer.out_dtypes[1])


def _cat(layer: _Layer, a: list, b: list, s: list, ws: list) -> tuple[jax.Array, jax.Array]:
  cat_a = jnp.concatenate([x * (w * sc)[:, None, None] for x, w, sc in zip(a, ws, s)], axis=-1)
  return layer.a_out(cat_a), layer.b_out(jnp.concatenate(b, axis=1))


def _factors(method: str, layer: _Layer, a: list, b: list, s: list, ws: list,
             masks: list | None, density, sign_method: str) -> tuple[jax.Array, jax.Array]:
  """The entry-wise methods on A and on B, with sqrt(|w*s|) split over the two factors."""
  ws_ = jnp.stack([w * sc for w, sc in zip(ws, s)])  # (n, groups)
  root = jnp.sqrt(jnp.abs(ws_))
  w_a = jnp.where(ws_ >= 0, root, -root)  # the sign goes on A only
  a_masks = None if masks is None else [m[0] for m in masks]
  b_masks = None if masks is None else [m[1] for m in masks]
  new_a = _combine(method, jnp.stack(a), w_a, density, sign_method, a_masks)
  new_b = _combine(method, jnp.stack(b), root, density, sign_method, b_masks)
  return layer.a_out(new_a), layer.b_out(new_b)


def _svd(spec: _Spec, layer: _Layer, a: list, b: list, s: list, ws: list, masks: list | None,
         key: jax.Array | None) -> tuple[jax.Array, jax.Array]:
  """Combines the products, then truncates their SVD (computed on PEFT's (out, in) layout).

  One group (layer slice) at a time, so that only one kernel-sized product per
  adapter and one SVD exist at once.
  """
  weights = jnp.stack(ws)[:, None]  # (n, 1): one group at a time
  base = "linear" if spec.method == "svd" else spec.method[:-len("_svd")]
  assert spec.new_rank is not None  # `combine` sets it for every SVD method
  r = min(spec.new_rank, layer.n_in, layer.n_out)
  n = len(a)

  def one(xs):
    index, a_g, b_g, s_g, m_g = xs
    deltas = jnp.stack([jnp.einsum("ir,ro->io", x, y, precision=jax.lax.Precision.HIGHEST) * sc
                        for x, y, sc in zip(a_g, b_g, s_g)])[:, None]  # (n, 1, in, out)
    if base in _RANDOM and m_g is None:
      flat = jax.random.bernoulli(jax.random.fold_in(key, index), spec.density,
                                  (n * layer.n_in * layer.n_out,))
      m_g = list(flat.reshape(n, 1, layer.n_in, layer.n_out))
    elif m_g is not None:
      m_g = [m[None] for m in m_g]
    delta = _combine(base, deltas, weights, spec.density, spec.sign_method, m_g)[0]
    u, sv, vh = jnp.linalg.svd(delta.T, full_matrices=spec.full_matrices)
    u, sv, vh = u[:, :r], sv[:r], vh[:r]
    # A fixed sign per singular pair (the largest entry of u positive), so that the clamp's
    # quantile of the signed entries does not depend on the SVD routine's choice.
    peak = jnp.take_along_axis(u, jnp.argmax(jnp.abs(u), axis=0, keepdims=True), axis=0)
    flip = jnp.where(peak < 0, -1, 1).astype(u.dtype)  # (1, r)
    u = u * flip * sv[None, :]  # (out, r)
    vh = vh * flip.T  # (r, in)
    if spec.clamp is not None:
      hi = jnp.quantile(jnp.concatenate([u.ravel(), vh.ravel()]), spec.clamp)
      u = jnp.minimum(jnp.maximum(u, -hi), hi)  # as torch.clamp, also when -hi > hi
      vh = jnp.minimum(jnp.maximum(vh, -hi), hi)
    return vh.T, u.T  # (in, r), (r, out)

  xs = (jnp.arange(layer.groups), a, b, s, None if masks is None else [m[0] for m in masks])
  new_a, new_b = jax.lax.map(one, xs)
  return layer.a_out(new_a), layer.b_out(new_b)


# ---------------------------------------------------------------------- pruning and merging


def _combine(method: str, x: jax.Array, w: jax.Array, density, sign_method: str,
             masks: list | None) -> jax.Array:
  """PEFT's merge utilities on stacked tensors ``x`` (n, groups, ...) with weights (n, groups)."""
  if method in ("ties", "magnitude_prune"):
    x = _magnitude_prune(x, density)
  elif method in ("dare_linear", "dare_ties") and density < 1:
    assert masks is not None  # given, or drawn by `_combine_layer`
    keep = jnp.stack([jnp.asarray(m, x.dtype) for m in masks])
    x = x * keep / jnp.asarray(density, x.dtype)
  weighted = x * w.reshape(w.shape + (1,) * (x.ndim - 2)).astype(x.dtype)
  if method not in ("ties", "dare_ties"):
    return weighted.sum(0)
  sign = jnp.sign(x)
  votes = x.sum(0) if sign_method == "total" else sign.sum(0)
  agree = (sign == jnp.where(votes >= 0, 1, -1).astype(x.dtype)[None]).astype(x.dtype)
  return (weighted * agree).sum(0) / jnp.maximum(agree.sum(0), 1)


def _magnitude_prune(x: jax.Array, density: float) -> jax.Array:
  """Keeps the int(density * n) largest magnitudes of each (adapter, group) tensor."""
  if density >= 1:
    return x
  flat = x.reshape(x.shape[0] * x.shape[1], -1)
  k = int(density * flat.shape[1])  # PEFT's count: int() of the float product
  if k == 0:
    return jnp.zeros_like(x)
  _, idx = jax.lax.top_k(jnp.abs(flat), k)
  keep = jnp.zeros(flat.shape, x.dtype).at[jnp.arange(flat.shape[0])[:, None], idx].set(1)
  return (flat * keep).reshape(x.shape)


def _draw_factor_masks(layer: _Layer, key: jax.Array, density: float) -> list[tuple]:
  """Bernoulli(density) keep-masks for A and B of each adapter, in the tree's layouts."""
  shapes = [[shape for _, shape in layer.mask_shapes("dare_linear", i)]
            for i in range(len(layer.ranks))]
  sizes = [math.prod(shape) for per in shapes for shape in per]
  # One draw for the whole layer: each separate draw would compile its own RNG program.
  flat = jax.random.bernoulli(key, density, (sum(sizes),))
  offsets = np.cumsum([0] + sizes)
  out, n = [], 0
  for per in shapes:
    masks = []
    for shape in per:
      masks.append(flat[offsets[n]:offsets[n + 1]].reshape(shape))
      n += 1
    out.append(tuple(masks))
  return out


def _given_masks(method: str, adapter: int, name: str, layer: _Layer, path_t: tuple[str, ...],
                 tree: Any) -> tuple:
  """The masks a caller gave for one adapter on one layer, checked against their shapes."""
  wanted = layer.mask_shapes(method, adapter)
  node = _tree.lookup(tree, path_t, None)
  if not isinstance(node, Mapping):
    raise InputError(f"The masks for {name} have no entry for the layer '{layer.path}'; give "
                     f"{' and '.join(repr(k) for k, _ in wanted)} masks there.")
  out = []
  for mask_key, shape in wanted:
    if mask_key not in node:
      raise InputError(f"The masks for {name} at '{layer.path}' lack {mask_key!r} (a mask of "
                       f"shape {shape}).")
    m = node[mask_key]
    if tuple(jnp.shape(m)) != tuple(shape):
      raise InputError(f"The {mask_key!r} mask for {name} at '{layer.path}' has shape "
                       f"{tuple(jnp.shape(m))}; {method} needs {tuple(shape)}.")
    out.append(jnp.asarray(m))
  return tuple(out)
