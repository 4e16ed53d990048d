"""QLoRA measurements: storage, loading memory, step time and task quality of an NF4 base.

One invocation measures, side by side:

  1. storage   bits per quantized parameter of NF4 + double quantization (read from a real
               quantized tree with `jaxlora.quantization.bits_per_parameter`), and the bytes
               of a Llama-2-7B-shaped base in NF4 (embeddings and head in bf16), computed from
               shapes alone (`jaxlora.sharding.memory_plan(..., quantize='nf4')`, checked
               against a count that mirrors the record layout by hand): nothing is allocated.
  2. rss       peak host memory of loading a checkpoint as bf16 and as NF4
               (`benchmarks/qlora_rss.py`, separate processes; `--skip-rss` leaves it out).
  3. step      time of a LoRA training step (r=16 on all linear layers, adamw, the frozen
               half passed to the jitted step as an argument) on the same small Llama-shaped
               model with an f32 base, a bf16 base, an NF4 base computing in bf16 and an NF4
               base computing in f32; variants alternate over `--reps` rounds, medians
               reported. Beside it, the time of dequantizing every kernel once (jitted): a
               step dequantizes twice (forward, and again in the backward, which
               `jax.checkpoint` makes recompute the kernel instead of keeping it).
  4. quality   the `jaxlora demo` task (ROT13 of unseen 5-letter words) trained through
               `jaxlora_cli.trainer.train` on the demo's float base and on the same base with
               `model.quantize=nf4`: same steps, seed and batches; exact match of each, for
               each of `--seeds` (word split and init) and their mean. One seed is not
               enough: seed-to-seed differences reach several points either way.

Usage:
  python benchmarks/qlora.py                        # everything (~15 min on a busy 2-core CPU)
  python benchmarks/qlora.py --seeds 0              # one seed for quality (~7 min)
  python benchmarks/qlora.py --smoke                # tiny shapes, f32/NF4 steps only, no rss or
                                                    # quality: for CI (its time is 2 compiles)
  python benchmarks/qlora.py --skip-rss --out qlora.json
"""

from __future__ import annotations

import argparse
import importlib.util
import inspect
import json
import math
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time

import machine  # benchmarks/machine.py, beside this script

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import jaxlora  # noqa: E402  (the checkout's copy, without installing it)
from jaxlora.models.decoder import abstract_variables  # noqa: E402
from jaxlora.quantization import NESTED_BLOCK_SIZE  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
STEP_VARIANTS = ("f32", "bf16", "nf4", "nf4-f32")
STEP_NAMES = {"f32": "f32 base, f32 compute", "bf16": "bf16 base, bf16 compute",
              "nf4": "NF4 base, bf16 compute (QLoRA)", "nf4-f32": "NF4 base, f32 compute"}


def llama(vocab, hidden, layers, heads, kv_heads, intermediate, max_pos=4096):
  return jaxlora.models.ModelConfig("llama", vocab, hidden, layers, heads, kv_heads,
                                    hidden // heads, intermediate, max_pos, 1e-5, False)


# ----------------------------------------------------------------------------- 1. storage


def record_bytes(shape, n_stack, block_size=64, double_quant=True) -> int:
  """Bytes of one NF4 record of a float kernel, mirroring `QuantizedArray`'s layout by hand.

  Per stacked layer: packed codes ceil(n/2) uint8, one block maximum per `block_size` values
  (uint8 codes with double quantization, else float32), the 16-entry float32 code table, and
  with double quantization a float32 scale per 256 blocks, the 256-entry float32 map and a
  float32 offset.
  """
  layers = math.prod(shape[:n_stack])
  n = math.prod(shape[n_stack:])
  blocks = -(-n // block_size)
  per = -(-n // 2) + 16 * 4
  if double_quant:
    per += blocks + 4 * -(-blocks // NESTED_BLOCK_SIZE) + 256 * 4 + 4
  else:
    per += 4 * blocks
  return layers * per


def storage(args) -> dict:
  # (a) bits per parameter on a real quantized tree (random values; the storage is the same).
  cfg = llama(*args.storage_model)
  model = jaxlora.models.Decoder(cfg, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
  params = jaxlora.models.init(model, jax.random.key(0))
  q = jaxlora.quantize(params, "nf4", double_quant=True, layout=model)
  bits = jaxlora.quantization.bits_per_parameter(q)
  bits_nodq = jaxlora.quantization.bits_per_parameter(
      jaxlora.quantize(params, "nf4", double_quant=False, layout=model))
  del params, q

  # (b) Llama-2-7B shape, bf16 embeddings/head/norms, NF4 + double quant kernels; shapes only.
  cfg7 = llama(32000, 4096, 32, 32, 32, 11008)
  model7 = jaxlora.models.Decoder(cfg7, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
  abstract = nn.unbox(abstract_variables(model7))["params"]
  float_bytes = sum(math.prod(x.shape) * x.dtype.itemsize for x in jax.tree.leaves(abstract))
  # By hand: every 2-D-per-layer kernel except the head (what 'all-linear' quantizes).
  leaves = machine.flatten(abstract)
  kernels = {path: x for path, x in leaves.items()
             if path[-1] == "kernel" and path[0] != "lm_head"}
  by_hand = sum(record_bytes(x.shape, 1 if path[0] == "layers" else 0)
                for path, x in kernels.items())
  by_hand += sum(math.prod(x.shape) * x.dtype.itemsize for path, x in leaves.items()
                 if path not in kernels)
  source = "jaxlora.quantize on ShapeDtypeStructs"
  mesh = jaxlora.sharding.make_mesh(fsdp=1, devices=jax.devices()[:1])
  if "quantize" in inspect.signature(jaxlora.sharding.memory_plan).parameters:
    plan = jaxlora.sharding.memory_plan(model7, mesh, rank=16, quantize="nf4")
    lib_bytes, source = plan["base"], "jaxlora.sharding.memory_plan(quantize='nf4')"
    plan_bf16 = jaxlora.sharding.memory_plan(model7, mesh, rank=16)
  else:
    qa = jaxlora.quantize(abstract, "nf4", layout=model7)
    lib_bytes = sum(math.prod(x.shape) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(qa))
    plan = plan_bf16 = None
  n_kernel = sum(math.prod(x.shape) for x in kernels.values())
  return {
      "bits_per_param_nf4_dq": bits, "bits_per_param_nf4": bits_nodq,
      "storage_model": list(args.storage_model),
      "llama2_7b_params": sum(math.prod(x.shape) for x in jax.tree.leaves(abstract)),
      "llama2_7b_quantized_params": n_kernel,
      "llama2_7b_bf16_bytes": float_bytes, "llama2_7b_nf4_bytes": lib_bytes,
      "llama2_7b_nf4_bytes_by_hand": by_hand, "llama2_7b_source": source,
      "llama2_7b_r16_adapter_bytes": None if plan is None else plan["adapter"],
      "llama2_7b_r16_optimizer_bytes": None if plan is None else plan["optimizer"],
      "llama2_7b_nf4_plan_total": None if plan is None else plan["total"],
      "llama2_7b_bf16_plan_total": None if plan_bf16 is None else plan_bf16["total"],
  }


# ----------------------------------------------------------------------------- 2. rss


def rss(args) -> dict | None:
  path = os.path.join(HERE, "qlora_rss.py")
  if not os.path.isfile(path):
    print("  benchmarks/qlora_rss.py is missing: loading RSS not measured", flush=True)
    return None
  spec = importlib.util.spec_from_file_location("qlora_rss", path)
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  kwargs = {}
  if args.smoke:
    kwargs = dict(n_layer=2, n_embd=128, vocab=1024)
  with tempfile.TemporaryDirectory() as d:
    return mod.measure(d, **kwargs)


# ----------------------------------------------------------------------------- 3. step time


def build_steps(args):
  """One runner per variant: (jitted step, initial trainable/opt state, frozen half, data)."""
  vocab, hidden, layers, heads, kv, inter = args.step_model
  cfg = llama(vocab, hidden, layers, heads, kv, inter, max_pos=max(args.seq, 128))
  rng = np.random.default_rng(0)
  tokens = jnp.asarray(rng.integers(0, vocab, (args.batch, args.seq + 1)), jnp.int32)
  x, y = tokens[:, :-1], tokens[:, 1:]
  f32_model = jaxlora.models.Decoder(cfg)
  base = jaxlora.models.init(f32_model, jax.random.key(0))
  bf16 = jax.tree.map(lambda v: v.astype(jnp.bfloat16), base)
  setups = {
      "f32": lambda: (jnp.float32, base),
      "bf16": lambda: (jnp.bfloat16, bf16),
      "nf4": lambda: (jnp.bfloat16, jaxlora.quantize(bf16, "nf4", layout=f32_model)),
      "nf4-f32": lambda: (jnp.float32, jaxlora.quantize(base, "nf4", layout=f32_model)),
  }
  tx = optax.adamw(1e-4)
  runners, dequant = {}, {}
  for name in args.variants:
    dtype, params = setups[name]()
    model = jaxlora.models.Decoder(cfg, dtype=dtype, param_dtype=dtype)
    tree = jaxlora.wrap(params, rank=16, targets="all-linear", layout=model,
                        key=jax.random.key(1))
    trainable, frozen = jaxlora.split(tree)
    fwd = jaxlora.apply(model.apply)

    def loss_fn(t, f, x, y, fwd=fwd):
      logits = fwd({"params": jaxlora.combine(t, f)}, x).astype(jnp.float32)
      return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    def step(t, opt, f, x, y, loss_fn=loss_fn):
      loss, g = jax.value_and_grad(loss_fn)(t, f, x, y)
      upd, opt = tx.update(g, opt, t)
      return optax.apply_updates(t, upd), opt, loss

    runners[name] = Runner(jax.jit(step, donate_argnums=(0, 1)), trainable, tx.init(trainable),
                           frozen, (x, y))
    if jaxlora.quantization.records(params):
      dq = jax.jit(jaxlora.dequantize)
      dequant[name] = (dq, params)
  n_params = sum(x.size for x in jax.tree.leaves(base))
  return runners, dequant, n_params


class Runner:
  """The state of one training variant; `step()` runs one timed step."""

  def __init__(self, fn, trainable, opt, frozen, data):
    self.fn, self.frozen, self.data = fn, frozen, data
    self.state = [jax.tree.map(jnp.copy, trainable), opt]
    self.losses = []

  def step(self) -> float:
    t0 = time.perf_counter()
    *self.state, loss = self.fn(*self.state, self.frozen, *self.data)
    jax.block_until_ready((self.state, loss))
    self.losses.append(float(loss))
    return time.perf_counter() - t0


def step_time(args) -> dict:
  runners, dequant, n_params = build_steps(args)
  compile_s = {}
  for k, r in runners.items():
    t0 = time.perf_counter()
    r.step()
    compile_s[k] = time.perf_counter() - t0
    r.step()  # warm
    print(f"  {k:8s} first call (compile) {compile_s[k]:6.1f} s", flush=True)

  def dq_timer(fn, p):
    def run():
      t0 = time.perf_counter()
      jax.block_until_ready(fn(p))
      return time.perf_counter() - t0
    return run

  timers = {k: r.step for k, r in runners.items()}
  timers.update({f"dequant-{k}": dq_timer(fn, p) for k, (fn, p) in dequant.items()})
  for t in timers.values():
    t()
  times = machine.alternate(timers, args.reps)
  med = {k: statistics.median(v) for k, v in times.items()}
  first = {k: r.losses[0] for k, r in runners.items()}
  return {"median_s": med, "min_s": {k: min(v) for k, v in times.items()},
          "compile_s": compile_s, "samples_s": times, "first_loss": first,
          "model": list(args.step_model), "batch": args.batch, "seq": args.seq,
          "params": n_params,
          "nf4_over_bf16": med["nf4"] / med["bf16"] if "bf16" in med and "nf4" in med else None,
          "nf4_f32_over_f32": (med["nf4-f32"] / med["f32"] if "f32" in med and "nf4-f32" in med
                               else None)}


# ----------------------------------------------------------------------------- 4. quality


def quality(args) -> dict:
  from jaxlora_cli import demo, trainer  # pylint: disable=import-outside-toplevel

  root = os.path.abspath(args.quality_dir)
  shutil.rmtree(root, ignore_errors=True)
  tok = trainer.load_tokenizer(demo.DEMO_BASE)
  res = {"steps": args.quality_steps, "seeds": list(args.seeds), "runs": {}}
  for seed in args.seeds:
    out = os.path.join(root, f"seed{seed}")
    _, eval_words = demo.write_task(os.path.join(out, "data"), seed)
    res["eval_words"] = len(eval_words)
    runs = res["runs"][seed] = {}
    for name, quant in (("float", None), ("nf4", "nf4")):
      extra = {} if quant is None else {"model.quantize": quant}
      cfg = demo.demo_config(os.path.join(out, name), args.quality_steps, seed, **extra)
      cfg.data.train_file = os.path.join(out, "data", "train.jsonl")
      cfg.data.eval_file = os.path.join(out, "data", "eval.jsonl")
      t0 = time.time()
      r = trainer.train(cfg, progress=False, log=lambda s: None)
      seconds = time.time() - t0
      model, params = trainer.load_model(cfg)
      tree = jaxlora.load(os.path.join(cfg.output_dir, "adapter"), params)
      acc, _ = demo.exact_match(model, tree, tok, eval_words)
      runs[name] = {"exact_match": acc,
                    "eval_loss_before": r["eval_loss_before"],
                    "eval_loss_after": r["eval_loss_after"], "base_bytes": r["base_bytes"],
                    "train_s": seconds}
      print(f"  seed {seed} {name:5s} exact match {100 * acc:5.1f}%, eval loss {r['eval_loss_before']:.3f} -> {r['eval_loss_after']:.3f}, {seconds:.0f} s",
            flush=True)
  for name in ("float", "nf4"):
    res[name] = {k: statistics.mean(res["runs"][s][name][k] for s in args.seeds)
                 for k in ("exact_match", "eval_loss_before", "eval_loss_after")}
  res["difference_points"] = 100 * (res["nf4"]["exact_match"] - res["float"]["exact_match"])
  res["difference_points_per_seed"] = [
      100 * (res["runs"][s]["nf4"]["exact_match"] - res["runs"][s]["float"]["exact_match"])
      for s in args.seeds]
  return res


# ----------------------------------------------------------------------------- main


def main():
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--smoke", action="store_true", help="tiny shapes, 2 reps, no rss/quality")
  ap.add_argument("--skip-rss", action="store_true", help="leave out the loading-RSS children")
  ap.add_argument("--skip-quality", action="store_true", help="leave out the demo-task runs")
  ap.add_argument("--skip-step", action="store_true", help="leave out the step-time runs")
  ap.add_argument("--reps", type=int, default=7, help="timed rounds per step variant")
  ap.add_argument("--variants", nargs="+", choices=STEP_VARIANTS, default=list(STEP_VARIANTS),
                  help="step-time variants")
  ap.add_argument("--batch", type=int, default=4)
  ap.add_argument("--seq", type=int, default=128)
  ap.add_argument("--step-model", type=int, nargs=6, default=[8192, 512, 4, 8, 8, 1376],
                  metavar=("VOCAB", "HIDDEN", "LAYERS", "HEADS", "KV_HEADS", "MLP"))
  ap.add_argument("--storage-model", type=int, nargs=6, default=[8192, 512, 4, 8, 8, 1376],
                  metavar=("VOCAB", "HIDDEN", "LAYERS", "HEADS", "KV_HEADS", "MLP"))
  ap.add_argument("--quality-steps", type=int, default=800)
  ap.add_argument("--quality-dir", default=os.path.join(tempfile.gettempdir(), "qlora_quality"))
  ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2],
                  help="demo-task seeds (word split and init); means are reported")
  ap.add_argument("--out", help="write the results as JSON here")
  args = ap.parse_args()
  if args.smoke:
    args.reps, args.batch, args.seq = 2, 2, 32
    args.variants = ["f32", "nf4-f32"]  # each variant is a compile (the bulk of a smoke run)
    args.step_model = args.storage_model = [512, 64, 2, 4, 4, 128]
    args.skip_quality = True
    args.skip_rss = True
  t_start = time.time()
  print(f"jax {jax.__version__} on {jax.devices()[0].platform} ({machine.cpu_model()}), "
        f"{os.cpu_count()} CPUs, {machine.ram_gib():.0f} GiB RAM, Python "
        f"{platform.python_version()}", flush=True)
  results = {"smoke": args.smoke}

  print("1. storage ...", flush=True)
  s = results["storage"] = storage(args)
  print("2. loading RSS ...", flush=True)
  results["rss"] = None if args.skip_rss else rss(args)
  print("3. step time ...", flush=True)
  st = results["step"] = None if args.skip_step else step_time(args)
  print("4. quality ...", flush=True)
  q = results["quality"] = None if args.skip_quality else quality(args)
  results["seconds"] = time.time() - t_start

  gb = 1e9
  print()
  print("| measurement | value | target |")
  print("|---|---:|---:|")
  print(f"| bits per quantized parameter, NF4 + double quant | {s['bits_per_param_nf4_dq']:.3f} "
        "| <= 4.13 (paper 4.127) |")
  print(f"| bits per quantized parameter, NF4 without double quant "
        f"| {s['bits_per_param_nf4']:.3f} | (4.5) |")
  print(f"| Llama-2-7B shape, base in NF4 (embeddings, head, norms bf16) "
        f"| {s['llama2_7b_nf4_bytes'] / gb:.3f} GB ({s['llama2_7b_nf4_bytes'] / 2**30:.2f} GiB) "
        "| <= 4.0 GB |")
  same = "equal" if s["llama2_7b_nf4_bytes_by_hand"] == s["llama2_7b_nf4_bytes"] else "DIFFERENT"
  print(f"| same, counted by hand from the record layout "
        f"| {s['llama2_7b_nf4_bytes_by_hand'] / gb:.3f} GB ({same}) | |")
  print(f"| Llama-2-7B shape, base in bf16 | {s['llama2_7b_bf16_bytes'] / gb:.3f} GB | |")
  print(f"| NF4 / bf16 base bytes | {s['llama2_7b_nf4_bytes'] / s['llama2_7b_bf16_bytes']:.3f} "
        "| |")
  if s["llama2_7b_nf4_plan_total"] is not None:
    print(f"| Llama-2-7B NF4 base + r=16 adapters + adamw state (memory_plan, 1 device) "
          f"| {s['llama2_7b_nf4_plan_total'] / gb:.3f} GB (bf16 base: "
          f"{s['llama2_7b_bf16_plan_total'] / gb:.3f} GB) | |")
  r = results["rss"]
  if r is not None:
    print(f"| loading peak RSS, NF4 / bf16 ({r.get('checkpoint_mb', '?')} MiB checkpoint) "
          f"| {r['nf4_rss_mb']:.0f} / {r['bf16_rss_mb']:.0f} MiB = {r['ratio']:.3f} | |")
  else:
    print("| loading peak RSS | not measured | |")
  med = st["median_s"] if st else {}
  for k in args.variants if st else ():
    print(f"| LoRA step, {STEP_NAMES[k]} | {med[k]:.3f} s (min {st['min_s'][k]:.3f}, compile "
          f"{st['compile_s'][k]:.1f} s) | |")
  if st:
    for k in ("nf4", "nf4-f32"):
      if "dequant-" + k in med:
        print(f"| dequantize all kernels once, {STEP_NAMES[k]} | {med['dequant-' + k]:.3f} s | |")
    if st["nf4_over_bf16"] is not None:
      print(f"| step time NF4 / bf16 | {st['nf4_over_bf16']:.2f}x | <= 1.5x |")
    if st["nf4_f32_over_f32"] is not None:
      print(f"| step time NF4 (f32 compute) / f32 | {st['nf4_f32_over_f32']:.2f}x | |")
  else:
    print("| step time | not measured | |")
  if q is not None:
    n = len(q["seeds"])
    mean = "" if n == 1 else f", mean of {n} seeds"
    print(f"| demo task exact match, float base{mean} | {100 * q['float']['exact_match']:.1f}% "
          f"(eval loss {q['float']['eval_loss_after']:.3f}) | |")
    print(f"| demo task exact match, NF4 base{mean} | {100 * q['nf4']['exact_match']:.1f}% "
          f"(eval loss {q['nf4']['eval_loss_after']:.3f}) | |")
    print(f"| demo base eval loss before training, float / NF4 "
          f"| {q['float']['eval_loss_before']:.3f} / {q['nf4']['eval_loss_before']:.3f} | |")
    per = ", ".join(f"{d:+.1f}" for d in q["difference_points_per_seed"])
    print(f"| exact match NF4 - float{mean} | {q['difference_points']:+.1f} points"
          f"{'' if n == 1 else f' (per seed {per})'} | within 3 |")
  else:
    print("| demo task quality | not measured | |")
  print()
  v, h, l, hd, kv, m = args.step_model
  if st:
    print(f"step model: Llama-shaped vocab {v}, hidden {h}, {l} layers, {hd} heads ({kv} kv), MLP "
          f"{m}, untied head ({st['params']:,} params); batch {st['batch']} x {st['seq']}, r=16 "
          f"all-linear, adamw; {args.reps} alternating rounds, medians")
  if q:
    print(f"quality: demo task (jaxlora_cli/demo_base, ROT13), {q['steps']} steps x 32 examples, "
          f"rank 8 all-linear, seeds {q['seeds']}, {q['eval_words']} unseen words")
  print(f"total {results['seconds']:.0f} s")
  if args.out:
    with open(args.out, "w") as f:
      json.dump(results, f, indent=2)
    print(f"wrote {args.out}")


if __name__ == "__main__":
  main()
