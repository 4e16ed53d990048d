"""Sharded LoRA training: per-device bytes for each mesh, and step time on 1 vs 8 devices.

One invocation runs two child processes side by side (a CPU backend's device
count is fixed when JAX starts): one with a single CPU device, one with eight
simulated CPU devices (``--xla_force_host_platform_device_count=8``), and
alternates them over ``--reps`` rounds. Each child builds the same Llama-shaped
model, places the base params directly into their shards, wraps them
(r=16, all linear layers) and runs the training step of ``jaxlora train``
(``jaxlora_cli.trainer.make_train_step``: adamw, jit with in/out shardings,
batch over data x fsdp) for each mesh:

  1 device     the single-device process
  fsdp=8       FSDP over all eight
  fsdp4_tp2    FSDP 4 x tensor parallel 2 (FSDP+TP rules)
  dp2_fsdp4    data parallel 2 x FSDP 4

Per-device bytes are read from the arrays (the largest total over devices of
the addressable shards' sizes), not computed; ``memory_plan`` (computed from
shapes alone) is printed beside them. Eight simulated devices share the same
CPU cores, so the 8-device step is expected to be slower; the point is that it
runs, and the ratio says what the collectives and the smaller per-device
matmuls cost on CPU.

Usage:
  python benchmarks/scale.py                 # defaults below
  python benchmarks/scale.py --layers 2 --reps 1 --steps 2   # smoke run
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import platform
import statistics
import subprocess
import sys
import time

import machine  # benchmarks/machine.py, beside this script

MESHES = {"1 device": dict(data=1, fsdp=1, tensor=1, rules="fsdp"),
          "fsdp=8": dict(data=1, fsdp=8, tensor=1, rules="fsdp"),
          "fsdp4_tp2": dict(data=1, fsdp=4, tensor=2, rules="fsdp_tp"),
          "dp2_fsdp4": dict(data=2, fsdp=4, tensor=1, rules="fsdp")}


def _child(args) -> None:
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel
  import optax  # pylint: disable=import-outside-toplevel
  from jax.sharding import NamedSharding, PartitionSpec as P  # pylint: disable=import-outside-toplevel

  import jaxlora  # pylint: disable=import-outside-toplevel
  from jaxlora_cli import trainer  # pylint: disable=import-outside-toplevel

  cfg = jaxlora.models.ModelConfig(
      "llama", vocab_size=args.vocab, hidden_size=args.d, num_hidden_layers=args.layers,
      num_attention_heads=args.heads, num_key_value_heads=args.heads // 2,
      head_dim=args.d // args.heads, intermediate_size=args.mlp, max_position_embeddings=args.seq,
      norm_eps=1e-5, tie_word_embeddings=False)
  model = jaxlora.models.Decoder(cfg)
  tx = optax.adamw(1e-4)
  rng = np.random.default_rng(0)
  ids = rng.integers(0, args.vocab, (1, args.batch, args.seq), dtype=np.int32)
  host_batch = {"input_ids": ids, "attention_mask": np.ones_like(ids),
                "targets": np.ones(ids.shape, np.float32)}

  def per_device(tree) -> tuple[int, int]:
    used = collections.Counter()
    for x in jax.tree.leaves(tree):
      for s in x.addressable_shards:
        used[s.device] += s.data.nbytes
    return max(used.values()), min(used.values())

  out = {}
  for name in args.meshes.split(","):
    m = MESHES[name]
    mesh = jaxlora.sharding.make_mesh(data=m["data"], fsdp=m["fsdp"], tensor=m["tensor"])
    rules = (jaxlora.sharding.FSDP_TP_RULES if m["rules"] == "fsdp_tp"
             else jaxlora.sharding.FSDP_RULES)
    base_sh = jaxlora.sharding.param_shardings(model, mesh, rules)
    # Created directly in their shards: no full copy of the base on any device.
    params = jax.jit(lambda k: jaxlora.models.init(model, k), out_shardings=base_sh)(
        jax.random.key(0))
    tree = jaxlora.wrap(params, rank=args.rank, layout=model, key=jax.random.key(1))
    t_sh, f_sh = jaxlora.split(jaxlora.sharding.tree_shardings(tree, base_sh))
    trainable, frozen = jaxlora.split(tree)
    trainable, frozen = jax.device_put(trainable, t_sh), jax.device_put(frozen, f_sh)
    o_sh = jaxlora.sharding.opt_state_shardings(tx, trainable, t_sh, mesh)
    opt_state = jax.jit(tx.init, out_shardings=o_sh)(trainable)
    rep = NamedSharding(mesh, P())
    b_sh = NamedSharding(mesh, P(None, ("data", "fsdp"), None))
    step = trainer.make_train_step(model, tx, 0.0, (t_sh, o_sh, f_sh, b_sh, rep))
    batch = jax.device_put(host_batch, b_sh)
    key = jax.random.key(2)
    trainable, opt_state, m_out = step(trainable, opt_state, frozen, batch, key)  # compile
    float(m_out["loss"])
    times = []
    for _ in range(args.steps):
      t0 = time.perf_counter()
      trainable, opt_state, m_out = step(trainable, opt_state, frozen, batch, key)
      float(m_out["loss"])
      times.append(time.perf_counter() - t0)
    plan = jaxlora.sharding.memory_plan(model, mesh, rank=args.rank, rules=rules, tx=tx)
    base_max, base_min = per_device(params)
    out[name] = {
        "devices": mesh.size, "step_s": statistics.median(times), "loss": float(m_out["loss"]),
        "base": base_max, "base_min": base_min, "adapter": per_device(jaxlora.adapter(trainable))[0],
        "optimizer": per_device(opt_state)[0],
        "base_total": sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(params)),
        "plan": plan}
    del params, tree, trainable, frozen, opt_state
  print("RESULT " + json.dumps(out))


def _run_child(args, devices: int, meshes: str) -> dict:
  env = {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}"}
  cmd = [sys.executable, os.path.abspath(__file__), "--child", "--meshes", meshes,
         *[f"--{k}={getattr(args, k)}" for k in ("layers", "d", "heads", "mlp", "vocab", "seq",
                                                  "batch", "rank", "steps")]]
  proc = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
  lines = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
  if proc.returncode or not lines:
    raise SystemExit(f"child failed ({devices} devices):\n{proc.stderr[-3000:]}")
  return json.loads(lines[-1][len("RESULT "):])


def _mib(n: int) -> str:
  return f"{n / 2**20:8.2f}"


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
  ap.add_argument("--meshes", default="", help=argparse.SUPPRESS)
  ap.add_argument("--layers", type=int, default=4)
  ap.add_argument("--d", type=int, default=512)
  ap.add_argument("--heads", type=int, default=8)
  ap.add_argument("--mlp", type=int, default=1408)
  ap.add_argument("--vocab", type=int, default=8192)
  ap.add_argument("--seq", type=int, default=256)
  ap.add_argument("--batch", type=int, default=8)
  ap.add_argument("--rank", type=int, default=16)
  ap.add_argument("--steps", type=int, default=5, help="timed steps per mesh and round")
  ap.add_argument("--reps", type=int, default=3, help="rounds; each runs both children")
  args = ap.parse_args()
  if args.child:
    _child(args)
    return
  print(f"machine: {machine.cpu_model()}, {os.cpu_count()} cores, {machine.ram_gib():.0f} GiB; "
        f"python {platform.python_version()}")
  print(f"model: llama d={args.d} layers={args.layers} heads={args.heads} mlp={args.mlp} "
        f"vocab={args.vocab}; batch {args.batch}x{args.seq}; r={args.rank} all linear; adamw; fp32")
  eight = ",".join(n for n in MESHES if n != "1 device")
  rounds = []
  for _ in range(args.reps):  # alternate, so that drift in machine load hits both alike
    rounds.append({**_run_child(args, 1, "1 device"), **_run_child(args, 8, eight)})
  last = rounds[-1]
  print("\nper-device bytes, MiB (largest device; read from the arrays' shards) "
        "and memory_plan's figure")
  print(f"{'mesh':>10} {'devices':>7} {'base':>8} {'plan':>8} {'adapter':>8} {'plan':>8} "
        f"{'opt':>8} {'plan':>8} {'base/1dev':>9}")
  one_base = last["1 device"]["base"]
  for name, r in last.items():
    print(f"{name:>10} {r['devices']:>7} {_mib(r['base'])} {_mib(r['plan']['base'])} "
          f"{_mib(r['adapter'])} {_mib(r['plan']['adapter'])} {_mib(r['optimizer'])} "
          f"{_mib(r['plan']['optimizer'])} {r['base'] / one_base:9.3f}")
  print("\nstep time, s (median over rounds of the per-round median) and ratio to 1 device")
  one = statistics.median(r["1 device"]["step_s"] for r in rounds)
  for name in MESHES:
    t = statistics.median(r[name]["step_s"] for r in rounds)
    loss_gap = abs(last[name]["loss"] - last["1 device"]["loss"]) / abs(last["1 device"]["loss"])
    print(f"{name:>10}: {t:7.3f} s  {t / one:5.2f}x   (loss after the steps: "
          f"{last[name]['loss']:.6f}, rel. diff to 1 device {loss_gap:.1e})")


if __name__ == "__main__":
  main()
