"""Reading and writing Hugging Face checkpoints (config.json + safetensors) from local files."""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxlora import _files
from jaxlora import _tree
from jaxlora import safetensors_io
from jaxlora.models.config import ModelConfig
from jaxlora.models.decoder import Decoder, abstract_variables
from jaxlora.errors import InputError, InputTypeError, NotFoundError

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


# Mixture of experts: the flax kernels stack the experts, `(E, in, out)` per layer; the
# checkpoints (as transformers writes them, and as on the Hub) hold one Linear per expert.
_EXPERT_FILES = {
    # model_type: (experts' module, gate, up, down)
    "mixtral": ("block_sparse_moe.experts", "w1", "w3", "w2"),
    "qwen2_moe": ("mlp.experts", "gate_proj", "up_proj", "down_proj"),
    "qwen3_moe": ("mlp.experts", "gate_proj", "up_proj", "down_proj"),
}


def _is_expert_kernel(path: tuple[str, ...]) -> bool:
  return len(path) >= 3 and path[-3] == "experts" and path[-1] == "kernel"


def _disk_name(cfg: ModelConfig, name: str) -> str:
  """The tensor name on disk of a module's weight (Mixtral keeps its router under
  ``block_sparse_moe``; transformers renames it to ``mlp`` in memory)."""
  if cfg.model_type == "mixtral":
    return name.replace(".mlp.gate.weight", ".block_sparse_moe.gate.weight")
  return name


def _expert_names(cfg: ModelConfig, layer: int | None, proj: str) -> list[list[str]]:
  """Per expert, the checkpoint tensors a stacked expert kernel concatenates (gate then up
  for ``gate_up_proj``)."""
  module, gate, up, down = _EXPERT_FILES[cfg.model_type]
  parts = [gate, up] if proj == "gate_up_proj" else [down]
  at = "" if layer is None else f"layers.{layer}."
  return [[f"model.{at}{module}.{e}.{w}.weight" for w in parts]
          for e in range(cfg.num_experts)]


def _transposed(cfg: ModelConfig, path: tuple[str, ...]) -> bool:
  """PyTorch Linear stores `[out, in]`; GPT-2's Conv1D already stores `(in, out)`."""
  if path[-1] != "kernel":
    return False
  return not cfg.is_gpt2 or path[0] == "lm_head"


def _abstract_params(model: Decoder) -> dict:
  return nn.unbox(abstract_variables(model))["params"]


def _read_config(path: str) -> dict:
  if not os.path.isdir(path):
    raise NotFoundError(f"Model directory {path!r} does not exist.")
  cfg_path = os.path.join(path, "config.json")
  if not os.path.isfile(cfg_path):
    raise NotFoundError(f"{cfg_path} not found: a Hugging Face checkpoint directory holds "
                        "config.json and model.safetensors (or a sharded index).")
  try:
    with open(cfg_path) as f:
      return json.load(f)
  except json.JSONDecodeError as e:
    raise InputError(f"{cfg_path} is not valid JSON ({e}).") from None


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
          raise NotFoundError(f"{index} lists {fname!r} (for {name!r}) but {full} is missing.")
        files[fname] = safetensors_io.SafetensorsFile(full)
      if name not in files[fname].header:
        raise InputError(f"{index} says {name!r} is in {fname!r}, but that file lacks it.")
      out[name] = files[fname]
    return out
  others = [f for f in os.listdir(path) if f.endswith((".bin", ".pt", ".pth", ".ckpt"))]
  hint = (f" Found {others}: jaxlora reads safetensors only (never pickles); convert them with "
          "transformers' save_pretrained(safe_serialization=True).") if others else ""
  raise NotFoundError(f"No model.safetensors or model.safetensors.index.json in {path!r}.{hint}")


def _torch_dtype(name: Any) -> np.dtype:
  """A dtype as bitsandbytes' quant state writes it ('float32', 'bfloat16', 'torch.float16')."""
  name = str(name)
  name = name[len("torch."):] if name.startswith("torch.") else name
  if name not in _STATE_DTYPES:
    raise InputError(f"dtype {name!r} (expected one of {sorted(_STATE_DTYPES)})")
  return np.dtype(_STATE_DTYPES[name])


_STATE_DTYPES = {"float32": np.float32, "float16": np.float16, "bfloat16": jnp.bfloat16}
_QUANT_STATE = re.compile(r"^(.+\.weight)\.quant_state\.(.+)$")
_BNB4_STATES = {"bitsandbytes__nf4": "nf4", "bitsandbytes__fp4": "fp4"}


def _stored_qtype(hf: Mapping, source: str, qtype: str | None) -> str | None:
  """Checks config.json's ``quantization_config``; the bitsandbytes type it declares, if any."""
  qc = hf.get("quantization_config")
  if not qc:
    return None
  if not isinstance(qc, Mapping):
    raise InputError(f"{source}: quantization_config is {type(qc).__name__}, not an object.")
  method = qc.get("quant_method", "bitsandbytes" if ("load_in_4bit" in qc or "load_in_8bit" in qc)
                  else None)
  if method != "bitsandbytes":
    raise InputError(
        f"{source}: quantization_config.quant_method is {method!r}; jaxlora reads checkpoints "
        "quantized with bitsandbytes (4-bit nf4/fp4 and 8-bit) only. Load the original float "
        "checkpoint instead, optionally with from_pretrained(..., quantize='nf4').")
  if qc.get("load_in_4bit"):
    stored, key = qc.get("bnb_4bit_quant_type", "fp4"), "bnb_4bit_quant_type"
    if stored not in ("nf4", "fp4"):
      raise InputError(f"{source}: quantization_config.bnb_4bit_quant_type is {stored!r}; "
                       "bitsandbytes 4-bit types are 'nf4' and 'fp4'.")
  elif qc.get("load_in_8bit"):
    stored, key = "int8", "load_in_8bit"
  else:
    return None
  if qtype is not None and qtype != stored:
    raise InputError(
        f"{source}: quantize={qtype!r}, but this checkpoint is already quantized by bitsandbytes "
        f"as {stored!r} (quantization_config.{key}); quantizing its quantized weights again "
        f"would add a second rounding. Pass quantize=None (or {stored!r}) to load it as stored, "
        f"or load the float checkpoint with quantize={qtype!r}.")
  return stored


# Hub ids: ``org/name``, the characters the Hub allows (no leading '.', no '..').
_REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9_][\w.-]*")

# The files `from_pretrained` and a tokenizer (with its chat template) read; no .bin/.pt pickles.
HUB_PATTERNS = ("*.json", "*.safetensors", "tokenizer*", "*.model", "*.txt", "*.jinja")


def is_repo_id(path: str) -> bool:
  """Whether `path` reads as a Hugging Face Hub id, ``org/name``, rather than a local path.

  Args:
    path: what the user gave (a directory or an id).

  Returns:
    True for ``org/name`` (one '/', no leading '/', './' or '~', no '..').

  >>> is_repo_id("HuggingFaceTB/SmolLM2-135M"), is_repo_id("./ckpt"), is_repo_id("/a/b")
  (True, False, False)
  >>> is_repo_id("runs/a/adapter"), is_repo_id("../ckpt")
  (False, False)
  """
  return bool(_REPO_ID.fullmatch(path)) and ".." not in path


def resolve(path: str, revision: str | None = None) -> str:
  """The local directory of a checkpoint given as a directory or a Hugging Face Hub id.

  An existing directory is returned as is. Otherwise an id (``org/name``, see
  `is_repo_id`) is fetched with ``huggingface_hub.snapshot_download``: only
  config, safetensors and tokenizer files (`HUB_PATTERNS`), never pickled
  ``.bin``/``.pt`` weights. With ``HF_HUB_OFFLINE=1`` huggingface_hub reads its
  local cache only.

  Args:
    path: a local checkpoint directory or a Hub id.
    revision: a branch, tag or commit of the Hub repository (None: ``main``);
      only for Hub ids.

  Returns:
    A local directory holding the checkpoint.

  Raises:
    NotFoundError: `path` is neither a directory nor an id, or the id is not on
      the Hub (or not in the cache while offline).
    InputError: a `revision` with a local directory.

  >>> import tempfile
  >>> d = tempfile.mkdtemp()
  >>> resolve(d) == d
  True
  >>> resolve(d, revision="main")  # doctest: +ELLIPSIS
  Traceback (most recent call last):
  ...
  jaxlora.errors.InputError: revision='main' applies to Hugging Face Hub ids (org/name), ...
  >>> resolve("no/such/dir")
  Traceback (most recent call last):
  ...
  jaxlora.errors.NotFoundError: Model directory 'no/such/dir' does not exist (nor is it a Hugging \
Face Hub id, org/name).
  """
  if os.path.isdir(path):
    if revision is not None:
      raise InputError(f"revision={revision!r} applies to Hugging Face Hub ids (org/name), but "
                       f"{path} is a local directory; leave the revision out")
    return path
  if not is_repo_id(path):
    raise NotFoundError(f"Model directory {path!r} does not exist (nor is it a Hugging Face "
                        "Hub id, org/name).")
  import huggingface_hub  # pylint: disable=import-outside-toplevel
  from huggingface_hub import errors as hub_errors  # pylint: disable=import-outside-toplevel

  at = "" if revision is None else f" at revision {revision!r}"
  include = " ".join(f"--include '{p}'" for p in HUB_PATTERNS)  # one flag per pattern
  download = f"hf download {path}{'' if revision is None else f' --revision {revision}'} {include}"
  try:
    return huggingface_hub.snapshot_download(path, revision=revision,
                                             allow_patterns=list(HUB_PATTERNS))
  except hub_errors.LocalEntryNotFoundError:  # offline (or no network), not in the cache
    raise NotFoundError(
        f"{path!r} is not a local directory, and the Hugging Face Hub model {path}{at} is not "
        f"in the local cache and cannot be downloaded (offline); download it with `{download}` "
        "(or unset HF_HUB_OFFLINE to let it download).") from None
  except hub_errors.RevisionNotFoundError:
    raise NotFoundError(f"the Hugging Face Hub model {path} has no revision {revision!r}; give "
                        "a branch, tag or commit of it.") from None
  except hub_errors.RepositoryNotFoundError:  # gated too
    raise NotFoundError(f"{path!r} is not a local directory, and the Hugging Face Hub has no "
                        f"model {path} you can access; check the id, or log in (`hf auth "
                        "login`) for a private or gated one.") from None
  except (hub_errors.OfflineModeIsEnabled, hub_errors.HfHubHTTPError) as e:
    first = (str(e).strip().splitlines() or [""])[0]
    raise NotFoundError(f"the Hugging Face Hub model {path}{at} could not be fetched "
                        f"({type(e).__name__}: {first}); download it with `{download}`.") \
        from None
  except hub_errors.HFValidationError as e:
    raise InputError(f"{path!r} is not a valid Hugging Face Hub id: "
                     f"{(str(e).strip().splitlines() or [''])[0]}") from None


def from_pretrained(path: str, *, dtype: Any = jnp.float32, param_dtype: Any = jnp.float32,
                    remat: str | None = None, shardings: Any = None, quantize: str | None = None,
                    block_size: int = 64, double_quant: bool = True,
                    attention: str = "auto",
                    revision: str | None = None) -> tuple[Decoder, dict]:
  """Loads a Hugging Face checkpoint (any family `ModelConfig` reads) from a directory or Hub id.

  Reads `config.json` and `model.safetensors` (or a sharded
  `model.safetensors.index.json`), converts tensor by tensor (PyTorch
  `[out, in]` to Flax `(in, out)`, GPT-2 Conv1D as is), stacks the layers for
  `nn.scan`; a Hub id (``org/name``) is fetched first (`resolve`: config,
  safetensors and tokenizer files only; the cache only with ``HF_HUB_OFFLINE=1``),
  a local directory never touches the network. Each tensor is read from the file
  into its own buffer, converted, placed and dropped, so host memory holds the
  loaded params plus one tensor, not a second copy of the checkpoint.

  QLoRA bases: with ``quantize='nf4'`` (or ``'fp4'``, ``'int8'``) every linear
  kernel but ``lm_head`` becomes a `jaxlora.QuantizedArray` as it is read (one
  layer of a stack at a time; embeddings and norms stay in float, as
  bitsandbytes leaves them), equal to ``jaxlora.quantize`` of the float params
  in `param_dtype`, so the float model never exists in full. Checkpoints that
  transformers saved quantized with bitsandbytes (``quantization_config``
  with ``load_in_4bit`` or ``load_in_8bit``; ``weight.absmax``,
  ``weight.quant_map``, ``weight.quant_state.bitsandbytes__nf4``, ... or
  ``SCB`` tensors) load as records built from the stored codes, block maxima
  and code tables: their kernels dequantize exactly to bitsandbytes'
  dequantization, in the dtype recorded in each quant state (int8 records in
  `param_dtype`). Run the result through `jaxlora.apply`.

  Args:
    path: checkpoint directory, or a Hugging Face Hub id (``org/name``).
    dtype: compute dtype of the returned model.
    param_dtype: dtype the params are stored in (and that quantized kernels
      of a float checkpoint dequantize to).
    remat: rematerialisation policy of the layers (see `Decoder`).
    attention: attention implementation (see `Decoder`).
    shardings: optional tree of shardings like the (float) params (e.g. from
      `jaxlora.sharding.param_shardings`), or a function of the model that returns
      one: each tensor is placed straight into its shards, so no device ever
      holds a whole copy of a sharded weight. A quantized kernel's record is
      placed with `jaxlora.sharding.quantized_sharding` of its float sharding.
    quantize: None (float kernels, or a bitsandbytes checkpoint as stored),
      ``'nf4'``, ``'fp4'`` or ``'int8'``. On a bitsandbytes checkpoint it must
      be None or the stored type.
    block_size: values per 4-bit block when quantizing a float checkpoint
      (a bitsandbytes checkpoint keeps its own).
    double_quant: quantize the 4-bit block maxima again when quantizing a
      float checkpoint (QLoRA's double quantization).
    revision: branch, tag or commit of a Hub id (None: ``main``).

  Returns:
    ``(model, params)``; ``model.apply({'params': params}, input_ids, attention_mask=...)``
    returns logits (``jaxlora.apply(model.apply)`` when params hold quantized kernels).

  Raises:
    FileNotFoundError: missing directory or files; a Hub id not on the Hub (or
      not in the cache while offline).
    ValueError: unknown model type, missing, extra or misshapen tensors, an
      unknown `quantize` value, a checkpoint quantized by another method than
      bitsandbytes (GPTQ, AWQ, ...) or with another type than `quantize`, and
      corrupt quantization state.

  >>> import tempfile, jax, jax.numpy as jnp, jaxlora
  >>> cfg = jaxlora.models.ModelConfig.tiny("llama")
  >>> model = jaxlora.models.Decoder(cfg)
  >>> params = jaxlora.models.init(model, jax.random.key(0))
  >>> d = tempfile.mkdtemp()
  >>> jaxlora.models.save_pretrained(d, model, params)
  >>> model2, params2 = jaxlora.models.from_pretrained(d)
  >>> bool(jnp.array_equal(params2['layers']['mlp']['up_proj']['kernel'],
  ...                      params['layers']['mlp']['up_proj']['kernel']))
  True
  >>> model3, qparams = jaxlora.models.from_pretrained(d, quantize="nf4")
  >>> qparams['layers']['mlp']['up_proj']['kernel']
  QuantizedArray(nf4, shape=(2, 16, 32), dtype=float32, block_size=64, double_quant)
  >>> logits = jaxlora.apply(model3.apply)({'params': qparams}, jnp.ones((1, 4), jnp.int32))
  >>> logits.shape
  (1, 4, 32)
  """
  from jaxlora import quantization  # pylint: disable=import-outside-toplevel
  from jaxlora import sharding as sharding_lib  # pylint: disable=import-outside-toplevel

  path = resolve(path, revision)
  source = os.path.join(path, "config.json")
  hf = _read_config(path)
  qtype = None if quantize is None else quantization._check_qtype(quantize)  # pylint: disable=protected-access
  if qtype is not None:
    block_size = quantization._check_block_size(block_size, qtype)  # pylint: disable=protected-access
  _stored_qtype(hf, source, qtype)
  # The quantization config describes the stored tensors, not the model: a merged export of
  # the loaded model is a float checkpoint, so it is not carried into `config.extra`.
  cfg = ModelConfig.from_hf({k: v for k, v in hf.items() if k != "quantization_config"},
                            source=source)
  if cfg.num_experts and (qtype is not None or hf.get("quantization_config")):
    raise InputError(f"{source}: a quantized base (quantize={quantize!r} or a bitsandbytes "
                     f"checkpoint) is not supported for the mixture-of-experts model_type "
                     f"{cfg.model_type!r} yet: its stacked expert kernels run as float "
                     "grouped matmuls. Load it with quantize=None.")
  weights = _open_weights(path)
  model = Decoder(cfg, dtype=dtype, param_dtype=param_dtype, remat=remat, attention=attention)
  abstract = _abstract_params(model)
  prefix = "transformer." if any(k.startswith("transformer.") for k in weights) else ""
  used: set[str] = set()
  scan = _scan_name(cfg)
  pdtype = np.dtype(param_dtype)
  quant_states: dict[str, str] = {}  # '<...>.weight' -> its quant_state key
  for k in weights:
    m = _QUANT_STATE.match(k)
    if m:
      if m.group(2) not in _BNB4_STATES:
        raise InputError(f"Checkpoint {path!r}: tensor {k!r} holds a quant state of unknown "
                         f"kind {m.group(2)!r}; jaxlora reads bitsandbytes "
                         f"{sorted(_BNB4_STATES)} (and 8-bit SCB) quantization.")
      quant_states[m.group(1)] = k

  def read(name: str) -> np.ndarray:
    used.add(name)
    return weights[name].read(name)

  def fetch(name: str, want: tuple[int, ...], transpose: bool) -> np.ndarray:
    if name not in weights:
      raise InputError(f"Checkpoint {path!r} lacks tensor {name!r} (expected shape "
                       f"{want[::-1] if transpose else want}) for model_type {cfg.model_type!r}.")
    stored = tuple(weights[name].shape(name))
    if (stored[::-1] if transpose else stored) != want:
      raise InputError(f"Tensor {name!r} in {weights[name].path} has shape {stored}; the config "
                       f"implies {want[::-1] if transpose else want}.")
    t = read(name)
    if not np.issubdtype(t.dtype, np.floating) and t.dtype != jnp.bfloat16:
      raise InputError(f"Tensor {name!r} in {weights[name].path} has dtype {t.dtype}; a float "
                       "weight was expected (a quantized weight without its quantization "
                       "state? Check that the checkpoint's files are complete).")
    return t.T if transpose else t

  def aux(name: str, part: str, owner: str) -> np.ndarray:
    key = f"{name}.{part}"
    if key not in weights:
      raise InputError(f"Checkpoint {path!r} lacks tensor {key!r}, part of the bitsandbytes "
                       f"quantization of {owner!r}; the checkpoint is incomplete.")
    return read(key)

  def bnb4(name: str, want: tuple[int, ...]):
    key = quant_states[name]
    where = f"Tensor {key!r} in {weights[key].path}"
    try:
      state = json.loads(bytes(read(key).reshape(-1).view(np.uint8)).decode("utf-8"))
      if not isinstance(state, dict):
        raise InputError("not a JSON object")
      qt = state["quant_type"]
      bs = int(state["blocksize"])
      shape = tuple(int(d) for d in state["shape"])
      kdtype = _torch_dtype(state["dtype"])
      nested = "nested_blocksize" in state or "nested_offset" in state
      if nested:
        nested_bs = int(state["nested_blocksize"])
        offset = np.float32(state["nested_offset"])
    except (UnicodeDecodeError, ValueError, KeyError, TypeError) as e:
      detail = f"missing field {e}" if isinstance(e, KeyError) else f"{type(e).__name__}: {e}"
      raise InputError(f"{where} is not a valid bitsandbytes quant state ({detail}); the "
                       "checkpoint is corrupt: save it again with transformers' "
                       "save_pretrained.") from None
    kind = _QUANT_STATE.match(key)
    assert kind is not None  # quant_states holds only keys that match
    expect = _BNB4_STATES[kind.group(2)]
    if qt != expect:
      raise InputError(f"{where} says quant_type {qt!r} but its name says {expect!r}; the "
                       "checkpoint is corrupt.")
    if qtype is not None and qt != qtype:
      raise InputError(f"quantize={qtype!r}, but {name!r} in {weights[name].path} is stored "
                       f"quantized by bitsandbytes as {qt!r}. Pass quantize=None (or {qt!r}) "
                       f"to load it as stored, or load the float checkpoint with "
                       f"quantize={qtype!r}.")
    if len(shape) != 2 or shape[::-1] != want:
      raise InputError(f"{where} records weight shape {list(shape)}; the config implies "
                       f"{list(want[::-1])}.")
    if bs < 2 or bs % 2:
      raise InputError(f"{where} has blocksize {bs}; bitsandbytes uses even block sizes.")
    n = shape[0] * shape[1]
    packed = read(name).reshape(-1).view(np.uint8)  # any quant_storage dtype: the bytes
    if packed.size != (n + 1) // 2:
      raise InputError(f"Tensor {name!r} in {weights[name].path} holds {packed.size} bytes of "
                       f"4-bit codes; its quant state (shape {list(shape)}) needs {(n + 1) // 2}.")
    n_blocks = -(-n // bs)
    absmax = aux(name, "absmax", name).reshape(-1)
    quant_map = aux(name, "quant_map", name).reshape(-1).astype(np.float32)
    if absmax.size != n_blocks or quant_map.size != 16:
      raise InputError(f"{name!r}: absmax has {absmax.size} values and quant_map {quant_map.size}"
                       f"; blocksize {bs} over {list(shape)} needs {n_blocks} and 16.")
    fields = dict(packed=packed, quant_map=quant_map)
    if nested:
      if nested_bs != quantization.NESTED_BLOCK_SIZE:
        raise InputError(f"{where} has nested_blocksize {nested_bs}; jaxlora implements "
                         f"bitsandbytes' {quantization.NESTED_BLOCK_SIZE}.")
      if absmax.dtype != np.uint8:
        raise InputError(f"{name}.absmax has dtype {absmax.dtype}; double quantization "
                         "stores uint8 codes.")
      nested_absmax = aux(name, "nested_absmax", name).reshape(-1).astype(np.float32)
      nested_map = aux(name, "nested_quant_map", name).reshape(-1).astype(np.float32)
      if (nested_absmax.size != -(-n_blocks // nested_bs) or nested_map.size != 256):
        raise InputError(f"{name!r}: nested_absmax has {nested_absmax.size} values and "
                         f"nested_quant_map {nested_map.size}; {n_blocks} blocks need "
                         f"{-(-n_blocks // nested_bs)} and 256.")
      fields.update(absmax=absmax, nested_absmax=nested_absmax, nested_quant_map=nested_map,
                    offset=np.asarray(offset, np.float32))
    else:
      fields.update(absmax=absmax.astype(np.float32))
    return quantization.QuantizedArray(qtype=qt, layer_shape=want, n_in=1, dtype=kdtype,
                                       block_size=bs, **fields)

  def bnb8(name: str, module: str, want: tuple[int, ...]):
    where = f"Tensor {name!r} in {weights[name].path}"
    if qtype is not None and qtype != "int8":
      raise InputError(f"quantize={qtype!r}, but {name!r} in {weights[name].path} is stored "
                       "quantized by bitsandbytes as 'int8'. Pass quantize=None (or 'int8') to "
                       f"load it as stored, or load the float checkpoint with quantize={qtype!r}.")
    w = read(name)
    if w.dtype != np.int8 or w.ndim != 2 or w.shape[::-1] != want:
      raise InputError(f"{where} is {w.dtype} {list(w.shape)}; a bitsandbytes 8-bit weight is "
                       f"int8 {list(want[::-1])}.")
    fmt_key = module + ".weight_format"
    if fmt_key in weights:
      fmt = read(fmt_key).reshape(-1)
      if fmt.size != 1 or int(fmt[0]) != 0:
        raise InputError(f"Tensor {fmt_key!r} is {fmt.tolist()}: only bitsandbytes' row-major "
                         "int8 format (0) is supported.")
    scb = aux(module, "SCB", name).reshape(-1).astype(np.float32)
    if scb.size != want[1]:
      raise InputError(f"{module}.SCB has {scb.size} row scales; {name!r} has {want[1]} rows.")
    return quantization.QuantizedArray(qtype="int8", layer_shape=want, n_in=1, dtype=pdtype,
                                       block_size=0, packed=np.ascontiguousarray(w.T),
                                       absmax=scb)

  def experts(path_t: tuple[str, ...], layer_i: int | None, want: tuple[int, ...]):
    """One layer's stacked expert kernel ``(E, in, out)`` from per-expert Linear weights."""
    e, n_in, n_out = want
    names = _expert_names(cfg, layer_i, path_t[-2])
    width = n_out // len(names[0])
    return np.stack([np.concatenate([fetch(n, (n_in, width), True) for n in per], axis=1)
                     for per in names])

  def layer(path_t: tuple[str, ...], name: str, want: tuple[int, ...], transpose: bool,
            index: int | None = None):
    """One layer's tensor (`index` in the stack): a float array, or a record for a quantized
    kernel."""
    if _is_expert_kernel(path_t):
      return experts(path_t, index, want)
    name = _disk_name(cfg, name)
    if path_t[-1] == "kernel":
      module = name[: -len(".weight")]
      if name in quant_states:
        return bnb4(name, want)
      if module + ".SCB" in weights:
        return bnb8(name, module, want)
      if qtype is not None and path_t[0] != "lm_head":
        t = np.asarray(fetch(name, want, transpose), pdtype)
        return quantization.quantize_array(t, qtype, block_size=block_size,
                                           double_quant=double_quant)
    return fetch(name, want, transpose)

  def load(path_t: tuple[str, ...], leaf: jax.ShapeDtypeStruct):
    transpose = _transposed(cfg, path_t)
    if path_t[0] == scan:
      out: Any = None
      recs: list[Any] = []  # the layers' quantized records, when stored quantized
      for i in range(leaf.shape[0]):
        t = layer(path_t, _hf_name(cfg, path_t, i, prefix), leaf.shape[1:], transpose, i)
        if i and quantization.is_quantized(t) != bool(recs):
          raise InputError(
              f"{_hf_name(cfg, path_t, i, prefix)!r} is stored "
              f"{'in float' if recs else 'quantized'} but {_hf_name(cfg, path_t, 0, prefix)!r} "
              f"{'is quantized' if recs else 'is not'}: the layers of an nn.scan stack need one "
              "storage format. Load the float checkpoint with quantize=... instead.")
        if quantization.is_quantized(t):
          recs.append(t)
        else:
          if out is None:
            out = np.empty(leaf.shape, leaf.dtype)
          out[i] = t
      if recs:
        out = _stack_records(recs, _hf_name(cfg, path_t, 0, prefix))
    else:
      out = layer(path_t, _hf_name(cfg, path_t, None, prefix), leaf.shape, transpose)
      if not quantization.is_quantized(out):
        out = np.asarray(out, leaf.dtype)
    sharding = shard_map.get(path_t)
    if sharding is None:
      placed = jax.device_put(out)  # one copy (jnp.asarray makes a second, transient one on CPU)
    elif quantization.is_quantized(out):
      placed = jax.tree.map(_place, out, sharding_lib.quantized_sharding(out, sharding))
    else:
      placed = _place(out, sharding)
    # One tensor at a time: wait for the copy so that the host array is freed before the next
    # tensor is read (otherwise pending transfers keep several host copies alive at once).
    return jax.block_until_ready(placed)

  flat = jax.tree_util.tree_flatten_with_path(abstract)[0]
  shard_map = {}
  if callable(shardings):
    shardings = shardings(model)
  if shardings is not None:
    shard_map = {tuple(k.key for k in kp): s for kp, s in jax.tree_util.tree_flatten_with_path(
        _tree.get_params(shardings), is_leaf=lambda x: isinstance(x, jax.sharding.Sharding))[0]}
  loaded = {}
  # Largest pieces first: the peak of host memory is the params loaded so far plus the piece
  # in flight, so the big float tensors (embeddings, head) go while little is resident; a
  # scanned kernel is read (and quantized) one layer at a time.
  def in_flight(item):
    path_t, shape = tuple(k.key for k in item[0]), item[1].shape
    return math.prod(shape[1:] if path_t[0] == scan and path_t[-1] == "kernel" else shape)

  for kp, leaf in sorted(flat, key=lambda item: -in_flight(item)):
    path_t = tuple(k.key for k in kp)
    loaded[path_t] = load(path_t, leaf)
  extra = sorted(k for k in weights if k not in used and not _IGNORED.search(k)
                 and not (cfg.tie_word_embeddings and k == "lm_head.weight"))
  if extra:
    raise InputError(f"Checkpoint {path!r} has tensors the {cfg.model_type!r} model does not use: "
                     f"{extra[:8]}{' ...' if len(extra) > 8 else ''}. Is config.json for "
                     "this checkpoint?")
  params = jax.tree_util.tree_unflatten(
      jax.tree.structure(abstract), [loaded[tuple(k.key for k in kp)] for kp, _ in flat])
  return model, params


def _place(x: np.ndarray, sharding: jax.sharding.Sharding) -> jax.Array:
  """A host array placed straight into its shards."""
  return jax.make_array_from_callback(x.shape, sharding, lambda idx: x[idx])


def _stack_records(recs: list, name: str):
  """Stacks per-layer `QuantizedArray` records along a new leading (scan) axis."""
  aux0 = recs[0].tree_flatten_with_keys()[1]
  for i, r in enumerate(recs):
    if r.tree_flatten_with_keys()[1] != aux0:
      raise InputError(f"Layer {i} of the stack starting at {name!r} is stored as {r!r}, layer 0 "
                       f"as {recs[0]!r}: the layers of an nn.scan stack need one quantization "
                       "type, block size, dtype and double quantization.")
  return jax.tree.map(lambda *xs: np.stack(xs), *recs)


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
  >>> cfg = jaxlora.models.ModelConfig.tiny("gpt2")
  >>> model = jaxlora.models.Decoder(cfg)
  >>> d = tempfile.mkdtemp()
  >>> jaxlora.models.save_pretrained(d, model, jaxlora.models.init(model, jax.random.key(0)))
  >>> sorted(os.listdir(d))
  ['config.json', 'model.safetensors']
  """
  if not isinstance(model, Decoder):
    raise InputTypeError(f"`model` must be a jaxlora.models.Decoder, got {type(model).__name__}.")
  p = _tree.get_params(params)
  if _tree.adapter_modules(p):
    raise InputError("The params hold LoRA adapters; export `jaxlora.merge(tree)` as a plain "
                     "checkpoint, or the adapter alone in PEFT format.")
  from jaxlora import quantization  # pylint: disable=import-outside-toplevel
  quantized = quantization.records(p)
  if quantized:
    raise InputError(f"The params hold quantized kernels (at {next(iter(quantized))!r}); "
                     "save_pretrained writes float checkpoints: export "
                     "`jaxlora.dequantize(params)` (or `jaxlora.merge(tree)`).")
  cfg = model.config
  abstract = _abstract_params(model)
  want = jax.tree_util.tree_flatten_with_path(abstract)[0]
  have = {tuple(k.key for k in kp): v for kp, v in jax.tree_util.tree_flatten_with_path(p)[0]}
  prefix = "transformer." if cfg.is_gpt2 else ""
  tensors: dict[str, np.ndarray] = {}
  for kp, leaf in want:
    path_t = tuple(k.key for k in kp)
    if path_t not in have:
      raise InputError(f"params lack '{_tree.join(path_t)}' {leaf.shape} required by the model.")
    arr = np.asarray(jax.device_get(have.pop(path_t)))
    if arr.shape != leaf.shape:
      raise InputError(f"params '{_tree.join(path_t)}' has shape {arr.shape}; the model "
                       f"expects {leaf.shape}.")
    if dtype is not None:
      arr = arr.astype(dtype)
    transpose = _transposed(cfg, path_t)
    layers = range(arr.shape[0]) if path_t[0] == _scan_name(cfg) else [None]
    for i in layers:
      t = arr if i is None else arr[i]
      if _is_expert_kernel(path_t):  # (E, in, out) -> one [out, in] Linear per expert and part
        for e, names in enumerate(_expert_names(cfg, i, path_t[-2])):
          for n, part in zip(names, np.split(t[e], len(names), axis=1)):
            tensors[n] = np.ascontiguousarray(part.T)
      else:
        tensors[_disk_name(cfg, _hf_name(cfg, path_t, i, prefix))] = t.T if transpose else t
  if have:
    raise InputError(f"params hold leaves the model does not use: "
                     f"{sorted(_tree.join(k) for k in have)[:8]}.")
  hf_cfg = cfg.to_hf()
  first = next(iter(tensors.values()))
  hf_cfg["dtype"] = str(first.dtype) if str(first.dtype) != "bfloat16" else "bfloat16"

  with _files.staging_dir(path, prefix=".tmp-save-") as tmp:
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
    for stale in ("model.safetensors", "model.safetensors.index.json"):
      if stale not in files and os.path.exists(os.path.join(path, stale)):
        os.remove(os.path.join(path, stale))
    _files.publish(tmp, path, files)  # config.json last: it makes the directory loadable


def init(model: Decoder, key: jax.Array) -> dict:
  """Freshly initialised, unboxed params for `model` (plain arrays).

  >>> import jax, jaxlora
  >>> cfg = jaxlora.models.ModelConfig.tiny("llama")
  >>> params = jaxlora.models.init(jaxlora.models.Decoder(cfg), jax.random.key(0))
  >>> params['layers']['self_attn']['k_proj']['kernel'].shape
  (2, 16, 8)
  """
  return nn.unbox(model.init(key, jnp.zeros((1, 1), jnp.int32)))["params"]


def hf_module_name(config: ModelConfig, module_path: tuple[str, ...], layer: int | None) -> str:
  """The PyTorch module name of a flax module, e.g. 'model.layers.3.self_attn.q_proj'.

  >>> import jaxlora
  >>> cfg = jaxlora.models.ModelConfig.tiny("llama")
  >>> hf_module_name(cfg, ("layers", "self_attn", "q_proj"), 3)
  'model.layers.3.self_attn.q_proj'
  """
  prefix = "transformer." if config.is_gpt2 else ""
  return _hf_name(config, tuple(module_path) + ("kernel",), layer, prefix)[: -len(".weight")]


def flax_module_path(config: ModelConfig, name: str) -> tuple[tuple[str, ...], int | None]:
  """Inverse of `hf_module_name`: ``(module path, layer or None)``.

  >>> import jaxlora
  >>> cfg = jaxlora.models.ModelConfig.tiny("gpt2")
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
