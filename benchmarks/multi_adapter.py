"""Adapter banks: a mixed batch over many adapters vs one adapter, hot swap, bank size (CPU).

One invocation measures, on a GPT-2-small-shaped decoder (hidden 768, 12 layers, 12 heads,
vocab 50257, tied head; random weights, no download) with r=16 adapters on every linear
layer (``targets='all-linear'``, ``layout=model``, B drawn at random so every adapter
changes the output):

  1. forward    tokens/s of one jitted ``jaxlora.apply(model.apply)`` call on a batch of
                ``--batch`` x ``--seq`` tokens, four variants alternating over ``--reps``
                rounds (order rotated each round; medians reported):
                  mixed     a bank of ``--adapters`` adapters (``jaxlora.stack``), row i
                            uses adapter ``i % adapters`` (``adapter_ids=``)
                  bank-one  the same bank and function, every row uses adapter 0
                  single    adapter 0's own wrapped tree, no ``adapter_ids`` (the shared
                            2-D LoRA matmuls)
                  base      the plain ``model.apply`` on the base params (no LoRA), for scale
  2. generate   tokens/s of ``jaxlora.generate`` (greedy, KV cache, jitted), ``--batch``
                prompts of ``--prompt`` tokens, ``--new`` new tokens: the bank with mixed
                ids, the bank with every row on adapter 0, and adapter 0's own tree.
  3. swap       ``jaxlora.bank_set`` of one slot of the mixed bank (another adapter), then
                the jitted forward again: the jit cache size before and after
                (``fn._cache_size()``; equal means no compile) and the time of
                ``bank_set`` (to its result being ready; median of ``--reps``).
  4. bank64     a bank of ``--big`` rank-16 adapters (all-linear) on the same base: bytes of
                its adapter leaves (``lora_a``, ``lora_b``, ``lora_scale``), and the median
                time of ``bank_set`` of one of them.

Usage:
  python benchmarks/multi_adapter.py                  # full spec (a few minutes, 2-core CPU)
  python benchmarks/multi_adapter.py --out multi_adapter.json
  python benchmarks/multi_adapter.py --smoke          # tiny shapes, seconds: for CI
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

import machine  # benchmarks/machine.py, beside this script

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import jaxlora  # noqa: E402  (the checkout's copy, without installing it)

LORA_KEYS = ("lora_a", "lora_b", "lora_scale")


def gpt2(vocab, hidden, layers, heads, max_pos=1024):
  return jaxlora.models.ModelConfig(
      model_type="gpt2", vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers,
      num_attention_heads=heads, num_key_value_heads=heads, head_dim=hidden // heads,
      intermediate_size=4 * hidden, max_position_embeddings=max_pos, norm_eps=1e-5,
      tie_word_embeddings=True, qkv_bias=True, o_bias=True, mlp_bias=True,
      activation="gelu_new")


def adapter(params, model, seed, rank):
  """A wrapped tree with non-zero B (wrap starts B at zero), so each adapter differs."""
  tree = jaxlora.wrap(params, rank=rank, targets="all-linear", layout=model,
                      key=jax.random.key(seed))
  return jax.tree_util.tree_map_with_path(
      lambda p, x: x + 0.02 * jax.random.normal(jax.random.key(seed + 10_000), x.shape, x.dtype)
      if getattr(p[-1], "key", None) == "lora_b" else x, tree)


def ready(x):
  return jax.block_until_ready(x)


def timer(fn):
  def run():
    t = time.perf_counter()
    ready(fn())
    return time.perf_counter() - t
  return run


def lora_bytes(tree) -> int:
  leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
  return sum(x.nbytes for p, x in leaves if getattr(p[-1], "key", None) in LORA_KEYS)


def paired(section, a, b) -> float:
  """Median over rounds of b's time / a's time in the same round (tokens/s ratio a / b):
  less sensitive than a ratio of medians to load that drifts during the run."""
  return statistics.median(tb / ta for ta, tb in zip(section[a]["times"], section[b]["times"]))


def main():
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--batch", type=int, default=8)
  ap.add_argument("--seq", type=int, default=128)
  ap.add_argument("--adapters", type=int, default=8)
  ap.add_argument("--rank", type=int, default=16)
  ap.add_argument("--prompt", type=int, default=32)
  ap.add_argument("--new", type=int, default=16)
  ap.add_argument("--reps", type=int, default=5)
  ap.add_argument("--big", type=int, default=64, help="adapters in the large bank (0: skip)")
  ap.add_argument("--model", type=int, nargs=4, default=(50257, 768, 12, 12),
                  metavar=("VOCAB", "HIDDEN", "LAYERS", "HEADS"))
  ap.add_argument("--smoke", action="store_true", help="tiny shapes, 2 reps")
  ap.add_argument("--out", help="write the results as JSON here")
  args = ap.parse_args()
  if args.smoke:
    args.model, args.seq, args.prompt, args.new, args.reps, args.big = \
        (512, 64, 2, 4), 16, 8, 4, 2, 8
  command = "python " + " ".join([os.path.relpath(__file__)] + sys.argv[1:])
  print(f"command: {command}")
  print(f"machine: {machine.cpu_model()}, {os.cpu_count()} CPUs, {machine.ram_gib():.0f} GiB, "
        f"jax {jax.__version__}, {platform.python_version()}", flush=True)

  vocab, hidden, layers, heads = args.model
  cfg = gpt2(vocab, hidden, layers, heads)
  model = jaxlora.models.Decoder(cfg)
  params = jaxlora.models.init(model, jax.random.key(0))
  names = [f"task{i}" for i in range(args.adapters)]
  trees = {n: adapter(params, model, i + 1, args.rank) for i, n in enumerate(names)}
  bank = jaxlora.stack(trees)
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.integers(0, vocab, (args.batch, args.seq)), jnp.int32)
  mixed_ids = bank.ids([names[i % len(names)] for i in range(args.batch)])
  one_ids = bank.ids([names[0]] * args.batch)
  res = {"command": command, "model": list(args.model), "batch": args.batch, "seq": args.seq,
         "adapters": args.adapters, "rank": args.rank, "cpu": machine.cpu_model(),
         "jax": jax.__version__}

  # ------------------------------------------------------------------- 1. forward
  print(f"\n1. forward, batch {args.batch} x {args.seq}, {args.adapters} adapters r={args.rank}",
        flush=True)
  fwd = jax.jit(jaxlora.apply(model.apply))
  fwd_single = jax.jit(jaxlora.apply(model.apply))
  fwd_base = jax.jit(model.apply)
  v_bank, v_single, v_base = {"params": bank.tree}, {"params": trees[names[0]]}, \
      {"params": params}
  variants = {
      "mixed": lambda: fwd(v_bank, x, adapter_ids=mixed_ids),
      "bank-one": lambda: fwd(v_bank, x, adapter_ids=one_ids),
      "single": lambda: fwd_single(v_single, x),
      "base": lambda: fwd_base(v_base, x),
  }
  for k, f in variants.items():
    t = time.perf_counter()
    ready(f())
    print(f"  compile + first call {k}: {time.perf_counter() - t:.1f} s", flush=True)
  # Rows of the mixed run equal their own adapter's single run (a sanity check, not timed).
  got = fwd(v_bank, x, adapter_ids=mixed_ids)
  for i in (0, min(1, args.batch - 1)):
    want = fwd_single({"params": trees[names[i % len(names)]]}, x[i:i + 1])
    err = float(jnp.max(jnp.abs(got[i] - want[0])))
    assert err < 1e-3, f"row {i} differs from its adapter's own run by {err}"
  del got
  times = machine.alternate({k: timer(f) for k, f in variants.items()}, args.reps)
  med = {k: statistics.median(v) for k, v in times.items()}
  tok = args.batch * args.seq
  res["forward"] = {k: {"median_s": med[k], "tokens_per_s": tok / med[k], "times": times[k]}
                    for k in med}

  # ------------------------------------------------------------------- 2. generate
  print(f"\n2. generate, {args.batch} prompts x {args.prompt}, {args.new} new tokens", flush=True)
  prompts = jnp.asarray(rng.integers(0, vocab, (args.batch, args.prompt)), jnp.int32)
  mixed_names = [names[i % len(names)] for i in range(args.batch)]
  gen = {
      "mixed": lambda: jaxlora.generate(model, bank, prompts, adapter_ids=mixed_names,
                                        max_new_tokens=args.new, eos_token_id=None),
      "bank-one": lambda: jaxlora.generate(model, bank, prompts, adapter_ids=one_ids,
                                           max_new_tokens=args.new, eos_token_id=None),
      "single": lambda: jaxlora.generate(model, trees[names[0]], prompts,
                                         max_new_tokens=args.new, eos_token_id=None),
  }
  for k, f in gen.items():
    t = time.perf_counter()
    ready(f())
    print(f"  compile + first call {k}: {time.perf_counter() - t:.1f} s", flush=True)
  g_times = machine.alternate({k: timer(f) for k, f in gen.items()}, args.reps)
  g_med = {k: statistics.median(v) for k, v in g_times.items()}
  g_tok = args.batch * args.new
  res["generate"] = {k: {"median_s": g_med[k], "new_tokens_per_s": g_tok / g_med[k],
                         "times": g_times[k]} for k in g_med}

  # ------------------------------------------------------------------- 3. swap
  print("\n3. bank_set of one slot, then the jitted forward again", flush=True)
  fresh = adapter(params, model, 999, args.rank)
  before = fwd._cache_size()
  t = time.perf_counter()  # the first call also compiles bank_set's eager scatter ops
  swapped = ready(jaxlora.bank_set(bank, names[3 % len(names)], fresh))
  swap_first = time.perf_counter() - t
  swap_times = []
  for _ in range(args.reps):
    t = time.perf_counter()
    swapped = ready(jaxlora.bank_set(bank, names[3 % len(names)], fresh))
    swap_times.append(time.perf_counter() - t)
  t = time.perf_counter()
  ready(fwd({"params": swapped.tree}, x, adapter_ids=mixed_ids))
  after_call = time.perf_counter() - t
  after = fwd._cache_size()
  res["swap"] = {"cache_before": before, "cache_after": after, "bank_set_first_s": swap_first,
                 "bank_set_median_s": statistics.median(swap_times), "bank_set_times": swap_times,
                 "forward_after_swap_s": after_call, "bank_adapter_bytes": lora_bytes(bank.tree)}
  print(f"  jit cache size before {before}, after {after}; bank_set first {swap_first * 1e3:.1f} "
        f"ms, then median {statistics.median(swap_times) * 1e3:.1f} ms; forward after swap "
        f"{after_call:.2f} s",
        flush=True)
  del swapped, fwd, fwd_single, fwd_base

  # ------------------------------------------------------------------- 4. a bank of 64
  if args.big:
    print(f"\n4. a bank of {args.big} rank-{args.rank} adapters", flush=True)
    del bank
    small = {n: trees[n] for n in names}
    t = time.perf_counter()
    big_trees = {f"a{i}": adapter(params, model, 100 + i, args.rank) for i in range(args.big)}
    big = ready(jaxlora.stack(big_trees))
    stack_s = time.perf_counter() - t
    del big_trees
    one = lora_bytes(small[names[0]])
    nbytes = lora_bytes(big.tree)
    ready(jaxlora.bank_set(big, "a1", fresh))  # warm: compiles the slot update for these shapes
    set_times = []
    for i in range(args.reps):
      t = time.perf_counter()
      out = ready(jaxlora.bank_set(big, f"a{(7 * i) % args.big}", fresh))
      set_times.append(time.perf_counter() - t)
      del out
    res["bank64"] = {"adapters": args.big, "adapter_bytes": nbytes, "one_adapter_bytes": one,
                     "build_and_stack_s": stack_s,
                     "bank_set_median_s": statistics.median(set_times), "bank_set_times": set_times}
    print(f"  adapter leaves {nbytes / 2**20:.1f} MiB ({one / 2**20:.2f} MiB per adapter); "
          f"bank_set median {statistics.median(set_times) * 1e3:.1f} ms", flush=True)

  # ------------------------------------------------------------------- summary
  f, g = res["forward"], res["generate"]
  print(f"\ncommand: {command}")
  print(f"forward tokens/s (batch {args.batch} x {args.seq}, medians of {args.reps}):")
  for k in f:
    print(f"  {k:9s} {f[k]['tokens_per_s']:8.1f} tok/s  ({f[k]['median_s'] * 1e3:.0f} ms)")
  print(f"  mixed / bank-one: {f['mixed']['tokens_per_s'] / f['bank-one']['tokens_per_s']:.3f}x"
        f"   mixed / single: {f['mixed']['tokens_per_s'] / f['single']['tokens_per_s']:.3f}x"
        f"   (target >= 0.85x)   single / base: "
        f"{f['single']['tokens_per_s'] / f['base']['tokens_per_s']:.3f}x")
  print(f"  per-round (paired) medians: mixed / bank-one {paired(f, 'mixed', 'bank-one'):.3f}x, "
        f"mixed / single {paired(f, 'mixed', 'single'):.3f}x")
  print(f"generate new tokens/s ({args.batch} x {args.prompt} prompts, {args.new} new):")
  for k in g:
    print(f"  {k:9s} {g[k]['new_tokens_per_s']:8.1f} tok/s  ({g[k]['median_s'] * 1e3:.0f} ms)")
  rate = {k: g[k]["new_tokens_per_s"] for k in g}
  print(f"  mixed / bank-one: {rate['mixed'] / rate['bank-one']:.3f}x"
        f"   mixed / single: {rate['mixed'] / rate['single']:.3f}x")
  print(f"  per-round (paired) medians: mixed / bank-one {paired(g, 'mixed', 'bank-one'):.3f}x, "
        f"mixed / single {paired(g, 'mixed', 'single'):.3f}x")
  s = res["swap"]
  print(f"swap: jit cache {s['cache_before']} -> {s['cache_after']}, bank_set "
        f"{s['bank_set_median_s'] * 1e3:.1f} ms (first call {s['bank_set_first_s'] * 1e3:.0f} ms) "
        f"({args.adapters}-adapter bank, {s['bank_adapter_bytes'] / 2**20:.1f} MiB of adapter "
        "leaves)")
  if "bank64" in res:
    b = res["bank64"]
    print(f"bank of {b['adapters']}: {b['adapter_bytes']} bytes ({b['adapter_bytes'] / 2**20:.1f} "
          f"MiB) of adapter leaves, bank_set {b['bank_set_median_s'] * 1e3:.1f} ms")
  if args.out:
    with open(args.out, "w") as fh:
      json.dump(res, fh, indent=1)


if __name__ == "__main__":
  main()
