"""Reading and writing Hugging Face checkpoints (config.json + safetensors) from local files."""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxlora import _tree
from jaxlora.models import safetensors_io
from jaxlora.models.config import ModelConfig
from jaxlora.models.decoder import Decoder, abstract_variables

# Buffers some checkpoints carry that are not parameters.
_IGNORED = re.compile(r"(^|\.)attn\.(bias|masked_bias)$|rotary_emb\.inv_freq$")


def _scan_name(cfg: ModelConfig) -> str:
  return "h" if cfg.is_gpt2 else "layers"


def _hf_name(cfg: ModelConfig, path: tuple[str, ...], layer: int | None, prefix: str) -> str:
  """The checkpoint tensor name of a flax param (`layer` for scanned params)."""
  *mods, leaf = path
  suffix = "bias" if leaf == "bias" else "weight"
  if layer is not None:
    mods = [mods[0], str(layer)] + mods[1:]
  name = ".".join(mods + [suffix])
  if mods[0] == "lm_head":
    return name
  return (prefix if cfg.is_gpt2 else "model.") + name


def _transposed(cfg: ModelConfig, path: tuple[str, ...]) -> bool:
  """PyTorch Linear stores `[out, in]`; GPT-2's Conv1D already stores `(in, out)`."""
  if path[-1] != "kernel":
    return False
  return not cfg.is_gpt2 or path[0] == "lm_head"


def _abstract_params(model: Decoder) -> dict:
  return nn.unbox(abstract_variables(model))["params"]


def _read_config(path: str) -> dict:
  if not os.path.isdir(path):
    raise FileNotFoundError(f"Model directory {path!r} does not exist.")
  cfg_path = os.path.join(path, "config.json")
  if not os.path.isfile(cfg_path):
    raise FileNotFoundError(f"{cfg_path} not found: a Hugging Face checkpoint directory holds "
                            "config.json and model.safetensors (or a sharded index).")
  try:
    with open(cfg_path) as f:
      return json.load(f)
  except json.JSONDecodeError as e:
    raise ValueError(f"{cfg_path} is not valid JSON ({e}).") from None


def _open_weights(path: str) -> dict[str, safetensors_io.SafetensorsFile]:
  """Tensor name -> the file that holds it."""
  single = os.path.join(path, "model.safetensors")
  index = os.path.join(path, "model.safetensors.index.json")
  if os.path.isfile(single):
    f = safetensors_io.SafetensorsFile(single)
    return {k: f for k in f.keys()}
  if os.path.isfile(index):
    with open(index) as fh:
      weight_map = json.load(fh).get("weight_map", {})
    files = {}
    out = {}
    for name, fname in weight_map.items():
      full = os.path.join(path, fname)
      if fname not in files:
        if not os.path.isfile(full):
          raise FileNotFoundError(f"{index} lists {fname!r} (for {name!r}) but {full} is missing.")
        files[fname] = safetensors_io.SafetensorsFile(full)
      if name not in files[fname].header:
        raise ValueError(f"{index} says {name!r} is in {fname!r}, but that file lacks it.")
      out[name] = files[fname]
    return out
  others = [f for f in os.listdir(path) if f.endswith((".bin", ".pt", ".pth", ".ckpt"))]
  hint = (f" Found {others}: jaxlora reads safetensors only (never pickles); convert them with "
          "transformers' save_pretrained(safe_serialization=True).") if others else ""
  raise FileNotFoundError(f"No model.safetensors or model.safetensors.index.json in {path!r}.{hint}")


def from_pretrained(path: str, *, dtype: Any = jnp.float32, param_dtype: Any = jnp.float32,
                    remat: str | None = None, shardings: Any = None) -> tuple[Decoder, dict]:
  """Loads a Hugging Face GPT-2 or Llama-family checkpoint from a local directory.

  Reads `config.json` and `model.safetensors` (or a sharded
  `model.safetensors.index.json`), converts tensor by tensor (PyTorch
  `[out, in]` to Flax `(in, out)`, GPT-2 Conv1D as is), stacks the layers for
  `nn.scan`, and never touches the network.

  Args:
    path: checkpoint directory.
    dtype: compute dtype of the returned model.
    param_dtype: dtype the params are stored in.
    remat: rematerialisation policy of the layers (see `Decoder`).
    shardings: optional tree of shardings like the params (e.g. from
      `jaxlora.sharding.param_shardings`), or a function of the model that returns
      one: each tensor is placed straight into its shards, so no device ever
      holds a whole copy of a sharded weight.

  Returns:
    ``(model, params)``; ``model.apply({'params': params}, input_ids, attention_mask=...)``
    returns logits.

  Raises:
    FileNotFoundError: missing directory or files.
    ValueError: unknown model type, missing, extra or misshapen tensors.

  >>> import tempfile, jax, jax.numpy as jnp, jaxlora
  >>> cfg = jaxlora.models.ModelConfig("llama", 32, 16, 2, 4, 2, 4, 32, 64, 1e-6, False)
  >>> model = jaxlora.models.Decoder(cfg)
  >>> params = jaxlora.models.init(model, jax.random.key(0))
  >>> d = tempfile.mkdtemp()
  >>> jaxlora.models.save_pretrained(d, model, params)
  >>> model2, params2 = jaxlora.models.from_pretrained(d)
  >>> bool(jnp.array_equal(params2['layers']['mlp']['up_proj']['kernel'],
  ...                      params['layers']['mlp']['up_proj']['kernel']))
  True
  """
  cfg = ModelConfig.from_hf(_read_config(path), source=os.path.join(path, "config.json"))
  weights = _open_weights(path)
  model = Decoder(cfg, dtype=dtype, param_dtype=param_dtype, remat=remat)
  abstract = _abstract_params(model)
  prefix = "transformer." if any(k.startswith("transformer.") for k in weights) else ""
  used: set[str] = set()
  scan = _scan_name(cfg)

  def fetch(name: str, want: tuple[int, ...], transpose: bool) -> np.ndarray:
    if name not in weights:
      raise ValueError(f"Checkpoint {path!r} lacks tensor {name!r} (expected shape "
                       f"{want[::-1] if transpose else want}) for model_type {cfg.model_type!r}.")
    t = weights[name].get(name)
    if transpose:
      t = t.T
    if tuple(t.shape) != want:
      stored = tuple(weights[name].shape(name))
      raise ValueError(f"Tensor {name!r} in {weights[name].path} has shape {stored}; the config "
                       f"implies {want[::-1] if transpose else want}.")
    used.add(name)
    return t

  def load(path_t: tuple[str, ...], leaf: jax.ShapeDtypeStruct):
    transpose = _transposed(cfg, path_t)
    if path_t[0] == scan:
      out = np.empty(leaf.shape, leaf.dtype)
      for i in range(leaf.shape[0]):
        out[i] = fetch(_hf_name(cfg, path_t, i, prefix), leaf.shape[1:], transpose)
    else:
      out = np.asarray(fetch(_hf_name(cfg, path_t, None, prefix), leaf.shape, transpose),
                       leaf.dtype)
    sharding = shard_map.get(path_t)
    if sharding is not None:
      return jax.make_array_from_callback(out.shape, sharding, lambda idx: out[idx])
    return jnp.asarray(out)  # one tensor at a time: the numpy copy is freed right after

  flat = jax.tree_util.tree_flatten_with_path(abstract)[0]
  shard_map = {}
  if callable(shardings):
    shardings = shardings(model)
  if shardings is not None:
    shard_map = {tuple(k.key for k in kp): s for kp, s in jax.tree_util.tree_flatten_with_path(
        _tree.get_params(shardings), is_leaf=lambda x: isinstance(x, jax.sharding.Sharding))[0]}
  loaded = {}
  for kp, leaf in flat:
    path_t = tuple(k.key for k in kp)
    loaded[path_t] = load(path_t, leaf)
  extra = sorted(k for k in weights if k not in used and not _IGNORED.search(k)
                 and not (cfg.tie_word_embeddings and k == "lm_head.weight"))
  if extra:
    raise ValueError(f"Checkpoint {path!r} has tensors the {cfg.model_type!r} model does not use: "
                     f"{extra[:8]}{' ...' if len(extra) > 8 else ''}. Is config.json for "
                     "this checkpoint?")
  params = jax.tree_util.tree_unflatten(
      jax.tree.structure(abstract), [loaded[tuple(k.key for k in kp)] for kp, _ in flat])
  return model, params


def save_pretrained(path: str, model: Decoder, params: Any, *,
                    dtype: Any = None, max_shard_bytes: int = 5 * 2**30) -> None:
  """Writes a Hugging Face checkpoint (config.json + safetensors) that transformers loads.

  Use it for merged exports: ``save_pretrained(d, model, jaxlora.merge(tree))``.
  Files are written to a temporary directory beside `path` and moved into
  place, so an interrupted save leaves no half-written checkpoint.

  Args:
    path: output directory (created; existing checkpoint files are replaced).
    model: the `Decoder` the params belong to.
    params: its params (plain arrays, with or without ``{'params': ...}``).
    dtype: tensor dtype on disk (default: the params' own).
    max_shard_bytes: above this total, write shards plus an index file.

  Raises:
    ValueError: if the params still hold adapters (merge them first) or do not fit the model.

  >>> import tempfile, os, jax, jaxlora
  >>> cfg = jaxlora.models.ModelConfig("gpt2", 32, 16, 2, 4, 4, 4, 64, 64, 1e-5, True)
  >>> model = jaxlora.models.Decoder(cfg)
  >>> d = tempfile.mkdtemp()
  >>> jaxlora.models.save_pretrained(d, model, jaxlora.models.init(model, jax.random.key(0)))
  >>> sorted(os.listdir(d))
  ['config.json', 'model.safetensors']
  """
  if not isinstance(model, Decoder):
    raise TypeError(f"`model` must be a jaxlora.models.Decoder, got {type(model).__name__}.")
  p = _tree.get_params(params)
  if _tree.adapter_modules(p):
    raise ValueError("The params hold LoRA adapters; export `jaxlora.merge(tree)` as a plain "
                     "checkpoint, or the adapter alone in PEFT format.")
  cfg = model.config
  abstract = _abstract_params(model)
  want = jax.tree_util.tree_flatten_with_path(abstract)[0]
  have = {tuple(k.key for k in kp): v for kp, v in jax.tree_util.tree_flatten_with_path(p)[0]}
  prefix = "transformer." if cfg.is_gpt2 else ""
  tensors: dict[str, np.ndarray] = {}
  for kp, leaf in want:
    path_t = tuple(k.key for k in kp)
    if path_t not in have:
      raise ValueError(f"params lack '{_tree.join(path_t)}' {leaf.shape} required by the model.")
    arr = np.asarray(jax.device_get(have.pop(path_t)))
    if arr.shape != leaf.shape:
      raise ValueError(f"params '{_tree.join(path_t)}' has shape {arr.shape}; the model "
                       f"expects {leaf.shape}.")
    if dtype is not None:
      arr = arr.astype(dtype)
    transpose = _transposed(cfg, path_t)
    if path_t[0] == _scan_name(cfg):
      for i in range(arr.shape[0]):
        tensors[_hf_name(cfg, path_t, i, prefix)] = arr[i].T if transpose else arr[i]
    else:
      tensors[_hf_name(cfg, path_t, None, prefix)] = arr.T if transpose else arr
  if have:
    raise ValueError(f"params hold leaves the model does not use: "
                     f"{sorted(_tree.join(k) for k in have)[:8]}.")
  hf_cfg = cfg.to_hf()
  first = next(iter(tensors.values()))
  hf_cfg["dtype"] = str(first.dtype) if str(first.dtype) != "bfloat16" else "bfloat16"

  parent = os.path.dirname(os.path.abspath(path)) or "."
  os.makedirs(parent, exist_ok=True)
  tmp = tempfile.mkdtemp(dir=parent, prefix=".tmp-save-")
  try:
    shards: list[dict[str, np.ndarray]] = [{}]
    size = 0
    for name in sorted(tensors):
      nbytes = tensors[name].nbytes
      if size and size + nbytes > max_shard_bytes:
        shards.append({})
        size = 0
      shards[-1][name] = tensors[name]
      size += nbytes
    meta = {"format": "pt"}
    if len(shards) == 1:
      safetensors_io.save_file(shards[0], os.path.join(tmp, "model.safetensors"), meta)
      files = ["model.safetensors"]
    else:
      files = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
      weight_map = {}
      for fname, shard in zip(files, shards):
        safetensors_io.save_file(shard, os.path.join(tmp, fname), meta)
        weight_map.update({k: fname for k in shard})
      total = sum(t.nbytes for t in tensors.values())
      with open(os.path.join(tmp, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
      files.append("model.safetensors.index.json")
    with open(os.path.join(tmp, "config.json"), "w") as f:
      json.dump(hf_cfg, f, indent=2, sort_keys=True)
    files.append("config.json")
    os.makedirs(path, exist_ok=True)
    for stale in ("model.safetensors", "model.safetensors.index.json"):
      if stale not in files and os.path.exists(os.path.join(path, stale)):
        os.remove(os.path.join(path, stale))
    for fname in files:
      os.replace(os.path.join(tmp, fname), os.path.join(path, fname))
  finally:
    shutil.rmtree(tmp, ignore_errors=True)


def init(model: Decoder, key: jax.Array) -> dict:
  """Freshly initialised, unboxed params for `model` (plain arrays).

  >>> import jax, jaxlora
  >>> cfg = jaxlora.models.ModelConfig("llama", 32, 16, 2, 4, 2, 4, 32, 64, 1e-6, False)
  >>> params = jaxlora.models.init(jaxlora.models.Decoder(cfg), jax.random.key(0))
  >>> params['layers']['self_attn']['k_proj']['kernel'].shape
  (2, 16, 8)
  """
  return nn.unbox(model.init(key, jnp.zeros((1, 1), jnp.int32)))["params"]


def hf_module_name(config: ModelConfig, module_path: tuple[str, ...], layer: int | None) -> str:
  """The PyTorch module name of a flax module, e.g. 'model.layers.3.self_attn.q_proj'.

  >>> import jaxlora
  >>> cfg = jaxlora.models.ModelConfig("llama", 32, 16, 2, 4, 2, 4, 32, 64, 1e-6, False)
  >>> hf_module_name(cfg, ("layers", "self_attn", "q_proj"), 3)
  'model.layers.3.self_attn.q_proj'
  """
  prefix = "transformer." if config.is_gpt2 else ""
  return _hf_name(config, tuple(module_path) + ("kernel",), layer, prefix)[: -len(".weight")]


def flax_module_path(config: ModelConfig, name: str) -> tuple[tuple[str, ...], int | None]:
  """Inverse of `hf_module_name`: ``(module path, layer or None)``.

  >>> import jaxlora
  >>> cfg = jaxlora.models.ModelConfig("gpt2", 32, 16, 2, 4, 4, 4, 64, 64, 1e-5, True)
  >>> flax_module_path(cfg, "transformer.h.1.mlp.c_fc")
  (('h', 'mlp', 'c_fc'), 1)
  """
  parts = name.split(".")
  if config.is_gpt2 and parts[0] == "transformer":
    parts = parts[1:]
  elif not config.is_gpt2 and parts[0] == "model":
    parts = parts[1:]
  scan = _scan_name(config)
  if len(parts) > 2 and parts[0] == scan and parts[1].isdigit():
    return (scan,) + tuple(parts[2:]), int(parts[1])
  return tuple(parts), None
