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
from jaxlora import model_api
from jaxlora import safetensors_io
from jaxlora._tree import A_KEY, B_KEY, KERNEL_KEY, SCALE_KEY
from jaxlora.errors import InputError, NotFoundError

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
_PREFIX = "base_model.model."
# PEFT options that change what an adapter computes; refused rather than ignored.
_UNSUPPORTED = ("use_dora", "modules_to_save", "lora_bias", "target_parameters",
                "layer_replication", "use_qalora", "trainable_token_indices",
                "alora_invocation_tokens", "use_bdlora", "megatron_config", "arrow_config")


def save(path: str, tree: Any, *, model: model_api.HubNames,
         base_model_name_or_path: str | None = None,
         use_rslora: bool = False, dtype: Any = None) -> None:
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
  p = _tree.get_params(tree)
  mods = _tree.adapter_modules(p)
  if not mods:
    raise InputError("The tree holds no adapter; wrap the params with jaxlora.wrap first.")
  tensors: dict[str, np.ndarray] = {}
  ranks: dict[str, int] = {}
  alphas: dict[str, float] = {}
  leaf_names: set[str] = set()
  adapted: set[tuple[str, ...]] = set()
  stacked_paths: set[tuple[str, ...]] = set()  # modules with a layer axis (nn.scan)
  for path_t, mod in mods:
    a = _multihost.host_value(mod[A_KEY])
    b = _multihost.host_value(mod[B_KEY])
    s = _multihost.host_value(mod[SCALE_KEY]).astype(np.float64)
    if dtype is not None:
      a, b = a.astype(dtype), b.astype(dtype)
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
      ranks[name] = r
      alphas[name] = si * (math.sqrt(r) if use_rslora else r)
    leaf_names.add(path_t[-1])
    adapted.add(path_t)
    if stacked:
      stacked_paths.add(path_t)

  r0 = collections.Counter(ranks.values()).most_common(1)[0][0]
  alpha0 = collections.Counter(alphas.values()).most_common(1)[0][0]
  rank_pattern = {re.escape(n): r for n, r in ranks.items() if r != r0}
  alpha_pattern = {re.escape(n): a for n, a in alphas.items() if a != alpha0}
  # Plain module names when they pick exactly the adapted modules (what vLLM and most tools
  # expect); otherwise a regex that PEFT full-matches against module names.
  all_kernels = {pt for pt, _ in _tree.kernel_modules(p)}
  same_name = {pt for pt in all_kernels if pt[-1] in leaf_names}
  if same_name == adapted:
    target_modules: Any = sorted(leaf_names)
  else:
    alts = sorted(re.escape(model.hf_module_name(pt, 0 if pt in stacked_paths else None))
                  .replace(r"\.0\.", r"\.\d+\.", 1) for pt in adapted)
    target_modules = "(" + "|".join(alts) + ")"
  config = {
      "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": int(r0),
      "lora_alpha": _num(alpha0), "target_modules": target_modules,
      "rank_pattern": rank_pattern, "alpha_pattern": {k: _num(v) for k, v in alpha_pattern.items()},
      "use_rslora": bool(use_rslora), "fan_in_fan_out": bool(model.fan_in_fan_out), "bias": "none",
      "lora_dropout": 0.0, "use_dora": False, "init_lora_weights": True,
      "modules_to_save": None, "layers_to_transform": None, "layers_pattern": None,
      "inference_mode": True, "base_model_name_or_path": base_model_name_or_path,
  }
  if _multihost.is_writer():
    _write(os.fspath(path), tensors, config)
  _multihost.barrier("jaxlora.peft.save: done")


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

  Raises:
    ValueError: unsupported PEFT options (DoRA, modules_to_save, ...), unknown
      keys, or shapes that do not fit the base.

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
  if pc.get("bias", "none") != "none":
    bad.append(f"bias={pc['bias']!r}")
  if bad:
    raise InputError(f"{cfg_path} uses PEFT options jaxlora does not implement: {bad}. "
                     "Loading it without them would compute a different model.")
  p = _tree.get_params(base_params)
  if _tree.adapter_modules(p):
    raise InputError("`base_params` already hold an adapter; pass the unwrapped base params.")
  weights = _read_weights(path)
  use_rslora = bool(pc.get("use_rslora", False))
  # module path -> layer (None when not stacked) -> {"A": array, "B": array, "name": hf name}
  factors: dict[tuple[str, ...], dict[int | None, dict[str, Any]]] = {}
  for key, value in weights.items():
    m = re.fullmatch(r"(?:base_model\.model\.)?(.+)\.lora_([AB])(?:\.[A-Za-z0-9_]+)?\.weight", key)
    if m is None:
      raise InputError(f"{path}: tensor {key!r} is not a LoRA A/B weight; jaxlora loads plain "
                       "LoRA adapters only (no DoRA magnitudes, embeddings or saved modules).")
    name, which = m.groups()
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
    new[module_path] = mod
  return _tree.with_params(base_params, _tree.replace_modules(p, new))
