"""The selection language shared by every function that picks layers.

A selector is one of:
  * a string: a preset name or a regular expression searched (``re.search``) in
    the '/'-joined module path, e.g. ``r'attn/(q|k|v)$'``. Presets:
    ``'all-linear'`` (every Dense-like kernel but the output head and the
    mixture-of-experts routers ``mlp/gate`` and ``mlp/shared_expert_gate``,
    which stay frozen unless selected by name),
    ``'attention'`` (q/k/v/o projections: Llama's ``q_proj`` ... ``o_proj``,
    Phi-3's fused ``qkv_proj``, GPT-2's ``attn/c_attn`` and ``attn/c_proj``) and
    ``'mlp'`` (``gate_proj``, ``up_proj``, ``down_proj``, Phi-3's ``gate_up_proj``,
    GPT-2's ``mlp/c_fc`` and ``mlp/c_proj``, and in mixture-of-experts layers
    the stacked ``mlp/experts/gate_up_proj`` and ``mlp/experts/down_proj``
    and the shared expert's projections);
  * a callable ``(path, kernel) -> bool`` taking that path and the kernel leaf;
  * a tuple or list of selectors, matching when any of them matches.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from typing import Any, Union

from jaxlora import kernel_layout as layout_lib
from jaxlora.errors import InputError, InputTypeError

Selector = Union[str, Callable[[str, Any], bool], tuple, list]

# Presets for the jaxlora.models naming (which follows Hugging Face's).
_NAMED = {
    "attention": r"(^|/)(self_attn|attn)/(q_proj|k_proj|v_proj|o_proj|qkv_proj|c_attn|c_proj)$",
    "mlp": r"(^|/)mlp/((experts|shared_expert)/)?"
           r"(gate_proj|up_proj|down_proj|gate_up_proj|c_fc|c_proj)$",
}
# Mixture-of-experts routers: trained only when named (e.g. train_extra='mlp/gate$').
_ROUTER = re.compile(r"(^|/)mlp/(gate|shared_expert_gate)$")
PRESETS = ("all-linear",) + tuple(_NAMED)


def compile_selector(sel: Selector | None, *, layout: layout_lib.Layout | None,
                     what: str) -> Callable[[str, Any], bool]:
  """Turns a selector into a predicate `(path, kernel) -> bool`."""
  if sel is None:
    return lambda path, kernel: False
  if isinstance(sel, (tuple, list)):
    preds = [compile_selector(s, layout=layout, what=what) for s in sel]
    return lambda path, kernel: any(p(path, kernel) for p in preds)
  if isinstance(sel, str):
    if sel == "all-linear":
      return _all_linear(layout)
    if sel in _NAMED:
      sel = _NAMED[sel]
    try:
      rx = re.compile(sel)
    except re.error as e:
      raise InputError(f"`{what}` {sel!r} is neither a preset {PRESETS} nor a valid "
                       f"regular expression ({e}).") from None
    return lambda path, kernel: rx.search(path) is not None
  if callable(sel):
    return lambda path, kernel: bool(sel(path, kernel))
  raise InputTypeError(
      f"`{what}` must be a regex string, a preset {PRESETS}, a callable "
      f"(path, kernel) -> bool, or a tuple of these; got {type(sel).__name__}: {sel!r}.")


def _all_linear(layout: layout_lib.Layout | None) -> Callable[[str, Any], bool]:
  def pred(path: str, kernel: Any) -> bool:
    if layout is not None:
      info = layout.kernels.get(path)
      return info is not None and not info.is_head and not _ROUTER.search(path)
    # Without a layout only plain 2-D kernels are known to be Dense layers;
    # `wrap` rejects N-D ones with a message that asks for a layout.
    return not layout_lib.is_head(path) and not _ROUTER.search(path)
  return pred


def describe(sel: Selector | None) -> Any:
  """A JSON-friendly description of a selector (for metadata and messages)."""
  if sel is None or isinstance(sel, str):
    return sel
  if isinstance(sel, (tuple, list)):
    return [describe(s) for s in sel]
  return getattr(sel, "__name__", repr(sel))


def match_pattern(patterns: Mapping[str, Any] | None, path: str, default: Any) -> Any:
  """The value of the first pattern (regex, in insertion order) found in `path`."""
  for pat, value in (patterns or {}).items():
    if re.search(pat, path):
      return value
  return default
