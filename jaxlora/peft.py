"""The Hugging Face PEFT LoRA format, both ways: adapter_config.json + adapter_model.safetensors.

What is trained here serves in PyTorch PEFT and vLLM, and PEFT adapters load
here. Key names follow PEFT (``base_model.model.<module>.lora_A.weight``) with
PyTorch layouts: ``lora_A.weight`` is ``[r, in]``, ``lora_B.weight`` ``[out, r]``.
"""

from __future__ import annotations

import collections
import json
import math
import os
import re
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxlora import _files
from jaxlora import _multihost
from jaxlora import _tree
from jaxlora import initialisation
from jaxlora import dora
from jaxlora import model_api
from jaxlora import safetensors_io
from jaxlora import tokens
from jaxlora._tree import (A_KEY, B_KEY, BIAS_KEY, EXTRA_KEY, KERNEL_KEY, MAGNITUDE_KEY,
                            SCALE_KEY)
from jaxlora.errors import InputError, NotFoundError
# PiSSA/OLoRA-trained adapters to plain LoRA on the original base (see jaxlora.initialisation).
from jaxlora.initialisation import convert_to_lora, original_base  # pylint: disable=unused-import

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
_PREFIX = "base_model.model."
# PEFT options that change what an adapter computes; refused rather than ignored.
_UNSUPPORTED = ("lora_bias",
                "layer_replication", "use_qalora",
                "alora_invocation_tokens", "use_bdlora", "megatron_config", "arrow_config",
                "monteclora_config", "kasa_config")


def save(path: str, tree: Any, *, model: model_api.HubNames,
         base_model_name_or_path: str | None = None,
         use_rslora: bool = False, dtype: Any = None,
         init_lora_weights: bool | str = True,
         task_type: str | None = "CAUSAL_LM") -> None:
  """Writes the adapter of `tree` as a PEFT LoRA adapter directory.

  Per-layer ranks and scales become PEFT's ``rank_pattern``/``alpha_pattern``
  (keyed by full module names). PEFT's scale is ``lora_alpha / r`` (or
  ``/ sqrt(r)`` with rsLoRA); ``lora_alpha`` is written so that the scale is
  the tree's. Files go to a temporary directory first and are moved into
  place, so an interrupted save never leaves a loadable half-adapter. `path`
  may be a URL ``etils.epath`` writes (``gs://...``). In a multi-process run
  every process must call `save` (sharded factors are gathered); process 0
  writes.

  Args:
    path: output directory.
    tree: a wrapped tree of `model`'s params.
    model: the model the tree belongs to; it names its modules as Hugging Face
      does (`jaxlora.model_api.HubNames`), as `jaxlora.models.Decoder` does.
    base_model_name_or_path: recorded in the config (e.g. a hub id or local path).
    use_rslora: express scales as rsLoRA alphas (``alpha = scale * sqrt(r)``).
    dtype: tensor dtype on disk (default: the adapter's).
    init_lora_weights: the config's ``init_lora_weights``. ``True`` (default):
      the adapter applies to the original base; a tree wrapped with PiSSA or
      OLoRA (which keeps its initial factors) is written as `convert_to_lora`
      makes it, a plain LoRA of rank ``r + r0``. ``'pissa'``, ``'pissa_niter_K'``
      or ``'olora'`` (the ``init`` the tree was wrapped with): the adapter is
      served on the ORIGINAL
      base, from which PEFT (and `load`) rebuild that scheme's residual when
      loading, as for PEFT's own PiSSA/OLoRA adapters (``'pissa_niter_K'``
      rebuilds it from a new random draw, so only approximately). For an
      adapter that needs no residual, see `convert_to_lora`.
    task_type: PEFT's ``task_type`` (``'CAUSAL_LM'`` for language models; None
      for a custom PyTorch module, which PEFT then wraps as a plain `PeftModel`).

  >>> import tempfile, os, jax, jaxlora
  >>> cfg = jaxlora.models.ModelConfig.tiny("llama")
  >>> model = jaxlora.models.Decoder(cfg)
  >>> params = jaxlora.models.init(model, jax.random.key(0))
  >>> tree = jaxlora.wrap(params, rank=2, targets="attention", layout=model, key=jax.random.key(1))
  >>> d = tempfile.mkdtemp()
  >>> jaxlora.peft.save(d, tree, model=model)
  >>> sorted(os.listdir(d))
  ['adapter_config.json', 'adapter_model.safetensors']
  """
  model_api.require(model, model_api.HubNames, "jaxlora.peft.save")
  init_lora_weights = initialisation.peft_init_value(init_lora_weights)
  p = _tree.get_params(tree)
  if init_lora_weights is True and initialisation.initial_adapter(p) is not None:
    # A PiSSA/OLoRA tree: serve it on the original base as a plain LoRA of rank r + r0.
    p = _tree.overlay(_tree.base_leaves(p, prune=False), convert_to_lora(p))
  mods = _tree.adapter_modules(p)
  if not mods:
    raise InputError("The tree holds no adapter; wrap the params with jaxlora.wrap first.")
  tensors: dict[str, np.ndarray] = {}
  ranks: dict[str, int] = {}
  alphas: dict[str, float] = {}
  leaf_names: set[str] = set()
  adapted: set[tuple[str, ...]] = set()
  stacked_paths: set[tuple[str, ...]] = set()  # modules with a layer axis (nn.scan)
  experts: dict[str, dict[str, tuple[np.ndarray, np.ndarray, float]]] = {}
  expert_paths: set[tuple[str, ...]] = set()
  for path_t, mod in mods:
    a = _multihost.host_value(mod[A_KEY])
    b = _multihost.host_value(mod[B_KEY])
    s = _multihost.host_value(mod[SCALE_KEY]).astype(np.float64)
    if dtype is not None:
      a, b = a.astype(dtype), b.astype(dtype)
    if a.ndim == 3 + s.ndim and b.ndim == 3 + s.ndim:  # stacked experts (E, in, r): target_parameters
      for i in (range(s.shape[0]) if s.ndim else [None]):
        name = model.hf_module_name(path_t, i)
        ai, bi, si = (a[i], b[i], float(s[i])) if s.ndim else (a, b, float(s))
        module, param = name.rsplit(".", 1)
        experts.setdefault(module, {})[param] = (ai, bi, si)
      expert_paths.add(path_t)
      continue
    mag = _dora_host(mod, dtype)
    stacked = s.ndim == 1
    if a.ndim != 2 + s.ndim or b.ndim != 2 + s.ndim:
      raise InputError(f"Adapter at '{_tree.join(path_t)}' has lora_a {a.shape}: the PEFT format "
                       "holds 2-D (Linear) adapters only.")
    layers = range(s.shape[0]) if stacked else [None]
    for i in layers:
      name = model.hf_module_name(path_t, i)
      ai, bi, si = (a[i], b[i], float(s[i])) if stacked else (a, b, float(s))
      r = ai.shape[-1]
      tensors[f"{_PREFIX}{name}.lora_A.weight"] = np.ascontiguousarray(ai.T)
      tensors[f"{_PREFIX}{name}.lora_B.weight"] = np.ascontiguousarray(bi.T)
      if mag is not None:
        tensors[f"{_PREFIX}{name}.{_DORA_NAME}"] = np.ascontiguousarray(mag[i] if stacked else mag)
      ranks[name] = r
      alphas[name] = si * (math.sqrt(r) if use_rslora else r)
    leaf_names.add(path_t[-1])
    adapted.add(path_t)
    if stacked:
      stacked_paths.add(path_t)

  target_parameters = _save_param_wrappers(experts, tensors, ranks, alphas, use_rslora)
  saved_modules = _save_full_leaves(p, model, tensors, dtype)
  token_tensors, token_indices = tokens.peft_export(p, model, dtype)  # trained token rows
  tensors.update(token_tensors)

  r0 = collections.Counter(ranks.values()).most_common(1)[0][0]
  alpha0 = collections.Counter(alphas.values()).most_common(1)[0][0]
  rank_pattern = {re.escape(n): r for n, r in ranks.items() if r != r0}
  alpha_pattern = {re.escape(n): a for n, a in alphas.items() if a != alpha0}
  # Plain module names when they pick exactly the adapted modules (what vLLM and most tools
  # expect); otherwise a regex that PEFT full-matches against module names.
  all_kernels = {pt for pt, _ in _tree.kernel_modules(p)} - expert_paths
  same_name = {pt for pt in all_kernels if pt[-1] in leaf_names}
  target_modules: Any = []
  if adapted and same_name == adapted:
    target_modules = sorted(leaf_names)
  elif adapted:
    alts = sorted(re.escape(model.hf_module_name(pt, 0 if pt in stacked_paths else None))
                  .replace(r"\.0\.", r"\.\d+\.", 1) for pt in adapted)
    target_modules = "(" + "|".join(alts) + ")"
  config = {
      "peft_type": "LORA", "task_type": task_type, "r": int(r0),
      "lora_alpha": _num(alpha0), "target_modules": target_modules,
      "rank_pattern": rank_pattern, "alpha_pattern": {k: _num(v) for k, v in alpha_pattern.items()},
      "use_rslora": bool(use_rslora), "fan_in_fan_out": bool(model.fan_in_fan_out),
      "bias": _bias_mode(p),
      "lora_dropout": 0.0, "use_dora": _uses_dora(mods),
      "init_lora_weights": init_lora_weights,
      "modules_to_save": saved_modules or None, "layers_to_transform": None,
      "layers_pattern": None,
      "inference_mode": True, "base_model_name_or_path": base_model_name_or_path,
      "trainable_token_indices": token_indices,
      "target_parameters": target_parameters or None,
  }
  if _multihost.is_writer():
    _write(os.fspath(path), tensors, config)
  _multihost.barrier("jaxlora.peft.save: done")


# ------------------------------------------------------------------------------ experts
# PEFT adapts a stacked expert parameter (transformers' ``experts.gate_up_proj``, shaped
# ``(E, out, in)``) through ``target_parameters``: a ``ParamWrapper`` around the experts module
# holds ``lora_A.weight`` ``(E*r, in)`` (row ``e*r + j`` is expert e's row j) and
# ``lora_B.weight`` ``(out, r*E)`` (column ``j*E + e``), scale ``alpha / r``. Two adapted
# parameters of one module nest: the one wrapped first (transformers' definition order)
# sits under ``base_layer.``.
_EXPERT_PARAM_ORDER = ("gate_up_proj", "down_proj")
_WRAPPED_KEY = re.compile(r"(?:base_model\.model\.)?(.+?)((?:\.base_layer)*)\.lora_([AB])\.weight")


def _param_depths(params: list[str]) -> dict[str, int]:
  """How many ``base_layer.`` levels PEFT puts before each adapted parameter's factors."""
  order = sorted(params, key=lambda n: (_EXPERT_PARAM_ORDER.index(n)
                                        if n in _EXPERT_PARAM_ORDER else len(_EXPERT_PARAM_ORDER), n))
  return {n: len(order) - 1 - i for i, n in enumerate(order)}


def _save_param_wrappers(experts: Mapping, tensors: dict, ranks: dict, alphas: dict,
                         use_rslora: bool) -> list[str]:
  """Writes the stacked-expert adapters in PEFT's ParamWrapper layout; their
  ``target_parameters`` entries."""
  targets = set()
  for module, params in experts.items():
    depths = _param_depths(list(params))
    r_mod = {params[n][0].shape[-1] for n in params}
    a_mod = {params[n][2] * (math.sqrt(r) if use_rslora else r)
             for n in params for r in [params[n][0].shape[-1]]}
    if len(r_mod) > 1 or len(a_mod) > 1:
      raise InputError(f"'{module}': its expert parameters {sorted(params)} have ranks "
                       f"{sorted(r_mod)} and alphas {sorted(a_mod)}; PEFT keys rank_pattern and "
                       "alpha_pattern by module, so they need one rank and one alpha.")
    for param, (a, b, scale) in params.items():
      e, n_in, r = a.shape
      key = f"{_PREFIX}{module}.{'base_layer.' * depths[param]}"
      tensors[key + "lora_A.weight"] = np.ascontiguousarray(a.transpose(0, 2, 1).reshape(e * r, n_in))
      tensors[key + "lora_B.weight"] = np.ascontiguousarray(
          b.transpose(2, 1, 0).reshape(b.shape[-1], r * e))
      ranks[module] = r
      alphas[module] = scale * (math.sqrt(r) if use_rslora else r)
      targets.add(re.sub(r"^.*?\.\d+\.", "", f"{module}.{param}"))
  return sorted(targets)


def _load_param_wrappers(path: str, weights: dict[str, np.ndarray], pc: Mapping, p: Mapping,
                         model: model_api.HubNames, dtype: Any) -> dict:
  """The stacked-expert adapters of a PEFT ``target_parameters`` adapter, by module path;
  their tensors are taken out of `weights`."""
  targets = pc.get("target_parameters") or []
  if isinstance(targets, str):
    targets = [targets]
  owners = {t.rsplit(".", 1)[0] for t in targets}
  found: dict[str, dict[int, dict[str, np.ndarray]]] = {}  # module -> depth -> {"A", "B"}
  for key in list(weights):
    m = _WRAPPED_KEY.fullmatch(key)
    if m is None or not any(m.group(1) == o or m.group(1).endswith("." + o) for o in owners):
      continue
    depth = m.group(2).count(".base_layer")
    found.setdefault(m.group(1), {}).setdefault(depth, {})[m.group(3)] = weights.pop(key)
  use_rslora = bool(pc.get("use_rslora", False))
  per_path: dict[tuple[str, ...], dict[int | None, tuple[np.ndarray, np.ndarray, float]]] = {}
  for module, by_depth in sorted(found.items()):
    for f in by_depth.values():
      if set(f) != {"A", "B"}:
        raise InputError(f"{path}: '{module}' lacks lora_{'B' if 'A' in f else 'A'}.weight.")
      cands = []
      for t in targets:
        param = t.rsplit(".", 1)[1]
        if not (module + "." + param).endswith(t):
          continue
        module_path, layer = model.flax_module_path(f"{module}.{param}")
        node = _tree.lookup(p, module_path, None)
        kernel = node.get(KERNEL_KEY) if isinstance(node, Mapping) else None
        if kernel is None or kernel.ndim < 3:
          continue
        e, n_in, n_out = kernel.shape[-3:]
        if (f["A"].shape[1] == n_in and f["B"].shape[0] == n_out
            and f["A"].shape[0] % e == 0 and f["B"].shape[1] == f["A"].shape[0]):
          cands.append((module_path, layer, e))
      if len(cands) != 1:
        raise InputError(
            f"{path}: lora_A {f['A'].shape} / lora_B {f['B'].shape} of '{module}' fit "
            f"{len(cands)} of the stacked expert kernels named by target_parameters {targets}; "
            "is this adapter for this model?")
      module_path, layer, e = cands[0]
      r = f["A"].shape[0] // e
      a = f["A"].reshape(e, r, -1).transpose(0, 2, 1)
      b = f["B"].reshape(f["B"].shape[0], r, e).transpose(2, 1, 0)
      alpha = _pattern(pc.get("alpha_pattern") or {}, module, pc.get("lora_alpha", 8))
      per_path.setdefault(module_path, {})[layer] = (a, b, alpha / (math.sqrt(r) if use_rslora
                                                                   else r))
  new = {}
  for module_path, per_layer in per_path.items():
    node = _tree.lookup(p, module_path)
    kernel = node[KERNEL_KEY]
    stacked = None not in per_layer
    lead = (kernel.shape[0],) if stacked else ()
    e, n_in, n_out = kernel.shape[-3:]
    r_max = max(f[0].shape[-1] for f in per_layer.values())
    a_all = np.zeros(lead + (e, n_in, r_max), np.float32)
    b_all = np.zeros(lead + (e, r_max, n_out), np.float32)
    s_all = np.zeros(lead, np.float32)
    for layer, (a, b, scale) in per_layer.items():
      idx = (layer,) if stacked else ()
      r = a.shape[-1]
      a_all[idx + (slice(None), slice(None), slice(0, r))] = a
      b_all[idx + (slice(None), slice(0, r))] = b
      s_all[idx] = scale
    new[module_path] = dict(node, **{A_KEY: jnp.asarray(a_all, dtype),
                                     B_KEY: jnp.asarray(b_all, dtype),
                                     SCALE_KEY: jnp.asarray(s_all)})
  return new


def _full_leaves(p: Mapping):
  """``(module path, leaf key, value, stacked axes, 'extra' | 'bias')`` of every base leaf
  that trains in full (`jaxlora.wrap`'s ``train_extra`` and ``bias``)."""
  out = []

  def walk(mod, path_t, extra_ndim):
    if EXTRA_KEY in mod and extra_ndim is None:
      extra_ndim = np.ndim(mod[EXTRA_KEY])
    for k, v in sorted(mod.items()):
      if isinstance(v, Mapping):
        walk(v, path_t + (k,), extra_ndim)
      elif not _tree.is_adapter_key(k):
        if extra_ndim is not None:
          out.append((path_t, k, v, extra_ndim, "extra"))
        elif k == _tree.BIAS_LEAF and BIAS_KEY in mod:
          out.append((path_t, k, v, np.ndim(mod[BIAS_KEY]), "bias"))

  walk(p, (), None)
  return out


def _torch_name(model: model_api.HubNames, path_t: tuple[str, ...], key: str,
                layer: int | None, lora_module: bool) -> str:
  name = model.hf_module_name(path_t, layer)
  if key == _tree.BIAS_LEAF:  # PEFT keeps an adapted layer's own weights under `base_layer`
    return f"{name}.base_layer.bias" if lora_module else f"{name}.bias"
  return f"{name}.weight"


def _save_full_leaves(p: Mapping, model: model_api.HubNames, tensors: dict[str, np.ndarray],
                      dtype: Any) -> list[str]:
  """Adds the fully trained leaves to `tensors`; returns PEFT's ``modules_to_save`` names."""
  saved: set[str] = set()
  for path_t, key, value, n_stack, kind in _full_leaves(p):
    arr = _multihost.host_value(value)
    if dtype is not None:
      arr = arr.astype(dtype)
    if n_stack > 1:
      raise InputError(f"'{_tree.join(path_t + (key,))}' has {n_stack} stacked axes; the PEFT "
                       "format holds one layer axis at most.")
    is_lora = A_KEY in _tree.lookup(p, path_t)
    transpose = key == KERNEL_KEY and not model.fan_in_fan_out
    for i in (range(arr.shape[0]) if n_stack else [None]):
      one = arr if i is None else arr[i]
      if one.ndim > 2 or (key == KERNEL_KEY and one.ndim != 2):
        raise InputError(f"'{_tree.join(path_t + (key,))}' {one.shape}: the PEFT format holds "
                         "PyTorch Linear, Embedding and norm weights only.")
      tensors[_PREFIX + _torch_name(model, path_t, key, i, is_lora)] = np.ascontiguousarray(
          one.T if transpose else one)
      if kind == "extra":
        saved.add(model.hf_module_name(path_t, i))
  return sorted(saved)


def _bias_mode(p: Mapping) -> str:
  marked = [m for _, m in _tree.iter_modules(p) if BIAS_KEY in m]
  if not marked:
    return "none"
  every = all(BIAS_KEY in m or EXTRA_KEY in m for _, m in _tree.iter_modules(p)
              if isinstance(m.get(_tree.BIAS_LEAF), (jax.Array, np.ndarray)))
  return "all" if every and any(A_KEY not in m for m in marked) else "lora_only"


_FULL_KEY = re.compile(r"(?:base_model\.model\.)?(.+?)(\.base_layer)?\.(weight|bias)")


def _load_full_leaves(path: str, weights: dict[str, np.ndarray], pc: Mapping, p: Mapping,
                      model: model_api.HubNames) -> dict:
  """The base leaves a PEFT adapter trains in full (``modules_to_save``, ``bias``), as a
  nested dict of new leaves and markers; their tensors are taken out of `weights`."""
  saved = pc.get("modules_to_save") or []
  if isinstance(saved, str):
    saved = [saved]
  found: dict[tuple[tuple[str, ...], str], dict[int | None, np.ndarray]] = {}
  kinds: dict[tuple[str, ...], str] = {}
  for key in list(weights):
    m = _FULL_KEY.fullmatch(key)
    if m is None or re.search(r"(^|\.)(lora_[A-Za-z_]+|token_adapter)(\.|$)", m.group(1)):
      continue  # a LoRA factor or another adapter tensor
    name, under_lora, which = m.groups()
    module_path, layer = model.flax_module_path(name)
    node = _tree.lookup(p, module_path, None)
    if not isinstance(node, Mapping):
      raise InputError(f"{path}: tensor {key!r} belongs to {name!r}, which the model "
                       f"({type(model).__name__}) does not have.")
    extra = any(name.endswith(t) for t in saved)  # PEFT's rule: a plain suffix match
    if which == "bias":
      leaf = _tree.BIAS_LEAF
    else:
      leaf = next((k for k in (KERNEL_KEY, "embedding", "scale") if k in node), "")
      if not leaf or not extra:
        raise InputError(f"{path}: tensor {key!r} is a full weight of {name!r}, which the config's "
                         f"modules_to_save {saved} does not name.")
    if under_lora and pc.get("bias", "none") == "none":
      raise InputError(f"{path}: tensor {key!r} is a trained bias but the config says "
                       "bias='none'.")
    kinds[module_path] = "extra" if extra else kinds.get(module_path, "bias")
    found.setdefault((module_path, leaf), {})[layer] = weights.pop(key)
  out: dict[tuple[str, ...], dict[str, Any]] = {}
  for (module_path, leaf), per_layer in found.items():
    node = _tree.lookup(p, module_path)
    base = node.get(leaf)
    if base is None:
      raise InputError(f"{path}: the adapter trains '{_tree.join(module_path + (leaf,))}', which "
                       "the base params lack.")
    stacked = None not in per_layer
    value: Any = np.array(jax.device_get(base), dtype=np.float32) if stacked else None
    for layer, arr in per_layer.items():
      arr = np.asarray(arr, np.float32)
      if leaf == KERNEL_KEY and not model.fan_in_fan_out:
        arr = arr.T
      want = tuple(np.shape(base))[1:] if stacked else tuple(np.shape(base))
      if arr.shape != want:
        raise InputError(f"{path}: '{model.hf_module_name(module_path, layer)}' {leaf} has shape "
                         f"{arr.shape}; the base needs {want}. Is this adapter for this model?")
      if stacked:
        value[layer] = arr
      else:
        value = arr
    marker_shape = tuple(np.shape(base))[:1] if stacked else ()
    marker = EXTRA_KEY if kinds[module_path] == "extra" else BIAS_KEY
    entry = out.setdefault(module_path, {})
    entry[leaf] = jnp.asarray(value, jnp.asarray(base).dtype)
    entry[marker] = jnp.zeros(marker_shape, jnp.int8)
  return _tree.nest(out)


# ------------------------------------------------------------------------------ DoRA

_DORA_NAME = "lora_magnitude_vector"  # PEFT's key for the magnitude; no `.weight` on disk


def _uses_dora(mods: list) -> bool:
  """PEFT's ``use_dora``; PEFT applies it to every adapted layer, so all or none must be DoRA."""
  dora = [_tree.join(pt) for pt, m in mods if MAGNITUDE_KEY in m]
  plain = [_tree.join(pt) for pt, m in mods if MAGNITUDE_KEY not in m]
  if dora and plain:
    raise InputError(f"'{dora[0]}' is a DoRA layer but '{plain[0]}' is not; a PEFT adapter has "
                     "one use_dora for all its layers. Wrap every layer with use_dora=True, or "
                     "none.")
  return bool(dora)


def _dora_host(mod: Mapping, dtype: Any) -> np.ndarray | None:
  """The magnitude of a DoRA module on the host (``(*stacked, out)``), else None."""
  if MAGNITUDE_KEY not in mod:
    return None
  mag = _multihost.host_value(mod[MAGNITUDE_KEY])
  return mag.astype(dtype) if dtype is not None else mag


def _dora_load(path: str, pc: Mapping, mod: dict, per_layer: Mapping, dtype: Any) -> None:
  """Adds the magnitude read from the file to a module that `load` built (DoRA configs)."""
  has = [f["name"] for f in per_layer.values() if "m" in f]
  if not pc.get("use_dora"):
    if has:
      raise InputError(f"{path}: {has[0]!r} has a DoRA magnitude ({_DORA_NAME}) but the config "
                       "says use_dora=false.")
    return
  lacks = [f["name"] for f in per_layer.values() if "m" not in f]
  if lacks:
    raise InputError(f"{path}: the config says use_dora=true but {lacks[0]!r} has no "
                     f"{_DORA_NAME}; the adapter is incomplete.")
  kernel = mod[KERNEL_KEY]
  stacked = np.ndim(mod[SCALE_KEY]) == 1
  roles = (("stack",) if stacked else ()) + ("in", "out")
  # Layers of a stack the file leaves out get their own norm: a factor of one, the base.
  mag = np.array(dora.magnitude(kernel, mod[A_KEY], mod[B_KEY], mod[SCALE_KEY], roles,
                                jnp.float32))
  for layer, f in per_layer.items():
    value = np.asarray(f["m"], np.float32)
    if value.shape != (kernel.shape[-1],):
      raise InputError(f"{path}: {f['name']!r} has a {_DORA_NAME} of shape {f['m'].shape}; the "
                       f"base kernel needs ({kernel.shape[-1]},).")
    mag[(layer,) if stacked else ()] = value
  mod[MAGNITUDE_KEY] = jnp.asarray(mag, dtype)


def _write(path: str, tensors: dict[str, np.ndarray], config: dict) -> None:
  """Stages both files locally, then moves (or, for URLs, copies) them into `path`."""
  with _files.staging_dir(path, prefix=".tmp-peft-") as stage:
    safetensors_io.save_file(tensors, os.path.join(stage, WEIGHTS_NAME), {"format": "pt"})
    with open(os.path.join(stage, CONFIG_NAME), "w") as f:
      json.dump(config, f, indent=2, sort_keys=True)
    # Weights first: a directory is a loadable adapter only once its config is in place.
    _files.publish(stage, path, (WEIGHTS_NAME, CONFIG_NAME))


def _num(x: float) -> int | float:
  return int(round(x)) if abs(x - round(x)) < 1e-9 else float(x)


def _read_weights(path: str) -> dict[str, np.ndarray]:
  st = os.path.join(path, WEIGHTS_NAME)
  if os.path.isfile(st):
    f = safetensors_io.SafetensorsFile(st)
    return {k: f.get(k) for k in f.keys()}
  binf = os.path.join(path, "adapter_model.bin")
  if os.path.isfile(binf):
    try:
      import torch  # pylint: disable=import-outside-toplevel
    except ImportError:
      raise InputError(f"{binf} is a PyTorch pickle; jaxlora reads it only through "
                       "torch.load(weights_only=True), and torch is not installed. Install torch "
                       "or convert the adapter to safetensors.") from None
    state = torch.load(binf, map_location="cpu", weights_only=True)
    return {k: v.float().numpy() if v.dtype == torch.bfloat16 else v.numpy()
            for k, v in state.items()}
  raise NotFoundError(f"No {WEIGHTS_NAME} (or adapter_model.bin) in {path!r}.")


def _pattern(patterns: dict, name: str, default: Any) -> Any:
  for key, value in (patterns or {}).items():  # PEFT's rule: a suffix match on module names
    if re.match(rf"(.*\.)?({key})$", name):
      return value
  return default


def load(path: str, base_params: Any, *, model: model_api.HubNames,
         dtype: Any = jnp.float32) -> Any:
  """Reads a PEFT LoRA adapter onto a jaxlora tree.

  Args:
    path: adapter directory (``adapter_config.json`` + ``adapter_model.safetensors``;
      ``adapter_model.bin`` only through ``torch.load(weights_only=True)``).
    base_params: the unwrapped params of `model` (with or without ``{'params': ...}``).
    model: the model of `base_params`; it names its modules as Hugging Face
      does (`jaxlora.model_api.HubNames`), as `jaxlora.models.Decoder` does.
    dtype: dtype of the adapter factors.

  Returns:
    The wrapped tree. Layers of a stack that the adapter leaves out get zero
    factors; differing ranks within a stack are zero-padded (both exact).
    A DoRA adapter (``use_dora``) gets ``lora_magnitude`` from the file's
    ``lora_magnitude_vector`` tensors (left-out layers of a stack: the norms of
    their base kernels, so they compute the base). With ``init_lora_weights``
    ``'pissa'``, ``'pissa_niter_K'`` or ``'olora'`` the adapted kernels become
    that scheme's residual of `base_params` (the original base), as PEFT
    does when it loads such an adapter.

  Raises:
    ValueError: unsupported PEFT options (lora_bias, layer_replication, ...),
      unknown keys, or shapes that do not fit the base.

  >>> import tempfile, jax, jaxlora
  >>> cfg = jaxlora.models.ModelConfig.tiny("llama")
  >>> model = jaxlora.models.Decoder(cfg)
  >>> params = jaxlora.models.init(model, jax.random.key(0))
  >>> tree = jaxlora.wrap(params, rank=2, targets="mlp", layout=model, key=jax.random.key(1))
  >>> d = tempfile.mkdtemp()
  >>> jaxlora.peft.save(d, tree, model=model)
  >>> back = jaxlora.peft.load(d, params, model=model)
  >>> [l.path for l in jaxlora.summary(back).layers]
  ['layers/mlp/down_proj', 'layers/mlp/gate_proj', 'layers/mlp/up_proj']
  """
  model_api.require(model, model_api.HubNames, "jaxlora.peft.load")
  cfg_path = os.path.join(path, CONFIG_NAME)
  if not os.path.isfile(cfg_path):
    raise NotFoundError(f"{cfg_path} not found: not a PEFT adapter directory.")
  try:
    with open(cfg_path) as cfg_file:
      pc = json.load(cfg_file)
  except json.JSONDecodeError as e:
    raise InputError(f"{cfg_path} is not valid JSON ({e}).") from None
  if pc.get("peft_type", "LORA") != "LORA":
    raise InputError(f"{cfg_path}: peft_type {pc.get('peft_type')!r}; only LORA adapters load.")
  bad = [k for k in _UNSUPPORTED if pc.get(k) not in (None, False, {}, [], "")]
  if pc.get("bias", "none") not in ("none", "all", "lora_only"):
    bad.append(f"bias={pc['bias']!r}")
  if bad:
    raise InputError(f"{cfg_path} uses PEFT options jaxlora does not implement: {bad}. "
                     "Loading it without them would compute a different model.")
  init = initialisation.peft_load_init(pc.get("init_lora_weights", True), cfg_path)
  p = _tree.get_params(base_params)
  if _tree.adapter_modules(p):
    raise InputError("`base_params` already hold an adapter; pass the unwrapped base params.")
  weights = _read_weights(path)
  # Both take their tensors out of `weights`.
  wrapped_params = _load_param_wrappers(path, weights, pc, p, model, dtype)
  full = _load_full_leaves(path, weights, pc, p, model)
  use_rslora = bool(pc.get("use_rslora", False))
  # module path -> layer (None when not stacked) -> {"A": array, "B": array, "name": hf name}
  factors: dict[tuple[str, ...], dict[int | None, dict[str, Any]]] = {}
  for key, value in weights.items():
    if tokens.is_peft_key(key):  # trained token rows: read below
      continue
    m = re.fullmatch(r"(?:base_model\.model\.)?(.+)\.(?:lora_([AB])(?:\.[A-Za-z0-9_]+)?\.weight"
                     rf"|{_DORA_NAME}(?:\.[A-Za-z0-9_]+)?(?:\.weight)?)", key)
    if m is None:
      raise InputError(f"{path}: tensor {key!r} is not a LoRA A/B weight or DoRA magnitude; "
                       "jaxlora loads LoRA adapters (no embedding or other adapter tensors).")
    name, which = m.group(1), m.group(2) or "m"
    module_path, layer = model.flax_module_path(name)
    factors.setdefault(module_path, {}).setdefault(layer, {})[which] = np.asarray(value)
    factors[module_path][layer]["name"] = name

  new = {}
  for module_path, per_layer in sorted(factors.items(), key=lambda kv: kv[0]):
    node = _tree.lookup(p, module_path, None)
    if not isinstance(node, Mapping):
      some = next(iter(per_layer.values()))["name"]
      raise InputError(f"{path}: the adapter targets {some!r}, which the "
                       f"model ({type(model).__name__}) does not have.")
    if KERNEL_KEY not in node:
      raise InputError(f"{path}: module {_tree.join(module_path)!r} has no kernel.")
    kernel = node[KERNEL_KEY]
    stacked = None not in per_layer
    n_layers = kernel.shape[0] if stacked else 0
    in_dim, out_dim = kernel.shape[-2], kernel.shape[-1]
    for layer, f in per_layer.items():
      if "A" not in f or "B" not in f:
        raise InputError(f"{path}: {f['name']!r} lacks lora_{'B' if 'A' in f else 'A'}.weight.")
      r = f["A"].shape[0]
      if f["A"].shape != (r, in_dim) or f["B"].shape != (out_dim, r):
        raise InputError(
            f"{path}: {f['name']!r} has lora_A {f['A'].shape} and lora_B {f['B'].shape}; the "
            f"base kernel needs [r, {in_dim}] and [{out_dim}, r]. Is this adapter for this model?")
      if stacked and layer is not None and not 0 <= layer < n_layers:
        raise InputError(f"{path}: {f['name']!r} names layer {layer}; the model has {n_layers}.")
    r_max = max(f["A"].shape[0] for f in per_layer.values())
    lead = (n_layers,) if stacked else ()
    a = np.zeros(lead + (in_dim, r_max), np.float32)
    b = np.zeros(lead + (r_max, out_dim), np.float32)
    s = np.zeros(lead, np.float32)
    for layer, f in per_layer.items():
      r = f["A"].shape[0]
      alpha = _pattern(pc.get("alpha_pattern"), f["name"], pc.get("lora_alpha", 8))
      scale = alpha / math.sqrt(r) if use_rslora else alpha / r
      idx = (layer,) if stacked else ()
      a[idx + (slice(None), slice(0, r))] = f["A"].T
      b[idx + (slice(0, r), slice(None))] = f["B"].T
      s[idx] = scale
    mod = dict(node)
    mod[A_KEY] = jnp.asarray(a, dtype)
    mod[B_KEY] = jnp.asarray(b, dtype)
    mod[SCALE_KEY] = jnp.asarray(s)
    if initialisation.mutates_base(init):  # PEFT rebuilds the PiSSA/OLoRA residual on load
      mod[KERNEL_KEY] = initialisation.peft_residual(init, kernel, {
          l: (f["A"].shape[0], float(s[(l,) if stacked else ()])) for l, f in per_layer.items()})
    _dora_load(path, pc, mod, per_layer, dtype)
    new[module_path] = mod
  new.update(wrapped_params)
  out = tokens.peft_import(path, pc.get("trainable_token_indices"), weights,
                           _tree.replace_modules(p, new), model, dtype)
  return _tree.with_params(base_params, _tree.overlay(out, full))
