"""MoE block: the ragged (grouped matmul) path vs the dense all-experts reference (CPU).

One invocation builds `jaxlora.models.moe.MoE` (random weights, float32) and
times one jitted ``jax.value_and_grad`` step with respect to the input and all
params (forward + backward) for both implementations on the same params and
tokens, alternating the variants over ``--reps`` rounds (order rotated each
round), and prints the median seconds, tokens/s and the ratio dense/ragged.

  ragged  tokens sorted by expert, each expert runs on its own top-k tokens only
          (`jaxlora.experts.grouped_matmul`: a tiled scan on CPU, `lax.ragged_dot`
          on GPU/TPU)
  dense   every token through every expert, weights zero off the top-k
          (``num_experts / top_k`` times the expert FLOPs)

Usage:
  python benchmarks/moe.py                 # 8 experts, top-2, hidden 512, I 1024, 4096 tokens
  python benchmarks/moe.py --smoke         # tiny sizes, seconds
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _step(implementation: str, args: argparse.Namespace):
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel

  from jaxlora.models.moe import MoE  # pylint: disable=import-outside-toplevel

  block = MoE(args.hidden, args.intermediate, args.experts, args.top_k, norm_topk_prob=True,
              implementation=implementation)

  def loss(params: Any, h: jax.Array) -> jax.Array:
    return jnp.mean(block.apply({"params": params}, h) ** 2)

  return block, jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))


def main(argv: list[str] | None = None) -> dict[str, float]:
  """Runs the benchmark and prints one line per variant and the ratio."""
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--experts", type=int, default=8)
  p.add_argument("--top-k", type=int, default=2)
  p.add_argument("--hidden", type=int, default=512)
  p.add_argument("--intermediate", type=int, default=1024)
  p.add_argument("--tokens", type=int, default=4096)
  p.add_argument("--reps", type=int, default=5)
  p.add_argument("--smoke", action="store_true", help="tiny sizes (seconds)")
  args = p.parse_args(argv)
  if args.smoke:
    args.hidden, args.intermediate, args.tokens, args.reps = 32, 64, 256, 2

  import flax.linen as nn  # pylint: disable=import-outside-toplevel
  import jax  # pylint: disable=import-outside-toplevel

  h = jax.random.normal(jax.random.key(0), (1, args.tokens, args.hidden))
  variants = ("ragged", "dense")
  steps = {}
  params = None
  for name in variants:
    block, fn = _step(name, args)
    if params is None:
      params = nn.unbox(jax.jit(block.init)(jax.random.key(1), h))["params"]
    jax.block_until_ready(fn(params, h))  # compile and warm up
    steps[name] = fn
  times: dict[str, list[float]] = {name: [] for name in variants}
  for rep in range(args.reps):
    for name in variants[rep % 2:] + variants[:rep % 2]:
      t0 = time.perf_counter()
      jax.block_until_ready(steps[name](params, h))
      times[name].append(time.perf_counter() - t0)
  print(f"MoE fwd+bwd, {args.experts} experts, top-{args.top_k}, hidden {args.hidden}, "
        f"intermediate {args.intermediate}, {args.tokens} tokens, float32, "
        f"{jax.default_backend()}, {args.reps} reps (median)")
  result = {}
  for name in variants:
    med = statistics.median(times[name])
    result[name] = med
    print(f"  {name:6s} {med * 1e3:9.1f} ms  {args.tokens / med:10.0f} tokens/s")
  result["dense_over_ragged"] = result["dense"] / result["ragged"]
  print(f"  dense/ragged time ratio: {result['dense_over_ragged']:.2f}x")
  return result


if __name__ == "__main__":
  main()
