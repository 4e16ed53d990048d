"""LoRA on a Flax NNX model, end to end: pretrain a small base, adapt it, save, reload.

A tiny NNX character model learns to copy its input shifted by one letter
(the base task); then jaxlora.nnx adapts it with LoRA to shift by three
letters instead, training the adapter factors alone (`nnx.Optimizer(...,
wrt=jaxlora.nnx.LoRAParam)`). The adapter is saved with Orbax (the factors
only), loaded into a fresh copy of the base and checked to give the same
outputs; `merge` then folds it into the kernels for inference.

  python examples/train_nnx.py                  # about a minute on a laptop CPU
  python examples/train_nnx.py --steps 20       # a quick look
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile

import jax
import jax.numpy as jnp
import optax
from flax import nnx

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import jaxlora  # noqa: E402  (the checkout's copy, without installing it)

VOCAB = 26  # the letters a..z


class CharModel(nnx.Module):
  """Embedding, two residual MLP blocks with a per-head einsum mixer, output head."""

  def __init__(self, rngs: nnx.Rngs, d: int = 64, heads: int = 4):
    self.embed = nnx.Embed(VOCAB, d, rngs=rngs)
    self.blocks = nnx.List([Block(d, heads, rngs) for _ in range(2)])
    self.head = nnx.Linear(d, VOCAB, rngs=rngs)

  def __call__(self, ids):
    x = self.embed(ids)
    for block in self.blocks:
      x = block(x)
    return self.head(x)


class Block(nnx.Module):
  def __init__(self, d: int, heads: int, rngs: nnx.Rngs):
    self.split = nnx.LinearGeneral(d, (heads, d // heads), rngs=rngs)
    self.mix = nnx.Einsum("bthe,hed->btd", (heads, d // heads, d), (d,), rngs=rngs)
    self.up = nnx.Linear(d, 4 * d, rngs=rngs)
    self.down = nnx.Linear(4 * d, d, rngs=rngs)

  def __call__(self, x):
    x = x + self.mix(jax.nn.gelu(self.split(x)))
    return x + self.down(jax.nn.gelu(self.up(x)))


def batch(key: jax.Array, shift: int, size: int = 64, length: int = 16):
  ids = jax.random.randint(key, (size, length), 0, VOCAB)
  return ids, (ids + shift) % VOCAB


def loss_fn(model, ids, targets):
  logits = model(ids)
  return optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean()


def accuracy(model, shift: int) -> float:
  ids, targets = batch(jax.random.key(999), shift, size=256)
  return float(jnp.mean(jnp.argmax(model(ids), -1) == targets))


def train(model, optimizer, shift: int, steps: int, seed: int, wrt) -> float:
  @nnx.jit
  def step(model, optimizer, ids, targets):
    loss, grads = nnx.value_and_grad(loss_fn, argnums=nnx.DiffState(0, wrt))(model, ids, targets)
    optimizer.update(model, grads)
    return loss

  key = jax.random.key(seed)
  loss = jnp.inf
  for _ in range(steps):
    key, sub = jax.random.split(key)
    loss = step(model, optimizer, *batch(sub, shift))
  return float(loss)


def main(argv: list[str] | None = None) -> dict:
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--steps", type=int, default=300, help="steps for the base and for LoRA")
  ap.add_argument("--rank", type=int, default=8)
  ap.add_argument("--out", default=None, help="adapter directory (default: a temporary one)")
  args = ap.parse_args(argv)

  base = CharModel(nnx.Rngs(0))
  train(base, nnx.Optimizer(base, optax.adam(3e-3), wrt=nnx.Param), shift=1, steps=args.steps,
        seed=1, wrt=nnx.Param)
  print(f"base: shift-1 accuracy {accuracy(base, 1):.2f}, shift-3 accuracy {accuracy(base, 3):.2f}")
  base_state = nnx.state(base)

  model = jaxlora.nnx.wrap(base, rank=args.rank, targets="all-linear", key=jax.random.key(2))
  adapters = nnx.to_pure_dict(jaxlora.nnx.adapter_state(model))
  print("adapted layers of a block:", sorted(adapters["blocks"][0]))
  before = accuracy(model, 3)
  loss = train(model, nnx.Optimizer(model, optax.adam(1e-2), wrt=jaxlora.nnx.LoRAParam),
               shift=3, steps=args.steps, seed=3, wrt=jaxlora.nnx.LoRAParam)
  after = accuracy(model, 3)
  print(f"LoRA r={args.rank}: shift-3 accuracy {before:.2f} -> {after:.2f} (final loss {loss:.3f})")

  out = args.out or os.path.join(tempfile.mkdtemp(), "adapter")
  jaxlora.nnx.save(out, model)
  fresh = CharModel(nnx.Rngs(0))
  nnx.update(fresh, base_state)  # the same base weights
  fresh = jaxlora.nnx.load(out, fresh)
  ids, _ = batch(jax.random.key(5), 3)
  same = bool(jnp.array_equal(fresh(ids), model(ids)))
  merged = jaxlora.nnx.merge(fresh)
  close = bool(jnp.allclose(merged(ids), model(ids), atol=1e-4))
  print(f"adapter saved to {out}; reloaded outputs equal: {same}; merged outputs close: {close}")
  return {"before": before, "after": after, "reloaded_equal": same, "merged_close": close}


if __name__ == "__main__":
  main()
