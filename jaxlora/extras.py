"""Base leaves that train in full beside the adapters: whole modules and biases.

PEFT's ``modules_to_save`` (a classification head, the output head, layer
norms) and ``bias='all'|'lora_only'``. A module that trains gets a marker leaf
(frozen int8 zeros shaped like its stacked axes, so that ``nn.scan`` can slice
it like any other leaf): `jaxlora.split`, `jaxlora.optimizer`,
`jaxlora.adapter` and the checkpoints read the markers, so these leaves get
gradients, optimizer state and a place in every save while the rest of the
base stays frozen.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp
import numpy as np

from jaxlora import _tree
from jaxlora import kernel_layout as layout_lib
from jaxlora._tree import A_KEY, BIAS_KEY, BIAS_LEAF, EXTRA_KEY, SCALE_KEY
from jaxlora.errors import InputError, InputTypeError

BIAS_MODES = ("none", "all", "lora_only")


def check(train_extra: Any, bias: Any) -> None:
  """Raises an `InputError` for a bad ``train_extra`` or ``bias`` argument.

  >>> check(r"lm_head$", "lora_only")
  """
  if bias not in BIAS_MODES:
    raise InputError(f"`bias` must be one of {list(BIAS_MODES)} (as PEFT's), got {bias!r}.")
  if train_extra is None:
    return
  pats = (train_extra,) if isinstance(train_extra, str) else train_extra
  if not isinstance(pats, (tuple, list)) or not all(isinstance(x, str) for x in pats):
    raise InputTypeError(f"`train_extra` must be a regex or a list of regexes searched in module "
                         f"paths, got {train_extra!r}.")
  for pat in pats:
    try:
      re.compile(pat)
    except re.error as e:
      raise InputError(f"`train_extra` regex {pat!r} does not compile: {e}.") from None


def _owns_leaves(mod: Mapping) -> bool:
  return any(not isinstance(v, Mapping) for k, v in mod.items() if not _tree.is_adapter_key(k))


def _marker(mod: Mapping, path: str, layout: layout_lib.Layout | None) -> jnp.ndarray:
  """int8 zeros shaped like the stacked axes of the module's leaves."""
  if SCALE_KEY in mod:  # an adapted module: its scale has exactly the stacked shape
    shape = tuple(np.shape(mod[SCALE_KEY]))
  else:
    depth = layout.stack_depth(path) if layout is not None else 0
    leaf = next(v for k, v in mod.items() if not isinstance(v, Mapping)
                and not _tree.is_adapter_key(k))
    shape = tuple(np.shape(leaf))[:depth]
  return jnp.zeros(shape, jnp.int8)


def extra_paths(params: Mapping, train_extra: Any) -> list[tuple[str, ...]]:
  """Module paths that `train_extra` selects (outermost only; children train with them).

  >>> params = {"lm_head": {"kernel": np.ones((2, 3))}, "norm": {"scale": np.ones(2)}}
  >>> extra_paths(params, r"(lm_head|norm)$")
  [('lm_head',), ('norm',)]
  """
  if train_extra is None:
    return []
  pats = [re.compile(p) for p in ((train_extra,) if isinstance(train_extra, str) else train_extra)]
  chosen: list[tuple[str, ...]] = []
  for path_t, mod in _tree.iter_modules(params):
    if not path_t or any(path_t[:len(c)] == c for c in chosen):
      continue
    if any(p.search(_tree.join(path_t)) for p in pats) and (
        _owns_leaves(mod) or any(_owns_leaves(m) for _, m in _tree.iter_modules(mod))):
      chosen.append(path_t)
  if not chosen:
    some = ", ".join(repr(_tree.join(pt)) for pt, m in _tree.iter_modules(params)
                     if pt and _owns_leaves(m))
    raise InputError(f"train_extra={train_extra!r} matched no module. Module paths: {some}. "
                     "Regexes are searched in these paths, e.g. train_extra=r'lm_head$'.")
  return chosen


def mark(params: Mapping, *, train_extra: Any = None, bias: str = "none",
         layout: layout_lib.Layout | None = None) -> dict:
  """Marks the modules and biases that train in full (`jaxlora.wrap`'s last step).

  Args:
    params: a params dict, usually already holding the adapters.
    train_extra: regex (or list of them) searched in '/'-joined module paths:
      those modules train in full (PEFT's ``modules_to_save``).
    bias: ``'none'``, ``'all'`` (every ``bias`` leaf trains) or ``'lora_only'``
      (the biases of adapted modules), as PEFT's ``bias``.
    layout: the model's layout, which knows the stacked axes of each module.

  Returns:
    `params` with marker leaves added.

  >>> params = {"d": {"kernel": np.ones((4, 2)), "bias": np.zeros(2)}}
  >>> sorted(mark(params, bias="all")["d"])
  ['bias', 'kernel', 'lora_bias']
  """
  check(train_extra, bias)
  new: dict[tuple[str, ...], dict] = {}
  from jaxlora.quantization import is_quantized  # pylint: disable=import-outside-toplevel
  for path_t in extra_paths(params, train_extra):
    sub = _tree.lookup(params, path_t)
    for inner_t, mod in _tree.iter_modules(sub):
      where = _tree.join(path_t + inner_t)
      if A_KEY in mod:
        raise InputError(f"'{where}' is both adapted (LoRA) and selected by train_extra; a module "
                         "trains either through an adapter or in full. Exclude it from `targets` "
                         "or from `train_extra`.")
      if any(is_quantized(v) for v in mod.values()):
        raise InputError(f"'{where}' holds a quantized kernel and cannot train in full; leave it "
                         "out of `quantize` or of `train_extra`.")
    new[path_t] = {EXTRA_KEY: _marker(sub if _owns_leaves(sub) else
                                      next(m for _, m in _tree.iter_modules(sub) if _owns_leaves(m)),
                                      _tree.join(path_t), layout)}
  if bias != "none":
    extras = list(new)
    for path_t, mod in _tree.iter_modules(params):
      b = mod.get(BIAS_LEAF)
      if b is None or isinstance(b, Mapping) or any(path_t[:len(e)] == e for e in extras):
        continue  # no bias, or inside a module that trains in full anyway
      if bias == "lora_only" and A_KEY not in mod:
        continue
      new.setdefault(path_t, {})[BIAS_KEY] = _marker(mod, _tree.join(path_t), layout)
  return _tree.overlay(params, _tree.nest(new))


def refuse(params: Mapping, what: str) -> None:
  """An `InputError` when `params` trains base leaves or sits on a PiSSA/OLoRA residual,
  which `what` (a bank, a merge of adapters) cannot hold.

  >>> refuse({"d": {"kernel": np.ones((2, 2))}}, "a bank")
  """
  reasons = ((EXTRA_KEY, "trains the module in full (train_extra)"),
             (BIAS_KEY, "trains its bias (bias='all'/'lora_only')"),
             (_tree.INIT_A_KEY, "sits on a PiSSA/OLoRA residual kernel; "
                                "jaxlora.peft.convert_to_lora makes it a plain LoRA on the "
                                "original base"))
  for path_t, mod in _tree.iter_modules(params):
    for key, why in reasons:
      if key in mod:
        raise InputError(f"'{_tree.join(path_t)}' {why}: {what} holds LoRA factors only. "
                         "Use adapters wrapped without it.")
