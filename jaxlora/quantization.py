"""Quantized base kernels for QLoRA: NF4 and FP4 (4-bit) and int8 records, as tree transforms.

`quantize` replaces selected kernels of a param tree by `QuantizedArray`
records; `dequantize` turns them back into float arrays; `jaxlora.apply`
computes a layer with a quantized kernel by dequantizing that kernel inside
the jitted step (one layer at a time under ``nn.scan``) and adds the LoRA term
as usual.

The 4-bit storage is the one bitsandbytes uses (and transformers writes to
``*-bnb-4bit`` checkpoints): the kernel is laid out as PyTorch's
``(out, in)`` weight, flattened row-major, cut into blocks of `block_size`
values along that order (so blocks run along the input dimension and may
straddle output rows), each block scaled by its absolute maximum and every
value rounded to the nearest of 16 code values (NF4 or FP4), two codes per byte
(the first in the high nibble). With double quantization the float32 block
maxima are stored as 8-bit codes of bitsandbytes' dynamic map, in groups of 256
blocks, each group with its own float32 scale, after subtracting their mean
(`offset`). Values equal bitsandbytes' for the same weight; see `quantize` for
the one caveat (the float32 mean).

int8 is per-output-channel absmax quantization: LLM.int8()'s storage without
its outlier decomposition (every value goes through int8), which matches
``bitsandbytes.functional.int8_vectorwise_quant`` at ``threshold=0``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxlora import _tree
from jaxlora import kernel_layout as layout_lib
from jaxlora import model_api
from jaxlora import targets as targets_lib
from jaxlora._tree import KERNEL_KEY
from jaxlora.errors import InputError, InputTypeError

QTYPES = ("nf4", "fp4", "int8")
NESTED_BLOCK_SIZE = 256  # blocks of absmax per double-quantization group (bitsandbytes')

# The 4-bit code values (bitsandbytes' tables, index = stored nibble).
NF4_CODE = np.array([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0], np.float32)
FP4_CODE = np.array([
    0.0, 0.0052083334885537624, 0.6666666865348816, 1.0, 0.3333333432674408, 0.5,
    0.1666666716337204, 0.25, -0.0, -0.0052083334885537624, -0.6666666865348816, -1.0,
    -0.3333333432674408, -0.5, -0.1666666716337204, -0.25], np.float32)

# bitsandbytes' signed 8-bit dynamic map (create_dynamic_map(signed=True)), as little-endian
# float32 bits: its float32 rounding is specific to torch.linspace, so it is stored, not rebuilt.
_DYNAMIC_HEX = (
    "33337ebf9a997abf000077bf666673bfcdcc6fbf33336cbf9a9968bf000065bf666661bfcdcc5dbf33335abf"
    "9a9956bf000053bf66664fbfcdcc4bbf333348bf9a9944bf000041bf66663dbfcdcc39bf343336bf9a9932bf"
    "00002fbf66662bbfcdcc27bf343324bf9a9920bf00001dbf666619bfcdcc15bf343312bf9a990ebf00000bbf"
    "666607bfcccc03bf333300bf3233f9be0000f2becccceabe9a99e3be6666dcbe3333d5be0000cebeccccc6be"
    "9a99bfbe6666b8be3333b1be0000aabecccca2be9a999bbe666694be34338dbe000086be99997dbe33336fbe"
    "cdcc60be666652be000044be9a9935be333327becdcc18be66660abe0000f8bd3433dbbd85ebc9bdf728c4bd"
    "6766bebdd7a3b8bd48e1b2bdb81eadbd2a5ca7bd9a99a1bd0ad79bbd7b1496bdeb5190bd5d8f8abdcdcc84bd"
    "7b147ebd5d8f72bd3d0a67bd1f855bbd000050bde17a44bdc3f538bda3702dbd85eb21bd676616bd48e10abd"
    "52b8febc15aee7bcd7a3d0bc9a99b9bc5d8fa2bc1f858bbcc3f568bc48e13abc643b1fbc180416bccdcc0cbc"
    "819503bc6abcf4bbd34de2bb3bdfcfbba470bdbb0d02abbb749398bbdd2486bb8a6c67bb5c8f42bb2db21dbb"
    "fca9f1ba9defa7baff6577ba3ee859ba806a3cbac1ec1eba016f01ba83e2c7b905e78cb90bd723b94b1fbab8"
    "b3ef8ab8348037b80642b2b7ff0502b7941a5ab6b7a313b500000000b7a31335941a5a36ff0502370642b237"
    "34803738b3ef8a384b1fba380bd7233905e78c3983e2c739016f013ac1ec1e3a806a3c3a3ee8593aff65773a"
    "9defa73afca9f13a2db21d3b5c8f423b8a6c673bdd24863b7493983b0d02ab3ba470bd3b3bdfcf3bd34de23b"
    "6abcf43b8195033ccdcc0c3c1804163c643b1f3c48e13a3cc3f5683c1f858b3c5d8fa23c9a99b93cd7a3d03c"
    "15aee73c52b8fe3c48e10a3d6766163d85eb213da3702d3dc3f5383de17a443d0000503d1f855b3d3d0a673d"
    "5d8f723d7b147e3dcdcc843d5d8f8a3deb51903d7b14963d0ad79b3d9a99a13d2a5ca73db81ead3d48e1b23d"
    "d7a3b83d6766be3df728c43d85ebc93d3433db3d0000f83d66660a3ecdcc183e3333273e9a99353e0000443e"
    "6666523ecdcc603e33336f3e99997d3e0000863e34338d3e6666943e9a999b3ecccca23e0000aa3e3333b13e"
    "6666b83e9a99bf3eccccc63e0000ce3e3333d53e6666dc3e9a99e33eccccea3e0000f23e3233f93e3333003f"
    "cccc033f6666073f00000b3f9a990e3f3433123fcdcc153f6666193f00001d3f9a99203f3433243fcdcc273f"
    "66662b3f00002f3f9a99323f3433363fcdcc393f66663d3f0000413f9a99443f3333483fcdcc4b3f66664f3f"
    "0000533f9a99563f33335a3fcdcc5d3f6666613f0000653f9a99683f33336c3fcdcc6f3f6666733f0000773f"
    "9a997a3f33337e3f0000803f")
DYNAMIC_CODE = np.frombuffer(bytes.fromhex(_DYNAMIC_HEX), "<f4").astype(np.float32)

_CODES = {"nf4": NF4_CODE, "fp4": FP4_CODE}
_INT8_STEP = np.float32(7.874015718698502e-3)  # 1/127, the constant bitsandbytes multiplies by
_FIELDS = ("packed", "absmax", "quant_map", "nested_absmax", "nested_quant_map", "offset")


@jax.tree_util.register_pytree_with_keys_class
class QuantizedArray:
  """A quantized kernel: array leaves plus static metadata, usable wherever a kernel goes.

  It is a pytree (`jax.tree` utilities, ``jax.eval_shape``, ``jax.jit``,
  Orbax and shardings see its arrays) and answers ``shape``, ``dtype`` and
  ``ndim`` like the float kernel it stands for, so `jaxlora.wrap`, target
  selection and `jaxlora.summary` treat it as that kernel. ``astype``
  dequantizes. A kernel stacked by ``nn.scan`` keeps its stacked axes leading on
  every array leaf, so the scan slices the record like any other param.

  Array leaves (``*stack`` are stacked-layer axes):
    packed: 4-bit: uint8 ``(*stack, ceil(n / 2))``, two codes per byte in
      bitsandbytes' order; int8: int8 ``(*stack, *shape)`` in the kernel's layout.
    absmax: float32 ``(*stack, n_blocks)`` block maxima, uint8 codes of them
      with double quantization, or for int8 float32 ``(*stack, n_out)``
      per-output-channel maxima.
    quant_map: float32 ``(*stack, 16)``, the 4-bit code values.
    nested_absmax, nested_quant_map, offset: double quantization only: float32
      ``(*stack, n_groups)`` group scales, ``(*stack, 256)`` the 8-bit map and
      ``(*stack,)`` the mean subtracted before quantizing the block maxima.

  Attributes:
    qtype: ``'nf4'``, ``'fp4'`` or ``'int8'``.
    layer_shape: the kernel shape of one layer (without stacked axes).
    n_in: how many leading axes of ``layer_shape`` are input axes.
    dtype: the dtype the kernel dequantizes to (the original kernel's).
    block_size: values per 4-bit block (0 for int8).
  """

  def __init__(self, *, qtype: str, layer_shape: tuple[int, ...], n_in: int, dtype: Any,
               block_size: int, packed: Any, absmax: Any, quant_map: Any = None,
               nested_absmax: Any = None, nested_quant_map: Any = None, offset: Any = None):
    self.qtype = qtype
    self.layer_shape = tuple(int(d) for d in layer_shape)
    self.n_in = int(n_in)
    self._dtype = np.dtype(dtype)
    self.block_size = int(block_size)
    self.packed = packed
    self.absmax = absmax
    self.quant_map = quant_map
    self.nested_absmax = nested_absmax
    self.nested_quant_map = nested_quant_map
    self.offset = offset
    self._names = tuple(f for f in _FIELDS if getattr(self, f) is not None)

  # pytree protocol. The fields a record has are fixed when it is made, so that trees of other
  # leaves (None, shardings, metadata) built from it keep its structure.
  def tree_flatten_with_keys(self):
    names = self._names
    # Dict keys (not attribute keys): Orbax names checkpoint entries by `.key`.
    children = [(jax.tree_util.DictKey(f), getattr(self, f)) for f in names]
    aux = (self.qtype, self.layer_shape, self.n_in, self._dtype.name, self.block_size, names)
    return children, aux

  @classmethod
  def tree_unflatten(cls, aux, children):
    qtype, layer_shape, n_in, dtype, block_size, names = aux
    q = cls(qtype=qtype, layer_shape=layer_shape, n_in=n_in, dtype=dtype, block_size=block_size,
            packed=None, absmax=None)
    for name, value in zip(names, children):
      setattr(q, name, value)
    q._names = names  # pylint: disable=protected-access
    return q

  @property
  def double_quant(self) -> bool:
    return "nested_absmax" in self._names

  @property
  def n_stack(self) -> int:
    """Stacked (``nn.scan``) axes in front of the layer shape."""
    return len(self.packed.shape) - (len(self.layer_shape) if self.qtype == "int8" else 1)

  @property
  def shape(self) -> tuple[int, ...]:
    """The float kernel's shape, stacked axes included."""
    return tuple(self.packed.shape[:self.n_stack]) + self.layer_shape

  @property
  def ndim(self) -> int:
    return len(self.shape)

  @property
  def dtype(self) -> np.dtype:
    return self._dtype

  @property
  def size(self) -> int:
    return math.prod(self.shape)

  @property
  def nbytes(self) -> int:
    """Bytes of the stored arrays."""
    return sum(math.prod(x.shape) * np.dtype(x.dtype).itemsize
               for x in jax.tree.leaves(self))

  def astype(self, dtype: Any) -> jax.Array:
    """The dequantized kernel in `dtype`."""
    return dequantize_array(self).astype(dtype)

  def __repr__(self) -> str:
    if not hasattr(self.packed, "shape"):  # a record of shardings or other per-leaf values
      names = [k.key for k, _ in self.tree_flatten_with_keys()[0]]
      return f"QuantizedArray({self.qtype}, {', '.join(f'{n}={getattr(self, n)!r}' for n in names)})"
    dq = ", double_quant" if self.double_quant else ""
    bs = f", block_size={self.block_size}" if self.block_size else ""
    return (f"QuantizedArray({self.qtype}, shape={self.shape}, dtype={self._dtype.name}"
            f"{bs}{dq})")


def is_quantized(x: Any) -> bool:
  """True for a `QuantizedArray`.

  >>> import numpy as np, jaxlora
  >>> q = jaxlora.quantize({"d": {"kernel": np.ones((64, 4), np.float32)}}, "nf4")
  >>> jaxlora.quantization.is_quantized(q["d"]["kernel"])
  True
  """
  return isinstance(x, QuantizedArray)


# ----------------------------------------------------------------------------- host-side quantizers


def _check_block_size(block_size: Any, qtype: str) -> int:
  if qtype == "int8":
    return 0
  if (isinstance(block_size, bool) or not isinstance(block_size, (int, np.integer))
      or block_size < 2 or block_size % 2):
    raise InputError(
        f"block_size={block_size!r} cannot hold whole bytes of packed 4-bit codes: it must be "
        "a positive even integer. bitsandbytes uses 64 (transformers' default) and accepts "
        "32, 64, 128, ..., 4096.")
  return int(block_size)


def _check_qtype(qtype: Any) -> str:
  if qtype not in QTYPES:
    raise InputError(f"Unknown quantization type {qtype!r}; choose one of {QTYPES} "
                     "(or None for a float base).")
  return qtype


def _block_scale(flat: np.ndarray, block_size: int) -> tuple[np.ndarray, np.ndarray]:
  """Per-block absmax and values scaled into [-1, 1], with bitsandbytes' float32 arithmetic."""
  n = flat.size
  rem = n % block_size
  full = n - rem
  blocks = flat[:full].reshape(-1, block_size)
  absmax = np.abs(blocks).max(axis=-1) if full else np.zeros((0,), np.float32)
  inv = np.float32(1.0) / np.maximum(absmax, np.float32(1e-38))
  scaled = np.clip(blocks * inv[:, None], -1, 1).reshape(-1)
  if rem:  # the last, partial block is divided (not multiplied by a reciprocal), as bnb does
    am = np.maximum(np.abs(flat[full:]).max(), np.float32(1e-38))
    absmax = np.concatenate([absmax, np.abs(flat[full:]).max(keepdims=True)])
    scaled = np.concatenate([scaled, np.clip(flat[full:] / am, -1, 1)])
  return absmax.astype(np.float32), scaled.astype(np.float32)


def _quantize_4bit(flat: np.ndarray, code: np.ndarray, block_size: int):
  absmax, scaled = _block_scale(flat, block_size)
  if scaled.size % 2:
    scaled = np.concatenate([scaled, np.zeros((1,), np.float32)])
  q = _nearest(code, scaled)
  return (q[0::2] << 4) | q[1::2], absmax


def _nearest(code: np.ndarray, scaled: np.ndarray) -> np.ndarray:
  """Index of the nearest code value (a midpoint goes to the lower one), as bitsandbytes rounds."""
  order = np.argsort(code, kind="stable")
  bounds = (code[order[:-1]] + code[order[1:]]) / np.float32(2)
  return order[np.searchsorted(bounds, scaled, side="left")].astype(np.uint8)


def _quantize_8bit_dynamic(x: np.ndarray, block_size: int):
  """Blockwise 8-bit quantization on the dynamic map (bitsandbytes' portable kernel).

  bitsandbytes' native CPU kernel searches the map approximately and picks the
  second-nearest code for a few values in a thousand; this is the nearest-code
  rule of its portable implementation, which its other backends share.
  """
  absmax, scaled = _block_scale(x, block_size)
  return _nearest(DYNAMIC_CODE, scaled), absmax


_CHUNK_VALUES = 1 << 20  # values quantized at a time: bounds the host working memory


def _quantize_4bit_rows(w2: np.ndarray, code: np.ndarray, block_size: int):
  """4-bit codes and block maxima of a Flax ``(n_in, n_out)`` kernel in PyTorch's flat order.

  Works through the kernel a few output rows at a time (whole blocks per
  chunk), so the float32 working copies stay near `_CHUNK_VALUES` values
  whatever the kernel's size.
  """
  n_in, n_out = w2.shape
  n = n_in * n_out
  packed = np.empty((-(-n // 2),), np.uint8)
  absmax = np.empty((-(-n // block_size),), np.float32)
  unit = block_size // math.gcd(n_in, block_size)  # rows whose values fill whole blocks
  rows = max(unit, _CHUNK_VALUES // max(n_in, 1) // unit * unit)
  for o0 in range(0, n_out, rows):
    o1 = min(n_out, o0 + rows)
    flat = np.ascontiguousarray(w2[:, o0:o1].T, np.float32).reshape(-1)
    b0, f0 = o0 * n_in // block_size, o0 * n_in  # f0 is a multiple of the (even) block size
    am, scaled = _block_scale(flat, block_size)
    if scaled.size % 2:
      scaled = np.concatenate([scaled, np.zeros((1,), np.float32)])
    q = _nearest(code, scaled)
    packed[f0 // 2:f0 // 2 + q.size // 2] = (q[0::2] << 4) | q[1::2]
    absmax[b0:b0 + am.size] = am
  return packed, absmax


def _quantize_layer(w: np.ndarray, qtype: str, n_in: int, block_size: int,
                    double_quant: bool) -> dict[str, np.ndarray]:
  n_rows = math.prod(w.shape[:n_in])
  w2 = w.reshape(n_rows, -1)
  if qtype == "int8":
    w2 = w2.astype(np.float32)  # exact for bf16 / f16 inputs
    stats = np.abs(w2).max(axis=0)
    with np.errstate(divide="ignore", invalid="ignore"):
      q = np.round(w2 * (np.float32(127.0) / stats)[None, :])
    q = np.where(stats[None, :] > 0, q, 0).astype(np.int8)
    return {"packed": q.reshape(w.shape), "absmax": stats.astype(np.float32)}
  packed, absmax = _quantize_4bit_rows(w2, _CODES[qtype], block_size)
  out = {"packed": packed, "absmax": absmax, "quant_map": _CODES[qtype].copy()}
  if double_quant:
    # The mean in float64, rounded once. bitsandbytes takes torch's float32 mean, whose
    # summation order depends on the CPU's vector width and thread count: the two can
    # differ in the last bit, everything downstream of the offset is the same arithmetic.
    offset = np.float32(math.fsum(absmax.astype(np.float64)) / max(absmax.size, 1))
    codes, nested = _quantize_8bit_dynamic(absmax - offset, NESTED_BLOCK_SIZE)
    out.update(absmax=codes, nested_absmax=nested, nested_quant_map=DYNAMIC_CODE.copy(),
               offset=np.asarray(offset, np.float32))
  return out


def quantize_array(kernel: Any, qtype: str = "nf4", *, n_in: int = 1, n_stack: int = 0,
                   block_size: int = 64, double_quant: bool = True) -> QuantizedArray:
  """Quantizes one float kernel on the host (NumPy), each stacked layer separately.

  Args:
    kernel: a float array ``(*stacked, *in_axes, *out_axes)`` (NumPy or JAX).
    qtype: ``'nf4'``, ``'fp4'`` or ``'int8'``.
    n_in: number of input axes after the stacked ones.
    n_stack: number of leading stacked-layer axes (``nn.scan``).
    block_size: values per 4-bit block.
    double_quant: quantize the 4-bit block maxima again (8-bit, groups of 256).

  Returns:
    A `QuantizedArray` with NumPy leaves (``jax.device_put`` it, or let
    `quantize` / `from_pretrained` place it).

  >>> import numpy as np
  >>> w = np.linspace(-1, 1, 128 * 3, dtype=np.float32).reshape(128, 3)
  >>> q = quantize_array(w, "nf4")
  >>> q.packed.shape, q.absmax.dtype, q.shape
  ((192,), dtype('uint8'), (128, 3))
  >>> float(np.abs(np.asarray(dequantize_array(q)) - w).max()) < 0.15  # half NF4's widest gap
  True
  """
  qtype = _check_qtype(qtype)
  block_size = _check_block_size(block_size, qtype)
  if isinstance(kernel, jax.ShapeDtypeStruct):
    return _abstract_record(kernel, qtype, n_in, n_stack, block_size, double_quant)
  arr = np.asarray(jax.device_get(kernel))
  if not np.issubdtype(arr.dtype, np.floating) and arr.dtype.name != "bfloat16":
    raise InputTypeError(f"Only float kernels can be quantized, got dtype {arr.dtype}.")
  layer_shape = arr.shape[n_stack:]
  if not 0 < n_in < len(layer_shape):
    raise InputError(f"n_in={n_in} input axes do not fit a kernel of layer shape {layer_shape}.")
  lead = arr.shape[:n_stack]
  layers = [_quantize_layer(arr[idx], qtype, n_in, block_size, double_quant)
            for idx in np.ndindex(*lead)] if lead else [
                _quantize_layer(arr, qtype, n_in, block_size, double_quant)]
  fields = {k: np.stack([l[k] for l in layers]).reshape(lead + layers[0][k].shape)
            for k in layers[0]}
  return QuantizedArray(qtype=qtype, layer_shape=layer_shape, n_in=n_in, dtype=arr.dtype,
                        block_size=block_size, **fields)


def _abstract_record(kernel: jax.ShapeDtypeStruct, qtype: str, n_in: int, n_stack: int,
                     block_size: int, double_quant: bool) -> QuantizedArray:
  """The record `quantize_array` would return, as ShapeDtypeStructs (nothing is computed)."""
  lead, layer_shape = tuple(kernel.shape[:n_stack]), tuple(kernel.shape[n_stack:])
  if not 0 < n_in < len(layer_shape):
    raise InputError(f"n_in={n_in} input axes do not fit a kernel of layer shape {layer_shape}.")
  sds = lambda shape, dt: jax.ShapeDtypeStruct(lead + tuple(shape), np.dtype(dt))
  if qtype == "int8":
    fields = {"packed": sds(layer_shape, np.int8),
              "absmax": sds((math.prod(layer_shape[n_in:]),), np.float32)}
  else:
    n = math.prod(layer_shape)
    n_blocks = -(-n // block_size)
    fields = {"packed": sds((-(-n // 2),), np.uint8), "quant_map": sds((16,), np.float32),
              "absmax": sds((n_blocks,), np.uint8 if double_quant else np.float32)}
    if double_quant:
      fields.update(nested_absmax=sds((-(-n_blocks // NESTED_BLOCK_SIZE),), np.float32),
                    nested_quant_map=sds((256,), np.float32), offset=sds((), np.float32))
  return QuantizedArray(qtype=qtype, layer_shape=layer_shape, n_in=n_in, dtype=kernel.dtype,
                        block_size=block_size, **fields)


# ----------------------------------------------------------------------------- dequantization (jnp)


def _absmax(q: QuantizedArray) -> jax.Array:
  """Float32 block maxima ``(*stack, n_blocks)``."""
  if not q.double_quant:
    return jnp.asarray(q.absmax, jnp.float32)
  codes = jnp.asarray(q.absmax)
  n_blocks = codes.shape[-1]
  table = jnp.asarray(q.nested_quant_map, jnp.float32)
  vals = jnp.take_along_axis(table, codes.astype(jnp.int32), axis=-1)
  nested = jnp.asarray(q.nested_absmax, jnp.float32)
  scale = jnp.repeat(nested, NESTED_BLOCK_SIZE, axis=-1)[..., :n_blocks]
  # bitsandbytes rounds the product before adding the offset. XLA would contract the two into
  # one fused multiply-add (another last bit); a select on the product (NaN kept as NaN) stops
  # that where an optimization barrier does not. It acts on the block maxima, 1/64 of the values.
  prod = vals * scale
  prod = jnp.where(prod == prod, prod, jnp.nan)
  return prod + jnp.asarray(q.offset, jnp.float32)[..., None]


def dequantize_array(q: QuantizedArray) -> jax.Array:
  """The float kernel a `QuantizedArray` stands for (jittable; stacked axes kept).

  The arithmetic is bitsandbytes': ``code[nibble] * absmax`` in float32, then
  cast to the kernel's dtype.

  >>> import numpy as np
  >>> w = np.arange(12, dtype=np.float32).reshape(4, 3) - 6
  >>> np.asarray(dequantize_array(quantize_array(w, "int8")))[0]
  array([-6.      , -5.      , -4.015748], dtype=float32)
  """
  if not isinstance(q, QuantizedArray):
    raise InputTypeError(f"Expected a QuantizedArray, got {type(q).__name__}.")
  lead = tuple(q.packed.shape[:q.n_stack])
  n_in = math.prod(q.layer_shape[:q.n_in])
  n_out = math.prod(q.layer_shape[q.n_in:])
  if q.qtype == "int8":
    w = jnp.asarray(q.packed).reshape(lead + (n_in, n_out)).astype(jnp.float32)
    w = w * jnp.asarray(q.absmax, jnp.float32)[..., None, :] * _INT8_STEP
    return w.reshape(lead + q.layer_shape).astype(q.dtype)
  n = n_in * n_out
  packed = jnp.asarray(q.packed)
  nib = jnp.stack([packed >> 4, packed & 15], axis=-1).reshape(lead + (-1,))[..., :n]
  vals = jnp.take_along_axis(jnp.asarray(q.quant_map, jnp.float32), nib.astype(jnp.int32),
                             axis=-1)
  absmax = _absmax(q)
  n_blocks = absmax.shape[-1]
  vals = jnp.pad(vals, [(0, 0)] * len(lead) + [(0, n_blocks * q.block_size - n)])
  vals = (vals.reshape(lead + (n_blocks, q.block_size)) * absmax[..., None])
  w = vals.reshape(lead + (-1,))[..., :n].reshape(lead + (n_out, n_in))
  return jnp.swapaxes(w, -1, -2).reshape(lead + q.layer_shape).astype(q.dtype)


# ----------------------------------------------------------------------------- tree transforms


def _quantizable_roles(path: str, kernel: Any, layout: layout_lib.Layout | None):
  """(n_stack, n_in) for a kernel laid out (*stacked, *in, *out), or a ValueError."""
  from jaxlora import transform  # pylint: disable=import-outside-toplevel
  roles = transform.kernel_roles(path, kernel, layout)
  n_stack = sum(r == layout_lib.STACK for r in roles)
  rest = roles[n_stack:]
  n_in = sum(r == layout_lib.IN for r in rest)
  if (layout_lib.STACK in rest or layout_lib.BATCH in rest
      or rest != (layout_lib.IN,) * n_in + (layout_lib.OUT,) * (len(rest) - n_in)):
    raise InputError(
        f"Kernel '{path}/kernel' {tuple(kernel.shape)} has axes {roles}: only kernels laid out "
        "(*stacked, *inputs, *outputs) map to bitsandbytes' (out, in) blocks (per-head einsum "
        "axes or interleaved input/output axes do not). Leave it out with `exclude`.")
  return n_stack, n_in


def quantize(params: Any, qtype: str = "nf4", *, block_size: int = 64, double_quant: bool = True,
             targets: targets_lib.Selector = "all-linear",
             exclude: targets_lib.Selector | None = None,
             layout: layout_lib.Layout | model_api.LayoutProvider | None = None) -> Any:
  """Replaces the selected float kernels of a param tree by quantized records.

  Embeddings and norms (no ``kernel``) and the output head (left out by
  ``'all-linear'``) stay in float, as bitsandbytes leaves them. The result
  runs through `jaxlora.apply` (quantized layers are computed from their
  dequantized kernel inside the step, one layer at a time) and can be wrapped
  with `jaxlora.wrap` before or after quantizing. Quantization runs on the
  host, one kernel (and one stacked layer) at a time; each record is placed
  where the kernel was (same sharding when the kernel was sharded).

  NF4/FP4 values equal bitsandbytes' for the same weight, with one caveat for
  ``double_quant``: the mean of the block maxima is computed in float64 and
  rounded once, where torch sums in float32 in an order that depends on the
  machine, so the offset may differ in its last bit.

  Args:
    params: a Flax param tree (with or without ``{'params': ...}``).
    qtype: ``'nf4'`` (QLoRA's NormalFloat), ``'fp4'`` or ``'int8'``.
    block_size: values per 4-bit block (even; bitsandbytes' default 64).
    double_quant: quantize the block maxima again (QLoRA's double quantization).
    targets: kernels to quantize, the selection language of `jaxlora.wrap`.
    exclude: kernels to keep in float.
    layout: a `jaxlora.Layout` from `jaxlora.trace_layout`, or a model that
      provides its own (``layout=model`` calls ``model.lora_layout(params)``,
      as for `jaxlora.wrap`); needed for N-D and
      stacked kernels.

  Returns:
    The tree with `QuantizedArray` records in place of the selected kernels.

  Raises:
    ValueError: unknown ``qtype``, a block size that does not hold whole
      bytes, targets matching nothing, an already quantized tree, or a kernel
      whose axes do not map to bitsandbytes' layout.

  >>> import jax, jax.numpy as jnp, flax.linen as nn, jaxlora
  >>> model = nn.Dense(8)
  >>> x = jnp.ones((2, 64))
  >>> params = model.init(jax.random.key(0), x)['params']
  >>> q = jaxlora.quantize(params, "nf4", targets=".*")
  >>> q['kernel']
  QuantizedArray(nf4, shape=(64, 8), dtype=float32, block_size=64, double_quant)
  >>> y = jaxlora.apply(model.apply)({'params': q}, x)
  >>> bool(jnp.allclose(y, model.apply({'params': jaxlora.dequantize(q)}, x)))
  True
  """
  qtype = _check_qtype(qtype)
  block_size = _check_block_size(block_size, qtype)
  p = _tree.get_params(params)
  layout = model_api.resolve_layout(layout, p)
  already = [pt for pt, m in _tree.iter_modules(p) if is_quantized(m.get(KERNEL_KEY))]
  if already:
    raise InputError(f"The tree is already quantized (at '{_tree.join(already[0])}'); "
                     "quantize the float params, or `jaxlora.dequantize` first.")
  kernels = _tree.kernel_modules(p)
  select = targets_lib.compile_selector(targets, layout=layout, what="targets")
  skip = targets_lib.compile_selector(exclude, layout=layout, what="exclude")
  chosen = [(pt, m) for pt, m in kernels
            if select(_tree.join(pt), m[KERNEL_KEY]) and not skip(_tree.join(pt), m[KERNEL_KEY])]
  if not chosen:
    sample = ", ".join(repr(_tree.join(pt)) for pt, _ in kernels[:8]) or "none"
    raise InputError(f"targets={targets_lib.describe(targets)!r} matched no kernel to quantize "
                     f"(kernels: {sample}).")
  new = {}
  for path_t, mod in chosen:
    path = _tree.join(path_t)
    kernel = mod[KERNEL_KEY]
    n_stack, n_in = _quantizable_roles(path, kernel, layout)
    q = quantize_array(kernel, qtype, n_in=n_in, n_stack=n_stack, block_size=block_size,
                       double_quant=double_quant)
    out = dict(mod)
    out[KERNEL_KEY] = _place_like(q, kernel)
    new[path_t] = out
  return _tree.with_params(params, _tree.replace_modules(p, new))


def _place_like(q: QuantizedArray, kernel: Any) -> QuantizedArray:
  if isinstance(kernel, jax.ShapeDtypeStruct):
    return q
  sharding = getattr(kernel, "sharding", None)
  if isinstance(sharding, jax.sharding.NamedSharding):
    from jaxlora import sharding as sharding_lib  # pylint: disable=import-outside-toplevel
    return jax.device_put(q, sharding_lib.quantized_sharding(q, sharding))
  return jax.tree.map(jnp.asarray, q)


def requantize_like(kernel: Any, like: QuantizedArray) -> QuantizedArray:
  """Quantizes a float kernel with the settings of an existing record (host side).

  >>> import numpy as np
  >>> q = quantize_array(np.ones((64, 2), np.float32), "fp4", double_quant=False)
  >>> requantize_like(np.zeros((64, 2), np.float32), q)
  QuantizedArray(fp4, shape=(64, 2), dtype=float32, block_size=64)
  """
  q = quantize_array(kernel, like.qtype, n_in=like.n_in, n_stack=like.n_stack,
                     block_size=like.block_size or 64, double_quant=like.double_quant)
  return _place_like(q, kernel)


def dequantize(tree: Any) -> Any:
  """Replaces every `QuantizedArray` in a tree by its float kernel (adapters kept).

  >>> import numpy as np, jaxlora
  >>> params = {"d": {"kernel": np.ones((64, 2), np.float32)}}
  >>> back = jaxlora.dequantize(jaxlora.quantize(params, "nf4"))
  >>> back["d"]["kernel"].dtype, float(back["d"]["kernel"].min())
  (dtype('float32'), 1.0)
  """
  return jax.tree.map(lambda x: dequantize_array(x) if is_quantized(x) else x, tree,
                      is_leaf=is_quantized)


def bits_per_parameter(tree: Any) -> float:
  """Stored bits per quantized kernel parameter, over all records of `tree`.

  >>> import numpy as np, jaxlora
  >>> q = jaxlora.quantize({"d": {"kernel": np.ones((4096, 64), np.float32)}}, "nf4")
  >>> round(bits_per_parameter(q), 3)
  4.127
  """
  recs = [x for x in jax.tree.leaves(tree, is_leaf=is_quantized) if is_quantized(x)]
  if not recs:
    raise InputError("The tree holds no quantized kernel.")
  fixed = 0
  for r in recs:  # the code tables are per-tensor constants, not per-parameter storage
    fixed += sum(math.prod(getattr(r, f).shape) * 4 for f in ("quant_map", "nested_quant_map")
                 if getattr(r, f) is not None)
  return 8 * (sum(r.nbytes for r in recs) - fixed) / sum(r.size for r in recs)


def records(tree: Any) -> dict[str, QuantizedArray]:
  """``{module path: QuantizedArray}`` for every quantized kernel of a tree.

  >>> import numpy as np, jaxlora
  >>> list(records(jaxlora.quantize({"d": {"kernel": np.ones((64, 2), np.float32)}}, "fp4")))
  ['d']
  """
  p = _tree.get_params(tree) if isinstance(tree, Mapping) else tree
  return {_tree.join(pt): m[KERNEL_KEY] for pt, m in _tree.iter_modules(p)
          if is_quantized(m.get(KERNEL_KEY))}
