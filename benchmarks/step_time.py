"""Step time and peak memory: full fine-tuning vs LoRA on a GPT-2-small-shaped decoder.

Measures, side by side in one invocation (variants alternate over ``--reps``
repetitions; the median is reported):

  full      full fine-tuning step: adamw, gradients with respect to all params
  lora      LoRA step through ``jaxlora.apply`` (factored), gradients with respect
            to the trainable half of ``jaxlora.split`` only, adamw on that half
  merged    LoRA step through merge on the fly: the base model on
            ``jaxlora.merge(combine(trainable, frozen))`` inside the loss
  floor     no adapters; differentiates only the LayerNorm scales, so the backward
            computes every input gradient but no kernel gradient: the lower bound
            for any adapter method that trains something at the bottom of the net
  fwd-*     inference forward (logits): base params, ``jaxlora.apply`` on the
            wrapped params, base model on merged params

Peak memory of each training variant is the peak RSS (``ru_maxrss``) of a
separate subprocess that builds the model and runs a few steps of that variant
alone, so the peaks do not mix. The child compiles its step ahead of time and
then hands the allocator's free pages back to the system (``malloc_trim``, glibc),
so the peak measures what the step holds, not what compilation left in the heap
(``--no-trim`` keeps that residue: about 0.1 GiB, more for a bigger program).

With ``--dora`` the script compares DoRA with LoRA instead (same model, one
invocation, variants alternating):

  lora       as above (jaxlora, factored)
  dora       jaxlora DoRA (``jaxlora.wrap(..., use_dora=True)``): the same step with
             the magnitudes trained too; column norms computed factored per layer
  peft-lora  Hugging Face PEFT LoRA on the PyTorch GPT-2 of the same shape
             (``transformers.GPT2LMHeadModel``, dropout off), AdamW, same tokens
  peft-dora  the same with ``use_dora=True``

and prints DoRA's step-time and peak-memory ratios to LoRA for both libraries.

The model: 12 pre-LN blocks (d=768, 12 heads, MLP 3072, GELU), learned
positions, vocab 50257, blocks stacked with ``nn.scan``, attention as one fused
``qkv`` Dense (768 -> 2304) plus ``proj``, MLP ``fc`` and ``out``. The output
head is tied to the token embedding (as in GPT-2). float32 throughout.

Usage:
  python benchmarks/step_time.py                         # full spec (slow on CPU)
  python benchmarks/step_time.py --layers 2 --seq 64 --reps 2   # smoke run
  python benchmarks/step_time.py --dora                  # DoRA vs LoRA, jaxlora and PEFT
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time

import machine  # benchmarks/machine.py, beside this script

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import jaxlora  # noqa: E402  (the checkout's copy, without installing it)

VOCAB = 50257
D_MODEL = 768
HEADS = 12
D_MLP = 3072
TARGETS = r"(qkv|proj|fc|out)$"
RANK = 16
TRAIN_VARIANTS = ("full", "lora", "merged", "floor")
FWD_VARIANTS = ("fwd-base", "fwd-lora", "fwd-merged")
DORA_VARIANTS = ("lora", "dora", "peft-lora", "peft-dora")


# ----------------------------------------------------------------------------- model


class Block(nn.Module):
  d: int
  heads: int
  d_mlp: int

  @nn.compact
  def __call__(self, x, _):
    b, t, _ = x.shape
    hd = self.d // self.heads
    h = nn.LayerNorm(name="ln1")(x)
    qkv = nn.Dense(3 * self.d, name="qkv")(h)
    q, k, v = jnp.split(qkv.reshape(b, t, 3, self.heads, hd), 3, axis=2)
    q, k, v = (z[:, :, 0] for z in (q, k, v))  # (b, t, heads, hd)
    att = jnp.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(hd).astype(x.dtype)
    mask = jnp.tril(jnp.ones((t, t), bool))
    att = jnp.where(mask, att, jnp.finfo(att.dtype).min)
    att = jax.nn.softmax(att, axis=-1)
    o = jnp.einsum("bhqk,bkhd->bqhd", att, v).reshape(b, t, self.d)
    x = x + nn.Dense(self.d, name="proj")(o)
    h = nn.LayerNorm(name="ln2")(x)
    h = nn.gelu(nn.Dense(self.d_mlp, name="fc")(h))
    x = x + nn.Dense(self.d, name="out")(h)
    return x, None


class GPT(nn.Module):
  layers: int = 12
  max_len: int = 1024

  @nn.compact
  def __call__(self, tokens):
    b, t = tokens.shape
    wte = nn.Embed(VOCAB, D_MODEL, name="wte")
    wpe = self.param("wpe", nn.initializers.normal(0.01), (self.max_len, D_MODEL))
    x = wte(tokens) + wpe[:t]
    blocks = nn.scan(Block, variable_axes={"params": 0}, split_rngs={"params": True},
                     length=self.layers)
    x, _ = blocks(D_MODEL, HEADS, D_MLP, name="blocks")(x, None)
    x = nn.LayerNorm(name="ln_f")(x)
    return wte.attend(x)  # tied head


def xent(logits, targets):
  return optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean()


# ----------------------------------------------------------------------------- steps


def build(args):
  """Model, params and one jitted function per variant (all take data as arguments)."""
  model = GPT(layers=args.layers, max_len=max(args.seq, 1024))
  rng = np.random.default_rng(0)
  tokens = jnp.asarray(rng.integers(0, VOCAB, (args.batch, args.seq + 1)), jnp.int32)
  x, y = tokens[:, :-1], tokens[:, 1:]
  params = jax.jit(model.init)(jax.random.key(0), x)["params"]
  lay = jaxlora.trace_layout(model.apply, {"params": params}, x)
  wrapped = _with_b(jaxlora.wrap(params, rank=RANK, targets=TARGETS, layout=lay,
                                 key=jax.random.key(1)))
  trainable, frozen = jaxlora.split(wrapped)
  tx = optax.adamw(1e-4)
  lora_apply = jaxlora.apply(model.apply)

  # full fine-tuning
  def full_loss(p, x, y):
    return xent(model.apply({"params": p}, x), y)

  def full_step(p, opt, x, y):
    loss, g = jax.value_and_grad(full_loss)(p, x, y)
    upd, opt = tx.update(g, opt, p)
    return optax.apply_updates(p, upd), opt, loss

  # LoRA, factored
  def lora_loss(t, f, x, y):
    return xent(lora_apply({"params": jaxlora.combine(t, f)}, x), y)

  def lora_step(t, opt, f, x, y):
    loss, g = jax.value_and_grad(lora_loss)(t, f, x, y)
    upd, opt = tx.update(g, opt, t)
    return optax.apply_updates(t, upd), opt, loss

  # LoRA, merge on the fly
  def merged_loss(t, f, x, y):
    return xent(model.apply({"params": jaxlora.merge(jaxlora.combine(t, f))}, x), y)

  def merged_step(t, opt, f, x, y):
    loss, g = jax.value_and_grad(merged_loss)(t, f, x, y)
    upd, opt = tx.update(g, opt, t)
    return optax.apply_updates(t, upd), opt, loss

  # floor: LayerNorm scales only
  is_scale = lambda path: path[-1] == "scale"
  leaves = machine.flatten(params)
  ln_t = {"/".join(k): v for k, v in leaves.items() if is_scale(k)}
  ln_f = {"/".join(k): v for k, v in leaves.items() if not is_scale(k)}

  def floor_loss(t, f, x, y):
    return xent(model.apply({"params": _unflat({**t, **f})}, x), y)

  def floor_step(t, opt, f, x, y):
    loss, g = jax.value_and_grad(floor_loss)(t, f, x, y)
    upd, opt = tx.update(g, opt, t)
    return optax.apply_updates(t, upd), opt, loss

  # Trainable state is donated; the frozen base is an argument, never a closure constant.
  # In a memory child only one variant runs, so full fine-tuning may consume the base
  # params in place (as a real training loop would) instead of a copy.
  own = (lambda t: t) if args.memory_child else _copy
  jit_full = jax.jit(full_step, donate_argnums=(0, 1))
  jit_t = lambda f: jax.jit(f, donate_argnums=(0, 1))
  steps = {
      "full": (jit_full, lambda: [own(params), tx.init(params)], ()),
      "lora": (jit_t(lora_step), lambda: [_copy(trainable), tx.init(trainable)], (frozen,)),
      "merged": (jit_t(merged_step), lambda: [_copy(trainable), tx.init(trainable)], (frozen,)),
      "floor": (jit_t(floor_step), lambda: [_copy(ln_t), tx.init(ln_t)], (ln_f,)),
  }
  if args.dora or args.memory_child == "dora":
    # DoRA: the same step on a DoRA-wrapped tree (same A and B; magnitudes trained too).
    dora_t, dora_f = jaxlora.split(_with_b(jaxlora.wrap(
        params, rank=RANK, targets=TARGETS, layout=lay, key=jax.random.key(1), use_dora=True)))
    steps["dora"] = (jit_t(lora_step), lambda: [_copy(dora_t), tx.init(dora_t)], (dora_f,))
  if args.memory_child or args.dora:
    return steps, None, (x, y)
  merged_params = jax.jit(jaxlora.merge)(wrapped)
  fwd_base = jax.jit(lambda p, x: model.apply({"params": p}, x))
  fwd_lora = jax.jit(lambda p, x: lora_apply({"params": p}, x))
  fwds = {
      "fwd-base": (fwd_base, params),
      "fwd-lora": (fwd_lora, wrapped),
      "fwd-merged": (fwd_base, merged_params),
  }
  return steps, fwds, (x, y)


def _with_b(wrapped):
  """Non-zero B so that the LoRA term is really computed and merge changes the kernels."""
  return jax.tree_util.tree_map_with_path(
      lambda p, v: (0.01 * jax.random.normal(jax.random.key(2), v.shape, v.dtype)
                    if getattr(p[-1], "key", None) == "lora_b" else v), wrapped)


class PeftRunner:
  """One PEFT training variant on the PyTorch GPT-2 of the same shape (`step()` as
  `machine.Runner`)."""

  def __init__(self, args, use_dora: bool):
    import torch  # pylint: disable=import-outside-toplevel
    import transformers  # pylint: disable=import-outside-toplevel
    import peft  # pylint: disable=import-outside-toplevel
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(
        vocab_size=VOCAB, n_embd=D_MODEL, n_layer=args.layers, n_head=HEADS, n_inner=D_MLP,
        n_positions=max(args.seq, 1024), resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
        activation_function="gelu", tie_word_embeddings=True)
    hf = transformers.GPT2LMHeadModel(cfg)
    # c_attn = qkv, attn.c_proj = proj, c_fc = fc, mlp.c_proj = out: the jaxlora targets.
    lcfg = peft.LoraConfig(r=RANK, lora_alpha=RANK, lora_dropout=0.0, use_dora=use_dora,
                           target_modules=["c_attn", "c_proj", "c_fc"], fan_in_fan_out=True)
    self.model = peft.get_peft_model(hf, lcfg).train()
    with torch.no_grad():  # non-zero B, as for jaxlora
      for n, prm in self.model.named_parameters():
        if "lora_B" in n:
          prm.normal_(0.0, 0.01)
    self.params = [prm for prm in self.model.parameters() if prm.requires_grad]
    self.opt = torch.optim.AdamW(self.params, lr=1e-4)
    tokens = np.random.default_rng(0).integers(0, VOCAB, (args.batch, args.seq + 1))
    self.x = torch.tensor(tokens[:, :-1])
    self.y = torch.tensor(tokens[:, 1:])
    self.torch = torch

  def step(self) -> float:
    t0 = time.perf_counter()
    logits = self.model(input_ids=self.x).logits
    loss = self.torch.nn.functional.cross_entropy(logits.reshape(-1, VOCAB), self.y.reshape(-1))
    loss.backward()
    self.opt.step()
    self.opt.zero_grad(set_to_none=True)
    return time.perf_counter() - t0


def _unflat(flat):
  out: dict = {}
  for k, v in flat.items():
    node = out
    parts = k.split("/")
    for p in parts[:-1]:
      node = node.setdefault(p, {})
    node[parts[-1]] = v
  return out


def _copy(tree):
  return jax.tree.map(jnp.copy, tree)


# ----------------------------------------------------------------------------- memory


def peak_rss_child(args):
  """Runs in a subprocess: a few steps of one variant, prints the peak RSS in bytes."""
  start_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
  if args.memory_child.startswith("peft-"):
    r = PeftRunner(args, use_dora=args.memory_child == "peft-dora")
  else:
    steps, _, data = build(args)
    fn, init, frozen = steps[args.memory_child]
    del steps
    r = machine.Runner(fn, init, frozen, data)
    r.compile()
  if not args.no_trim:
    machine.trim_heap()
  for _ in range(2):
    r.step()
  kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
  print(json.dumps({"variant": args.memory_child, "peak_rss": kib * 1024,
                    "start_rss": start_kib * 1024}))


def measure_peaks(args, variants=TRAIN_VARIANTS):
  peaks = {}
  for v in variants:
    cmd = [sys.executable, os.path.abspath(__file__), "--memory-child", v,
           "--layers", str(args.layers), "--batch", str(args.batch), "--seq", str(args.seq)]
    cmd += ["--no-trim"] if args.no_trim else []
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    peaks[v] = json.loads(out.strip().splitlines()[-1])["peak_rss"]
    print(f"  peak RSS {v:7s} {peaks[v] / 2**30:.2f} GiB", flush=True)
  return peaks


# ----------------------------------------------------------------------------- main


def main():
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--layers", type=int, default=12)
  ap.add_argument("--batch", type=int, default=4)
  ap.add_argument("--seq", type=int, default=256)
  ap.add_argument("--reps", type=int, default=5, help="timed repetitions per variant")
  ap.add_argument("--no-memory", action="store_true", help="skip the peak-RSS subprocesses")
  ap.add_argument("--no-trim", action="store_true",
                  help="measure peak RSS without returning the heap that compilation freed")
  ap.add_argument("--dora", action="store_true",
                  help="compare DoRA with LoRA (jaxlora and PEFT) instead of the default variants")
  ap.add_argument("--memory-child", choices=sorted(set(TRAIN_VARIANTS + DORA_VARIANTS)),
                  default=None, help=argparse.SUPPRESS)
  args = ap.parse_args()
  if args.memory_child:
    return peak_rss_child(args)
  if args.dora:
    return dora_main(args)

  print(f"GPT-2-small-shaped decoder: layers={args.layers} d={D_MODEL} heads={HEADS} "
        f"mlp={D_MLP} vocab={VOCAB}, tied head, batch {args.batch} x {args.seq} tokens, "
        f"LoRA r={RANK} on qkv/proj/fc/out, float32")
  print(f"jax {jax.__version__} on {jax.devices()[0].platform} ({machine.cpu_model()}), "
        f"{os.cpu_count()} CPUs, {machine.ram_gib():.0f} GiB RAM, Python {platform.python_version()}",
        flush=True)

  peaks = None
  if not args.no_memory:
    # Before this process allocates anything large: a forked child's ru_maxrss starts
    # from the parent's resident size.
    print("peak memory (one subprocess per variant) ...", flush=True)
    peaks = measure_peaks(args)

  steps, fwds, data = build(args)
  runners = {k: machine.Runner(fn, init, frozen, data) for k, (fn, init, frozen) in steps.items()}

  def fwd_timer(fn, p):
    def run():
      t0 = time.perf_counter()
      jax.block_until_ready(fn(p, data[0]))
      return time.perf_counter() - t0
    return run

  timers = {k: r.step for k, r in runners.items()}
  timers.update({k: fwd_timer(fn, p) for k, (fn, p) in fwds.items()})

  # Correctness sanity: the three forwards agree (B != 0, so LoRA changes the output).
  out = {k: np.asarray(fn(p, data[0])) for k, (fn, p) in fwds.items()}
  err = np.abs(out["fwd-lora"] - out["fwd-merged"]).max()
  moved = np.abs(out["fwd-lora"] - out["fwd-base"]).max()
  print(f"forward check: |lora - merged| = {err:.2e}, |lora - base| = {moved:.2e}")

  print("compiling and warming up ...", flush=True)
  for k, t in timers.items():
    t0 = time.perf_counter()
    t()  # compile
    t()  # warm
    print(f"  {k:10s} first two calls {time.perf_counter() - t0:6.1f} s", flush=True)

  times = machine.alternate(timers, args.reps)
  med = {k: statistics.median(v) for k, v in times.items()}
  low = {k: min(v) for k, v in times.items()}  # least disturbed by other load

  print()
  print("| variant | median time / step | vs full FT | vs floor | min time (vs full FT) "
        "| peak RSS | vs full FT |")
  print("|---|---:|---:|---:|---:|---:|---:|")
  names = {"full": "full fine-tuning", "lora": "LoRA (jaxlora.apply, factored)",
           "merged": "LoRA (merge on the fly)", "floor": "floor (LayerNorm scales only)"}
  for k in TRAIN_VARIANTS:
    mem = ("| - | -" if peaks is None else
           f"| {peaks[k] / 2**30:.2f} GiB | {peaks[k] / peaks['full']:.2f}x")
    print(f"| {names[k]} | {med[k]:.3f} s | {med[k] / med['full']:.2f}x | "
          f"{med[k] / med['floor']:.2f}x | {low[k]:.3f} s ({low[k] / low['full']:.2f}x) {mem} |")
  print()
  print("| forward (logits) | median time | vs base | min time (vs base) |")
  print("|---|---:|---:|---:|")
  fnames = {"fwd-base": "base params", "fwd-lora": "LoRA (jaxlora.apply)",
            "fwd-merged": "merged params (base model)"}
  for k in FWD_VARIANTS:
    print(f"| {fnames[k]} | {med[k]:.3f} s | {med[k] / med['fwd-base']:.2f}x | "
          f"{low[k]:.3f} s ({low[k] / low['fwd-base']:.2f}x) |")
  print()
  print("all samples (s): " + json.dumps({k: [round(t, 4) for t in v] for k, v in times.items()}))


def dora_main(args):
  """``--dora``: DoRA against LoRA, jaxlora and PEFT, step time and peak memory."""
  import torch  # pylint: disable=import-outside-toplevel
  import peft  # pylint: disable=import-outside-toplevel
  torch.set_num_threads(os.cpu_count() or 1)
  print(f"GPT-2-small-shaped decoder: layers={args.layers} d={D_MODEL} heads={HEADS} "
        f"mlp={D_MLP} vocab={VOCAB}, tied head, batch {args.batch} x {args.seq} tokens, "
        f"LoRA/DoRA r={RANK} on qkv/proj/fc/out, float32, adamw")
  print(f"jax {jax.__version__} on {jax.devices()[0].platform}, torch {torch.__version__} "
        f"({torch.get_num_threads()} threads), peft {peft.__version__}; {machine.cpu_model()}, "
        f"{os.cpu_count()} CPUs, {machine.ram_gib():.0f} GiB RAM, "
        f"Python {platform.python_version()}", flush=True)
  peaks = None
  if not args.no_memory:
    print("peak memory (one subprocess per variant) ...", flush=True)
    peaks = measure_peaks(args, DORA_VARIANTS)
  steps, _, data = build(args)
  timers = {k: machine.Runner(*steps[k][:2], steps[k][2], data).step for k in ("lora", "dora")}
  timers.update({k: PeftRunner(args, use_dora=k == "peft-dora").step
                 for k in ("peft-lora", "peft-dora")})
  print("compiling and warming up ...", flush=True)
  for k, t in timers.items():
    t0 = time.perf_counter()
    t()
    t()
    print(f"  {k:10s} first two calls {time.perf_counter() - t0:6.1f} s", flush=True)
  times = machine.alternate(timers, args.reps)
  med = {k: statistics.median(v) for k, v in times.items()}
  low = {k: min(v) for k, v in times.items()}
  print()
  print("| variant | median time / step | min time | peak RSS |")
  print("|---|---:|---:|---:|")
  names = {"lora": "jaxlora LoRA", "dora": "jaxlora DoRA", "peft-lora": "PEFT LoRA (PyTorch)",
           "peft-dora": "PEFT DoRA (PyTorch)"}
  for k in DORA_VARIANTS:
    mem = "-" if peaks is None else f"{peaks[k] / 2**30:.2f} GiB"
    print(f"| {names[k]} | {med[k]:.3f} s | {low[k]:.3f} s | {mem} |")
  print()
  print("| DoRA / LoRA | step time (median) | step time (min) | peak RSS |")
  print("|---|---:|---:|---:|")
  for lib, (l, d) in (("jaxlora", ("lora", "dora")), ("PEFT", ("peft-lora", "peft-dora"))):
    mem = "-" if peaks is None else f"{peaks[d] / peaks[l]:.2f}x"
    print(f"| {lib} | {med[d] / med[l]:.2f}x | {low[d] / low[l]:.2f}x | {mem} |")
  print()
  print("all samples (s): " + json.dumps({k: [round(t, 4) for t in v] for k, v in times.items()}))


if __name__ == "__main__":
  main()
