"""Adapter checkpoint size and save/load time for GPT-2 small, r=16 on all linear layers.

    python benchmarks/checkpoint.py [--reps 5]

Compares the bytes on disk of `jaxlora.save` (Orbax) and `jaxlora.peft.save`
(safetensors) with the raw bytes of A and B, and times save and load (median
of --reps, alternating the formats). Random weights: no download.
"""

import argparse
import os
import statistics
import tempfile
import time

import jax
import jax.numpy as jnp

import jaxlora

GPT2_SMALL = jaxlora.models.ModelConfig(
    "gpt2", vocab_size=50257, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
    num_key_value_heads=12, head_dim=64, intermediate_size=3072, max_position_embeddings=1024,
    norm_eps=1e-5, tie_word_embeddings=True, qkv_bias=True, o_bias=True, mlp_bias=True,
    activation="gelu_new")


def du(path):
  return sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(path) for f in fs)


def main():
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--reps", type=int, default=5)
  args = ap.parse_args()
  model = jaxlora.models.Decoder(GPT2_SMALL)
  params = jaxlora.models.init(model, jax.random.key(0))
  tree = jaxlora.wrap(params, rank=16, targets="all-linear", layout=model, key=jax.random.key(1))
  # Random non-zero B, like a trained adapter (zeros would compress to nothing).
  tree = jax.tree_util.tree_map_with_path(
      lambda p, x: 0.01 * jax.random.normal(jax.random.key(2), x.shape, x.dtype)
      if p[-1].key == "lora_b" else x, tree)
  raw = sum(x.nbytes for x in jax.tree.leaves(jaxlora.split(tree)[0]))
  base = sum(x.nbytes for x in jax.tree.leaves(params))
  times = {k: [] for k in ("orbax save", "orbax load", "peft save", "peft load")}
  with tempfile.TemporaryDirectory() as d:
    for i in range(args.reps):
      o, p = os.path.join(d, f"orbax{i}"), os.path.join(d, f"peft{i}")
      t = time.perf_counter()
      jaxlora.save(o, tree)
      times["orbax save"].append(time.perf_counter() - t)
      t = time.perf_counter()
      jax.block_until_ready(jaxlora.load(o, params))
      times["orbax load"].append(time.perf_counter() - t)
      t = time.perf_counter()
      jaxlora.peft.save(p, tree, model=model)
      times["peft save"].append(time.perf_counter() - t)
      t = time.perf_counter()
      jax.block_until_ready(jaxlora.peft.load(p, params, model=model))
      times["peft load"].append(time.perf_counter() - t)
    orbax_size, peft_size = du(os.path.join(d, "orbax0")), du(os.path.join(d, "peft0"))
  print(f"GPT-2 small (124M), r=16 on c_attn/c_proj/c_fc/c_proj x 12 layers, float32 adapters")
  print(f"{'':24s}{'bytes':>14s}{'vs A+B':>9s}{'vs base':>9s}")
  print(f"{'raw A and B':24s}{raw:>14,d}{1:>9.3f}{raw / base:>9.4f}")
  print(f"{'jaxlora.save (Orbax)':24s}{orbax_size:>14,d}{orbax_size / raw:>9.3f}{orbax_size / base:>9.4f}")
  print(f"{'jaxlora.peft.save':24s}{peft_size:>14,d}{peft_size / raw:>9.3f}{peft_size / base:>9.4f}")
  print(f"{'base params':24s}{base:>14,d}")
  print(f"\nmedian of {args.reps} (seconds):")
  for k, v in times.items():
    print(f"  {k:12s} {statistics.median(v):.3f}")


if __name__ == "__main__":
  main()
