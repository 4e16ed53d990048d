"""`jaxlora merge-adapters`: several PEFT adapters of one base into one (jaxlora.merge_adapters).

Kept apart from `jaxlora_cli.main` so that it imports nothing heavy at parse time.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

DESCRIPTION = (
    "Combine LoRA adapters of one base model into a new PEFT adapter with the combination types "
    "of PEFT's add_weighted_adapter: linear, cat, svd, ties, ties_svd, dare_linear, dare_ties, "
    "dare_linear_svd, dare_ties_svd, magnitude_prune, magnitude_prune_svd. Each DIR is a PEFT "
    "adapter directory (adapter_config.json) or a jaxlora run directory (its adapter_peft/). "
    "Only the base model's config.json is read, never its weights. `jaxlora merge` is a "
    "different command: it folds a run's adapter into the base weights.")


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
  """Registers ``merge-adapters`` on the subcommand set of the `jaxlora` parser.

  >>> import argparse
  >>> p = argparse.ArgumentParser(prog="jaxlora")
  >>> _ = add_parser(p.add_subparsers(dest="command"))
  >>> args = p.parse_args(["merge-adapters", "--adapters", "a=x,b=y", "--weights", "0.7,0.3",
  ...                      "--method", "ties", "--density", "0.5", "--out", "o"])
  >>> args.method, args.density, args.svd_rank
  ('ties', 0.5, None)
  """
  p = sub.add_parser("merge-adapters", help="combine PEFT adapters into one (ties, dare, svd, ...)",
                     description=DESCRIPTION)
  p.add_argument("--adapters", required=True, metavar="NAME=DIR,...",
                 help="comma-separated adapters, e.g. a=runs/a,b=adapters/b")
  p.add_argument("--weights", required=True, metavar="W,...",
                 help="one weight per adapter, same order, e.g. 0.7,0.3 (negative subtracts)")
  p.add_argument("--method", default="linear", help="combination type (linear)")
  p.add_argument("--density", type=float,
                 help="fraction of entries kept: ties, dare and magnitude_prune methods")
  p.add_argument("--majority-sign-method", default="total", choices=("total", "frequency"),
                 help="sign election of the ties methods (total)")
  p.add_argument("--svd-rank", type=int, help="rank of an svd method's result "
                 "(default: the largest adapter rank)")
  p.add_argument("--svd-clamp", type=float, help="clamp an svd method's factors at this quantile")
  p.add_argument("--seed", type=int, help="seed of the dare methods' random masks (0)")
  p.add_argument("--base", help="base checkpoint directory (default: the first adapter's "
                 "base_model_name_or_path)")
  p.add_argument("--out", required=True, help="output directory for the PEFT adapter")
  return p


def _error(message: str) -> Exception:
  """A `jaxlora_cli.config.ConfigError` (imported late: see the module docstring)."""
  from jaxlora_cli.config import ConfigError  # pylint: disable=import-outside-toplevel
  return ConfigError(message)


def _read_json(path: str, what: str) -> dict:
  try:
    with open(path) as f:
      return json.load(f)
  except (OSError, ValueError) as e:  # ValueError: not JSON
    raise _error(f"{what} {path} could not be read: {e}") from None


def _adapter_dir(name: str, path: str) -> str:
  for candidate in (path, os.path.join(path, "adapter_peft")):
    if os.path.isfile(os.path.join(candidate, "adapter_config.json")):
      return candidate
  raise _error(f"adapter {name!r}: {path} is neither a PEFT adapter directory "
               "(adapter_config.json) nor a jaxlora run directory with adapter_peft/")


def _parse_adapters(text: str) -> dict[str, str]:
  out: dict[str, str] = {}
  for item in text.split(","):
    name, sep, path = item.partition("=")
    name, path = name.strip(), path.strip()
    if not sep or not name or not path:
      raise _error(f"--adapters takes NAME=DIR pairs separated by commas, got {item!r}")
    if name in out:
      raise _error(f"--adapters names {name!r} twice")
    out[name] = _adapter_dir(name, path)
  return out


def _parse_weights(text: str, names: list[str]) -> list[float]:
  try:
    weights = [float(w) for w in text.split(",")]
  except ValueError:
    raise _error(f"--weights takes numbers separated by commas, got {text!r}") from None
  if len(weights) != len(names):
    raise _error(f"--weights has {len(weights)} values for {len(names)} adapters "
                 f"({', '.join(names)})")
  return weights


def _base_dir(args, adapters: dict[str, str]) -> str:
  if args.base:
    if not os.path.isfile(os.path.join(args.base, "config.json")):
      raise _error(f"--base {args.base} is not a Hugging Face checkpoint directory (no "
                   "config.json)")
    return args.base
  name, first = next(iter(adapters.items()))
  base = _read_json(os.path.join(first, "adapter_config.json"), f"adapter {name!r}:").get(
      "base_model_name_or_path")
  if not base or not os.path.isfile(os.path.join(base, "config.json")):
    raise _error(f"adapter {name!r} names no local base checkpoint "
                 f"(base_model_name_or_path={base!r}); pass --base DIR")
  return base


def cmd_merge_adapters(args: argparse.Namespace) -> None:
  """Runs ``jaxlora merge-adapters`` on parsed arguments (see `add_parser`).

  Loads each adapter onto the abstract base (shapes only), combines them with
  `jaxlora.merge_adapters` and writes the result with `jaxlora.peft.save`.

  Raises:
    jaxlora_cli.config.ConfigError: unreadable ``--adapters``/``--weights``, no base
      checkpoint, or an ``--out`` that is a file.
    jaxlora.errors.InputError: what `jaxlora.merge_adapters` refuses (method, options,
      shapes).

  >>> cmd_merge_adapters(argparse.Namespace(adapters="a", weights="1", out="o"))
  Traceback (most recent call last):
  ...
  jaxlora_cli.config.ConfigError: --adapters takes NAME=DIR pairs separated by commas, got 'a'
  """
  adapters = _parse_adapters(args.adapters)
  weights = _parse_weights(args.weights, list(adapters))
  method = getattr(args, "method", "linear")
  seed = getattr(args, "seed", None)
  if seed is not None and not method.startswith("dare"):
    raise _error(f"--seed is for the dare methods; --method {method} draws nothing")
  base = _base_dir(args, adapters)

  import jax  # pylint: disable=import-outside-toplevel
  import jaxlora  # pylint: disable=import-outside-toplevel
  from jaxlora_cli import config as config_lib  # pylint: disable=import-outside-toplevel

  config_lib.check_output_dir(args.out, "--out")
  config_path = os.path.join(base, "config.json")
  hf = {k: v for k, v in _read_json(config_path, "base config").items()
        if k != "quantization_config"}
  config = jaxlora.models.ModelConfig.from_hf(hf, source=config_path)
  model = jaxlora.models.Decoder(config)
  # Shapes are all the adapters need from the base: no weights are read.
  params = jax.eval_shape(lambda k: jaxlora.models.init(model, k), jax.random.key(0))
  trees = {name: jaxlora.peft.load(path, params, model=model) for name, path in adapters.items()}
  kwargs = {}
  if method.startswith("dare"):
    kwargs["key"] = jax.random.key(0 if seed is None else seed)
  merged = jaxlora.merge_adapters(
      trees, weights, method=method, density=getattr(args, "density", None),
      majority_sign_method=getattr(args, "majority_sign_method", "total"),
      svd_rank=getattr(args, "svd_rank", None), svd_clamp=getattr(args, "svd_clamp", None),
      **kwargs)
  jaxlora.peft.save(args.out, merged, model=model, base_model_name_or_path=base)
  ranks = sorted({layer.rank for layer in jaxlora.summary(merged).layers})
  print(f"wrote the {method} combination of {', '.join(adapters)} (rank "
        f"{'/'.join(map(str, ranks))}) to {args.out}", file=sys.stderr)
