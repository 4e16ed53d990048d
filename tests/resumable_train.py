"""A small training run that checkpoints and resumes (driven by test_checkpoint.py).

    python tests/resumable_train.py RUN_DIR STEPS [--sleep S]

Prints "step N" after each step. Rerunning with the same RUN_DIR resumes from
the latest checkpoint; at the end the adapter is saved to RUN_DIR/final.
"""

import argparse
import os
import sys
import time

import jax
import jax.numpy as jnp
import optax

sys.path.insert(0, os.path.dirname(__file__))
import jaxlora  # noqa: E402
from models import Stack  # noqa: E402


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("run_dir")
  ap.add_argument("steps", type=int)
  ap.add_argument("--sleep", type=float, default=0.0)
  args = ap.parse_args()
  model = Stack(layers=2, d=16, vocab=32)
  x0 = jnp.zeros((4, 8), jnp.int32)
  variables = model.init(jax.random.key(0), x0)
  tree = jaxlora.wrap(variables, rank=4, key=jax.random.key(1),
                      layout=jaxlora.trace_layout(model.apply, variables, x0))
  trainable, frozen = jaxlora.split(tree)
  tx = optax.adamw(1e-2)
  opt_state = tx.init(trainable)
  rng = jax.random.key(42)
  fwd = jaxlora.apply(model.apply, dropout=0.1)
  mgr = jaxlora.CheckpointManager(os.path.join(args.run_dir, "ckpt"), max_to_keep=2,
                                  save_interval_steps=2)
  start = 0
  if mgr.latest_step() is not None:
    state = mgr.restore(trainable=trainable, opt_state=opt_state)
    trainable, opt_state, rng = state["trainable"], state["opt_state"], state["rng"]
    start = state["data_state"]["next_batch"]
    print(f"resumed at {start}", flush=True)

  @jax.jit
  def step(trainable, opt_state, frozen, tokens, key):
    def loss(t):
      logits = fwd(jaxlora.combine(t, frozen), tokens[:, :-1], rngs={"dropout": key})
      return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()
    l, g = jax.value_and_grad(loss)(trainable)
    updates, opt_state = tx.update(g, opt_state, trainable)
    return optax.apply_updates(trainable, updates), opt_state, l

  for i in range(start, args.steps):
    tokens = jax.random.randint(jax.random.fold_in(jax.random.key(7), i), (4, 9), 0, 32)
    rng, sub = jax.random.split(rng)
    trainable, opt_state, l = step(trainable, opt_state, frozen, tokens, sub)
    mgr.save(i + 1, trainable=trainable, opt_state=opt_state, rng=rng,
             data_state={"next_batch": i + 1})
    print(f"step {i + 1} loss {float(l):.6f}", flush=True)
    time.sleep(args.sleep)
  mgr.close()
  jaxlora.save(os.path.join(args.run_dir, "final"), jaxlora.combine(trainable, frozen))


if __name__ == "__main__":
  main()
