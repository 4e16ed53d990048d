"""Training step time and peak memory: jaxlora vs Hugging Face PEFT (PyTorch) on GPT-2 small.

Measures, side by side in one invocation (variants alternate over ``--reps``
repetitions, order rotated each repetition; the median is reported):

  jax-lora    jaxlora LoRA step: ``jaxlora.models.Decoder`` loaded with
              ``jaxlora.models.from_pretrained``, r=16, alpha=16 on ``attn/c_attn``,
              ``attn/c_proj``, ``mlp/c_fc``, ``mlp/c_proj`` (``targets='all-linear'``,
              ``layout=model``), factored forward through ``jaxlora.apply``, gradients
              with respect to the trainable half of ``jaxlora.split`` only, optax adamw on
              that half; one jitted step, the frozen half passed as a jit argument
  peft-lora   Hugging Face PEFT on PyTorch: ``GPT2LMHeadModel`` + ``get_peft_model`` with
              the same targets (``['c_attn', 'c_proj', 'c_fc']``), rank, alpha,
              ``lora_dropout=0``; ``torch.optim.AdamW`` on the trainable params,
              ``model.train()``, loss from ``labels=input_ids``, zero_grad/backward/step
  jax-full    full fine-tuning in jaxlora's Decoder: every param trainable, optax adamw
  torch-full  full fine-tuning of the plain ``GPT2LMHeadModel`` with ``torch.optim.AdamW``

Both frameworks start from identical random weights: a ``GPT2LMHeadModel`` is
built from a ``GPT2Config`` (random init, seed 0, no download), saved with
``save_pretrained`` to a temporary directory, and loaded from there by
``jaxlora.models.from_pretrained`` and by ``GPT2LMHeadModel.from_pretrained``.
Dropout probabilities in the config are 0 (jaxlora's Decoder has no dropout), so
both compute the same function; the script checks that the first-step losses of
all four variants agree on the same batch. Loss: next-token cross-entropy, mean
over the ``batch * (seq - 1)`` shifted positions (what ``labels=input_ids`` does).
float32 throughout; optimizers: adamw, lr 1e-4, weight decay 0.01 in both.

Threads: ``torch.set_num_threads(--threads)``; XLA:CPU uses one thread per core
of the machine (the run is meant for a 2-core machine, where both get 2).

Peak memory of each variant is the peak RSS (``ru_maxrss``) of a separate
subprocess that loads the checkpoint and runs two steps of that variant alone.
The subprocesses start before this process imports a framework (a child's
``ru_maxrss`` starts from its parent's resident size), and each imports only
its own framework; the RSS after imports is reported as the baseline.

Usage:
  python benchmarks/peer_step_time.py                                # full spec
  python benchmarks/peer_step_time.py --layers 2 --seq 64 --reps 2   # smoke run
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
import tempfile
import time

import machine  # benchmarks/machine.py, beside this script

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

VOCAB = 50257
D_MODEL = 768
HEADS = 12
D_MLP = 3072
N_POSITIONS = 1024
RANK = 16
ALPHA = 16
LR = 1e-4
WEIGHT_DECAY = 0.01
VARIANTS = ("jax-lora", "peft-lora", "jax-full", "torch-full")
NAMES = {"jax-lora": "jaxlora LoRA", "peft-lora": "PEFT LoRA (PyTorch)",
         "jax-full": "jaxlora full fine-tuning", "torch-full": "PyTorch full fine-tuning"}


def _rss() -> int:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def _tokens(args):
  import numpy as np
  rng = np.random.default_rng(0)
  return rng.integers(0, VOCAB, (args.batch, args.seq)).astype(np.int64)


# ----------------------------------------------------------------------------- checkpoint


def make_checkpoint(args, path):
  """Random-init GPT-2 (seed 0) saved in Hugging Face format; runs in a subprocess."""
  import torch
  import transformers
  torch.manual_seed(0)
  cfg = transformers.GPT2Config(
      vocab_size=VOCAB, n_positions=N_POSITIONS, n_embd=D_MODEL, n_layer=args.layers,
      n_head=HEADS, n_inner=D_MLP, activation_function="gelu_new", tie_word_embeddings=True,
      resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
  model = transformers.GPT2LMHeadModel(cfg)
  model.save_pretrained(path)


# ----------------------------------------------------------------------------- jaxlora


def build_jax(args, variant, donate_params):
  """Returns ``(step, state, extra_args, data, n_trainable)``; step(*state, *extra, *data)."""
  import jax
  import jax.numpy as jnp
  import optax
  import jaxlora

  model, params = jaxlora.models.from_pretrained(args.checkpoint)
  model = model.clone(scan_unroll=args.scan_unroll)
  ids = jnp.asarray(_tokens(args), jnp.int32)
  tx = optax.adamw(LR, weight_decay=WEIGHT_DECAY)

  def xent(logits, ids):
    return optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], ids[:, 1:]).mean()

  count = lambda t: sum(x.size for x in jax.tree.leaves(t))
  if variant == "jax-full":
    def loss_fn(p, ids):
      return xent(model.apply({"params": p}, ids), ids)

    def step(p, opt, ids):
      loss, g = jax.value_and_grad(loss_fn)(p, ids)
      upd, opt = tx.update(g, opt, p)
      return optax.apply_updates(p, upd), opt, loss

    p = params if donate_params else jax.tree.map(jnp.copy, params)
    return (jax.jit(step, donate_argnums=(0, 1)), [p, tx.init(p)], (), (ids,), count(params))

  tree = jaxlora.wrap(params, rank=RANK, alpha=ALPHA, targets="all-linear", layout=model,
                      key=jax.random.key(1))
  trainable, frozen = jaxlora.split(tree)
  fwd = jaxlora.apply(model.apply)

  def lora_loss(t, f, ids):
    return xent(fwd({"params": jaxlora.combine(t, f)}, ids), ids)

  def lora_step(t, opt, f, ids):
    loss, g = jax.value_and_grad(lora_loss)(t, f, ids)
    upd, opt = tx.update(g, opt, t)
    return optax.apply_updates(t, upd), opt, loss

  return (jax.jit(lora_step, donate_argnums=(0, 1)), [trainable, tx.init(trainable)],
          (frozen,), (ids,), count(trainable))


class JaxRunner:
  def __init__(self, args, variant, donate_params=False):
    self.fn, self.state, self.extra, self.data, self.n_trainable = build_jax(
        args, variant, donate_params)

  def step(self):
    import jax
    t0 = time.perf_counter()
    *self.state, loss = self.fn(*self.state, *self.extra, *self.data)
    jax.block_until_ready((self.state, loss))
    return time.perf_counter() - t0, float(loss)


# ----------------------------------------------------------------------------- PyTorch


class TorchRunner:
  def __init__(self, args, variant):
    import torch
    import transformers
    torch.set_num_threads(args.threads)
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    model = transformers.GPT2LMHeadModel.from_pretrained(args.checkpoint,
                                                         dtype=torch.float32)
    if variant == "peft-lora":
      import peft
      cfg = peft.LoraConfig(r=RANK, lora_alpha=ALPHA, lora_dropout=0.0,
                            target_modules=["c_attn", "c_proj", "c_fc"], fan_in_fan_out=True,
                            bias="none", task_type="CAUSAL_LM")
      model = peft.get_peft_model(model, cfg)
    model.train()
    self.model = model
    self.params = [p for p in model.parameters() if p.requires_grad]
    self.n_trainable = sum(p.numel() for p in self.params)
    self.opt = torch.optim.AdamW(self.params, lr=LR, weight_decay=WEIGHT_DECAY)
    self.ids = torch.from_numpy(_tokens(args))
    self.attn_impl = getattr(model.config, "_attn_implementation", "?")

  def step(self):
    t0 = time.perf_counter()
    self.opt.zero_grad(set_to_none=True)
    loss = self.model(input_ids=self.ids, labels=self.ids).loss
    loss.backward()
    self.opt.step()
    loss = loss.item()  # synchronous on CPU; .item() just reads the scalar
    return time.perf_counter() - t0, loss


def make_runner(args, variant, donate_params=False):
  if variant.startswith(("jax", )):
    return JaxRunner(args, variant, donate_params)
  return TorchRunner(args, variant)


# ----------------------------------------------------------------------------- memory


def peak_rss_child(args):
  """Runs in a subprocess: imports one framework, two steps of one variant, prints peak RSS."""
  start = _rss()
  v = args.memory_child
  if v.startswith("jax"):
    import jax  # noqa: F401
    import optax  # noqa: F401
    import jaxlora  # noqa: F401
  else:
    import torch  # noqa: F401
    import transformers  # noqa: F401
    import peft  # noqa: F401
  imported = _rss()
  # Only one variant runs here, so full fine-tuning may update the loaded params in place.
  r = make_runner(args, v, donate_params=True)
  for _ in range(2):
    r.step()
  print(json.dumps({"variant": v, "peak_rss": _rss(), "start_rss": start,
                    "import_rss": imported,
                    "other_framework_loaded": ("torch" in sys.modules) if v.startswith("jax")
                    else ("jax" in sys.modules)}))


def _child(args, *extra):
  cmd = [sys.executable, os.path.abspath(__file__), "--layers", str(args.layers),
         "--batch", str(args.batch), "--seq", str(args.seq), "--threads", str(args.threads),
         "--scan-unroll", str(args.scan_unroll),
         *extra]
  return subprocess.run(cmd, check=True, capture_output=True, text=True).stdout


def measure_peaks(args):
  peaks = {}
  for v in VARIANTS:
    out = _child(args, "--memory-child", v, "--checkpoint", args.checkpoint)
    peaks[v] = json.loads(out.strip().splitlines()[-1])
    print(f"  {v:10s} peak RSS {peaks[v]['peak_rss'] / 2**30:.2f} GiB "
          f"(after imports {peaks[v]['import_rss'] / 2**30:.2f} GiB; other framework loaded: "
          f"{peaks[v]['other_framework_loaded']})", flush=True)
  return peaks


# ----------------------------------------------------------------------------- main


def main():
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--layers", type=int, default=12)
  ap.add_argument("--batch", type=int, default=4)
  ap.add_argument("--seq", type=int, default=256)
  ap.add_argument("--reps", type=int, default=5, help="timed repetitions per variant")
  ap.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
  ap.add_argument("--scan-unroll", type=int, default=1,
                  help="layers per nn.scan iteration in jaxlora (layers = fully unrolled)")
  ap.add_argument("--no-memory", action="store_true", help="skip the peak-RSS subprocesses")
  ap.add_argument("--memory-child", choices=VARIANTS, default=None, help=argparse.SUPPRESS)
  ap.add_argument("--make-checkpoint", default=None, help=argparse.SUPPRESS)
  ap.add_argument("--checkpoint", default=None, help=argparse.SUPPRESS)
  args = ap.parse_args()
  if args.make_checkpoint:
    return make_checkpoint(args, args.make_checkpoint)
  if args.memory_child:
    return peak_rss_child(args)

  print(f"GPT-2 small config: layers={args.layers} d={D_MODEL} heads={HEADS} mlp={D_MLP} "
        f"vocab={VOCAB} n_positions={N_POSITIONS}, tied embeddings, random weights, float32; "
        f"batch {args.batch} x {args.seq} tokens; LoRA r={RANK} alpha={ALPHA} on "
        f"c_attn/attn.c_proj/c_fc/mlp.c_proj; adamw lr {LR} wd {WEIGHT_DECAY}")
  print(f"{machine.cpu_model()}, {os.cpu_count()} CPUs, {machine.ram_gib():.0f} GiB RAM, "
        f"Python {platform.python_version()}", flush=True)

  with tempfile.TemporaryDirectory() as ckpt:
    args.checkpoint = ckpt
    _child(args, "--make-checkpoint", ckpt)  # torch is imported there, not here
    peaks = None
    if not args.no_memory:
      print("peak memory (one subprocess per variant) ...", flush=True)
      peaks = measure_peaks(args)
    run(args, peaks)


def run(args, peaks):
  import jax
  import optax
  import peft
  import torch
  import transformers
  torch.set_num_threads(args.threads)
  print(f"jax {jax.__version__} ({jax.devices()[0].platform}, {len(jax.devices())} device), "
        f"optax {optax.__version__}, torch {torch.__version__} "
        f"({torch.get_num_threads()} threads), transformers {transformers.__version__}, "
        f"peft {peft.__version__}", flush=True)

  runners = {v: make_runner(args, v) for v in VARIANTS}
  print("attention in PyTorch: " + runners["torch-full"].attn_impl)
  print("trainable parameters: " + ", ".join(f"{v} {r.n_trainable:,}"
                                              for v, r in runners.items()), flush=True)

  print("compiling and warming up ...", flush=True)
  first_loss = {}
  for v, r in runners.items():
    t0 = time.perf_counter()
    _, first_loss[v] = r.step()  # jax: compile; torch: first step (allocator, oneDNN)
    r.step()
    print(f"  {v:10s} first two steps {time.perf_counter() - t0:6.1f} s", flush=True)
  # Same weights, same batch, B = 0 at the start: all four losses are the base model's.
  ref = first_loss["torch-full"]
  print("initial loss (step 1, same batch): " + ", ".join(
      f"{v} {first_loss[v]:.6f}" for v in VARIANTS))
  diff = max(abs(first_loss[v] - ref) for v in VARIANTS)
  print(f"  max |difference| {diff:.2e} "
        f"({'OK' if diff <= 1e-4 * max(1.0, abs(ref)) else 'MISMATCH'})", flush=True)

  times = {v: [] for v in VARIANTS}
  order = list(VARIANTS)
  for rep in range(args.reps):
    rot = order[rep % len(order):] + order[:rep % len(order)]
    for v in rot:
      times[v].append(runners[v].step()[0])
    print(f"  rep {rep + 1}/{args.reps}: " +
          " ".join(f"{v}={times[v][-1]:.3f}" for v in order), flush=True)
  med = {v: statistics.median(t) for v, t in times.items()}
  low = {v: min(t) for v, t in times.items()}

  print()
  print("| variant | median time / step | min time | peak RSS |")
  print("|---|---:|---:|---:|")
  for v in VARIANTS:
    mem = "-" if peaks is None else f"{peaks[v]['peak_rss'] / 2**30:.2f} GiB"
    print(f"| {NAMES[v]} | {med[v]:.3f} s | {low[v]:.3f} s | {mem} |")
  print()
  print("| ratio | median time | min time | peak RSS |")
  print("|---|---:|---:|---:|")
  ratios = [("jaxlora LoRA / PEFT LoRA (target <= 0.80x)", "jax-lora", "peft-lora"),
            ("jaxlora full / PyTorch full", "jax-full", "torch-full"),
            ("jaxlora LoRA / jaxlora full", "jax-lora", "jax-full"),
            ("PEFT LoRA / PyTorch full", "peft-lora", "torch-full")]
  for name, a, b in ratios:
    mem = ("-" if peaks is None
           else f"{peaks[a]['peak_rss'] / peaks[b]['peak_rss']:.2f}x")
    print(f"| {name} | {med[a] / med[b]:.2f}x | {low[a] / low[b]:.2f}x | {mem} |")
  print()
  r = med["jax-lora"] / med["peft-lora"]
  print(f"target jaxlora LoRA / PEFT LoRA <= 0.80x: {r:.2f}x "
        f"({'met' if r <= 0.8 else 'missed'})")
  print("all samples (s): " + json.dumps({v: [round(t, 4) for t in s] for v, s in times.items()}))


if __name__ == "__main__":
  main()
