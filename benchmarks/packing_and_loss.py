"""Packed rows and the chunked loss, measured side by side in one run (CPU is fine).

  packing   useful (non-padding) tokens per second of a LoRA training step on a
            long-tailed length distribution: one example per row, padded to the
            longest (the CLI's default bucketing pads to a power of two), against
            the same examples packed greedily (first fit) into rows of
            ``--seq`` tokens with ``segment_ids``. Both batches hold the same
            examples; rounds alternate and the median is reported.
  loss      peak temporary memory of the compiled loss-and-gradient computation
            (XLA's own ``memory_analysis()``) and step time, for the full
            ``(batch, seq, vocab)`` float32 logits against
            ``jaxlora.models.chunked_cross_entropy``, at vocab ``--vocab``.

Usage:
  python benchmarks/packing_and_loss.py             # defaults below
  python benchmarks/packing_and_loss.py --smoke     # seconds; what CI could run
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import machine  # benchmarks/machine.py, beside this script

import jax
import jax.numpy as jnp
import numpy as np
import optax

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import jaxlora  # noqa: E402  (the checkout's copy, without installing it)


def _config(args, vocab):
  return jaxlora.models.ModelConfig(
      "llama", vocab_size=vocab, hidden_size=args.hidden, num_hidden_layers=args.layers,
      num_attention_heads=args.hidden // 64, num_key_value_heads=args.hidden // 64, head_dim=64,
      intermediate_size=args.hidden * 8 // 3, max_position_embeddings=4 * args.seq,
      norm_eps=1e-6, tie_word_embeddings=False)


def _setup(cfg):
  model = jaxlora.models.Decoder(cfg)
  params = jax.jit(jaxlora.models.init, static_argnums=0)(model, jax.random.key(0))
  tree = jaxlora.wrap(params, rank=16, layout=model, key=jax.random.key(1))
  return model, jaxlora.split(tree)


def _lengths(rng, n, seq):
  """Long-tailed example lengths: most short, a few near the row length."""
  return np.clip(np.round(rng.lognormal(np.log(seq / 8), 0.9, size=n)), 4, seq).astype(int)


def _pack(lengths, seq):
  rows: list[list[int]] = []
  for i in np.argsort(-lengths, kind="stable"):
    for row in rows:
      if sum(lengths[j] for j in row) + lengths[i] <= seq:
        row.append(i)
        break
    else:
      rows.append([i])
  return rows


def _time(fn, reps):
  out = []
  for _ in range(reps):
    t = time.perf_counter()
    jax.block_until_ready(fn())
    out.append(time.perf_counter() - t)
  return out


def bench_packing(args):
  cfg = _config(args, args.packing_vocab)
  model, (trainable, frozen) = _setup(cfg)
  fwd = jaxlora.apply(model.apply)
  rng = np.random.default_rng(0)
  lengths = _lengths(rng, args.examples, args.seq)
  examples = [rng.integers(1, cfg.vocab_size, size=n) for n in lengths]

  # One example per row, right-padded to the longest example.
  t_pad = int(lengths.max())
  ids_p = np.zeros((len(examples), t_pad + 1), np.int32)
  w_p = np.zeros((len(examples), t_pad), np.float32)
  for r, e in enumerate(examples):
    ids_p[r, :len(e)] = e
    w_p[r, :len(e) - 1] = 1
  mask_p = (np.arange(t_pad)[None, :] < lengths[:, None]).astype(np.int32)

  rows = _pack(lengths, args.seq)
  ids_k = np.zeros((len(rows), args.seq + 1), np.int32)
  seg_k = np.zeros((len(rows), args.seq), np.int32)
  w_k = np.zeros((len(rows), args.seq), np.float32)
  for r, row in enumerate(rows):
    pos = 0
    for s, i in enumerate(row):
      n = lengths[i]
      ids_k[r, pos:pos + n] = examples[i]
      seg_k[r, pos:pos + n] = s + 1
      w_k[r, pos:pos + n - 1] = 1  # the last token of an example predicts nothing
      pos += n

  def make_step(**kw):
    @jax.jit
    def step(t, f, ids, w, extra):
      def loss(t):
        logits = fwd({"params": jaxlora.combine(t, f)}, ids[:, :-1], **{k: extra for k in kw})
        nll = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32),
                                                              ids[:, 1:])
        return jnp.sum(nll * w) / jnp.sum(w)
      return jax.grad(loss)(t)
    return step

  padded = make_step(attention_mask=True)
  packed = make_step(segment_ids=True)
  run_p = lambda: padded(trainable, frozen, ids_p, w_p, mask_p)
  run_k = lambda: packed(trainable, frozen, ids_k, w_k, seg_k)
  run_p(), run_k()  # compile
  tp, tk = [], []
  for _ in range(args.reps):
    tp += _time(run_p, 1)
    tk += _time(run_k, 1)
  useful = float(w_p.sum())
  assert useful == float(w_k.sum())
  mp, mk = statistics.median(tp), statistics.median(tk)
  print(f"packing: {len(examples)} examples, lengths median {int(np.median(lengths))}, max "
        f"{int(lengths.max())}; padded {ids_p.shape[0]}x{t_pad} "
        f"({useful / (ids_p.shape[0] * t_pad):.0%} useful) vs packed {len(rows)}x{args.seq} "
        f"({useful / (len(rows) * args.seq):.0%} useful)")
  print(f"  padded {mp * 1e3:.0f} ms, {useful / mp:,.0f} useful tok/s | packed {mk * 1e3:.0f} ms, "
        f"{useful / mk:,.0f} useful tok/s | packed/padded = {mp / mk:.2f}x")
  return mp / mk


def bench_loss(args):
  cfg = _config(args, args.vocab)
  model, (trainable, frozen) = _setup(cfg)
  fwd = jaxlora.apply(model.apply)
  ids = jax.random.randint(jax.random.key(3), (args.batch, args.seq + 1), 0, cfg.vocab_size)

  def full(t, f, ids):
    logits = fwd({"params": jaxlora.combine(t, f)}, ids[:, :-1]).astype(jnp.float32)
    return optax.softmax_cross_entropy_with_integer_labels(logits, ids[:, 1:]).mean()

  def chunked(t, f, ids):
    p = jaxlora.combine(t, f)
    h = fwd({"params": p}, ids[:, :-1], return_hidden=True)
    return jaxlora.models.chunked_cross_entropy(model, p, h, ids[:, 1:],
                                                chunk_size=args.chunk)

  results = {}
  for name, fn in (("full", full), ("chunked", chunked)):
    step = jax.jit(jax.value_and_grad(fn))
    mem = step.lower(trainable, frozen, ids).compile().memory_analysis()
    step(trainable, frozen, ids)
    results[name] = (mem.temp_size_in_bytes, step)
  times = {k: [] for k in results}
  for _ in range(args.reps):
    for name, (_, step) in results.items():
      times[name] += _time(lambda: step(trainable, frozen, ids), 1)
  lf, lc = (float(results[k][1](trainable, frozen, ids)[0]) for k in ("full", "chunked"))
  mf, mc = results["full"][0], results["chunked"][0]
  print(f"loss: batch {args.batch} x seq {args.seq}, vocab {args.vocab}, chunk {args.chunk}; "
        f"losses {lf:.6f} / {lc:.6f}")
  print(f"  XLA temp memory: full {mf / 2**20:.1f} MiB, chunked {mc / 2**20:.1f} MiB "
        f"(chunked/full = {mc / mf:.2f}x); step {statistics.median(times['full']) * 1e3:.0f} ms vs "
        f"{statistics.median(times['chunked']) * 1e3:.0f} ms")
  return mc / mf


def main():
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  ap.add_argument("--hidden", type=int, default=256)
  ap.add_argument("--layers", type=int, default=2)
  ap.add_argument("--seq", type=int, default=512)
  ap.add_argument("--batch", type=int, default=4)
  ap.add_argument("--examples", type=int, default=64)
  ap.add_argument("--vocab", type=int, default=50257)
  ap.add_argument("--packing-vocab", type=int, default=4096)
  ap.add_argument("--chunk", type=int, default=128)
  ap.add_argument("--reps", type=int, default=3)
  ap.add_argument("--smoke", action="store_true", help="tiny sizes, seconds")
  args = ap.parse_args()
  if args.smoke:
    args.hidden, args.layers, args.seq, args.batch, args.examples = 64, 1, 64, 2, 12
    args.vocab, args.packing_vocab, args.chunk, args.reps = 4096, 512, 16, 1
  print(f"{machine.cpu_model()}, {os.cpu_count()} CPUs, {machine.ram_gib():.0f} GiB; "
        f"jax {jax.__version__} on {jax.default_backend()}")
  bench_packing(args)
  bench_loss(args)


if __name__ == "__main__":
  main()
