"""Adapter banks: many adapters over one base, stacked along an adapter axis.

A bank is the base tree with every adapted module's LoRA leaves stacked over
adapters: ``lora_a (*stack, n, *in, R)``, ``lora_b (*stack, n, R, *out)``,
``lora_scale (*stack, n)``, where ``*stack`` are the layer axes of scanned
kernels (kept first, because `nn.scan` slices them), ``n`` the bank's capacity
and ``R`` its maximum rank. Smaller ranks are padded with zeros (exact: the
padding adds ``0`` to every product), and an adapter that does not target a
layer has zeros and scale 0 there. `jaxlora.apply` computes each row with its
own adapter when called with ``adapter_ids=``.

`Bank` keeps the names on the host beside the array tree (``bank.tree``), so a
jitted function of ``bank.tree`` is reused after `bank_set` as long as the
capacity and maximum rank stay the same.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxlora import _tree
from jaxlora import dora
from jaxlora import extras
from jaxlora import tokens
from jaxlora._tree import A_KEY, B_KEY, KERNEL_KEY, SCALE_KEY
from jaxlora.errors import InputError, InputTypeError

PyTree = Any


@dataclasses.dataclass(frozen=True)
class _Entry:
  """What one adapter held at one module, to give it back exactly."""
  rank: int
  scale_shape: tuple[int, ...]
  a_dtype: Any
  b_dtype: Any
  scale_dtype: Any


@dataclasses.dataclass(frozen=True)
class Bank:
  """Adapters over one base: the stacked tree and, on the host, which slot holds which adapter.

  Attributes:
    tree: the base param tree with stacked LoRA leaves (pass it to jitted functions).
    names: adapter names by slot; ``None`` marks a free slot.
    max_rank: the padded rank ``R``.
    entries: per adapter, per module path, its rank and original leaf shapes/dtypes.
  """
  tree: PyTree
  names: tuple[str | None, ...]
  max_rank: int
  entries: Mapping[str, Mapping[str, _Entry]]

  @property
  def capacity(self) -> int:
    return len(self.names)

  @property
  def adapters(self) -> tuple[str, ...]:
    return tuple(n for n in self.names if n is not None)

  def ids(self, names: Sequence[str | None]) -> jax.Array:
    """Row adapter ids for `jaxlora.apply(..., adapter_ids=)`; ``None`` is the base alone (-1).

    >>> import jax, flax.linen as nn, jaxlora
    >>> p = nn.Dense(3).init(jax.random.key(0), jax.numpy.ones((1, 4)))['params']
    >>> w = lambda s: jaxlora.wrap(p, rank=2, targets='.*', key=jax.random.key(s))
    >>> bank = jaxlora.stack({'a': w(1), 'b': w(2)})
    >>> bank.ids(['b', None, 'a']).tolist()
    [1, -1, 0]
    """
    out = []
    for name in names:
      if name is None:
        out.append(-1)
      elif name in self.names:
        out.append(self.names.index(name))
      else:
        raise InputError(f"no adapter named {name!r} in the bank; it holds "
                         f"{', '.join(map(repr, self.adapters)) or 'none'}.")
    return jnp.asarray(out, jnp.int32)


def _adapted(tree: PyTree, name: str) -> dict[str, Mapping]:
  params = _tree.get_params(tree)
  mods = {_tree.join(p): m for p, m in _tree.adapter_modules(params)}
  if not mods:
    raise InputError(f"adapter {name!r} holds no LoRA leaves; pass trees from jaxlora.wrap.")
  dora.refuse(_tree.adapter_modules(params), f"a bank (adapter {name!r})")
  tokens.refuse(params, f"a bank (adapter {name!r})")
  extras.refuse(params, f"a bank (adapter {name!r})")
  return mods


def _kernel_shapes(params: Mapping) -> dict[str, tuple[int, ...]]:
  return {_tree.join(p): tuple(m[KERNEL_KEY].shape) for p, m in _tree.kernel_modules(params)}


def _check_base(name: str, params: Mapping, base: Mapping, than: str, where: str) -> None:
  """Raises unless ``params`` has the kernels (paths and shapes) of ``base``."""
  theirs, mine = _kernel_shapes(params), _kernel_shapes(base)
  if theirs != mine:
    diff = sorted(k for k in set(theirs) | set(mine) if theirs.get(k) != mine.get(k))[0]
    raise InputError(f"adapter {name!r} is on a different base{than}: kernel {diff!r} is "
                     f"{theirs.get(diff)} there and {mine.get(diff)} {where}. A bank holds "
                     "adapters of one base model.")


def _n_stack(mod: Mapping) -> int:
  return jnp.ndim(mod[SCALE_KEY])


def stack(trees: Mapping[str, PyTree], *, capacity: int | None = None,
          max_rank: int | None = None) -> Bank:
  """Stacks wrapped trees over one base into a `Bank`.

  Args:
    trees: ``{name: tree}`` from `jaxlora.wrap` (or loaded adapters), all on the
      same base; ranks, alphas and target sets may differ.
    capacity: slots to reserve (default: the number of trees); free slots hold zeros.
    max_rank: the padded rank (default: the largest rank in ``trees``).

  Returns:
    The bank; its base leaves are the first tree's.

  Raises:
    ValueError: no trees, bases whose kernels differ in shape, capacity or rank too small.

  >>> import jax, jax.numpy as jnp, flax.linen as nn, jaxlora
  >>> model = nn.Dense(3)
  >>> p = model.init(jax.random.key(0), jnp.ones((1, 4)))['params']
  >>> bank = jaxlora.stack({'a': jaxlora.wrap(p, rank=2, targets='.*', key=jax.random.key(1)),
  ...                       'b': jaxlora.wrap(p, rank=1, targets='.*', key=jax.random.key(2))},
  ...                      capacity=4)
  >>> bank.tree['lora_a'].shape, bank.names
  ((4, 4, 2), ('a', 'b', None, None))
  """
  if not trees:
    raise InputError("stack() needs at least one adapter tree: {'name': tree, ...}.")
  names = list(trees)
  for n in names:
    if not isinstance(n, str):
      raise InputTypeError(f"adapter names must be strings, got {n!r}.")
  capacity = len(names) if capacity is None else capacity
  if capacity < len(names):
    raise InputError(f"capacity={capacity} is smaller than the {len(names)} adapters given.")
  first = names[0]
  base = _tree.get_params(trees[first])
  mods = {}
  for name in names:
    params = _tree.get_params(trees[name])
    _check_base(name, params, base, f" than {first!r}", f"in {first!r}")
    mods[name] = _adapted(params, name)
  ranks = [m[A_KEY].shape[-1] for ms in mods.values() for m in ms.values()]
  max_rank = max(ranks) if max_rank is None else max_rank
  if max_rank < max(ranks):
    raise InputError(f"max_rank={max_rank} is below the largest adapter rank {max(ranks)}.")
  paths = sorted({p for ms in mods.values() for p in ms})
  entries: dict[str, dict[str, _Entry]] = {n: {} for n in names}
  new_modules = {}
  base_mods = dict((_tree.join(p), (p, m)) for p, m in _tree.iter_modules(base))
  for path in paths:
    ref = next(ms[path] for ms in mods.values() if path in ms)
    ns = _n_stack(ref)
    stack_shape = tuple(ref[A_KEY].shape[:ns])
    a_mid = tuple(ref[A_KEY].shape[ns:-1])
    b_mid = tuple(ref[B_KEY].shape[ns + 1:])
    a_dt = jnp.result_type(*(ms[path][A_KEY].dtype for ms in mods.values() if path in ms))
    b_dt = jnp.result_type(*(ms[path][B_KEY].dtype for ms in mods.values() if path in ms))
    a = np.zeros(stack_shape + (capacity,) + a_mid + (max_rank,), a_dt)
    b = np.zeros(stack_shape + (capacity,) + (max_rank,) + b_mid, b_dt)
    s = np.zeros(stack_shape + (capacity,), np.float32)
    for slot, name in enumerate(names):
      m = mods[name].get(path)
      if m is None:
        continue
      if tuple(m[A_KEY].shape[:ns]) != stack_shape or tuple(m[A_KEY].shape[ns:-1]) != a_mid:
        raise InputError(f"adapter {name!r} at {path!r}: lora_a {tuple(m[A_KEY].shape)} does "
                         f"not fit the bank's {stack_shape + a_mid + ('r',)}.")
      r = m[A_KEY].shape[-1]
      idx = (slice(None),) * ns + (slot,)
      a[idx + (Ellipsis, slice(0, r))] = np.asarray(m[A_KEY])
      b[idx + (slice(0, r),)] = np.asarray(m[B_KEY])
      s[idx] = np.broadcast_to(np.asarray(m[SCALE_KEY], np.float32), stack_shape)
      entries[name][path] = _Entry(r, tuple(np.shape(m[SCALE_KEY])), m[A_KEY].dtype,
                                   m[B_KEY].dtype, jnp.asarray(m[SCALE_KEY]).dtype)
    path_t, bmod = base_mods[path]
    new = _tree.module_base(bmod)
    new.update({A_KEY: jnp.asarray(a), B_KEY: jnp.asarray(b), SCALE_KEY: jnp.asarray(s)})
    new_modules[path_t] = new
  tree = _tree.with_params(trees[first], _tree.replace_modules(base, new_modules))
  return Bank(tree, tuple(names) + (None,) * (capacity - len(names)), max_rank,
              {n: dict(e) for n, e in entries.items()})


def _slot_leaves(mod: Mapping, slot: int, entry: _Entry) -> dict:
  ns = jnp.ndim(mod[SCALE_KEY]) - 1
  idx = (slice(None),) * ns + (slot,)
  a = mod[A_KEY][idx + (Ellipsis, slice(0, entry.rank))].astype(entry.a_dtype)
  b = mod[B_KEY][idx + (slice(0, entry.rank),)].astype(entry.b_dtype)
  s = mod[SCALE_KEY][idx]
  if tuple(s.shape) != entry.scale_shape:  # a scalar scale broadcast over stacked layers
    s = s.reshape(-1)[0].reshape(entry.scale_shape)
  return {A_KEY: a, B_KEY: b, SCALE_KEY: s.astype(entry.scale_dtype)}


@functools.partial(jax.jit, static_argnums=(3,))
def _set_slot(olds, news, slot, axes):
  return [tuple(jax.lax.dynamic_update_index_in_dim(o, n, slot, ax) for o, n in zip(old, new))
          for old, new, ax in zip(olds, news, axes)]


def unstack(bank: Bank) -> dict[str, PyTree]:
  """The single adapter trees of a bank, exactly as they were stacked.

  >>> import jax, jax.numpy as jnp, flax.linen as nn, jaxlora
  >>> p = nn.Dense(3).init(jax.random.key(0), jnp.ones((1, 4)))['params']
  >>> t = jaxlora.wrap(p, rank=2, targets='.*', key=jax.random.key(1))
  >>> back = jaxlora.unstack(jaxlora.stack({'a': t}, max_rank=8))['a']
  >>> bool(jnp.array_equal(back['lora_a'], t['lora_a']))
  True
  """
  if not isinstance(bank, Bank):
    raise InputTypeError(f"unstack() takes a jaxlora Bank (from jaxlora.stack), got "
                         f"{type(bank).__name__}.")
  params = _tree.get_params(bank.tree)
  out = {}
  for slot, name in enumerate(bank.names):
    if name is None:
      continue
    new_modules = {}
    for path, mod in _tree.adapter_modules(params):
      key = _tree.join(path)
      plain = _tree.module_base(mod)
      if key in bank.entries[name]:
        plain.update(_slot_leaves(mod, slot, bank.entries[name][key]))
      new_modules[path] = plain
    out[name] = _tree.with_params(bank.tree, _tree.replace_modules(params, new_modules))
  return out


def bank_set(bank: Bank, name: str, tree: PyTree) -> Bank:
  """Replaces adapter ``name`` (or adds it in the first free slot), keeping shapes.

  The bank's array shapes do not change, so functions jitted on ``bank.tree``
  run again without compiling.

  Raises:
    ValueError: a full bank, a rank above ``max_rank``, a layer the bank has no
      slot for, or a different base.

  >>> import jax, jax.numpy as jnp, flax.linen as nn, jaxlora
  >>> p = nn.Dense(3).init(jax.random.key(0), jnp.ones((1, 4)))['params']
  >>> w = lambda s: jaxlora.wrap(p, rank=2, targets='.*', key=jax.random.key(s))
  >>> bank = jaxlora.stack({'a': w(1)}, capacity=2)
  >>> jaxlora.bank_set(bank, 'b', w(2)).names
  ('a', 'b')
  """
  if not isinstance(bank, Bank):
    raise InputTypeError(f"bank_set() takes a jaxlora Bank, got {type(bank).__name__}.")
  if name in bank.names:
    slot = bank.names.index(name)
  elif None in bank.names:
    slot = bank.names.index(None)
  else:
    raise InputError(f"the bank is full ({bank.capacity} adapters: {', '.join(bank.adapters)}); "
                     f"replace one of them, or stack(..., capacity=) a larger bank.")
  params = _tree.get_params(bank.tree)
  theirs = _tree.get_params(tree)
  _check_base(name, theirs, params, "", "in the bank")
  mods = _adapted(theirs, name)
  bank_mods = {_tree.join(p): (p, m) for p, m in _tree.adapter_modules(params)}
  extra = sorted(set(mods) - set(bank_mods))
  if extra:
    raise InputError(f"adapter {name!r} targets {extra[0]!r}, which no adapter in the bank "
                     "targets, so the bank has no slot there; stack() it with the others.")
  entries = {}
  olds, news, axes, paths = [], [], [], []
  for key, (path, bmod) in bank_mods.items():
    ns = jnp.ndim(bmod[SCALE_KEY]) - 1
    a, b, s = bmod[A_KEY], bmod[B_KEY], bmod[SCALE_KEY]
    m = mods.get(key)
    na: np.ndarray | jax.Array  # host zeros, or the adapter's padded arrays
    nb: np.ndarray | jax.Array
    nsc: np.ndarray | jax.Array
    if m is None:  # not targeted by this adapter: zeros, scale 0
      na = np.zeros(a.shape[:ns] + a.shape[ns + 1:], a.dtype)
      nb = np.zeros(b.shape[:ns] + b.shape[ns + 1:], b.dtype)
      nsc = np.zeros(s.shape[:ns], s.dtype)
    else:
      r = m[A_KEY].shape[-1]
      if r > bank.max_rank:
        raise InputError(f"adapter {name!r} has rank {r} at {key!r}, above the bank's "
                         f"max_rank={bank.max_rank}; stack(..., max_rank=) a larger bank.")
      want = tuple(a.shape[:ns]) + tuple(a.shape[ns + 1:-1])
      if tuple(m[A_KEY].shape[:-1]) != want:
        raise InputError(f"adapter {name!r} at {key!r}: lora_a {tuple(m[A_KEY].shape)} does "
                         f"not fit the bank's {want + ('r',)}.")
      pad_a = [(0, 0)] * (m[A_KEY].ndim - 1) + [(0, bank.max_rank - r)]
      pad_b = [(0, 0)] * ns + [(0, bank.max_rank - r)] + [(0, 0)] * (m[B_KEY].ndim - ns - 1)
      na = jnp.pad(jnp.asarray(m[A_KEY]), pad_a).astype(a.dtype)
      nb = jnp.pad(jnp.asarray(m[B_KEY]), pad_b).astype(b.dtype)
      nsc = jnp.broadcast_to(jnp.asarray(m[SCALE_KEY], s.dtype), s.shape[:ns])
      entries[key] = _Entry(r, tuple(np.shape(m[SCALE_KEY])), m[A_KEY].dtype, m[B_KEY].dtype,
                            jnp.asarray(m[SCALE_KEY]).dtype)
    olds.append((a, b, s))
    news.append((na, nb, nsc))
    axes.append(ns)
    paths.append((path, bmod))
  # One jitted update for the whole bank: compiled once per bank shape, any slot.
  updated = _set_slot(olds, news, jnp.asarray(slot, jnp.int32), tuple(axes))
  new_modules = {path: {**bmod, A_KEY: a, B_KEY: b, SCALE_KEY: sc}
                 for (path, bmod), (a, b, sc) in zip(paths, updated)}
  names = list(bank.names)
  names[slot] = name
  all_entries = {n: e for n, e in bank.entries.items() if n != name}
  all_entries[name] = entries
  tree = _tree.with_params(bank.tree, _tree.replace_modules(params, new_modules))
  return Bank(tree, tuple(names), bank.max_rank, all_entries)
