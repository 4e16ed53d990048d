"""A small training run that checkpoints and resumes (driven by test_checkpoint.py).

    python tests/resumable_train.py RUN_DIR STEPS [--sleep S [--sleep-after N]]

Prints "step N loss L" after each step, then waits S seconds (from step N + 1 on).
Rerunning with the same RUN_DIR resumes from the latest checkpoint; at the end
the adapter is saved to RUN_DIR/final. The test calls `train` in its own process
for the runs that are not killed (the same programs, with the same XLA flags),
and runs this script for the one that it kills.
"""

import argparse
import functools
import os
import sys
import time

import jax
import jax.numpy as jnp
import optax

sys.path.insert(0, os.path.dirname(__file__))
import jaxlora  # noqa: E402
from models import Stack  # noqa: E402

MODEL = dict(layers=2, d=16, vocab=32)
STACK = Stack(**MODEL)
TX = optax.adamw(1e-2)
FWD = jaxlora.apply(STACK.apply, dropout=0.1)


# The programs are built once per process (jitted at module level), so that a second run in
# the same process (the test's resume) compiles nothing again.
@jax.jit
def _init_base():
  return STACK.init(jax.random.key(0), jnp.zeros((4, 8), jnp.int32))


def base():
  """The model and its variables."""
  return STACK, _init_base()


@functools.cache
def _wrap():
  variables = _init_base()
  layout = jaxlora.trace_layout(STACK.apply, variables, jnp.zeros((4, 8), jnp.int32))
  return jax.jit(lambda v: jaxlora.wrap(v, rank=4, key=jax.random.key(1), layout=layout))


@jax.jit
def _step(trainable, opt_state, frozen, i, rng):
  tokens = jax.random.randint(jax.random.fold_in(jax.random.key(7), i), (4, 9), 0, 32)
  rng, key = jax.random.split(rng)

  def loss(t):
    logits = FWD(jaxlora.combine(t, frozen), tokens[:, :-1], rngs={"dropout": key})
    return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()

  l, g = jax.value_and_grad(loss)(trainable)
  updates, opt_state = TX.update(g, opt_state, trainable)
  return optax.apply_updates(trainable, updates), opt_state, rng, l


def train(run_dir: str, steps: int, sleep: float = 0.0, sleep_after: int = 0, log=print) -> None:
  """Trains (or resumes) to `steps`, logging "step N loss L" after each step."""
  trainable, frozen = jaxlora.split(_wrap()(_init_base()))
  opt_state = jax.jit(TX.init)(trainable)
  rng = jax.random.key(42)
  mgr = jaxlora.CheckpointManager(os.path.join(run_dir, "ckpt"), max_to_keep=2,
                                  save_interval_steps=2)
  start = 0
  if mgr.latest_step() is not None:
    state = mgr.restore(trainable=trainable, opt_state=opt_state)
    trainable, opt_state, rng = state["trainable"], state["opt_state"], state["rng"]
    start = state["data_state"]["next_batch"]
    log(f"resumed at {start}")
  # Restored arrays are committed to their device: commit them all, fresh or restored, so that
  # `_step` sees the same arguments either way (a resume in this process compiles nothing).
  trainable, opt_state, frozen, rng = jax.device_put((trainable, opt_state, frozen, rng),
                                                     jax.devices()[0])
  for i in range(start, steps):
    trainable, opt_state, rng, l = _step(trainable, opt_state, frozen, i, rng)
    mgr.save(i + 1, trainable=trainable, opt_state=opt_state, rng=rng,
             data_state={"next_batch": i + 1})
    log(f"step {i + 1} loss {float(l):.6f}")
    if i + 1 > sleep_after:
      time.sleep(sleep)
  mgr.close()
  jaxlora.save(os.path.join(run_dir, "final"), jaxlora.combine(trainable, frozen))


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("run_dir")
  ap.add_argument("steps", type=int)
  ap.add_argument("--sleep", type=float, default=0.0)
  ap.add_argument("--sleep-after", type=int, default=0)
  args = ap.parse_args()
  train(args.run_dir, args.steps, args.sleep, args.sleep_after,
        log=lambda line: print(line, flush=True))


if __name__ == "__main__":
  main()
