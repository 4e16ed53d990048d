"""GPU step time, tokens/s, model FLOP utilisation and peak memory: jaxlora vs PEFT on Llama shapes.

Both frameworks train LoRA adapters on the same random Llama-shaped checkpoint, in bfloat16, on
the same batch of random tokens (numpy seed 0):

  jaxlora  ``jaxlora.models.from_pretrained(..., dtype=bf16, param_dtype=bf16, remat=,
           attention=)``, ``jaxlora.wrap(targets='all-linear', layout=model)`` (q, k, v, o, gate,
           up, down in every layer; not the head), r=16, alpha=16, float32 adapters (jaxlora's
           default for a bf16 base), ``jaxlora.apply`` (factored forward), gradients of the
           trainable half of ``jaxlora.split`` only, optax adamw on it; one jitted step with the
           frozen half passed as an argument and the trainable state donated. Loss: the full
           logits taken to float32 (``--loss-chunk 0``) or ``jaxlora.models.chunked_cross_entropy``
           on ``model.apply(..., return_hidden=True)`` (``--loss-chunk N``).
  peft     ``LlamaForCausalLM.from_pretrained(dtype=bf16, attn_implementation='sdpa')`` +
           ``peft.get_peft_model`` with the same targets, rank, alpha and ``lora_dropout=0``
           (PEFT also keeps float32 adapters on a bf16 base), ``model.train()``,
           ``torch.optim.AdamW`` on the trainable params, ``labels=input_ids``.

Both losses are the next-token cross-entropy, mean over the ``batch * (seq - 1)`` shifted
positions; adamw lr 1e-4, weight decay 0.01 in both. The script checks that the first-step losses
agree (same weights, same batch, B = 0 at step 1).

Shapes (``--shapes``): Llama-3.2-1B (hidden 2048, 16 layers, 32 / 8 heads, head_dim 64,
intermediate 8192, vocab 128256, tied embeddings, rope_theta 500000, llama3 rope factor 32) at
8 x 1024, 2 x 4096 and 1 x 16384; Llama-3-8B (untied head, 32 layers, hidden 4096, 32 / 8 heads,
head_dim 128, intermediate 14336, vocab 128256, rope_theta 500000, llama3 rope factor 8 as in
Llama-3.1-8B) at 4 x 2048. The checkpoint is a ``LlamaForCausalLM(LlamaConfig(...))`` with random
weights (torch seed 0), saved in bf16 with ``save_pretrained`` (no download), once per model.

Each variant x shape runs in its own subprocess (a fresh device, its own peak memory; an
out-of-memory failure becomes an ``OOM`` row instead of ending the table), one after the other
(``--smoke``: side by side). The parent imports neither framework. Per child: load, a first
step (compile for jax), ``--warmup - 1`` more untimed steps, then ``--steps`` timed steps (jax:
``block_until_ready``; torch: ``torch.cuda.synchronize``); the median is reported. Peak memory: jax
``device.memory_stats()['peak_bytes_in_use']``, torch ``torch.cuda.max_memory_allocated()``
(both: bytes in use by tensors since the process started, load included; on CPU the peak RSS
instead). jax children get ``XLA_PYTHON_CLIENT_MEM_FRACTION=0.95`` unless it is set, so that
jax may use about as much of the GPU as torch can.

Model FLOPs utilisation counts the matmul FLOPs of a LoRA step (printed with the formula) against
``--peak-tflops`` (989 TFLOP/s: the bf16 dense peak of an H100 / H200 SXM).

Usage:
  python benchmarks/gpu_step_time.py                        # all four shapes, both variants
  python benchmarks/gpu_step_time.py --shapes 1b-2x4096 --remat dots_no_batch --loss-chunk 1024
  python benchmarks/gpu_step_time.py --smoke                # tiny shapes on CPU (CI), bf16
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import math
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

import machine  # benchmarks/machine.py, beside this script

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

RANK = 16
ALPHA = 16
LR = 1e-4
WEIGHT_DECAY = 0.01
TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
VARIANTS = ("jaxlora", "peft")
REMAT = ("none", "full", "dots", "dots_no_batch", "offload_dots_no_batch")
PEAK_TFLOPS = 989.0  # bf16 dense, H100 / H200 SXM

MODELS = {
    "llama-3.2-1b": dict(vocab=128256, hidden=2048, layers=16, heads=32, kv_heads=8,
                         head_dim=64, intermediate=8192, tied=True, rope_theta=500000.0,
                         rope_factor=32.0, max_positions=131072),
    "llama-3-8b": dict(vocab=128256, hidden=4096, layers=32, heads=32, kv_heads=8,
                       head_dim=128, intermediate=14336, tied=False, rope_theta=500000.0,
                       rope_factor=8.0, max_positions=131072),
    "smoke": dict(vocab=256, hidden=64, layers=2, heads=4, kv_heads=2, head_dim=16,
                  intermediate=128, tied=True, rope_theta=500000.0, rope_factor=32.0,
                  max_positions=131072, initializer_range=0.2),
}
SHAPES = {  # name: (model, batch, seq)
    "1b-8x1024": ("llama-3.2-1b", 8, 1024),
    "1b-2x4096": ("llama-3.2-1b", 2, 4096),
    "1b-1x16384": ("llama-3.2-1b", 1, 16384),
    "8b-4x2048": ("llama-3-8b", 4, 2048),
}
SMOKE_SHAPES = {"smoke-2x32": ("smoke", 2, 32)}
ALL_SHAPES = {**SHAPES, **SMOKE_SHAPES}

# Targets from the issue.
TARGET_RATIO = 0.6
TARGET_MFU = {"llama-3-8b": 0.45, "llama-3.2-1b": 0.40}
FITS_SHAPE = "1b-1x16384"
OOM_MARKERS = ("RESOURCE_EXHAUSTED", "out of memory", "OutOfMemoryError", "Out of memory")


def loss_tolerance(dtype: str, ref: float) -> float:
  """|jaxlora - PEFT| allowed for the first-step loss (bf16: both round differently)."""
  return (2e-2 if dtype == "bfloat16" else 1e-4) * max(1.0, abs(ref))


# ----------------------------------------------------------------------------- FLOPs


FORMULA = """\
model FLOPs of one LoRA step (N = B*T tokens; L layers, d hidden, n / k query / kv heads,
h head_dim, I intermediate, V vocab, r rank):
  base linears  4*N*L*P - 2*N*d*(n+2k)*h,  P = d*(n+2k)*h + n*h*d + 3*d*I
                (forward + input gradient; frozen, so no weight gradient; layer 0's q/k/v input
                gradient feeds only the frozen embedding and is not needed)
  attention     6*B*T^2*n*h*L  (QK^T and PV, 4*B*T^2*n*h per layer; causal half;
                backward = 2x forward)
  adapters      6*N*r*L*S - 6*N*r*d,  S = sum of (in + out) over q, k, v, o, gate, up, down
                (x@A, z@B forward; dB, dz, dA and the input gradient through A backward;
                less layer 0's q/k/v input gradients)
  head          4*N*d*V  (forward + input gradient; the head is frozen)
  not counted: norms, RoPE, softmax, SwiGLU, the loss, the optimizer, rematerialised recompute
MFU = FLOPs / step time / peak; peak = {peak:g} TFLOP/s (bf16 dense, H100 / H200 SXM;
--peak-tflops)"""


def lora_step_flops(cfg: dict, batch: int, seq: int, rank: int = RANK) -> dict:
  """Matmul FLOPs of one forward + backward LoRA step, by part (see FORMULA)."""
  n_tok = batch * seq
  d, L, n, k, h, i, v = (cfg[x] for x in ("hidden", "layers", "heads", "kv_heads", "head_dim",
                                          "intermediate", "vocab"))
  qkv = d * (n + 2 * k) * h
  p = qkv + n * h * d + 3 * d * i
  s = (d + n * h) + 2 * (d + k * h) + (n * h + d) + 3 * (d + i)
  parts = {
      "base": 4 * n_tok * L * p - 2 * n_tok * qkv,
      "attention": 6 * batch * seq * seq * n * h * L,
      "adapters": 6 * n_tok * rank * L * s - 6 * n_tok * rank * d,
      "head": 4 * n_tok * d * v,
  }
  parts["total"] = sum(parts.values())
  return parts


# ----------------------------------------------------------------------------- children


def _peak_rss() -> int:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def _tokens(cfg, batch, seq):
  import numpy as np
  return np.random.default_rng(0).integers(0, cfg["vocab"], (batch, seq)).astype(np.int64)


def make_checkpoint(model_name: str, path: str, dtype: str):
  """Random-init LlamaForCausalLM (torch seed 0) saved with save_pretrained; a subprocess."""
  import torch
  import transformers
  cfg = MODELS[model_name]
  torch.manual_seed(0)
  hf_cfg = transformers.LlamaConfig(
      vocab_size=cfg["vocab"], hidden_size=cfg["hidden"], intermediate_size=cfg["intermediate"],
      num_hidden_layers=cfg["layers"], num_attention_heads=cfg["heads"],
      num_key_value_heads=cfg["kv_heads"], head_dim=cfg["head_dim"],
      max_position_embeddings=cfg["max_positions"], rms_norm_eps=1e-5,
      rope_theta=cfg["rope_theta"],
      rope_scaling={"rope_type": "llama3", "factor": cfg["rope_factor"], "low_freq_factor": 1.0,
                    "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
      tie_word_embeddings=cfg["tied"], attention_bias=False, mlp_bias=False,
      initializer_range=cfg.get("initializer_range", 0.02))
  torch.set_default_dtype(getattr(torch, dtype))  # an 8B model never exists in float32
  model = transformers.LlamaForCausalLM(hf_cfg)
  model.save_pretrained(path)


def run_jaxlora(args, cfg, ids):
  import jax
  import jax.numpy as jnp
  import optax
  sys.path.insert(0, ROOT)
  import jaxlora

  dt = jnp.dtype(args.dtype)
  remat = None if args.remat == "none" else args.remat
  t0 = time.perf_counter()
  model, params = jaxlora.models.from_pretrained(args.checkpoint, dtype=dt, param_dtype=dt,
                                                 remat=remat, attention=args.attention)
  tree = jaxlora.wrap(params, rank=RANK, alpha=ALPHA, targets="all-linear", layout=model,
                      key=jax.random.key(1))
  del params
  trainable, frozen = jaxlora.split(tree)
  del tree
  load_s = time.perf_counter() - t0
  tx = optax.adamw(LR, weight_decay=WEIGHT_DECAY)
  chunk = args.loss_chunk
  fwd = jaxlora.apply(model.apply, check_reached=not chunk)

  def loss_fn(t, f, ids):
    p = jaxlora.combine(t, f)
    if chunk:
      h = fwd({"params": p}, ids, return_hidden=True)
      return jaxlora.models.chunked_cross_entropy(model, p, h[:, :-1], ids[:, 1:],
                                                  chunk_size=chunk)
    logits = fwd({"params": p}, ids)[:, :-1].astype(jnp.float32)
    return optax.softmax_cross_entropy_with_integer_labels(logits, ids[:, 1:]).mean()

  def step(t, opt, f, ids):
    loss, g = jax.value_and_grad(loss_fn)(t, f, ids)
    upd, opt = tx.update(g, opt, t)
    return optax.apply_updates(t, upd), opt, loss

  fn = jax.jit(step, donate_argnums=(0, 1))
  state = [trainable, tx.init(trainable)]
  n_trainable = sum(x.size for x in jax.tree.leaves(trainable))
  n_adapted = sum(math.prod(a.shape[:-2])  # lora_a: (*layers, in, r), one per layer
                  for p, a in jax.tree_util.tree_flatten_with_path(trainable)[0]
                  if getattr(p[-1], "key", None) == "lora_a")
  ids = jnp.asarray(ids, jnp.int32)
  dev = jax.devices()[0]

  def one():
    t0 = time.perf_counter()
    state[0], state[1], loss = fn(*state, frozen, ids)
    jax.block_until_ready((state, loss))
    return time.perf_counter() - t0, float(loss)

  def peak():
    stats = dev.memory_stats()  # None on CPU
    if stats and "peak_bytes_in_use" in stats:
      return stats["peak_bytes_in_use"], "device"
    return _peak_rss(), "RSS"

  kind = getattr(dev, "device_kind", "")
  info = {"device": dev.platform + (f" ({kind})" if kind and kind != dev.platform else ""),
          "versions": f"jax {jax.__version__}, optax {optax.__version__}",
          "trainable": int(n_trainable), "adapted_kernels": n_adapted, "load_s": load_s,
          "attention": args.attention, "remat": args.remat, "loss_chunk": chunk}
  return one, peak, info


def run_peft(args, cfg, ids):
  import torch
  import transformers
  import peft

  transformers.logging.set_verbosity_error()
  transformers.logging.disable_progress_bar()
  cuda = torch.cuda.is_available()
  device = torch.device("cuda" if cuda else "cpu")
  t0 = time.perf_counter()
  model = transformers.LlamaForCausalLM.from_pretrained(
      args.checkpoint, dtype=getattr(torch, args.dtype), attn_implementation="sdpa").to(device)
  lcfg = peft.LoraConfig(r=RANK, lora_alpha=ALPHA, lora_dropout=0.0,
                         target_modules=list(TARGET_MODULES), bias="none", task_type="CAUSAL_LM")
  model = peft.get_peft_model(model, lcfg)
  model.train()
  load_s = time.perf_counter() - t0
  params = [p for p in model.parameters() if p.requires_grad]
  opt = torch.optim.AdamW(params, lr=LR, weight_decay=WEIGHT_DECAY)
  ids = torch.from_numpy(ids).to(device)
  sync = torch.cuda.synchronize if cuda else (lambda: None)

  def one():
    sync()
    t0 = time.perf_counter()
    opt.zero_grad(set_to_none=True)
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    opt.step()
    sync()
    dt = time.perf_counter() - t0
    return dt, loss.item()

  peak = ((lambda: (torch.cuda.max_memory_allocated(), "device")) if cuda
          else (lambda: (_peak_rss(), "RSS")))
  n_adapted = sum(1 for n, _ in model.named_parameters() if n.endswith("lora_A.default.weight"))
  info = {"device": torch.cuda.get_device_name() if cuda else "cpu",
          "versions": (f"torch {torch.__version__}, transformers {transformers.__version__}, "
                       f"peft {peft.__version__}"),
          "trainable": int(sum(p.numel() for p in params)), "adapted_kernels": n_adapted,
          "load_s": load_s, "attention": model.config._attn_implementation,
          "adapter_dtype": str(params[0].dtype).replace("torch.", "")}
  return one, peak, info


def child(args):
  """One variant on one shape; prints `RESULT {json}` as its last line."""
  model_name, batch, seq = ALL_SHAPES[args.shape]
  cfg = MODELS[model_name]
  ids = _tokens(cfg, batch, seq)
  one, peak, info = (run_jaxlora if args.child == "jaxlora" else run_peft)(args, cfg, ids)
  t0 = time.perf_counter()
  _, first_loss = one()  # jax: compile + step
  first_s = time.perf_counter() - t0
  for _ in range(args.warmup - 1):
    one()
  times = [one()[0] for _ in range(args.steps)]
  peak_bytes, peak_kind = peak()
  print("RESULT " + json.dumps({
      "variant": args.child, "shape": args.shape, "status": "ok", "first_loss": first_loss,
      "first_step_s": first_s, "step_s": statistics.median(times), "min_step_s": min(times),
      "times": [round(t, 5) for t in times], "peak_bytes": peak_bytes, "peak_kind": peak_kind,
      **info}), flush=True)


# ----------------------------------------------------------------------------- parent


def _run(cmd, env, timeout):
  try:
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
  except subprocess.TimeoutExpired as e:
    return e


def _child_env(args):
  env = dict(os.environ)
  if args.smoke:  # CPU only, whatever the machine has
    env["JAX_PLATFORMS"] = "cpu"
    env["CUDA_VISIBLE_DEVICES"] = ""
  else:
    env.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.95")
  return env


def run_variant(args, variant, shape, ckpt):
  cmd = [sys.executable, os.path.abspath(__file__), "--child", variant, "--shape", shape,
         "--checkpoint", ckpt, "--dtype", args.dtype, "--steps", str(args.steps),
         "--warmup", str(args.warmup), "--attention", args.attention, "--remat", args.remat,
         "--loss-chunk", str(args.loss_chunk)]
  t0 = time.perf_counter()
  r = _run(cmd, _child_env(args), args.child_timeout)
  wall = time.perf_counter() - t0
  row = {"variant": variant, "shape": shape, "wall_s": wall}
  if isinstance(r, subprocess.TimeoutExpired):
    return {**row, "status": "timeout", "error": f"no result after {args.child_timeout} s"}
  lines = [ln for ln in r.stdout.splitlines() if ln.startswith("RESULT ")]
  if r.returncode == 0 and lines:
    return {**row, **json.loads(lines[-1][len("RESULT "):])}
  out = (r.stdout or "") + (r.stderr or "")
  status = "OOM" if any(m in out for m in OOM_MARKERS) else "error"
  tail = [ln for ln in out.strip().splitlines() if ln.strip()][-1:] or ["(no output)"]
  return {**row, "status": status, "returncode": r.returncode, "error": tail[0][:300],
          "log_tail": out[-4000:]}


def _gib(b):
  return "-" if b is None else f"{b / 2**30:.2f} GiB"


def report(args, shapes, results):
  print()
  print(FORMULA.format(peak=args.peak_tflops))
  print()
  print("| shape | model FLOPs / step | jaxlora step | PEFT step | jaxlora / PEFT "
        "| jaxlora tokens/s | PEFT tokens/s | jaxlora MFU | PEFT MFU | jaxlora peak mem "
        "| PEFT peak mem | first-step loss jaxlora / PEFT (abs. difference) |")
  print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|")
  summary = {}
  for shape in shapes:
    model_name, batch, seq = ALL_SHAPES[shape]
    flops = lora_step_flops(MODELS[model_name], batch, seq)
    j, p = results.get((shape, "jaxlora"), {}), results.get((shape, "peft"), {})
    s = {"flops": flops, "tokens": batch * seq}
    for name, r in (("jaxlora", j), ("peft", p)):
      if r.get("status") == "ok":
        s[name] = {"step_s": r["step_s"], "tokens_per_s": batch * seq / r["step_s"],
                   "mfu": flops["total"] / r["step_s"] / (args.peak_tflops * 1e12),
                   "peak_bytes": r["peak_bytes"], "peak_kind": r["peak_kind"]}
    both = "jaxlora" in s and "peft" in s
    if both:
      s["ratio"] = s["jaxlora"]["step_s"] / s["peft"]["step_s"]
      diff = abs(j["first_loss"] - p["first_loss"])
      s["loss_diff"] = diff
      s["loss_ok"] = diff <= loss_tolerance(args.dtype, p["first_loss"])
    summary[shape] = s

    def col(name, fmt):
      return fmt(s[name]) if name in s else (results.get((shape, name)) or {}).get(
          "status", "not run")

    mem = lambda v: f"{_gib(v['peak_bytes'])}" + (" (RSS)" if v["peak_kind"] == "RSS" else "")
    loss = (f"{j['first_loss']:.5f} / {p['first_loss']:.5f} ({s['loss_diff']:.1e}, "
            f"{'OK' if s['loss_ok'] else 'MISMATCH'})" if both else "-")
    ms = lambda v: f"{v['step_s'] * 1e3:.1f} ms"
    tps = lambda v: f"{v['tokens_per_s']:,.0f}"
    mfu = lambda v: f"{v['mfu']:.1%}"
    ratio = f"{s['ratio']:.2f}x" if both else "-"
    print(f"| {shape} ({batch}x{seq}, {model_name}) | {flops['total'] / 1e12:.3g} T "
          f"| {col('jaxlora', ms)} | {col('peft', ms)} | {ratio} "
          f"| {col('jaxlora', tps)} | {col('peft', tps)} | {col('jaxlora', mfu)} "
          f"| {col('peft', mfu)} | {col('jaxlora', mem)} | {col('peft', mem)} | {loss} |")
  print()
  targets = evaluate_targets(shapes, summary, results)
  print("| target (from the issue) | result | |")
  print("|---|---|---|")
  for t in targets:
    print(f"| {t['target']} | {t['result']} | {t['verdict']} |")
  if args.smoke:
    print("\n(smoke shapes on CPU: the targets refer to the GPU shapes and mean nothing here)")
  return summary, targets


def evaluate_targets(shapes, summary, results):
  def verdict(oks):
    return "n/a (not run)" if not oks else ("met" if all(oks) else "missed")

  out = []
  vals = [(sh, s["ratio"]) for sh, s in summary.items() if "ratio" in s]
  out.append({"target": f"jaxlora step <= {TARGET_RATIO}x PEFT's",
              "result": ", ".join(f"{sh} {r:.2f}x" for sh, r in vals) or "-",
              "verdict": verdict([r <= TARGET_RATIO for _, r in vals])})
  for model_name, goal in TARGET_MFU.items():
    vals = [(sh, s["jaxlora"]["mfu"]) for sh, s in summary.items()
            if ALL_SHAPES[sh][0] == model_name and "jaxlora" in s]
    failed = [sh for sh in shapes if ALL_SHAPES[sh][0] == model_name and "jaxlora" not in
              summary[sh]]
    res = [f"{sh} {m:.1%}" for sh, m in vals] + [
        f"{sh} {results.get((sh, 'jaxlora'), {}).get('status', 'not run')}" for sh in failed]
    out.append({"target": f"jaxlora MFU >= {goal:.0%} on {model_name}",
                "result": ", ".join(res) or "-",
                "verdict": verdict([m >= goal for _, m in vals] + [False] * len(failed))})
  vals = [(sh, s["jaxlora"]["peak_bytes"], s["peft"]["peak_bytes"]) for sh, s in summary.items()
          if "jaxlora" in s and "peft" in s]
  out.append({"target": "jaxlora peak memory below PEFT's",
              "result": ", ".join(f"{sh} {_gib(a)} vs {_gib(b)}" for sh, a, b in vals) or "-",
              "verdict": verdict([a < b for _, a, b in vals])})
  if FITS_SHAPE in shapes:
    st = results.get((FITS_SHAPE, "jaxlora"), {}).get("status", "not run")
    out.append({"target": f"jaxlora fits {FITS_SHAPE}", "result": st,
                "verdict": "met" if st == "ok" else "missed"})
  else:
    out.append({"target": f"jaxlora fits {FITS_SHAPE}", "result": "-",
                "verdict": "n/a (not run)"})
  return out


def main():
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--shapes", default=",".join(SHAPES),
                  help=f"comma-separated, from {', '.join(ALL_SHAPES)}")
  ap.add_argument("--variants", default=",".join(VARIANTS), help="jaxlora,peft")
  ap.add_argument("--attention", default="auto",
                  help="jaxlora attention implementation (Decoder(attention=...)): auto, xla, "
                       "cudnn, ...")
  ap.add_argument("--remat", default="none", choices=REMAT, help="jaxlora remat policy")
  ap.add_argument("--loss-chunk", type=int, default=0,
                  help="jaxlora: chunked_cross_entropy with this chunk size; 0 = full logits")
  ap.add_argument("--steps", type=int, default=10, help="timed steps per variant")
  ap.add_argument("--warmup", type=int, default=2, help="untimed steps first (compile included)")
  ap.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
  ap.add_argument("--peak-tflops", type=float, default=PEAK_TFLOPS,
                  help="the MFU basis; 989 = bf16 dense H100 / H200 SXM")
  ap.add_argument("--checkpoint-dir", default=None,
                  help="keep (and reuse) the random checkpoints here instead of a temp dir")
  ap.add_argument("--child-timeout", type=float, default=1800.0, help="seconds per subprocess")
  ap.add_argument("--smoke", action="store_true",
                  help="CPU, tiny model (2 layers, hidden 64, vocab 256), 2 x 32 tokens")
  ap.add_argument("--json", default=None, help="write the results to this path")
  ap.add_argument("--child", choices=VARIANTS, default=None, help=argparse.SUPPRESS)
  ap.add_argument("--shape", default=None, help=argparse.SUPPRESS)
  ap.add_argument("--checkpoint", default=None, help=argparse.SUPPRESS)
  ap.add_argument("--make-checkpoint", default=None, help=argparse.SUPPRESS)
  ap.add_argument("--model", default=None, help=argparse.SUPPRESS)
  args = ap.parse_args()
  if args.make_checkpoint:
    return make_checkpoint(args.model, args.make_checkpoint, args.dtype)
  if args.child:
    return child(args)

  if args.smoke:
    args.shapes = ",".join(SMOKE_SHAPES)
    args.steps, args.warmup = min(args.steps, 3), 1
  shapes = [s for s in args.shapes.split(",") if s]
  variants = [v for v in args.variants.split(",") if v]
  bad = [s for s in shapes if s not in ALL_SHAPES] + [v for v in variants if v not in VARIANTS]
  if bad:
    ap.error(f"unknown shapes/variants {bad}; shapes: {list(ALL_SHAPES)}, variants: "
             f"{list(VARIANTS)}")
  if args.loss_chunk < 0 or args.steps < 1 or args.warmup < 1:
    ap.error("--loss-chunk must be >= 0, --steps and --warmup >= 1")

  print(f"jaxlora vs PEFT LoRA step: r={RANK} alpha={ALPHA} on {'/'.join(TARGET_MODULES)}, "
        f"adamw lr {LR} wd {WEIGHT_DECAY}, {args.dtype} base; jaxlora attention="
        f"{args.attention} remat={args.remat} loss-chunk={args.loss_chunk or 'off (full logits)'}; "
        f"{args.warmup} warm-up + {args.steps} timed steps per variant, one subprocess each")
  print(f"host: {machine.cpu_model()}, {os.cpu_count()} CPUs, {machine.ram_gib():.0f} GiB RAM, "
        f"Python {platform.python_version()}" + ("; --smoke: CPU only" if args.smoke else ""),
        flush=True)

  results = {}
  tmp = None if args.checkpoint_dir else tempfile.mkdtemp(prefix="gpu_step_time_")
  base = args.checkpoint_dir or tmp
  try:
    for model_name in dict.fromkeys(ALL_SHAPES[s][0] for s in shapes):
      ckpt = os.path.join(base, f"{model_name}-{args.dtype}")
      if not os.path.exists(os.path.join(ckpt, "config.json")):
        t0 = time.perf_counter()
        r = _run([sys.executable, os.path.abspath(__file__), "--make-checkpoint", ckpt,
                  "--model", model_name, "--dtype", args.dtype], None, args.child_timeout)
        if isinstance(r, subprocess.TimeoutExpired) or r.returncode != 0:
          sys.exit(f"making the {model_name} checkpoint failed:\n"
                   f"{getattr(r, 'stderr', '') or r}")
        print(f"{model_name}: random checkpoint saved in {time.perf_counter() - t0:.1f} s",
              flush=True)
      for shape in (s for s in shapes if ALL_SHAPES[s][0] == model_name):
        # --smoke runs the variants side by side (its timings mean nothing; it saves CI time);
        # otherwise one at a time, so that each has the device to itself.
        with concurrent.futures.ThreadPoolExecutor(len(variants) if args.smoke else 1) as ex:
          rows = list(ex.map(lambda v: run_variant(args, v, shape, ckpt), variants))
        for v, row in zip(variants, rows):
          results[(shape, v)] = row
          if row["status"] == "ok":
            print(f"  {shape:11s} {v:8s} {row['step_s'] * 1e3:9.1f} ms/step (first step "
                  f"{row['first_step_s']:.1f} s), peak {_gib(row['peak_bytes'])} "
                  f"({row['peak_kind']}), loss {row['first_loss']:.5f}, {row['trainable']:,} "
                  f"trainable in {row['adapted_kernels']} adapted kernels; {row['device']}; "
                  f"{row['versions']}", flush=True)
          else:
            print(f"  {shape:11s} {v:8s} {row['status']}: {row['error']}", flush=True)
      if tmp:
        shutil.rmtree(ckpt, ignore_errors=True)
  finally:
    if tmp:
      shutil.rmtree(tmp, ignore_errors=True)

  summary, targets = report(args, shapes, results)
  problems = [f"{sh} {v}: {r['status']}" for (sh, v), r in results.items()
              if r["status"] not in ("ok", "OOM") or (args.smoke and r["status"] != "ok")]
  problems += [f"{sh}: first-step losses differ by {s['loss_diff']:.2e}"
               for sh, s in summary.items() if s.get("loss_ok") is False]
  counts = {(sh, r["trainable"]) for (sh, _), r in results.items() if r["status"] == "ok"}
  for sh in shapes:
    if len({c for s, c in counts if s == sh}) > 1:
      problems.append(f"{sh}: trainable parameter counts differ between the variants")
  if args.json:
    with open(args.json, "w") as f:
      json.dump({"args": vars(args), "peak_tflops": args.peak_tflops,
                 "formula": FORMULA.format(peak=args.peak_tflops),
                 "rows": [r for r in results.values()],
                 "summary": summary, "targets": targets, "problems": problems}, f, indent=1)
    print(f"\nwrote {args.json}")
  if problems:
    print("\nproblems: " + "; ".join(problems))
    sys.exit(1)


if __name__ == "__main__":
  main()
