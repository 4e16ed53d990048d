"""Helpers for nested-dict param trees: paths, flattening, collection handling."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import Any
from jaxlora.errors import InputError, InputTypeError

A_KEY = "lora_a"
B_KEY = "lora_b"
SCALE_KEY = "lora_scale"
# DoRA: the trained magnitude per output unit, shaped (*stacked, *batch, *out_axes).
MAGNITUDE_KEY = "lora_magnitude"
# Trainable tokens (on an embedding module): the token ids (frozen, int32 (k,)) and
# their trained rows (k, features), which replace those rows of the embedding.
TOKEN_IDS_KEY = "lora_token_ids"
TOKEN_ROWS_KEY = "lora_token_rows"
# Markers, frozen int8 zeros shaped like the module's stacked axes: the module's own
# leaves train in full (modules_to_save), or its `bias` trains (bias='all'/'lora_only').
# PiSSA/OLoRA: the factors (and scale) the base kernel's residual was split off with, frozen.
# With them an adapter checkpoint rebuilds the residual from the original base, and
# `jaxlora.peft.convert_to_lora` needs nothing else.
INIT_A_KEY = "lora_init_a"
INIT_B_KEY = "lora_init_b"
INIT_SCALE_KEY = "lora_init_scale"
INIT_KEYS = (INIT_A_KEY, INIT_B_KEY, INIT_SCALE_KEY)
EXTRA_KEY = "lora_extra"
BIAS_KEY = "lora_bias"
MARKER_KEYS = (EXTRA_KEY, BIAS_KEY)
LORA_KEYS = (A_KEY, B_KEY, SCALE_KEY)  # every adapted kernel has these three
# The leaves an adapter adds to a module (all saved with it); the first group trains.
TRAINABLE_KEYS = (A_KEY, B_KEY, MAGNITUDE_KEY, TOKEN_ROWS_KEY)
ADAPTER_KEYS = (A_KEY, B_KEY, SCALE_KEY, MAGNITUDE_KEY, TOKEN_IDS_KEY, TOKEN_ROWS_KEY,
                EXTRA_KEY, BIAS_KEY) + INIT_KEYS
KERNEL_KEY = "kernel"
BIAS_LEAF = "bias"

Path = tuple[str, ...]


def wide_float(*dtypes: Any) -> Any:
  """float64 if any of `dtypes` is, else float32 (explicit: works under strict promotion)."""
  import numpy as np  # pylint: disable=import-outside-toplevel
  return np.dtype(np.float64 if any(np.dtype(d) == np.float64 for d in dtypes) else np.float32)


def is_variables(tree: Any) -> bool:
  """True when `tree` looks like linen variables (`{'params': {...}, ...}`)."""
  return isinstance(tree, Mapping) and isinstance(tree.get("params"), Mapping)


def get_params(tree: Mapping) -> Mapping:
  """Returns the `params` collection, accepting both variables and params dicts."""
  if not isinstance(tree, Mapping):
    raise InputTypeError(
        f"Expected a Flax param tree (a nested dict), got {type(tree).__name__}. "
        "Pass `variables['params']` or the variables dict returned by `model.init`.")
  return tree["params"] if is_variables(tree) else tree


def with_params(tree: Mapping, params: dict) -> dict:
  """Puts `params` back where `get_params` found it."""
  if is_variables(tree):
    out = dict(tree)
    out["params"] = params
    return out
  return params


def join(path: Path) -> str:
  return "/".join(str(p) for p in path)


_RAISE = object()  # `lookup`'s default: no default, raise


def lookup(tree: Any, path: Path, default: Any = _RAISE) -> Any:
  """The value at `path` (a tuple of keys) in nested dicts.

  Args:
    tree: nested dicts.
    path: the keys to follow, outermost first; ``()`` is `tree` itself.
    default: returned where `path` leaves the tree (a missing key, or a leaf
      where a dict should be).

  Returns:
    The value at `path`, or `default`.

  Raises:
    InputError: where `path` leaves the tree and no `default` is given; the
      message names the path and the first key that is missing.

  >>> lookup({"a": {"b": 1}}, ("a", "b")), lookup({"a": {"b": 1}}, ("a", "c"), None)
  (1, None)
  """
  node = tree
  for i, k in enumerate(path):
    if not isinstance(node, Mapping) or k not in node:
      if default is not _RAISE:
        return default
      where = f"'{join(path[:i])}'" if i else "the tree"
      raise InputError(f"Nothing at '{join(path)}': {where} has no entry {k!r}.")
    node = node[k]
  return node


def iter_modules(params: Mapping, prefix: Path = ()) -> Iterator[tuple[Path, Mapping]]:
  """Yields `(path, module_dict)` for every dict in the tree, depth first, sorted."""
  yield prefix, params
  for k in sorted(params, key=str):
    v = params[k]
    if isinstance(v, Mapping):
      yield from iter_modules(v, prefix + (k,))


def kernel_modules(params: Mapping) -> list[tuple[Path, Mapping]]:
  """Module dicts that hold an array-like `kernel` leaf with at least 2 dims."""
  out = []
  for path, mod in iter_modules(params):
    k = mod.get(KERNEL_KEY)
    if k is not None and not isinstance(k, Mapping) and len(getattr(k, "shape", ())) >= 2:
      out.append((path, mod))
  return out


def adapter_modules(params: Mapping) -> list[tuple[Path, Mapping]]:
  """Module dicts that carry adapter leaves."""
  return [(p, m) for p, m in iter_modules(params) if A_KEY in m]


def filter_tree(tree: Mapping, keep: Callable[[str], bool], *, prune: bool) -> dict:
  """Keeps the leaves whose key satisfies `keep`.

  With `prune`, dicts left without any kept leaf are dropped (they never held
  one); otherwise every dict of the original tree is kept, possibly empty.
  """
  return filter_leaves(tree, lambda key, mod, extra: keep(key), prune=prune)


def filter_leaves(tree: Mapping, keep: Callable[[str, Mapping, bool], bool], *, prune: bool,
                  extra: bool = False) -> dict:
  """Like `filter_tree`, with ``keep(key, module_dict, extra)``.

  ``extra`` is True inside a module marked with `EXTRA_KEY` (or below one):
  all of that module's own leaves train.
  """
  extra = extra or EXTRA_KEY in tree
  out = {}
  for k, v in tree.items():
    if isinstance(v, Mapping):
      sub = filter_leaves(v, keep, prune=prune, extra=extra)
      if sub or not prune:
        out[k] = sub
    elif keep(k, tree, extra):
      out[k] = v
  return out


def is_adapter_key(key: Any) -> bool:
  """True for the names of the leaves an adapter adds to a module (lora_a, lora_b, ...)."""
  return key in ADAPTER_KEYS


def is_trained_base(key: Any, module: Mapping, extra: bool) -> bool:
  """True for a base leaf that trains in full: in a marked module, or a marked bias."""
  if key in ADAPTER_KEYS:
    return False
  return extra or (key == BIAS_LEAF and BIAS_KEY in module)


def _is_trainable(key: Any, module: Mapping, extra: bool) -> bool:
  return key in TRAINABLE_KEYS or is_trained_base(key, module, extra)


def adapter_leaves(tree: Mapping) -> dict:
  """What an adapter checkpoint holds: adapter leaves and the base leaves that train.

  Dicts left without any are dropped.
  """
  return filter_leaves(tree, lambda k, m, e: k in ADAPTER_KEYS or is_trained_base(k, m, e),
                       prune=True)


def base_leaves(tree: Mapping, *, prune: bool) -> dict:
  """`tree` less its adapter leaves; with `prune`, dicts left empty are dropped."""
  return filter_tree(tree, lambda k: not is_adapter_key(k), prune=prune)


def module_base(module: Mapping) -> dict:
  """One module dict's own entries less its adapter leaves (child dicts kept as they are)."""
  return {k: v for k, v in module.items() if not is_adapter_key(k)}


def trainable_leaves(tree: Mapping) -> dict:
  """The trained leaves alone (lora_a, lora_b, DoRA magnitudes, token rows, marked base
  leaves); dicts left without any are dropped."""
  return filter_leaves(tree, _is_trainable, prune=True)


def frozen_leaves(tree: Mapping) -> dict:
  """`tree` less its trained leaves, every dict kept (the other half of `trainable_leaves`)."""
  return filter_leaves(tree, lambda k, m, e: not _is_trainable(k, m, e), prune=False)


def leaf_paths(tree: Mapping, prefix: Path = ()) -> set[Path]:
  """The key path of every leaf of nested dicts."""
  out: set[Path] = set()
  for k, v in tree.items():
    if isinstance(v, Mapping):
      out |= leaf_paths(v, prefix + (k,))
    else:
      out.add(prefix + (k,))
  return out


def select_paths(tree: Mapping, paths: set[Path], *, keep: bool, prune: bool,
                 prefix: Path = ()) -> dict:
  """The leaves of `tree` whose path is in `paths` (``keep=True``) or is not."""
  out = {}
  for k, v in tree.items():
    here = prefix + (k,)
    if isinstance(v, Mapping):
      sub = select_paths(v, paths, keep=keep, prune=prune, prefix=here)
      if sub or not prune:
        out[k] = sub
    elif (here in paths) == keep:
      out[k] = v
  return out


def nest(flat: Mapping[Path, Mapping]) -> dict:
  """``{path: {key: leaf}}`` as nested dicts (entries at the same path are merged)."""
  out: dict = {}
  for path, entries in flat.items():
    node = out
    for k in path:
      node = node.setdefault(k, {})
    node.update(entries)
  return out


def overlay(base: Mapping, top: Mapping, path: Path = ()) -> dict:
  """Deep union of two nested dicts where `top`'s leaves replace `base`'s."""
  out = dict(base)
  for k, v in top.items():
    if isinstance(v, Mapping) and isinstance(out.get(k), Mapping):
      out[k] = overlay(out[k], v, path + (k,))
    else:
      out[k] = v
  return out


def merge_trees(a: Mapping, b: Mapping, path: Path = ()) -> dict:
  """Deep union of two nested dicts whose leaves do not collide."""
  out = dict(a)
  for k, v in b.items():
    if k in out:
      if isinstance(out[k], Mapping) and isinstance(v, Mapping):
        out[k] = merge_trees(out[k], v, path + (k,))
      else:
        raise InputError(
            f"Both trees hold a leaf at '{join(path + (k,))}'; combine expects the "
            "two halves returned by `jaxlora.split`.")
    else:
      out[k] = v
  return out


def replace_modules(params: Mapping, new: Mapping[Path, dict], prefix: Path = ()) -> dict:
  """Returns a copy of `params` where module dicts at the given paths are replaced."""
  if prefix in new:
    return new[prefix]
  out = {}
  for k, v in params.items():
    out[k] = replace_modules(v, new, prefix + (k,)) if isinstance(v, Mapping) else v
  return out
