"""DPO vs SFT: one LoRA step on the same preference pairs, time and peak memory (CPU).

Both steps see the same ``batch`` pairs (prompt + chosen, prompt + rejected
completions, right-padded to ``--seq`` tokens) on one Llama-shaped
`jaxlora.models.Decoder`, LoRA r=16 on every projection, adamw:

  sft  cross-entropy on the completions of both rows of every pair (2 x batch rows),
       one forward and backward pass
  dpo  the sigmoid DPO loss (`jaxlora.preference.dpo_loss`, beta 0.1): the policy's
       sequence log-probs of both rows (forward and backward) and the reference's
       (`jaxlora.preference.reference_tree`: the same params with the adapters off,
       forward only, no gradient), all in one jitted program; no second copy of the
       weights
  sft_cli, dpo_cli  the same two objectives as `jaxlora train` runs them
       (`jaxlora_cli.trainer.make_train_step`, train.objective=sft vs dpo): the head
       and loss in chunks of 512 positions, gradient clipping off, same adamw

Times alternate over ``--reps`` rounds (medians). Peak memory is the peak RSS of a
subprocess per variant that compiles its step ahead of time, returns the heap
compilation freed (``malloc_trim``), then runs two steps (as benchmarks/step_time.py).

Usage:
  python benchmarks/dpo_step.py            # 4 layers, d=512, vocab 8192, 4 pairs x 256 tokens
  python benchmarks/dpo_step.py --smoke    # tiny, seconds
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys

import machine  # benchmarks/machine.py, beside this script

import jax
import jax.numpy as jnp
import numpy as np
import optax

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import jaxlora  # noqa: E402  (the checkout's copy, without installing it)
from jaxlora import preference  # noqa: E402
from jaxlora_cli import objectives, trainer  # noqa: E402

VARIANTS = ("sft", "dpo", "sft_cli", "dpo_cli")


def build(args):
  cfg = jaxlora.models.ModelConfig.tiny(
      "llama", vocab_size=args.vocab, hidden_size=args.d, num_hidden_layers=args.layers,
      num_attention_heads=args.d // 64, num_key_value_heads=max(args.d // 256, 1), head_dim=64,
      intermediate_size=4 * args.d, max_position_embeddings=max(args.seq, 64))
  model = jaxlora.models.Decoder(cfg)
  params = jaxlora.models.init(model, jax.random.key(0))
  tree = jaxlora.wrap(params, rank=16, targets="all-linear", layout=model, key=jax.random.key(1))
  trainable, frozen = jaxlora.split(tree)
  rng = np.random.default_rng(0)
  ids = rng.integers(3, args.vocab, size=(2 * args.batch, args.seq)).astype(np.int32)
  prompt = args.seq // 4
  lengths = rng.integers(args.seq // 2, args.seq + 1, size=2 * args.batch)
  mask = (np.arange(args.seq)[None] < lengths[:, None]).astype(np.int32)
  completion = mask * (np.arange(args.seq)[None] >= prompt)
  data = (jnp.asarray(ids), jnp.asarray(mask), jnp.asarray(completion))
  fwd = jaxlora.apply(model.apply)
  tx = optax.adamw(1e-4)

  def sft_loss(t, f, ids, mask, comp):
    logits = fwd({"params": jaxlora.combine(t, f)}, ids, attention_mask=mask)
    lp = preference.per_token_logprobs(logits, ids, comp)
    return -jnp.sum(lp) / jnp.maximum(jnp.sum(comp[:, 1:]), 1)

  def dpo_objective(t, f, ids, mask, comp):
    full = jaxlora.combine(t, f)
    policy = preference.logprobs(fwd, full, ids, comp, mask)
    ref = preference.logprobs(fwd, preference.reference_tree(full), ids, comp, mask)
    b = ids.shape[0] // 2  # rows [0, b) chosen, [b, 2b) rejected
    losses, _, _ = preference.dpo_loss(policy[:b], policy[b:], ref[:b], ref[b:], beta=0.1)
    return jnp.mean(losses)

  def make_step(loss_fn):
    def step(t, opt, f, ids, mask, comp):
      loss, g = jax.value_and_grad(loss_fn)(t, f, ids, mask, comp)
      upd, opt = tx.update(g, opt, t)
      return optax.apply_updates(t, upd), opt, loss
    return jax.jit(step, donate_argnums=(0, 1))

  steps = {"sft": make_step(sft_loss), "dpo": make_step(dpo_objective)}
  datas = {"sft": data, "dpo": data}
  key = jax.random.key(0)

  def cli_step(objective):
    inner = trainer.make_train_step(model, tx, 0.0, objective=objective)
    return jax.jit(lambda t, o, f, batch, k: (lambda r: (r[0], r[1], r[2]["loss"]))(
        inner(t, o, f, batch, k)), donate_argnums=(0, 1))

  rows = {"input_ids": data[0][None], "attention_mask": data[1][None],
          "targets": data[2][None].astype(jnp.float32)}
  b = args.batch
  pairs = {k: v[:, :b] for k, v in rows.items()}
  pairs.update({f"rejected_{k}": v[:, b:] for k, v in rows.items()})
  steps["sft_cli"], datas["sft_cli"] = cli_step(None), (rows, key)
  steps["dpo_cli"], datas["dpo_cli"] = cli_step(objectives.PairObjective("dpo", 0.1)), (pairs, key)
  init = lambda: [jax.tree.map(jnp.copy, trainable), tx.init(trainable)]
  return steps, init, frozen, datas


def memory_child(args) -> None:
  steps, init, frozen, datas = build(args)
  r = machine.Runner(steps[args.memory_child], init, (frozen,), datas[args.memory_child])
  r.compile()
  machine.trim_heap()
  for _ in range(2):
    r.step()
  print(json.dumps({"peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))


def main():
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--layers", type=int, default=4)
  ap.add_argument("--d", type=int, default=512)
  ap.add_argument("--vocab", type=int, default=8192)
  ap.add_argument("--batch", type=int, default=4, help="preference pairs per step")
  ap.add_argument("--seq", type=int, default=256)
  ap.add_argument("--reps", type=int, default=5)
  ap.add_argument("--smoke", action="store_true")
  ap.add_argument("--memory-child", choices=VARIANTS)
  args = ap.parse_args()
  if args.smoke:
    args.layers, args.d, args.vocab, args.batch, args.seq, args.reps = 2, 64, 256, 2, 32, 2
  if args.memory_child:
    return memory_child(args)
  print(f"LoRA r=16, Llama-shaped decoder: {args.layers} layers d={args.d} vocab={args.vocab}, "
        f"{args.batch} pairs x {args.seq} tokens (2 x {args.batch} rows), float32, adamw, "
        f"jax {jax.__version__} on {jax.devices()[0].platform}", flush=True)
  peaks = {}
  for v in VARIANTS:
    cmd = [sys.executable, os.path.abspath(__file__), "--memory-child", v]
    cmd += [f"--{k}={getattr(args, k)}" for k in ("layers", "d", "vocab", "batch", "seq")]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    peaks[v] = json.loads(out.strip().splitlines()[-1])["peak_rss"]
  steps, init, frozen, datas = build(args)
  runners = {k: machine.Runner(steps[k], init, (frozen,), datas[k]) for k in VARIANTS}
  for r in runners.values():  # compile and warm up
    r.step()
    r.step()
  times: dict[str, list[float]] = {k: [] for k in VARIANTS}
  for rep in range(args.reps):
    for k in (VARIANTS if rep % 2 == 0 else VARIANTS[::-1]):
      times[k].append(runners[k].step())
  med = {k: statistics.median(v) for k, v in times.items()}
  for k in VARIANTS:
    print(f"  {k:7s} {med[k] * 1e3:9.1f} ms/step (min {min(times[k]) * 1e3:.1f} ms)  "
          f"peak RSS {peaks[k] / 2**30:.2f} GiB")
  for dpo, sft in (("dpo", "sft"), ("dpo_cli", "sft_cli")):
    print(f"  {dpo} / {sft}: step time {med[dpo] / med[sft]:.2f}x (median), "
          f"{min(times[dpo]) / min(times[sft]):.2f}x (min); peak RSS "
          f"{peaks[dpo] / peaks[sft]:.2f}x")
  print("  all samples (s):", json.dumps({k: [round(t, 4) for t in v] for k, v in times.items()}))


if __name__ == "__main__":
  main()
