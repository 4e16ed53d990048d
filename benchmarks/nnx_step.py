"""NNX vs linen: one LoRA training step on the same model and weights (CPU).

Builds one decoder-like stack twice, as a Flax NNX module wrapped by
``jaxlora.nnx.wrap`` and as a linen module wrapped by ``jaxlora.wrap``, with
the same weights, the same factors (same key) and the same data, and times one
adamw step of each, alternating over ``--reps`` rounds (median):

  linen        ``jax.jit`` of value_and_grad with respect to ``jaxlora.split``'s
               trainable half, the frozen half an argument
  nnx          ``nnx.jit`` of ``nnx.value_and_grad`` + ``nnx.Optimizer(wrt=LoRAParam)``
               (the idiomatic NNX loop)
  nnx-split    ``jax.jit`` of a pure step on ``nnx.split(model, LoRAParam, ...)``
               states (what NNX recommends when the Python graph traversal of
               ``nnx.jit`` matters)

Each layer: ``q``/``k``/``v`` projections (``nnx.LinearGeneral`` to heads),
attention, an output ``nnx.Einsum`` from heads, and an MLP of two ``nnx.Linear``.
LoRA rank 16 on every projection, float32.

Usage:
  python benchmarks/nnx_step.py              # 4 layers, d=512, batch 8 x 128
  python benchmarks/nnx_step.py --smoke      # tiny, seconds
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from flax import nnx

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import jaxlora  # noqa: E402  (the checkout's copy, without installing it)


def _attend(q, k, v):
  t = q.shape[1]
  s = jnp.einsum("bqhd,bkhd->bhqk", q, k) / jnp.sqrt(q.shape[-1]).astype(q.dtype)
  s = jnp.where(jnp.tril(jnp.ones((t, t), bool)), s, jnp.finfo(s.dtype).min)
  return jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(s, axis=-1), v)


class NNXLayer(nnx.Module):
  def __init__(self, d, heads, mlp, rngs):
    hd = d // heads
    self.q = nnx.LinearGeneral(d, (heads, hd), use_bias=False, rngs=rngs)
    self.k = nnx.LinearGeneral(d, (heads, hd), use_bias=False, rngs=rngs)
    self.v = nnx.LinearGeneral(d, (heads, hd), use_bias=False, rngs=rngs)
    self.o = nnx.Einsum("bthd,hdo->bto", (heads, hd, d), rngs=rngs)
    self.up = nnx.Linear(d, mlp, rngs=rngs)
    self.down = nnx.Linear(mlp, d, rngs=rngs)

  def __call__(self, x):
    x = x + self.o(_attend(self.q(x), self.k(x), self.v(x)))
    return x + self.down(jax.nn.gelu(self.up(x)))


class NNXModel(nnx.Module):
  def __init__(self, layers, d, heads, mlp, rngs):
    self.layers = nnx.List([NNXLayer(d, heads, mlp, rngs) for _ in range(layers)])

  def __call__(self, x):
    for layer in self.layers:
      x = layer(x)
    return x


class LinenLayer(nn.Module):
  d: int
  heads: int
  mlp: int

  @nn.compact
  def __call__(self, x):
    hd = self.d // self.heads
    proj = lambda n: nn.DenseGeneral((self.heads, hd), use_bias=False, name=n)(x)
    o = nn.Einsum((self.heads, hd, self.d), "bthd,hdo->bto", use_bias=False, name="o")
    x = x + o(_attend(proj("q"), proj("k"), proj("v")))
    return x + nn.Dense(self.d, name="down")(jax.nn.gelu(nn.Dense(self.mlp, name="up")(x)))


class LinenModel(nn.Module):
  layers: int
  d: int
  heads: int
  mlp: int

  @nn.compact
  def __call__(self, x):
    for i in range(self.layers):
      x = LinenLayer(self.d, self.heads, self.mlp, name=f"layers_{i}")(x)
    return x


def build(args):
  nmodel = NNXModel(args.layers, args.d, args.heads, args.mlp, nnx.Rngs(0))
  x = jax.random.normal(jax.random.key(1), (args.batch, args.seq, args.d))
  y = jax.random.normal(jax.random.key(2), (args.batch, args.seq, args.d))
  # The linen params are the NNX model's weights.
  state = nnx.to_pure_dict(nnx.state(nmodel, nnx.Param))
  params = {f"layers_{i}": state["layers"][i] for i in range(args.layers)}
  lmodel = LinenModel(args.layers, args.d, args.heads, args.mlp)
  lay = jaxlora.trace_layout(lmodel.apply, {"params": params}, x)
  tree = jaxlora.wrap(params, rank=16, layout=lay, key=jax.random.key(3))
  nmodel = jaxlora.nnx.wrap(nmodel, rank=16, key=jax.random.key(3))
  tx = optax.adamw(1e-4)

  trainable, frozen = jaxlora.split(tree)
  fwd = jaxlora.apply(lmodel.apply)

  def linen_step(t, opt, f, x, y):
    loss, g = jax.value_and_grad(
        lambda t: jnp.mean((fwd({"params": jaxlora.combine(t, f)}, x) - y) ** 2))(t)
    upd, opt = tx.update(g, opt, t)
    return optax.apply_updates(t, upd), opt, loss

  linen_jit = jax.jit(linen_step, donate_argnums=(0, 1))
  lstate = [trainable, tx.init(trainable)]

  def run_linen():
    lstate[0], lstate[1], loss = linen_jit(lstate[0], lstate[1], frozen, x, y)
    return loss

  opt = nnx.Optimizer(nmodel, tx, wrt=jaxlora.nnx.LoRAParam)

  @nnx.jit
  def nnx_step(model, opt, x, y):
    loss, g = nnx.value_and_grad(lambda m: jnp.mean((m(x) - y) ** 2),
                                 argnums=nnx.DiffState(0, jaxlora.nnx.LoRAParam))(model)
    opt.update(model, g)
    return loss

  graphdef, lora, rest = nnx.split(nmodel, jaxlora.nnx.LoRAParam, ...)
  lora = jax.tree.map(jnp.copy, lora)  # donated below; the model keeps its own arrays
  sstate = [lora, tx.init(lora)]

  def split_step(lora, opt_state, rest, x, y):
    def loss_fn(lora):
      return jnp.mean((nnx.merge(graphdef, lora, rest)(x) - y) ** 2)
    loss, g = jax.value_and_grad(loss_fn)(lora)
    upd, opt_state = tx.update(g, opt_state, lora)
    return optax.apply_updates(lora, upd), opt_state, loss

  split_jit = jax.jit(split_step, donate_argnums=(0, 1))

  def run_split():
    sstate[0], sstate[1], loss = split_jit(sstate[0], sstate[1], rest, x, y)
    return loss

  return {"linen": run_linen, "nnx": lambda: nnx_step(nmodel, opt, x, y),
          "nnx-split": run_split}


def main():
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--layers", type=int, default=4)
  ap.add_argument("--d", type=int, default=512)
  ap.add_argument("--heads", type=int, default=8)
  ap.add_argument("--mlp", type=int, default=2048)
  ap.add_argument("--batch", type=int, default=8)
  ap.add_argument("--seq", type=int, default=128)
  ap.add_argument("--reps", type=int, default=7)
  ap.add_argument("--smoke", action="store_true", help="tiny sizes")
  args = ap.parse_args()
  if args.smoke:
    args.layers, args.d, args.heads, args.mlp = 2, 32, 4, 64
    args.batch, args.seq, args.reps = 2, 8, 2
  steps = build(args)
  print(f"LoRA r=16 step, {args.layers} layers d={args.d} heads={args.heads} mlp={args.mlp}, "
        f"batch {args.batch} x {args.seq}, float32, adamw, jax {jax.__version__} on "
        f"{jax.devices()[0].platform}", flush=True)
  for name, fn in steps.items():  # compile and warm up
    jax.block_until_ready(fn())
    jax.block_until_ready(fn())
  times: dict[str, list[float]] = {k: [] for k in steps}
  names = list(steps)
  for rep in range(args.reps):
    for name in names[rep % len(names):] + names[:rep % len(names)]:
      t0 = time.perf_counter()
      jax.block_until_ready(steps[name]())
      times[name].append(time.perf_counter() - t0)
  med = {k: statistics.median(v) for k, v in times.items()}
  for k in names:
    print(f"  {k:10s} {med[k] * 1e3:9.1f} ms  (min {min(times[k]) * 1e3:.1f} ms)")
  for k in ("nnx", "nnx-split"):
    print(f"  {k} / linen step time: {med[k] / med['linen']:.2f}x")


if __name__ == "__main__":
  main()
