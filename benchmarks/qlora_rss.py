"""Peak host memory of loading a checkpoint as a QLoRA (NF4) base versus a plain bf16 load.

Writes a random GPT-2-medium-sized float checkpoint (bf16 safetensors, ~355M
parameters), then loads it in fresh processes, once with
``from_pretrained(dtype=bf16, param_dtype=bf16)`` and once with
``quantize='nf4'`` on top, and reads each process' peak resident set size
(``resource.getrusage(RUSAGE_SELF).ru_maxrss``). JAX's CPU device buffers are
host memory, so both numbers include the loaded params; the interpreter with
jax and jaxlora imported (``import_rss_mb``) is the floor under both.

    python benchmarks/qlora_rss.py [--n-layer 24 --n-embd 1024 --vocab 50257 --dir DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile


def _rss_mb() -> float:
  import resource  # pylint: disable=import-outside-toplevel
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kB on Linux


def _write_checkpoint(path: str, n_layer: int, n_embd: int, vocab: int) -> None:
  import ml_dtypes  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel
  import jax  # pylint: disable=import-outside-toplevel
  import flax.linen as nn  # pylint: disable=import-outside-toplevel
  import jaxlora  # pylint: disable=import-outside-toplevel
  from jaxlora.models.decoder import abstract_variables  # pylint: disable=import-outside-toplevel
  heads = max(1, n_embd // 64)
  cfg = jaxlora.models.ModelConfig("gpt2", vocab, n_embd, n_layer, heads, heads, n_embd // heads,
                                   4 * n_embd, 1024, 1e-5, True, activation="gelu_new")
  model = jaxlora.models.Decoder(cfg)
  rng = np.random.default_rng(0)
  abstract = nn.unbox(abstract_variables(model))["params"]
  params = jax.tree.map(
      lambda a: (0.02 * rng.standard_normal(a.shape, np.float32)).astype(ml_dtypes.bfloat16),
      abstract)
  jaxlora.models.save_pretrained(path, model, params)


def _load(path: str, quantize: str | None) -> dict:
  base = _rss_mb()
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  import jaxlora  # pylint: disable=import-outside-toplevel
  jnp.zeros(()).block_until_ready()  # the CPU client, as every load has it
  imported = _rss_mb()
  _, params = jaxlora.models.from_pretrained(path, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16,
                                             quantize=quantize)
  jax.block_until_ready(params)
  nbytes = sum(x.nbytes for x in jax.tree.leaves(params))
  return {"python_rss_mb": base, "import_rss_mb": imported, "peak_rss_mb": _rss_mb(),
          "params_mb": nbytes / 2**20}


def _child(*args: str, platform: str | None) -> dict:
  env = dict(os.environ)
  if platform:
    env["JAX_PLATFORMS"] = platform
  out = subprocess.run([sys.executable, os.path.abspath(__file__), *args], env=env,
                       check=False, capture_output=True, text=True)
  if out.returncode:
    raise RuntimeError(f"{' '.join(args)} failed:\n{out.stderr[-4000:]}")
  return json.loads(out.stdout.strip().splitlines()[-1])


def measure(tmpdir: str, *, n_layer: int = 24, n_embd: int = 1024, vocab: int = 50257,
            platform: str | None = "cpu") -> dict:
  """Peak RSS (MiB) of a bf16 load and of an NF4 load of the same checkpoint, each in a new process.

  Args:
    tmpdir: directory for the checkpoint (reused when it already holds one).
    n_layer, n_embd, vocab: GPT-2 shape (defaults: GPT-2 medium, ~355M params).
    platform: ``JAX_PLATFORMS`` for the loading processes (None: inherit).

  Returns:
    ``{'bf16_rss_mb', 'nf4_rss_mb', 'ratio'}`` plus ``import_rss_mb`` (the
    process after importing jax and jaxlora, before loading),
    ``checkpoint_mb``, and ``bf16_params_mb`` / ``nf4_params_mb`` (bytes of
    the loaded arrays).
  """
  path = os.path.join(tmpdir, f"gpt2-{n_layer}x{n_embd}-{vocab}")
  if not os.path.isfile(os.path.join(path, "config.json")):
    _child("--write", path, str(n_layer), str(n_embd), str(vocab), platform=platform)
  bf16 = _child("--load", path, "none", platform=platform)
  nf4 = _child("--load", path, "nf4", platform=platform)
  ckpt = sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path)) / 2**20
  return {"bf16_rss_mb": round(bf16["peak_rss_mb"], 1), "nf4_rss_mb": round(nf4["peak_rss_mb"], 1),
          "ratio": round(nf4["peak_rss_mb"] / bf16["peak_rss_mb"], 3),
          "import_rss_mb": round(min(bf16["import_rss_mb"], nf4["import_rss_mb"]), 1),
          "checkpoint_mb": round(ckpt, 1), "bf16_params_mb": round(bf16["params_mb"], 1),
          "nf4_params_mb": round(nf4["params_mb"], 1)}


def main() -> None:
  if len(sys.argv) > 1 and sys.argv[1] == "--write":
    _write_checkpoint(sys.argv[2], *(int(a) for a in sys.argv[3:6]))
    print("{}")
    return
  if len(sys.argv) > 1 and sys.argv[1] == "--load":
    print(json.dumps(_load(sys.argv[2], None if sys.argv[3] == "none" else sys.argv[3])))
    return
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--n-layer", type=int, default=24)
  ap.add_argument("--n-embd", type=int, default=1024)
  ap.add_argument("--vocab", type=int, default=50257)
  ap.add_argument("--dir", default=None, help="checkpoint directory (default: a temporary one)")
  args = ap.parse_args()
  if args.dir:
    res = measure(args.dir, n_layer=args.n_layer, n_embd=args.n_embd, vocab=args.vocab)
  else:
    with tempfile.TemporaryDirectory() as d:
      res = measure(d, n_layer=args.n_layer, n_embd=args.n_embd, vocab=args.vocab)
  print(json.dumps(res, indent=2))


if __name__ == "__main__":
  main()
