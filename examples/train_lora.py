"""Fine-tune a small scanned linen model with LoRA on CPU, start to finish.

A base model is first fitted to a "teacher" network. The task then changes: the
new teacher's layers differ from the old by a low-rank update. LoRA adapts the
frozen base to it while training a small share of the parameters, and the
merged model is checked against the factored one.

    python examples/train_lora.py [--steps 300] [--rank 4]
"""

import argparse
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

import jaxlora


class Layer(nn.Module):
  d: int

  @nn.compact
  def __call__(self, x, _):
    h = nn.Dense(4 * self.d, name="up")(nn.LayerNorm(name="ln")(x))
    return x + nn.Dense(self.d, name="down")(nn.gelu(h)), None


class Model(nn.Module):
  d: int = 64
  layers: int = 4
  out: int = 8

  @nn.compact
  def __call__(self, x):
    x = nn.Dense(self.d, name="proj_in")(x)
    body = nn.scan(nn.remat(Layer), variable_axes={"params": 0}, split_rngs={"params": True, "dropout": True},
                   length=self.layers)
    x, _ = body(d=self.d, name="layers")(x, None)
    return nn.Dense(self.out, name="head")(x)


def fit(loss_fn, trainable, frozen, batches, steps, lr):
  """Adam on `trainable`; the frozen part goes in as an argument, not a constant."""
  tx = optax.adam(optax.cosine_decay_schedule(lr, steps))
  state = tx.init(trainable)

  @jax.jit
  def step(trainable, state, frozen, x, y):
    loss, grads = jax.value_and_grad(loss_fn)(trainable, frozen, x, y)
    updates, state = tx.update(grads, state, trainable)
    return optax.apply_updates(trainable, updates), state, loss

  for i in range(steps):
    x, y = batches(i)
    trainable, state, loss = step(trainable, state, frozen, x, y)
    if i % max(steps // 5, 1) == 0 or i == steps - 1:
      print(f"  step {i:4d}  loss {float(loss):.5f}")
  return trainable


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--steps", type=int, default=300, help="steps per phase")
  parser.add_argument("--rank", type=int, default=4, help="LoRA rank")
  parser.add_argument("--seed", type=int, default=0)
  args = parser.parse_args()
  t0 = time.time()
  model = Model()
  key = jax.random.key(args.seed)
  k_teacher, k_base, k_shift, k_lora, k_data = jax.random.split(key, 5)
  x0 = jnp.zeros((1, 16))

  teacher = model.init(k_teacher, x0)
  # The new task: every layer of the teacher moves by a rank-2 update.
  t_layout = jaxlora.trace_layout(model.apply, teacher, x0)
  shifted = jaxlora.wrap(teacher, rank=2, key=k_shift, layout=t_layout, targets="layers/")
  shifted = jax.tree_util.tree_map_with_path(
      lambda p, a: 0.3 * jax.random.normal(jax.random.fold_in(k_shift, 1), a.shape)
      if p[-1].key == "lora_b" else a, shifted)
  new_teacher = jaxlora.merge(shifted)

  def batches_for(params):
    def batches(i):
      x = jax.random.normal(jax.random.fold_in(k_data, i), (64, 16))
      return x, model.apply(params, x)
    return batches

  def mse(pred, y):
    return jnp.mean((pred - y) ** 2)

  print(f"1) pre-training the base model on the old task ({args.steps} steps)")
  base = fit(lambda p, _, x, y: mse(model.apply(p, x), y), model.init(k_base, x0), None,
             batches_for(teacher), args.steps, 3e-3)

  x_eval = jax.random.normal(jax.random.fold_in(k_data, 10**6), (1024, 16))
  y_new = model.apply(new_teacher, x_eval)
  base_loss = float(mse(model.apply(base, x_eval), y_new))

  layout = jaxlora.trace_layout(model.apply, base, x0)
  wrapped = jaxlora.wrap(base, rank=args.rank, key=k_lora, layout=layout)
  print("\n2) LoRA adapters (the base stays frozen):")
  print(jaxlora.summary(wrapped))
  trainable, frozen = jaxlora.split(wrapped)
  lora_apply = jaxlora.apply(model.apply)

  def lora_loss(trainable, frozen, x, y):
    return mse(lora_apply(jaxlora.combine(trainable, frozen), x), y)

  print(f"\n3) LoRA fine-tuning on the new task ({args.steps} steps)")
  trainable = fit(lora_loss, trainable, frozen, batches_for(new_teacher), args.steps, 1e-2)
  tuned = jaxlora.combine(trainable, frozen)

  factored = lora_apply(tuned, x_eval)
  merged = model.apply(jaxlora.merge(tuned), x_eval)
  rel = float(jnp.max(jnp.abs(factored - merged)) / jnp.max(jnp.abs(factored)))
  s = jaxlora.summary(tuned)
  print("\nResults")
  print(f"  eval MSE on the new task: base {base_loss:.5f} -> LoRA {float(mse(factored, y_new)):.5f}")
  print(f"  trainable parameters: {s.trainable:,} of {s.total:,} ({100 * s.trainable_fraction:.2f}%)")
  print(f"  merged vs factored forward: max rel. difference {rel:.2e} "
        f"({'OK' if rel < 1e-5 else 'MISMATCH'})")
  print(f"  wall time {time.time() - t0:.1f} s")
  if rel >= 1e-5:
    raise SystemExit("merged and factored outputs disagree")


if __name__ == "__main__":
  main()
