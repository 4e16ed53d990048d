"""How `jaxlora.wrap` initialises A and B (and, for some schemes, the base kernel).

Two families, as in PEFT's ``init_lora_weights``:

* ``'kaiming'`` and ``'gaussian'`` draw A at random and set B to zero; the
  kernel is left alone.
* ``'pissa'``, ``'pissa_niter_K'`` and ``'olora'`` move a rank-``r`` part of
  each kernel into A and B and leave the rest, the *residual*
  ``W - scale * A @ B``, as the new base kernel, so the wrapped model still
  computes the base model. An adapter trained this way belongs to the residual
  base: `convert_to_lora` turns it into a plain LoRA of rank ``2r`` for the
  original base, and `original_base` gives the original kernels back.

PEFT works on PyTorch ``(out, in)`` weights; flax kernels are
``(*stacked, *batch, *in, *out)``. Each stacked layer and each batch slice is
decomposed on its own, as the ``(in, out)`` matrix its input and output axes
form; PEFT's factors of ``W = kernel.T`` are the transposes of these.
"""

from __future__ import annotations

import functools
import math
import re
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxlora import _tree
from jaxlora import kernel_layout as layout_lib
from jaxlora._tree import (A_KEY, B_KEY, INIT_A_KEY, INIT_B_KEY, INIT_SCALE_KEY, KERNEL_KEY,
                           MAGNITUDE_KEY, SCALE_KEY)
from jaxlora.errors import InputError

# The names `check` accepts; 'pissa_niter_K' stands for any K >= 0.
INITS = ("kaiming", "gaussian", "pissa", "pissa_niter_K", "olora")
_NITER = re.compile(r"pissa_niter_(\d+)")
_NOT_IMPLEMENTED = {
    "loftq": "LoftQ (quantization-aware SVD of the base) is not implemented; quantize the base "
             "with jaxlora.quantize and use init='pissa' (the residual is requantized), or "
             "init='kaiming'",
}


def _describe() -> str:
  return ("'kaiming' (default), 'gaussian', 'pissa', 'pissa_niter_K' (K subspace iterations, "
          "e.g. 'pissa_niter_4') or 'olora'")


def check(init: Any) -> None:
  """Raises an `InputError` naming the choices when `init` is not a known scheme.

  >>> check("pissa_niter_4")
  >>> try:
  ...   check("svd")
  ... except InputError as e:
  ...   print(str(e)[:61])
  Unknown `init` 'svd'; choose 'kaiming' (default), 'gaussian',
  """
  if isinstance(init, str) and (init in INITS[:3] or init == "olora" or _NITER.fullmatch(init)):
    return
  if isinstance(init, str) and init in _NOT_IMPLEMENTED:
    raise InputError(f"init={init!r}: {_NOT_IMPLEMENTED[init]}.")
  hint = " (PEFT's init_lora_weights=True is 'kaiming')" if init is True else ""
  raise InputError(f"Unknown `init` {init!r}{hint}; choose {_describe()}.")


def mutates_base(init: Any) -> bool:
  """True for the schemes that replace the kernel by a residual (PiSSA, OLoRA).

  >>> mutates_base("pissa_niter_2"), mutates_base("olora"), mutates_base("kaiming")
  (True, True, False)
  """
  return isinstance(init, str) and (init == "pissa" or init == "olora"
                                    or _NITER.fullmatch(init) is not None)


def factors(init: str, key: jax.Array, path: str, kernel: Any, roles: tuple[str, ...],
            rank: int, scale: float, dtype: Any) -> tuple[Any, jax.Array, jax.Array]:
  """``(kernel, A, B)`` for one kernel; `kernel` comes back unchanged unless the scheme
  moves part of it into the factors.

  Args:
    init: a name `check` accepts.
    key: PRNG key (random A, or the test matrix of the randomized SVD).
    path: the module path, for messages.
    kernel: the kernel, ``(*stacked, *batch, *in, *out)`` in the order `roles`
      gives; a `jaxlora.QuantizedArray` is dequantized, decomposed and the
      residual quantized again with the record's settings (host side, so not
      under ``jax.jit``).
    roles: the role of each kernel axis (`jaxlora.kernel_layout`).
    rank: the LoRA rank ``r``.
    scale: the adapter's scale (``alpha / r`` or ``alpha / sqrt(r)``).
    dtype: dtype of A and B.

  Returns:
    ``(kernel, A, B)``; for PiSSA and OLoRA the kernel is the residual
    ``W - scale * A @ B``, computed in float32 (float64 for a float64 kernel)
    from the stored A and B and cast to the kernel's dtype.

  >>> k, a, b = factors("kaiming", jax.random.key(0), "d", jnp.ones((4, 3)),
  ...                   ("in", "out"), 2, 1.0, jnp.float32)
  >>> a.shape, b.shape, float(abs(b).max())
  ((4, 2), (2, 3), 0.0)
  >>> w = jnp.diag(jnp.array([3.0, 2.0, 1.0]))
  >>> k, a, b = factors("pissa", jax.random.key(0), "d", w, ("in", "out"), 1, 1.0, jnp.float32)
  >>> np.round(np.asarray(k), 6).tolist(), float(abs(a @ b)[0, 0])
  ([[0.0, 0.0, 0.0], [0.0, 2.0, 0.0], [0.0, 0.0, 1.0]], 3.0)
  """
  shape = tuple(kernel.shape)
  a_shape, b_shape, _ = layout_lib.adapter_shapes(shape, roles, rank)
  if init == "kaiming":  # PEFT's default: A ~ U(-1/sqrt(fan_in), 1/sqrt(fan_in))
    bound = 1.0 / math.sqrt(layout_lib.fan_in(shape, roles))
    lora_a = jax.random.uniform(key, a_shape, dtype, -bound, bound)
    return kernel, lora_a, jnp.zeros(b_shape, dtype)
  if init == "gaussian":  # PEFT's 'gaussian': A ~ N(0, std=1/r)
    lora_a = jax.random.normal(key, a_shape, dtype) / rank
    return kernel, lora_a, jnp.zeros(b_shape, dtype)
  check(init)
  return _residual_factors(init, key, path, kernel, roles, rank, scale, dtype)


# ----------------------------------------------------------------------------- PiSSA and OLoRA


def _qr_q(x: jax.Array) -> jax.Array:
  return jnp.linalg.qr(x, mode="reduced")[0]


def randomized_svd(m: jax.Array, rank: int, niter: int, key: jax.Array):
  """Rank-`rank` SVD ``m ~ u @ diag(s) @ vh`` of a batch of matrices, by random projection.

  The range finder with `niter` subspace (power) iterations and no
  oversampling (Halko, Martinsson and Tropp 2009, algorithms 4.4 and 5.1), as
  ``torch.svd_lowrank(W, q=rank, niter=niter)`` does for PEFT's
  ``pissa_niter_K``: the Gaussian test matrix is drawn from `key`, so the
  result matches PEFT's in distribution, not draw for draw.

  Args:
    m: ``(..., rows, cols)``.
    rank: components to keep (at most ``min(rows, cols)``).
    niter: subspace iterations (0 or more; more is closer to the exact SVD).
    key: PRNG key for the test matrix.

  Returns:
    ``(u, s, vh)`` of shapes ``(..., rows, rank)``, ``(..., rank)``,
    ``(..., rank, cols)``.

  >>> m = jnp.diag(jnp.array([4.0, 2.0, 1.0]))
  >>> u, s, vh = randomized_svd(m, 2, 4, jax.random.key(0))
  >>> np.round(np.asarray(s), 4).tolist()
  [4.0, 2.0]
  """
  transposed = m.shape[-2] < m.shape[-1]  # work on the tall orientation
  x = jnp.swapaxes(m, -1, -2) if transposed else m
  xt = jnp.swapaxes(x, -1, -2)
  with jax.default_matmul_precision("highest"):
    omega = jax.random.normal(key, x.shape[:-2] + (x.shape[-1], rank), x.dtype)
    q = _qr_q(x @ omega)
    for _ in range(niter):
      q = _qr_q(x @ _qr_q(xt @ q))
    small = jnp.swapaxes(q, -1, -2) @ x
    ub, s, vh = jnp.linalg.svd(small, full_matrices=False)
    u = q @ ub
  if transposed:
    return jnp.swapaxes(vh, -1, -2), s, jnp.swapaxes(u, -1, -2)
  return u, s, vh


def _decompose(init: str, key: jax.Array, m: jax.Array, rank: int, scale: float):
  """A ``(S, n_in, r)`` and B ``(S, r, n_out)`` for matrices ``m`` ``(S, n_in, n_out)``."""
  if init == "olora":
    # PEFT: Q, R = qr(W) for the torch weight W = m.T; B = Q[:, :r], A = R[:r] (not divided
    # by the scale, so the residual is W - scale * Q_r R_r).
    q, r = jnp.linalg.qr(jnp.swapaxes(m, -1, -2), mode="reduced")
    return jnp.swapaxes(r[..., :rank, :], -1, -2), jnp.swapaxes(q[..., :, :rank], -1, -2)
  if init == "pissa":
    u, s, vh = jnp.linalg.svd(m, full_matrices=False)
    u, s, vh = u[..., :rank], s[..., :rank], vh[..., :rank, :]
  else:
    found = _NITER.fullmatch(init)
    if found is None:
      raise InputError(f"`init` {init!r} is not a PiSSA scheme (pissa, pissa_niter_K).")
    niter = int(found.group(1))
    u, s, vh = randomized_svd(m, rank, niter, key)
  # PEFT: S_r / scale split evenly between the factors, so scale * A @ B = U_r S_r V_r^T.
  root = jnp.sqrt(s / scale)
  return u * root[..., None, :], root[..., :, None] * vh


def _residual_factors(init, key, path, kernel, roles, rank, scale, dtype):
  from jaxlora import quantization  # pylint: disable=import-outside-toplevel
  quantized = quantization.is_quantized(kernel)
  if quantized and any(isinstance(x, jax.core.Tracer) for x in jax.tree.leaves(kernel)):
    raise InputError(
        f"init={init!r} on the quantized kernel '{path}/kernel' quantizes the residual again, "
        "on the host, which cannot be traced: call jaxlora.wrap outside jax.jit/eval_shape, "
        "or wrap the float params first and quantize after.")
  if not scale > 0:
    raise InputError(
        f"init={init!r} at '{path}' needs a positive scale (alpha), got {scale!r}: PiSSA "
        "splits the singular values by the square root of the scale.")
  w = quantization.dequantize_array(kernel) if quantized else jnp.asarray(kernel)
  if not jnp.issubdtype(w.dtype, jnp.floating):
    raise InputError(f"init={init!r} needs a float kernel at '{path}/kernel', got {w.dtype}.")
  lora_a, lora_b = _split_kernel(w, key, scale, init=init, roles=tuple(roles), rank=rank,
                                 dtype=np.dtype(dtype))
  return _residual(kernel, w, lora_a, lora_b, scale, roles), lora_a, lora_b


def _residual(kernel: Any, w: jax.Array, lora_a: jax.Array, lora_b: jax.Array, scale: Any,
              roles: Sequence[str]) -> Any:
  """``W - scale * A @ B``, quantized again like `kernel` when it is a quantized record."""
  from jaxlora import quantization  # pylint: disable=import-outside-toplevel
  residual = _subtract(w, lora_a, lora_b, jnp.asarray(scale, jnp.float32), roles=tuple(roles))
  if quantization.is_quantized(kernel):
    return quantization.requantize_like(np.asarray(residual), kernel)
  return residual


@functools.partial(jax.jit, static_argnames=("init", "roles", "rank", "dtype"))
def _split_kernel(w, key, scale, *, init, roles, rank, dtype):
  """(A, B) of a float kernel; one compiled program per kernel shape."""
  ct = np.float64 if w.dtype == np.float64 else np.float32
  m, _ = layout_lib.as_matrices(w.astype(ct), roles)
  a, b = _decompose(init, key, m, rank, jnp.asarray(scale, ct))
  a_shape, b_shape, _ = layout_lib.adapter_shapes(tuple(w.shape), roles, rank)
  return a.reshape(a_shape).astype(dtype), b.reshape(b_shape).astype(dtype)


@functools.partial(jax.jit, static_argnames=("roles",))
def _subtract(w, lora_a, lora_b, scale, *, roles):
  """The residual kernel; `wrap` and `rebuild_residuals` share this one program, so that a
  checkpoint rebuilds the residual bit for bit. It subtracts the factors as stored, so that
  base + adapter rounds once."""
  ct = np.float64 if w.dtype == np.float64 else np.float32
  m, back = layout_lib.as_matrices(w.astype(ct), roles)
  a = lora_a.astype(ct).reshape(m.shape[:-2] + (m.shape[-2], -1))
  b = lora_b.astype(ct).reshape(m.shape[:-2] + (a.shape[-1], m.shape[-1]))
  s = scale.astype(ct).reshape(-1, 1)  # one scale per stacked layer; batch slices share it
  s = jnp.broadcast_to(s, (s.shape[0], m.shape[0] // s.shape[0])).reshape(-1, 1, 1)
  delta = jnp.matmul(a, b, precision=jax.lax.Precision.HIGHEST)
  return back(m - s * delta).astype(w.dtype)


def rebuild_residuals(params: Any) -> Any:
  """The residual kernels of a PiSSA/OLoRA tree from the ORIGINAL kernels.

  Every module holding the factors its residual was split off with
  (``lora_init_a``, ``lora_init_b``, ``lora_init_scale``, which `jaxlora.wrap`
  keeps) gets ``kernel - init_scale * init_a @ init_b``, computed by the
  program `wrap` used, so bit for bit the kernel `wrap` returned.
  `jaxlora.load` calls it: an adapter checkpoint holds the adapter, not the
  residual base.

  Args:
    params: a wrapped tree whose kernels are the original ones.

  Returns:
    The same tree with residual kernels.

  >>> import jax, jax.numpy as jnp, jaxlora
  >>> base = {'d': {'kernel': jax.random.normal(jax.random.key(0), (4, 3))}}
  >>> tree = jaxlora.wrap(base, rank=1, init='pissa')
  >>> again = rebuild_residuals(dict(tree, d=dict(tree['d'], kernel=base['d']['kernel'])))
  >>> bool(jnp.array_equal(again['d']['kernel'], tree['d']['kernel']))
  True
  """
  from jaxlora import quantization  # pylint: disable=import-outside-toplevel
  p = _tree.get_params(params)
  new = {}
  for path_t, mod in _tree.iter_modules(p):
    if INIT_A_KEY not in mod:
      continue
    kernel = mod[KERNEL_KEY]
    path = _tree.join(path_t)
    a0, b0, s0 = mod[INIT_A_KEY], mod[INIT_B_KEY], jnp.asarray(mod[INIT_SCALE_KEY])
    roles = layout_lib.roles_from_shapes(path, kernel.shape, a0.shape, b0.shape, s0.ndim)
    w = quantization.dequantize_array(kernel) if quantization.is_quantized(kernel) else kernel
    new[path_t] = dict(mod, **{KERNEL_KEY: _residual(kernel, jnp.asarray(w), a0, b0, s0, roles)})
  return _tree.with_params(params, _tree.replace_modules(p, new))


def initial_adapter(tree: Any) -> Any:
  """The adapter a PiSSA/OLoRA wrap started from, from the factors the tree keeps.

  Returns None when the tree keeps none (an init that leaves the kernels alone).

  >>> import jax, jaxlora
  >>> base = {'d': {'kernel': jax.random.normal(jax.random.key(0), (4, 3))}}
  >>> tree = jaxlora.wrap(base, rank=1, init='olora')
  >>> sorted(initial_adapter(tree)['d'])
  ['lora_a', 'lora_b', 'lora_scale']
  """
  p = _tree.get_params(tree)
  mods = {pt: {A_KEY: m[INIT_A_KEY], B_KEY: m[INIT_B_KEY], SCALE_KEY: m[INIT_SCALE_KEY]}
          for pt, m in _tree.iter_modules(p) if INIT_A_KEY in m}
  return _tree.nest(mods) if mods else None


# ----------------------------------------------------------------------------- back to plain LoRA


def _adapter_pairs(tree: Any, initial: Any):
  if initial is None:
    initial = initial_adapter(tree)
    if initial is None:
      raise InputError("`tree` keeps no initial factors (lora_init_a/lora_init_b: it was not "
                       "wrapped with init='pissa', 'pissa_niter_K' or 'olora'); pass the "
                       "adapter at init as `initial`.")
  p = _tree.get_params(tree)
  mods = dict(_tree.adapter_modules(p))
  mods0 = dict(_tree.adapter_modules(_tree.get_params(initial)))
  if not mods:
    raise InputError("`tree` holds no adapter (no 'lora_a' leaves).")
  if set(mods) != set(mods0):
    only = sorted(set(mods) ^ set(mods0))[0]
    side = "`tree`" if only in mods else "`initial`"
    raise InputError(
        f"The adapter at '{_tree.join(only)}' is only in {side}: `initial` must be the adapter "
        "of the same wrap, before training (jaxlora.adapter of the freshly wrapped tree).")
  for path_t, mod in mods.items():
    mod0 = mods0[path_t]
    path = _tree.join(path_t)
    for m, what in ((mod, "tree"), (mod0, "initial")):
      missing = [k for k in _tree.LORA_KEYS if k not in m]
      if missing:
        raise InputError(f"The adapter of `{what}` at '{path}' lacks {missing}.")
    a, a0, b, b0 = mod[A_KEY], mod0[A_KEY], mod[B_KEY], mod0[B_KEY]
    s, s0 = np.shape(mod[SCALE_KEY]), np.shape(mod0[SCALE_KEY])
    k = _b_rank_axis(path, mod, mod0)
    if (a.shape[:-1] != a0.shape[:-1] or s != s0 or b.shape[:k] != b0.shape[:k]
        or b.shape[k + 1:] != b0.shape[k + 1:] or b.ndim != b0.ndim):
      raise InputError(
          f"The adapters at '{path}' do not fit each other: lora_a {a.shape} vs {a0.shape}, "
          f"lora_b {b.shape} vs {b0.shape}; `initial` must come from the same wrap.")
  return p, mods, mods0


def convert_to_lora(tree: Any, initial: Any = None) -> Any:
  """A plain LoRA adapter for the ORIGINAL kernels from a PiSSA/OLoRA-trained one.

  PiSSA and OLoRA train on the residual base ``W_res = W - s0 * A0 @ B0``, so
  the trained model is ``W_res + s * A @ B = W + (s * A @ B - s0 * A0 @ B0)``.
  That difference is a LoRA of rank ``r + r0`` on ``W``: ``A' = [A, A0]``
  (along the rank axis) and ``B' = [B; -(s0 / s) * B0]``, with the trained
  scale ``s``. With equal scales (the usual case) this is exactly what PEFT's
  ``save_pretrained(..., path_initial_model_for_weight_conversion=...)``
  writes: rank ``2r``, B0 negated, and a ``lora_alpha`` doubled (times
  ``sqrt(2)`` with rsLoRA) so that the scale is unchanged, which
  `jaxlora.peft.save` of the result writes by itself. Each layer keeps its own
  rank and scale, so ``rank_pattern``/``alpha_pattern`` (and rsLoRA with them,
  which PEFT refuses here) need no special case.

  Pair the result with the original kernels (`original_base`, or the base the
  PiSSA wrap started from). Other adapter leaves of `tree` (trainable tokens,
  fully trained modules) are carried over unchanged; DoRA magnitudes cannot be
  carried (DoRA's normalisation is not a LoRA) and are refused.

  Args:
    tree: the trained tree (a wrapped tree or its `jaxlora.adapter`).
    initial: the adapter right after `jaxlora.wrap` with ``init='pissa'``,
      ``'pissa_niter_K'`` or ``'olora'`` (``jaxlora.adapter(wrapped)``, or the
      whole wrapped tree), saved before training. By default, the factors
      `wrap` keeps in the tree (``lora_init_a``, ``lora_init_b``,
      ``lora_init_scale``; see `initial_adapter`).

  Returns:
    The converted adapter, of the same form as ``jaxlora.adapter(tree)``.

  Raises:
    InputError: adapters that do not correspond, DoRA, or a zero trained
      scale where the initial one is not.

  >>> import jax, jax.numpy as jnp, numpy as np, jaxlora
  >>> base = {'d': {'kernel': jax.random.normal(jax.random.key(0), (6, 5))}}
  >>> start = jaxlora.wrap(base, rank=2, init='pissa')
  >>> trained = dict(start, d=dict(start['d'], lora_b=start['d']['lora_b'] + 0.1))
  >>> lora = jaxlora.peft.convert_to_lora(trained, jaxlora.adapter(start))
  >>> lora['d']['lora_a'].shape, lora['d']['lora_b'].shape
  ((6, 4), (4, 5))
  >>> back = jaxlora.peft.original_base(trained, jaxlora.adapter(start))
  >>> bool(jnp.allclose(back['d']['kernel'], base['d']['kernel'], atol=1e-5))
  True
  >>> x = jnp.ones((1, 6))
  >>> y_pissa = x @ jaxlora.merge(trained)['d']['kernel']
  >>> y_lora = x @ jaxlora.merge(jaxlora.combine(lora, back))['d']['kernel']
  >>> bool(jnp.allclose(y_pissa, y_lora, atol=1e-5))
  True
  """
  p, mods, mods0 = _adapter_pairs(tree, initial)
  new = {}
  for path_t, mod in mods.items():
    mod0 = mods0[path_t]
    path = _tree.join(path_t)
    if MAGNITUDE_KEY in mod:
      raise InputError(
          f"The adapter at '{path}' is DoRA (it has '{MAGNITUDE_KEY}'): a DoRA update is not a "
          "low-rank difference, so it cannot become a plain LoRA on the original base.")
    s, s0 = jnp.asarray(mod[SCALE_KEY], jnp.float32), jnp.asarray(mod0[SCALE_KEY], jnp.float32)
    if not isinstance(s, jax.core.Tracer) and not isinstance(s0, jax.core.Tracer):
      if np.any((np.asarray(s) == 0) & (np.asarray(s0) != 0)):
        raise InputError(
            f"The trained adapter at '{path}' has lora_scale 0 where the initial one does "
            "not: the initial part cannot be expressed at that scale.")
    a, a0, b, b0 = mod[A_KEY], mod0[A_KEY], mod[B_KEY], mod0[B_KEY]
    # s0/s is exactly 1 for equal scales, so B0 is then negated and nothing else.
    ratio = (s0 / s).astype(b.dtype)
    ratio = ratio.reshape(ratio.shape + (1,) * (b0.ndim - ratio.ndim))
    out = {k: v for k, v in mod.items() if _tree.is_adapter_key(k) and k not in _tree.INIT_KEYS}
    out[A_KEY] = jnp.concatenate([a, jnp.asarray(a0, a.dtype)], axis=-1)
    out[B_KEY] = jnp.concatenate([b, -ratio * jnp.asarray(b0, b.dtype)],
                                 axis=_b_rank_axis(path, mod, mod0))
    new[path_t] = out
  adapter_p = _tree.filter_tree(_tree.adapter_leaves(p), lambda k: k not in _tree.INIT_KEYS,
                                prune=True)
  return _tree.with_params(tree, _tree.overlay(adapter_p, _tree.nest(new)))


def _b_rank_axis(path: str, mod: Mapping, mod0: Mapping) -> int:
  """B's rank axis: A is ``(*shared, *in, r)`` and B ``(*shared, r, *out)``."""
  a, b = mod[A_KEY], mod[B_KEY]
  kernel = mod.get(KERNEL_KEY, mod0.get(KERNEL_KEY))
  if kernel is not None:  # the kernel pins how many axes A and B share
    return a.ndim + b.ndim - 2 - len(kernel.shape)
  r = a.shape[-1]
  n_stack = np.ndim(mod[SCALE_KEY])
  found = [k for k in range(n_stack, min(a.ndim, b.ndim))
           if b.shape[k] == r and a.shape[:k] == b.shape[:k]
           and a.ndim - 1 - k >= 1 and b.ndim - 1 - k >= 1]  # at least one in and out axis
  if len(found) != 1:
    raise InputError(
        f"The adapter at '{path}' (lora_a {a.shape}, lora_b {b.shape}) does not say which "
        "axes are shared with the kernel; pass the whole wrapped tree (with its kernels) "
        "instead of its jaxlora.adapter.")
  return found[0]


def original_base(tree: Any, initial: Any = None) -> Any:
  """The original base params from a PiSSA/OLoRA tree and its adapter at init.

  Each residual kernel of `tree` plus the initial adapter's product,
  ``W_res + s0 * A0 @ B0 = W`` (float32 rounding aside; this is
  ``jaxlora.merge`` of the freshly wrapped tree). Adapter leaves are dropped;
  other leaves are `tree`'s. A quantized residual comes back as a float
  kernel (`jaxlora.merge` semantics): the original ``Quant(W)`` is not
  recoverable from ``Quant(W_res)``.

  Args:
    tree: the trained (or initial) wrapped tree: it provides the residual kernels.
    initial: the adapter right after `jaxlora.wrap` (or the whole wrapped tree);
      by default the factors `wrap` keeps in the tree (`initial_adapter`).

  Returns:
    A plain param tree of the form of `tree` (variables or params).

  >>> import jax, jax.numpy as jnp, jaxlora
  >>> base = {'d': {'kernel': jax.random.normal(jax.random.key(0), (4, 3))}}
  >>> start = jaxlora.wrap(base, rank=1, init='olora')
  >>> back = jaxlora.peft.original_base(start, jaxlora.adapter(start))
  >>> bool(jnp.allclose(back['d']['kernel'], base['d']['kernel'], atol=1e-6))
  True
  """
  from jaxlora import transform  # pylint: disable=import-outside-toplevel
  p, mods, mods0 = _adapter_pairs(tree, initial)
  for path_t, mod in mods.items():
    if KERNEL_KEY not in mod:
      raise InputError(
          f"`tree` has no kernel at '{_tree.join(path_t)}/kernel': original_base needs the "
          "wrapped tree with its residual kernels, not its jaxlora.adapter.")
  base = _tree.base_leaves(p, prune=False)
  lora0 = _tree.nest({pt: {k: m[k] for k in _tree.LORA_KEYS} for pt, m in mods0.items()})
  return transform.merge(_tree.with_params(tree, _tree.overlay(base, lora0)))


# ----------------------------------------------------------------------------- PEFT configs


def peft_init_value(value: Any) -> bool | str:
  """Checks an ``init_lora_weights`` value for `jaxlora.peft.save`.

  ``True`` (the default) says the adapter applies to the base it is served
  with. ``'pissa'``, ``'pissa_niter_K'`` or ``'olora'`` say it was trained on
  that scheme's residual and PEFT (and `jaxlora.peft.load`) rebuild the
  residual from the ORIGINAL base when loading, as PEFT's own PiSSA/OLoRA
  adapters do.

  >>> peft_init_value("pissa"), peft_init_value(True)
  ('pissa', True)
  """
  if value is True or value is False or value == "gaussian" or mutates_base(value):
    return value
  raise InputError(
      f"init_lora_weights={value!r}: write True (the adapter applies to the base as it is), "
      "or the scheme the adapter was trained with when PEFT should rebuild its residual from "
      "the original base at load: 'pissa', 'pissa_niter_K' or 'olora'.")


# PEFT inits that leave the base alone when an adapter is loaded (its tensors then replace A and B).
_PLAIN_ON_LOAD = (True, False, "gaussian", "eva", "orthogonal")


def peft_load_init(value: Any, where: str) -> Any:
  """The ``init_lora_weights`` of an adapter config, or an error for ones jaxlora cannot load.

  >>> peft_load_init("olora", "adapter_config.json")
  'olora'
  """
  if isinstance(value, str) and value.lower() in ("olora", "gaussian"):  # as PEFT reads them
    return value.lower()
  if mutates_base(value) or any(value is v or (isinstance(v, str) and value == v)
                                for v in _PLAIN_ON_LOAD):
    return value
  raise InputError(
      f"{where}: init_lora_weights={value!r} changes the base weights when PEFT loads the "
      "adapter (or is unknown), which jaxlora does not reproduce; it loads adapters with "
      "True, False, 'gaussian', 'eva', 'orthogonal', 'pissa', 'pissa_niter_K' and 'olora'.")


def peft_residual(init: str, kernel: Any, layers: Mapping[int | None, tuple[int, float]],
                  key: jax.Array | None = None) -> Any:
  """The residual PEFT builds when it loads a PiSSA/OLoRA adapter onto the original base.

  Args:
    init: ``'pissa'``, ``'pissa_niter_K'`` or ``'olora'``.
    kernel: the original 2-D kernel ``(in, out)``, or a stack ``(layers, in, out)``
      (a `jaxlora.QuantizedArray` is dequantized and the result requantized).
    layers: ``{layer: (rank, scale)}`` for the adapted layers (``{None: ...}``
      for an unstacked kernel); other layers stay as they are.
    key: PRNG key for ``'pissa_niter_K'`` (default ``jax.random.key(0)``);
      PEFT draws its own, so that residual is only close to the one trained on.

  Returns:
    The kernel with the adapted layers replaced by their residuals.

  >>> w = jnp.diag(jnp.array([3.0, 1.0]))
  >>> (np.asarray(peft_residual("pissa", w, {None: (1, 2.0)})).round(6) + 0.0).tolist()
  [[0.0, 0.0], [0.0, 1.0]]
  """
  from jaxlora import quantization  # pylint: disable=import-outside-toplevel
  key = jax.random.key(0) if key is None else key
  quantized = quantization.is_quantized(kernel)
  w = quantization.dequantize_array(kernel) if quantized else jnp.asarray(kernel)
  roles = (layout_lib.IN, layout_lib.OUT)
  keys = jax.random.split(key, max(len(layers), 1))
  for k, (layer, (rank, scale)) in zip(keys, sorted(layers.items(), key=lambda kv: kv[0] or 0)):
    part = w if layer is None else w[layer]
    res, _, _ = _residual_factors(init, k, f"layer {layer}", part, roles, int(rank),
                                  float(scale), np.float32)
    w = res if layer is None else w.at[layer].set(res)
  if quantized:
    return quantization.requantize_like(np.asarray(w), kernel)
  return w
