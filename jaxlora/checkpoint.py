"""Adapter-only checkpoints (Orbax + a JSON record) and a training-state checkpoint manager."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from jaxlora import _files
from jaxlora import _multihost
from jaxlora import _tree
from jaxlora import initialisation
from jaxlora import kernel_layout as layout_lib
from jaxlora import sharding as sharding_lib
from jaxlora import transform
from jaxlora._tree import A_KEY, B_KEY, KERNEL_KEY, SCALE_KEY
from jaxlora.errors import CheckpointError, InputTypeError, NotFoundError

RECORD = "jaxlora.json"
ARRAYS = "adapter"
FORMAT = 1


def fingerprint(params: Any) -> str:
  """A hash of the base params' structure, shapes and dtypes (not their values).

  >>> import jax.numpy as jnp
  >>> fingerprint({"d": {"kernel": jnp.ones((2, 3))}}) == fingerprint({"d": {"kernel": jnp.zeros((2, 3))}})
  True
  """
  p = _tree.base_leaves(_tree.get_params(params), prune=True)
  items = sorted((_tree.join(tuple(k.key for k in kp)), tuple(x.shape), str(jnp.dtype(x.dtype)))
                 for kp, x in jax.tree_util.tree_flatten_with_path(p)[0])
  return hashlib.sha256(json.dumps(items).encode()).hexdigest()[:16]


def _record(tree: Any, metadata: dict | None) -> dict:
  from jaxlora import __version__  # pylint: disable=import-outside-toplevel
  summary = transform.summary(tree)
  p = _tree.get_params(tree)
  layers = {}
  for (path_t, mod), l in zip(_tree.adapter_modules(p), summary.layers):
    layers[l.path] = {
        "rank": l.rank, "alpha": l.alpha,
        "scale": _multihost.host_value(mod[SCALE_KEY]).astype(np.float64).tolist(),
        "kernel_shape": list(l.kernel_shape), "lora_a": list(l.a_shape), "lora_b": list(l.b_shape),
        "dtype": str(jnp.dtype(mod[A_KEY].dtype)),
    }
  # Every other saved leaf (DoRA magnitudes, token rows, markers, base leaves that train).
  leaves = {}
  for kp, x in jax.tree_util.tree_flatten_with_path(_tree.adapter_leaves(p))[0]:
    keys = tuple(k.key for k in kp)
    if keys[-1] not in _tree.LORA_KEYS or _tree.lookup(p, keys[:-1]).get(A_KEY) is None:
      leaves[_tree.join(keys)] = {"shape": list(np.shape(x)), "dtype": str(jnp.dtype(x.dtype))}
  return {"format": FORMAT, "jaxlora_version": __version__, "layers": layers, "leaves": leaves,
          "targets": sorted(layers), "trainable_params": summary.trainable,
          "base_fingerprint": fingerprint(tree), "metadata": metadata or {}}


def _as_path(path: Any) -> epath.Path:
  """Local paths made absolute; URLs (``gs://...``) kept as they are."""
  path = os.fspath(path)
  return epath.Path(path if _files.is_remote(path) else os.path.abspath(path))


def save(path: str, tree: Any, *, metadata: dict | None = None) -> None:
  """Saves only the adapter of `tree` (Orbax) plus a JSON record beside it.

  The record holds per-layer rank, alpha, scale and shapes, the adapted
  layers, the jaxlora version, dtypes, a fingerprint of the base params'
  structure and your `metadata` (JSON-serialisable). The checkpoint is written
  in a temporary directory next to `path` and renamed into place: an
  interrupted save leaves nothing that loads, and any other checkpoint is
  untouched. An existing checkpoint at `path` is replaced only once the new one
  is complete.

  `path` may be a local directory or a URL Orbax and ``etils.epath`` can write
  (``gs://bucket/run/adapter``; object stores rename by copying, so there the
  record, written last, is what marks a checkpoint complete). In a
  multi-process run (``jax.process_count() > 1``) every process must call
  `save`: each writes the shards it holds, process 0 writes the record. The
  processes must share `path` (a shared or cloud filesystem).

  Args:
    path: checkpoint directory.
    tree: a wrapped tree.
    metadata: extra JSON-serialisable information (e.g. the training config).

  >>> import tempfile, os, jax, jax.numpy as jnp, jaxlora
  >>> t = jaxlora.wrap({"d": {"kernel": jnp.ones((4, 4))}}, rank=2, key=jax.random.key(0))
  >>> d = os.path.join(tempfile.mkdtemp(), "adapter")
  >>> jaxlora.save(d, t, metadata={"task": "demo"})
  >>> sorted(os.listdir(d))
  ['adapter', 'jaxlora.json']
  """
  adapter = transform.adapter(tree)
  if not jax.tree.leaves(adapter):
    raise CheckpointError("The tree holds no adapter; nothing to save. Call jaxlora.wrap first.")
  try:
    record = json.dumps(_record(tree, metadata), indent=2, sort_keys=True)
  except TypeError as e:
    raise InputTypeError(f"`metadata` must be JSON-serialisable: {e}") from None
  target = _as_path(path)
  token = _multihost.shared_token()
  tmp = target.parent / f".{target.name}.tmp-{token}"
  writer = _multihost.is_writer()
  if writer:
    tmp.mkdir(parents=True)
  _multihost.barrier("jaxlora.save: started")
  try:
    with ocp.StandardCheckpointer() as ckptr:
      ckptr.save(tmp / ARRAYS, _tree.get_params(adapter))
      ckptr.wait_until_finished()
    if writer:
      (tmp / RECORD).write_text(record)  # written last: marks a complete checkpoint
      _files.replace_dir(tmp, target, aside=target.parent / f".{target.name}.old-{token}")
  finally:
    if writer and tmp.exists():
      tmp.rmtree()
  _multihost.barrier("jaxlora.save: done")  # nobody returns before the checkpoint is in place


def info(path: str) -> dict:
  """The JSON record of an adapter checkpoint (layers, ranks, metadata, fingerprint).

  Raises:
    FileNotFoundError / ValueError: missing or unreadable checkpoint.

  >>> import tempfile, os, jax, jax.numpy as jnp, jaxlora
  >>> t = jaxlora.wrap({"d": {"kernel": jnp.ones((4, 4))}}, rank=2, key=jax.random.key(0))
  >>> d = os.path.join(tempfile.mkdtemp(), "adapter")
  >>> jaxlora.save(d, t, metadata={"task": "demo"})
  >>> rec = jaxlora.checkpoint.info(d)
  >>> rec["layers"]["d"]["rank"], rec["metadata"]
  (2, {'task': 'demo'})
  """
  rec = _as_path(path) / RECORD
  if not rec.parent.is_dir():
    raise NotFoundError(f"No adapter checkpoint at {os.fspath(path)!r}.")
  if not rec.is_file():
    raise CheckpointError(f"{os.fspath(path)!r} is not a complete jaxlora checkpoint: {RECORD} is "
                          "missing (an interrupted save, or not a jaxlora adapter).")
  try:
    out = json.loads(rec.read_text())
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise CheckpointError(f"{rec} is corrupt: {e}.") from None
  if out.get("format") != FORMAT or "layers" not in out:
    raise CheckpointError(f"{rec}: unknown checkpoint format {out.get('format')!r}.")
  return out


def load(path: str, base_params: Any, *, shardings: Any = None) -> Any:
  """Loads an adapter checkpoint onto base params and returns the wrapped tree.

  Each adapter leaf is restored directly with its target sharding: from
  `shardings` (a tree like `jaxlora.adapter(...)`), else derived from the base
  kernels' shardings (`jaxlora.sharding.adapter_shardings`), so a sharded base
  gets sharded adapters without a full host copy per device.

  Args:
    path: a directory written by `jaxlora.save`.
    base_params: unwrapped params of the model the adapter was trained on.
    shardings: optional shardings for the adapter leaves.

  Returns:
    The wrapped tree (same form as `base_params`).

  Raises:
    ValueError: the base does not fit (names the first mismatching path and
      both shapes), or the checkpoint is incomplete or corrupt.

  >>> import tempfile, os, jax, jax.numpy as jnp, jaxlora
  >>> base = {"d": {"kernel": jnp.ones((4, 4))}}
  >>> t = jaxlora.wrap(base, rank=2, key=jax.random.key(0))
  >>> d = os.path.join(tempfile.mkdtemp(), "adapter")
  >>> jaxlora.save(d, t)
  >>> back = jaxlora.load(d, base)
  >>> bool(jnp.array_equal(back["d"]["lora_a"], t["d"]["lora_a"]))
  True
  """
  rec = info(path)
  p = _tree.get_params(base_params)
  if _tree.adapter_modules(p):
    raise CheckpointError("`base_params` already hold an adapter; pass the unwrapped base params.")
  added: dict[tuple[str, ...], dict[str, Any]] = {}  # module path -> leaves the adapter adds
  for lpath, layer in sorted(rec["layers"].items()):
    path_t = tuple(lpath.split("/")) if lpath else ()
    node = _tree.lookup(p, path_t, None)
    if node is None:
      shape = tuple(layer["kernel_shape"])
      raise CheckpointError(f"The adapter in {path!r} has a layer '{lpath}' that the base params "
                            f"do not have (kernel {shape}); it was trained on another model.")
    kernel = node.get(KERNEL_KEY) if isinstance(node, Mapping) else None
    if kernel is None:
      raise CheckpointError(f"The base params have no kernel at '{lpath}/kernel'.")
    want = tuple(layer["kernel_shape"])
    if tuple(kernel.shape) != want:
      raise CheckpointError(f"Adapter layer '{lpath}' was trained on a kernel of shape {want}; the "
                            f"base params have '{lpath}/kernel' with shape {tuple(kernel.shape)}.")
    dt = jnp.dtype(layer["dtype"])
    scale_shape = np.shape(layer["scale"])
    added[path_t] = {
        A_KEY: jax.ShapeDtypeStruct(tuple(layer["lora_a"]), dt),
        B_KEY: jax.ShapeDtypeStruct(tuple(layer["lora_b"]), dt),
        SCALE_KEY: jax.ShapeDtypeStruct(scale_shape, jnp.float32)}
    layout_lib.roles_from_shapes(lpath, want, layer["lora_a"], layer["lora_b"], len(scale_shape))
  for lpath, leaf in sorted(rec.get("leaves", {}).items()):
    keys = tuple(lpath.split("/"))
    path_t, key = keys[:-1], keys[-1]
    node = _tree.lookup(p, path_t, None)
    shape, dt = tuple(leaf["shape"]), jnp.dtype(leaf["dtype"])
    if not isinstance(node, Mapping):
      raise CheckpointError(f"The adapter in {path!r} holds '{lpath}' {shape}, but the base params "
                            f"have no module '{_tree.join(path_t)}'; it was trained on another model.")
    if not _tree.is_adapter_key(key):  # a base leaf trained in full: it must fit the base's
      have = node.get(key)
      if have is None or tuple(np.shape(have)) != shape:
        got = "nothing" if have is None else f"shape {tuple(np.shape(have))}"
        raise CheckpointError(f"The adapter in {path!r} trained '{lpath}' with shape {shape}; the "
                              f"base params have {got} there.")
      value: Any = jax.ShapeDtypeStruct(shape, dt, sharding=getattr(have, "sharding", None))
    else:
      value = jax.ShapeDtypeStruct(shape, dt)
    added.setdefault(path_t, {})[key] = value
  wrapped_abstract = _tree.overlay(p, _tree.nest(added))
  target_shardings = (_tree.get_params(shardings) if shardings is not None
                      else sharding_lib.adapter_shardings(wrapped_abstract))
  abstract = transform.adapter(wrapped_abstract)
  abstract = jax.tree.map(
      lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, target_shardings,
      is_leaf=lambda x: isinstance(x, jax.ShapeDtypeStruct))
  arrays_dir = _as_path(path) / ARRAYS
  try:
    with ocp.StandardCheckpointer() as ckptr:
      restored = ckptr.restore(arrays_dir, abstract)
  except Exception as e:  # Orbax raises many types; say which file and why
    raise CheckpointError(f"Could not read the adapter arrays in {arrays_dir}: "
                          f"{type(e).__name__}: {e}") from e
  # PiSSA/OLoRA adapters were trained on a residual base: rebuild it from the original one.
  return _tree.with_params(base_params,
                           initialisation.rebuild_residuals(_tree.overlay(p, restored)))


def _key_to_data(key: Any) -> Any:
  # A host NumPy copy: keys are replicated, and in a multi-process run a device-local key
  # array cannot be saved collectively.
  if key is None:
    return None
  if jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key):
    return {"typed": True, "impl": str(jax.random.key_impl(key)),
            "data": np.asarray(jax.device_get(jax.random.key_data(key)))}
  return {"typed": False, "data": np.asarray(jax.device_get(key))}


class CheckpointManager:
  """Saves and restores training state: adapter, optimizer state, step, data position, RNG.

  A thin layer over Orbax's ``CheckpointManager``: saves run asynchronously
  (training continues while arrays are written), the last `max_to_keep`
  checkpoints are kept, and a checkpoint counts only once Orbax has finalised
  it, so a run killed mid-save resumes from the previous one. Restoring onto
  templates (arrays or ShapeDtypeStructs with shardings) places every array
  directly on its devices.

  Example:

  >>> import tempfile, jax, jax.numpy as jnp, optax, jaxlora
  >>> t = jaxlora.wrap({"d": {"kernel": jnp.ones((4, 4))}}, rank=2, key=jax.random.key(0))
  >>> trainable, frozen = jaxlora.split(t)
  >>> tx = optax.adam(1e-3)
  >>> opt_state = tx.init(trainable)
  >>> with jaxlora.checkpoint.CheckpointManager(tempfile.mkdtemp()) as mgr:
  ...   _ = mgr.save(10, trainable=trainable, opt_state=opt_state, rng=jax.random.key(1),
  ...                data_state={"epoch": 0, "position": 320})
  ...   state = mgr.restore(trainable=trainable, opt_state=opt_state)
  >>> state["step"], state["data_state"]
  (10, {'epoch': 0, 'position': 320})
  """

  def __init__(self, directory: str, *, max_to_keep: int = 3, save_interval_steps: int = 1,
               async_save: bool = True):
    """Opens (or creates) a checkpoint directory.

    Args:
      directory: where step subdirectories are written (local path or a
        filesystem Orbax supports, e.g. ``gs://``).
      max_to_keep: how many recent checkpoints to keep.
      save_interval_steps: `save` skips steps that are not a multiple of this
        (unless forced).
      async_save: write arrays in the background.
    """
    self.directory = directory
    options = ocp.CheckpointManagerOptions(
        max_to_keep=max_to_keep, save_interval_steps=save_interval_steps,
        enable_async_checkpointing=async_save, cleanup_tmp_directories=True)
    self._mgr = ocp.CheckpointManager(directory, options=options,
                                      item_names=("trainable", "opt_state", "rng", "meta"))

  def save(self, step: int, *, trainable: Any, opt_state: Any, rng: Any = None,
           data_state: Any = None, metadata: dict | None = None, force: bool = False) -> bool:
    """Starts saving the state at `step`; returns whether a save was started.

    Args:
      step: the number of optimizer steps taken.
      trainable: the trainable half (`jaxlora.split`) or any adapter tree.
      opt_state: the optimizer state.
      rng: a PRNG key (typed or raw), restored bit-exactly.
      data_state: the data iterator's position (JSON-serialisable).
      metadata: anything else JSON-serialisable.
      force: save even if `step` is not on the save interval.
    """
    rng_data = _key_to_data(rng)
    meta = {"step": int(step), "data_state": data_state, "metadata": metadata or {},
            "rng": None if rng_data is None else
            {k: v for k, v in rng_data.items() if k != "data"}}
    items = {"trainable": ocp.args.StandardSave(trainable),
             "opt_state": ocp.args.StandardSave(opt_state),
             "meta": ocp.args.JsonSave(meta)}
    if rng_data is not None:
      items["rng"] = ocp.args.StandardSave({"data": rng_data["data"]})
    return self._mgr.save(int(step), args=ocp.args.Composite(**items), force=force)

  def latest_step(self) -> int | None:
    """The newest finalised step, or None."""
    return self._mgr.latest_step()

  def all_steps(self) -> list[int]:
    return list(self._mgr.all_steps())

  def restore(self, step: int | None = None, *, trainable: Any, opt_state: Any) -> dict:
    """Restores a step (default: the latest) onto the given templates.

    Args:
      step: which step; None for the latest.
      trainable: a template of the trainable tree (arrays or ShapeDtypeStructs,
        possibly with shardings).
      opt_state: a template of the optimizer state.

    Returns:
      ``{'step', 'trainable', 'opt_state', 'rng', 'data_state', 'metadata'}``.

    Raises:
      FileNotFoundError: if there is no checkpoint.
    """
    self._mgr.wait_until_finished()
    if step is None:
      step = self._mgr.latest_step()
    if step is None:
      raise NotFoundError(f"No finalised checkpoint in {self.directory!r}.")
    meta = self._mgr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]

    def template(x):
      x = jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None))
      return x

    items = {"trainable": ocp.args.StandardRestore(jax.tree.map(template, trainable)),
             "opt_state": ocp.args.StandardRestore(jax.tree.map(template, opt_state))}
    if meta.get("rng") is not None:
      items["rng"] = ocp.args.StandardRestore()
    out = self._mgr.restore(step, args=ocp.args.Composite(**items))
    rng = None
    if meta.get("rng") is not None:
      data = jnp.asarray(out["rng"]["data"])
      rng = (jax.random.wrap_key_data(data, impl=meta["rng"]["impl"]) if meta["rng"]["typed"]
             else data)
    return {"step": meta["step"], "trainable": out["trainable"], "opt_state": out["opt_state"],
            "rng": rng, "data_state": meta.get("data_state"), "metadata": meta.get("metadata")}

  def wait(self) -> None:
    """Blocks until pending asynchronous saves are written."""
    self._mgr.wait_until_finished()

  def close(self) -> None:
    self._mgr.wait_until_finished()
    self._mgr.close()

  def __enter__(self) -> "CheckpointManager":
    return self

  def __exit__(self, *exc) -> None:
    self.close()
