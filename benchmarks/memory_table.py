"""Which remat policy to pick, by model size and context length: a table from `memory_plan`.

Prints (Markdown) the per-device bytes `jaxlora.sharding.memory_plan` computes for a
LoRA training step (bfloat16 base and compute, r=16 on every linear layer of every
block, float32 adapters, adamw) of Llama-3.2-1B and Llama-3-8B at 1k, 4k and 16k tokens
of context, on

  H200     one 141 GB GPU, the cuDNN attention path (``attention='cudnn'``, what
           ``'auto'`` picks on NVIDIA GPUs);
  v5e-8    eight 16 GiB TPU v5e chips, FSDP over all eight (``fsdp=8``), the splash
           attention path (``attention='splash'``, what ``'auto'`` picks on TPU).

Rows per device: 8 at 1k, 2 at 4k, 1 at 16k (8192, 8192 and 16384 tokens per device per
step). The loss is `jaxlora.models.chunked_cross_entropy` with chunks of 512 positions
(``--loss-chunk 0``: the full float32 logits). For each policy the table gives the
activations (saved residuals of all layers plus one layer's backward pass); "pick" is
the first of none, dots_no_batch, full (in order of recomputation cost) whose whole step
(base + adapters + optimizer state + activations + logits) fits in 90% of the device's
memory. offload_dots_no_batch needs the device memory of full and recomputes what
dots_no_batch recomputes, at the price of host transfers whose speed nothing here
measures; it is listed, not picked. Nothing is allocated: the
plan traces the models abstractly, on CPU (eight simulated devices stand in for the
v5e's mesh).

A second table sets the plan beside the peaks and step times measured on one H200
(benchmarks/gpu_step_time.py, reported in the project's design notes): full logits,
as that benchmark's default.

Usage:
  python benchmarks/memory_table.py
  python benchmarks/memory_table.py --loss-chunk 0     # full logits
"""

from __future__ import annotations

import argparse
import os
import sys

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                           + " --xla_force_host_platform_device_count=8").strip()

import jax  # noqa: E402  (after XLA_FLAGS)
import jax.numpy as jnp  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import jaxlora  # noqa: E402  (the checkout's copy, without installing it)

GIB = 2**30
LLAMA_1B = jaxlora.models.ModelConfig("llama", 128256, 2048, 16, 32, 8, 64, 8192, 131072,
                                      1e-5, True)
LLAMA_8B = jaxlora.models.ModelConfig("llama", 128256, 4096, 32, 32, 8, 128, 14336, 8192,
                                      1e-5, False)
MODELS = {"Llama-3.2-1B": LLAMA_1B, "Llama-3-8B": LLAMA_8B}
# name: (devices in the mesh, bytes per device, attention implementation)
HARDWARE = {"H200": (1, 141e9, "cudnn"), "v5e-8": (8, 16 * GIB, "splash")}
CONTEXTS = {1024: 8, 4096: 2, 16384: 1}  # context: rows per device
POLICIES = (None, "dots_no_batch", "offload_dots_no_batch", "full")
PICK_ORDER = (None, "dots_no_batch", "full")
FRACTION = 0.9

# Measured on one H200 (jaxlora, cuDNN path; bf16 base, r=16 all-linear, float32 adapters,
# adamw, full logits): (model, rows, context, remat, ms per step, peak GiB), quoted from the
# design notes. `remat` None where the notes do not name a policy.
MEASURED_H200 = [
    ("Llama-3.2-1B", 8, 1024, "none", "112 ms", "25 GiB"),
    ("Llama-3.2-1B", 2, 4096, "none", "127 ms", "25 GiB"),
    ("Llama-3.2-1B", 2, 4096, "dots_no_batch", "106 ms", "19 GiB"),
    ("Llama-3.2-1B", 8, 1024, "full", "200-450 ms (over the shapes)", "9-16 GiB"),
    ("Llama-3.2-1B", 2, 4096, "full", "200-450 ms (over the shapes)", "9-16 GiB"),
    ("Llama-3.2-1B", 1, 16384, None, "373 ms", "36 GiB"),
    ("Llama-3-8B", 4, 2048, None, "537 ms", "61 GiB"),
]
# The same step on the XLA attention path (dense mask), also measured on one H200.
MEASURED_H200_XLA = [
    ("Llama-3.2-1B", 8, 1024, "none", "230 ms", "59 GiB"),
    ("Llama-3.2-1B", 2, 4096, "none", "out of memory", "-"),
]


def plan(cfg, hardware, rows, seq, remat, loss_chunk, attention=None):
  devices, _, default_attention = HARDWARE[hardware]
  model = jaxlora.models.Decoder(cfg, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
  mesh = jaxlora.sharding.make_mesh(fsdp=devices, devices=jax.devices()[:devices])
  return jaxlora.sharding.memory_plan(model, mesh, rank=16, batch=rows * devices, seq=seq,
                                      remat=remat, attention=attention or default_attention,
                                      loss_chunk_size=loss_chunk)


def gib(x):
  return f"{x / GIB:.1f}"


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--loss-chunk", type=int, default=512,
                      help="chunk size of the chunked loss; 0 for the full logits")
  args = parser.parse_args()
  chunk = args.loss_chunk or None
  loss = f"chunked loss ({chunk} positions)" if chunk else "full float32 logits"

  print(f"Per-device GiB of a LoRA step ({loss}); activations per remat policy; pick: the "
        f"least recomputation whose step fits in {FRACTION:.0%} of the device.\n")
  names = ["none" if p is None else p for p in POLICIES]
  print("| model | hardware | rows x context per device | base + adapters + adamw | logits | "
        + " | ".join(f"activations, {n}" for n in names) + " | pick (step total) |")
  print("|" + " --- |" * (6 + len(POLICIES)))
  for model_name, cfg in MODELS.items():
    for hardware, (_, memory, _) in HARDWARE.items():
      for seq, rows in CONTEXTS.items():
        plans = {p: plan(cfg, hardware, rows, seq, p, chunk) for p in POLICIES}
        fixed = plans[None]["base"] + plans[None]["adapter"] + plans[None]["optimizer"]
        fits = [p for p in PICK_ORDER if plans[p]["total"] <= FRACTION * memory]
        if fits:
          pick = f"{'none' if fits[0] is None else fits[0]} ({gib(plans[fits[0]]['total'])})"
        else:
          pick = f"does not fit (full: {gib(plans['full']['total'])})"
        logits = plans[fits[0] if fits else "full"]["logits"]
        print(f"| {model_name} | {hardware} | {rows} x {seq} | {gib(fixed)} | {gib(logits)} | "
              + " | ".join(gib(plans[p]["activations"]) for p in POLICIES) + f" | {pick} |")

  print("\nThe plan beside measurements on one H200 (full float32 logits; peak = "
        "`peak_bytes_in_use`, everything the step holds).\n")
  print("| model | rows x context | attention | remat | plan: step total | measured peak "
        "| measured step time |")
  print("| --- | --- | --- | --- | --- | --- | --- |")
  for rows_, attention in ((MEASURED_H200, "cudnn"), (MEASURED_H200_XLA, "xla")):
    for model_name, rows, seq, remat, ms, peak in rows_:
      policies = ["none", "dots_no_batch"] if remat is None else [remat]
      totals = []
      for p in policies:
        total = plan(MODELS[model_name], "H200", rows, seq, None if p == "none" else p, None,
                     attention)["total"]
        totals.append(f"{gib(total)} ({p})" if remat is None else gib(total))
      label = "not stated" if remat is None else remat
      print(f"| {model_name} | {rows} x {seq} | {attention} | {label} | {', '.join(totals)} "
            f"| {peak} | {ms} |")


if __name__ == "__main__":
  main()
