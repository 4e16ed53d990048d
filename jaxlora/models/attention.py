"""Attention implementations behind one switch: XLA, cuDNN, Pallas splash (TPU) and flash (GPU).

The decoder describes which keys each query may see once per batch, in the
form its implementation takes:

- ``xla``: a dense ``(batch, 1, q, k)`` boolean mask (the reference; also the
  decode path with a KV cache).
- ``cudnn`` (``jax.nn.dot_product_attention(implementation='cudnn')``): causal
  masking plus per-row sequence lengths. Padding anywhere in a row (left,
  right, or holes) is handled by moving each row's real tokens to the front
  once, before the first layer, and back after the last (`compact`), so the
  kernel only ever sees right padding; no ``(T, T)`` mask exists.
- ``splash`` (``jax.experimental.pallas.ops.tpu.splash_attention``) and
  ``flash`` (``jax.experimental.pallas.ops.gpu.attention``): causal masking plus
  segment ids (packed rows; padding is segment 0, which real tokens never see).

Every path supports grouped-query heads. Sliding windows (Mistral) run on XLA,
cuDNN and splash. A case a path does not support (packed rows on cuDNN,
windows on flash, float32 on cuDNN, KV-cache decoding) runs on the XLA path
instead, and the reason is logged once per trace. Asking explicitly for an
implementation the platform cannot run at all is an error.

``'splash-interpret'`` and ``'flash-interpret'`` run the Pallas kernels in
interpret mode on any platform (slow; for testing the mask logic on CPU);
``'cudnn-interpret'`` runs the cuDNN path (compaction, lengths, causal flag,
window) through the same function's XLA implementation.
"""

from __future__ import annotations

import logging
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jaxlora.errors import InputError

Array = jax.Array

IMPLEMENTATIONS = ("auto", "xla", "cudnn", "splash", "flash")
_INTERPRETED = ("cudnn-interpret", "splash-interpret", "flash-interpret")

logger = logging.getLogger("jaxlora")


def _backend() -> str:
  """'nvidia', 'tpu', 'cpu' or another platform name."""
  backend = jax.default_backend()
  if backend in ("gpu", "cuda"):
    version = str(getattr(jax.devices()[0].client, "platform_version", "")).lower()
    return "rocm" if "rocm" in version or "hip" in version else "nvidia"
  return backend


def resolve(implementation: str = "auto", *, backend: str | None = None) -> str:
  """The implementation an `attention=` setting runs on this platform.

  ``'auto'`` picks cuDNN on NVIDIA GPUs, splash on TPU and XLA elsewhere. An
  explicit choice the platform cannot run raises instead of falling back.

  Args:
    implementation: one of ``'auto'``, ``'xla'``, ``'cudnn'``, ``'splash'``,
      ``'flash'`` (or ``'splash-interpret'``/``'flash-interpret'``).
    backend: ``'nvidia'``, ``'tpu'``, ``'cpu'``...; default: JAX's default backend.

  Returns:
    The concrete implementation name.

  Raises:
    ValueError: an unknown name, or one this platform cannot run.

  >>> resolve("auto", backend="cpu"), resolve("auto", backend="tpu")
  ('xla', 'splash')
  >>> resolve("cudnn", backend="cpu")
  Traceback (most recent call last):
  ...
  jaxlora.errors.InputError: attention='cudnn' needs an NVIDIA GPU, but this process runs on cpu; use attention='auto' (picks what the platform has) or 'xla'.
  """
  if implementation not in IMPLEMENTATIONS + _INTERPRETED:
    raise InputError(f"attention={implementation!r} is not an attention implementation; "
                     f"choose one of {', '.join(IMPLEMENTATIONS)}.")
  if implementation in _INTERPRETED or implementation == "xla":
    return implementation
  backend = backend or _backend()
  if implementation == "auto":
    return {"nvidia": "cudnn", "tpu": "splash"}.get(backend, "xla")
  needs = {"cudnn": ("nvidia", "an NVIDIA GPU"), "flash": ("nvidia", "an NVIDIA GPU"),
           "splash": ("tpu", "a TPU")}[implementation]
  if backend != needs[0]:
    raise InputError(f"attention={implementation!r} needs {needs[1]}, but this process runs on "
                     f"{backend}; use attention='auto' (picks what the platform has) or 'xla'.")
  return implementation


class Plan(NamedTuple):
  """What one forward pass runs: the implementation and why it is not the requested one."""
  implementation: str
  reason: str | None = None


def plan(requested: str, *, packed: bool, cache: bool, window: int | None, dtype: Any,
         head_dim: int, backend: str | None = None, xla_only: str | None = None) -> Plan:
  """Picks the implementation for one call, falling back to XLA where a path cannot serve it.

  >>> plan("auto", packed=True, cache=False, window=None, dtype="bfloat16", head_dim=64,
  ...      backend="nvidia")
  Plan(implementation='flash', reason=None)
  >>> plan("cudnn", packed=False, cache=False, window=None, dtype="float32", head_dim=64,
  ...      backend="nvidia").reason
  'cuDNN fused attention runs in bfloat16/float16 only (compute dtype float32)'

  ``xla_only`` is a reason the architecture needs the XLA path (soft-capped
  logits, per-layer windows); a fused implementation then falls back with it.
  """
  impl = resolve(requested, backend=backend)
  if impl == "xla":
    return Plan("xla")
  if xla_only:
    return Plan("xla", xla_only)
  base = impl.split("-")[0]
  interpret = impl.endswith("-interpret")
  if cache:
    return Plan("xla", "KV-cache decoding uses the XLA path")
  if base == "cudnn":
    if packed:
      if requested == "auto":  # packed rows on NVIDIA: the Pallas kernel takes segment ids
        return plan("flash", packed=packed, cache=cache, window=window, dtype=dtype,
                    head_dim=head_dim, backend=backend)._replace(
                        reason=None if window is None else
                        "packed rows with a sliding window: no fused NVIDIA kernel has both")
      return Plan("xla", "cuDNN fused attention has no segment ids (packed rows); "
                         "attention='flash' takes them")
    if not interpret and jnp.dtype(dtype) not in (jnp.dtype(jnp.bfloat16),
                                                  jnp.dtype(jnp.float16)):
      return Plan("xla", "cuDNN fused attention runs in bfloat16/float16 only "
                         f"(compute dtype {jnp.dtype(dtype).name})")
    if head_dim % 8 or head_dim > 256:
      return Plan("xla", f"cuDNN fused attention needs head_dim a multiple of 8 up to 256, "
                         f"got {head_dim}")
  if base == "flash" and window is not None:
    return Plan("xla", "the Pallas flash kernel has no sliding window")
  return Plan(impl)


def log_fallback(requested: str, chosen: Plan) -> None:
  """Logs why `plan` ran the XLA path (INFO for ``'auto'``, WARNING for an explicit choice).

  >>> log_fallback("auto", Plan("xla", "KV-cache decoding uses the XLA path"))  # logged, no return
  """
  if chosen.reason:
    level = logging.INFO if requested == "auto" else logging.WARNING
    logger.log(level, "attention=%r runs on the XLA path: %s.", requested, chosen.reason)


def xla_mask(q_slot: Array, k_slot: Array, key_valid: Array, window: int | None,
             segment_ids: Array | None = None) -> Array:
  """The dense ``(batch, 1, q, k)`` mask: causal over slots, window, padding, segments.

  >>> m = xla_mask(jnp.arange(3), jnp.arange(3), jnp.array([[True, True, False]]), window=2)
  >>> m[0, 0].astype(int).tolist()
  [[1, 0, 0], [1, 1, 0], [0, 1, 0]]
  """
  allowed = k_slot[None, :] <= q_slot[:, None]
  if window is not None:
    allowed &= q_slot[:, None] - k_slot[None, :] < window
  mask = allowed[None, None, :, :] & key_valid[:, None, None, :]
  if segment_ids is not None:
    mask &= segment_ids[:, None, :, None] == segment_ids[:, None, None, :]
  return mask


def compact(valid: Array) -> tuple[Array, Array, Array]:
  """Per-row permutation moving real tokens to the front (in order), its inverse, the lengths.

  >>> perm, inv, n = compact(jnp.array([[0, 1, 1, 0, 1]], bool))
  >>> perm.tolist(), inv.tolist(), n.tolist()
  ([[1, 2, 4, 0, 3]], [[3, 0, 1, 4, 2]], [3])
  """
  perm = jnp.argsort(~valid, axis=-1, stable=True)
  inv = jnp.argsort(perm, axis=-1)
  return perm, inv, jnp.sum(valid, axis=-1).astype(jnp.int32)


def gather_rows(x: Array, index: Array) -> Array:
  """``x[b, index[b]]`` for ``x`` of shape ``(batch, seq, ...)``.

  >>> gather_rows(jnp.array([[10, 11, 12]]), jnp.array([[2, 0, 1]])).tolist()
  [[12, 10, 11]]
  """
  return jnp.take_along_axis(x, index.reshape(index.shape + (1,) * (x.ndim - 2)), axis=1)


def attend(q: Array, k: Array, v: Array, ctx: dict, *, implementation: str, scale: float,
           window: int | None = None, softcap: float | None = None) -> Array:
  """Attention of ``q (batch, q, heads, dim)`` over ``k, v (batch, k, kv_heads, dim)``.

  Args:
    q, k, v: queries, keys and values; ``heads`` a multiple of ``kv_heads``.
    ctx: the mask in the implementation's form: ``{'mask'}`` for ``xla``,
      ``{'lengths'}`` (or nothing: causal only) for ``cudnn``, ``{'segment_ids'}``
      (or nothing) for ``splash``/``flash``.
    implementation: a concrete name from `plan`.
    scale: the logit scale (usually ``1/sqrt(dim)``).
    window: sliding window (a query sees itself and the ``window - 1`` tokens before it).
    softcap: Gemma 2's ``cap * tanh(logits / cap)`` on the scaled logits (XLA path only).

  Returns:
    ``(batch, q, heads, dim)`` in ``q``'s dtype.

  >>> q = k = v = jnp.ones((1, 4, 2, 8))
  >>> seg = jnp.array([[1, 1, 2, 0]])
  >>> ref = attend(q, k, v, {'mask': xla_mask(jnp.arange(4), jnp.arange(4), seg > 0, None, seg)},
  ...              implementation='xla', scale=0.5)
  >>> out = attend(q, k, v, {'segment_ids': seg}, implementation='flash-interpret', scale=0.5)
  >>> bool(jnp.allclose(out[:, :3], ref[:, :3], atol=1e-6))
  True
  """
  if implementation == "xla":
    if softcap:
      return _capped(q, k, v, ctx["mask"], scale, softcap)
    return jax.nn.dot_product_attention(q, k, v, mask=ctx["mask"], scale=scale)
  if softcap:
    raise InputError(f"attention logit soft-capping runs on the XLA path only, not "
                     f"{implementation!r}; use plan(..., xla_only=...) to choose.")
  interpret = implementation.endswith("-interpret")
  if implementation.startswith("cudnn"):  # jax partitions the cuDNN call itself
    lengths = ctx.get("lengths")
    return jax.nn.dot_product_attention(
        q, k, v, scale=scale, is_causal=True, query_seq_lengths=lengths,
        key_value_seq_lengths=lengths, implementation="xla" if interpret else "cudnn",
        local_window_size=None if window is None else (window - 1, 0))
  seg = ctx.get("segment_ids")
  if seg is None:
    seg = jnp.ones(q.shape[:2], jnp.int32)
  if implementation.startswith("splash"):
    kernel = lambda q, k, v, s: _splash(q, k, v, s, scale, window, interpret)
  elif implementation.startswith("flash"):
    if window is not None:
      raise InputError("the Pallas flash kernel has no sliding window; use plan() to choose.")
    kernel = lambda q, k, v, s: _flash(q, k, v, s, scale, interpret)
  else:
    raise InputError(f"unknown attention implementation {implementation!r}.")
  return _per_shard(kernel, q, k, v, seg)


def _capped(q, k, v, mask, scale, cap):
  """XLA attention with soft-capped logits, grouped heads kept grouped (no repeated k/v)."""
  b, t, n, d = q.shape
  kv = k.shape[2]
  qg = q.reshape(b, t, kv, n // kv, d)
  logits = jnp.einsum("btkgd,bskd->bkgts", qg, k) * jnp.asarray(scale, q.dtype)
  logits = jnp.tanh(logits / cap) * cap
  logits = jnp.where(mask[:, :, None], logits, jnp.finfo(logits.dtype).min)
  probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(q.dtype)
  return jnp.einsum("bkgts,bskd->btkgd", probs, v).reshape(b, t, n, d)


def _batch_axes(mesh, rows: int) -> tuple[str, ...]:
  """The mesh axes the batch is split over (``data``, ``fsdp``), when they divide ``rows``."""
  axes = tuple(a for a in ("data", "fsdp") if a in mesh.axis_names and mesh.shape[a] > 1)
  return axes if rows % math.prod(mesh.shape[a] for a in axes) == 0 else ()


def shard_batch(x: Array) -> Array:
  """Pins the batch axis of an activation to the mesh's batch axes (inside `jax.set_mesh`).

  Without it XLA may follow the FSDP-sharded weights and split activations
  along the hidden axis instead, so that every device holds the whole batch.
  Outside a mesh context this is the identity.
  """
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return x
  batch = _batch_axes(mesh, x.shape[0])
  if not batch:
    return x
  from jax.sharding import PartitionSpec as P  # pylint: disable=import-outside-toplevel

  return jax.lax.with_sharding_constraint(x, P(batch))


def _per_shard(kernel, q, k, v, seg):
  """Runs a Pallas kernel on each device's rows and heads under the current mesh.

  XLA cannot partition a Pallas call: under `jax.jit` with sharded inputs it
  would gather the whole batch onto every device. Inside ``jax.set_mesh(mesh)``
  the kernel runs under `jax.shard_map` instead, split over the batch axes
  (``data``, ``fsdp``) and, when the key/value heads divide evenly, ``tensor``.
  """
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return kernel(q, k, v, seg)
  batch = _batch_axes(mesh, q.shape[0])
  heads = ("tensor",) if "tensor" in mesh.axis_names and mesh.shape["tensor"] > 1 \
      and k.shape[2] % mesh.shape["tensor"] == 0 else ()
  if not batch and not heads:
    return kernel(q, k, v, seg)
  from jax.sharding import PartitionSpec as P  # pylint: disable=import-outside-toplevel

  rows = batch or None
  qkv = P(rows, None, heads or None, None)
  return jax.shard_map(kernel, mesh=mesh, in_specs=(qkv, qkv, qkv, P(rows, None)),
                       out_specs=qkv, check_vma=False)(q, k, v, seg)


def _pad_seq(t: int, lanes: bool = False) -> tuple[int, int]:
  """Padded length and block size for the Pallas kernels (blocks must divide the length;
  splash's blocks are multiples of the TPU's 128 lanes)."""
  if t <= 128 and not lanes:
    n = max(32, 1 << (t - 1).bit_length())
    return n, n
  n = -(-t // 128) * 128
  return n, next(b for b in (512, 256, 128) if n % b == 0)


def _pad_inputs(q, k, v, seg, n):
  t = q.shape[1]
  if n == t:
    return q, k, v, seg.astype(jnp.int32)
  widths = ((0, 0), (0, n - t), (0, 0), (0, 0))
  # Padded slots are segment 0: real tokens (segments >= 1) never attend to them.
  return (jnp.pad(q, widths), jnp.pad(k, widths), jnp.pad(v, widths),
          jnp.pad(seg.astype(jnp.int32), ((0, 0), (0, n - t))))


def _flash(q, k, v, seg, scale, interpret):
  from jax.experimental.pallas.ops.gpu import attention as gpu_attention  # pylint: disable=import-outside-toplevel

  b, t, n, d = q.shape
  groups = n // k.shape[2]
  if groups > 1:  # the kernel wants one key/value head per query head
    k, v = jnp.repeat(k, groups, axis=2), jnp.repeat(v, groups, axis=2)
  size, block = _pad_seq(t)
  q, k, v, seg = _pad_inputs(q, k, v, seg, size)
  blocks = gpu_attention.BlockSizes(block_q=min(block, 128), block_k=min(block, 128),
                                    block_q_dkv=32, block_kv_dkv=32, block_q_dq=32,
                                    block_kv_dq=32)
  out = gpu_attention.mha(q, k, v, seg, sm_scale=scale, causal=True, block_sizes=blocks,
                          interpret=interpret)
  return out[:, :t]


def _splash_kernel(t: int, heads: int, window: int | None, block: int, mqa: bool,
                   interpret: bool):
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk  # pylint: disable=import-outside-toplevel
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm  # pylint: disable=import-outside-toplevel

  one = (sm.CausalMask((t, t)) if window is None
         else sm.LocalMask((t, t), window_size=(window - 1, 0), offset=0))
  sizes = sk.BlockSizes(block_q=block, block_kv=block, block_kv_compute=block,
                        block_q_dkv=block, block_kv_dkv=block, block_kv_dkv_compute=block,
                        block_q_dq=block, block_kv_dq=block)
  return sk.make_splash_mha(sm.MultiHeadMask([one] * heads), block_sizes=sizes, is_mqa=mqa,
                            head_shards=1, q_seq_shards=1, interpret=interpret), sk.SegmentIds


def _splash(q, k, v, seg, scale, window, interpret):
  b, t, n, d = q.shape
  kv = k.shape[2]
  groups = n // kv
  size, block = _pad_seq(t, lanes=True)
  q, k, v, seg = _pad_inputs(q, k, v, seg, size)
  q = q * jnp.asarray(scale, q.dtype)  # the kernel does not scale
  k, v = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)  # (b, kv, size, d)
  if groups == 1:
    kernel, segment_ids = _splash_kernel(size, n, window, block, False, interpret)
    row = lambda q, k, v, s: kernel(q, k, v, segment_ids=segment_ids(s, s))
    out = jax.vmap(row)(q.transpose(0, 2, 1, 3), k, v, seg)  # (b, n, size, d)
    return out.transpose(0, 2, 1, 3)[:, :t]
  # Grouped heads: the multi-query kernel once per key/value head.
  kernel, segment_ids = _splash_kernel(size, groups, window, block, True, interpret)
  head = lambda q, k, v, s: kernel(q, k, v, segment_ids=segment_ids(s, s))
  q = q.reshape(b, size, kv, groups, d).transpose(0, 2, 3, 1, 4)  # (b, kv, groups, size, d)
  out = jax.vmap(jax.vmap(head, in_axes=(0, 0, 0, None)))(q, k, v, seg)
  return out.transpose(0, 3, 1, 2, 4).reshape(b, size, n, d)[:, :t]
