"""The `jaxlora` command line: train, eval, generate, merge, merge-adapters, export, plot, demo."""

from __future__ import annotations

import argparse
import errno
import json
import os
import sys
import traceback
from jaxlora_cli import merge_adapters as merge_adapters_cli

HELP_OVERRIDES = ("dotted config overrides, e.g. train.lr=1e-4 lora.rank=8 "
                  "data.train_file=data.jsonl (values are parsed as YAML)")


def _config_help() -> str:
  from jaxlora_cli import config as config_lib  # pylint: disable=import-outside-toplevel
  return config_lib.describe()


class _Parser(argparse.ArgumentParser):
  """An argument parser whose epilog may be a function, called only when help is shown.

  The config keys' help needs `jaxlora_cli.config`, which imports jaxlora (and JAX):
  only ``jaxlora train --help`` pays for that, not every command's parsing.
  """

  def format_help(self) -> str:
    if callable(self.epilog):
      self.epilog = self.epilog()
    return super().format_help()


def _parser() -> argparse.ArgumentParser:
  p = _Parser(
      prog="jaxlora", description="LoRA fine-tuning for JAX/Flax models from local Hugging Face "
      "checkpoints. Every command works offline.")
  p.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
  sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

  t = sub.add_parser("train", help="train a LoRA adapter (rerun to resume)",
                     description="Train a LoRA adapter from a YAML config plus overrides. The "
                     "run directory (output_dir) receives config.yaml, metrics.jsonl, "
                     "tensorboard/, checkpoints/, adapter/ (Orbax), adapter_peft/ (PEFT), "
                     "loss.png and report.md. Rerunning the same command resumes from the latest "
                     "checkpoint.",
                     epilog=_config_help, formatter_class=argparse.RawDescriptionHelpFormatter)
  t.add_argument("--config", help="YAML preset (see configs/); defaults otherwise")
  t.add_argument("--no-progress", action="store_true", help="no progress bar")
  t.add_argument("overrides", nargs="*", help=HELP_OVERRIDES)

  e = sub.add_parser("eval", help="evaluation loss of a run's adapter (and of the base)",
                     description="Mean cross-entropy and perplexity on the run's evaluation "
                     "data (or --data), with the adapter and without it. With --base MODEL "
                     "--adapter NAME=DIR ... --data FILE: the loss of each adapter and of the "
                     "base, loading the base once (the adapters are stacked into one bank).")
  e.add_argument("run_dir", nargs="?", help="a run directory written by `jaxlora train`")
  e.add_argument("--data", help="a data file in the run's format (default: its eval data)")
  _adapter_args(e)
  e.add_argument("--batch-size", type=int, default=8, help="rows per batch (--adapter form; 8)")

  g = sub.add_parser("generate", help="generate text with a run's adapter",
                     description="Generate a continuation of --prompt with the run's adapter "
                     "(factored LoRA path), or with the base model (--base). With --base "
                     "MODEL --adapter NAME=DIR ...: with adapter --use NAME (one --use for "
                     "every prompt, or one per prompt: a mixed batch in one pass).")
  g.add_argument("run_dir", nargs="?", help="a run directory written by `jaxlora train`")
  g.add_argument("--prompt", required=True, action="append",
                 help="prompt text; repeat for a batch")
  g.add_argument("--max-new-tokens", type=int, default=64, help="tokens to generate (64)")
  g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
  g.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (1.0)")
  g.add_argument("--seed", type=int, default=0, help="sampling seed")
  _adapter_args(g)
  g.add_argument("--use", action="append", metavar="NAME",
                 help="the --adapter to generate with ('base': none); repeat once per prompt "
                 "to give each prompt its own")
  g.add_argument("--merged", action="store_true", help="merge the adapter into the kernels first")

  m = sub.add_parser("merge", help="write base + adapter as one Hugging Face checkpoint",
                     description="Fold the adapter into the base kernels (W + scale*A@B) and "
                     "write a plain Hugging Face checkpoint with the tokenizer files.")
  m.add_argument("run_dir")
  m.add_argument("--out", required=True, help="output directory")

  merge_adapters_cli.add_parser(sub)
  x = sub.add_parser("export", help="export a run's adapter as PEFT or merged HF checkpoint",
                     description="--format peft writes adapter_config.json + "
                     "adapter_model.safetensors for PEFT/vLLM; --format hf writes the merged "
                     "model.")
  x.add_argument("run_dir")
  x.add_argument("--format", choices=("peft", "hf"), required=True)
  x.add_argument("--out", required=True, help="output directory")

  pl = sub.add_parser("plot", help="(re)draw a run's loss curve as loss.png",
                      description="Draw the training and evaluation loss of a run (also while it "
                      "is running) into RUN_DIR/loss.png.")
  pl.add_argument("run_dir")
  d = sub.add_parser("demo", help="fine-tune the shipped small model on a new task (CPU, ~2 min)",
                     description="Runs the whole pipeline on the small base model shipped with "
                     "jaxlora (pretrained on Python docstrings): measures exact match on ROT13 of "
                     "unseen 5-letter words, LoRA-fine-tunes, measures again, and shows samples, "
                     "the trainable share, adapter size and where everything was written. No "
                     "download.")
  d.add_argument("--out", default="runs/demo", help="output directory (runs/demo)")
  d.add_argument("--steps", type=int, default=800, help="training steps (800)")
  d.add_argument("--seed", type=int, default=0, help="seed for the word split and init")
  d.add_argument("--no-progress", action="store_true", help="no progress bar")
  d.add_argument("--grpo", action="store_true",
                 help="then GRPO from the SFT adapter (reuses a finished SFT demo in --out): "
                 "samples answers, rewards the right ones, measures exact match again")
  d.add_argument("--grpo-steps", type=int, default=150, help="GRPO steps (150)")
  return p


def _adapter_args(p: argparse.ArgumentParser) -> None:
  p.add_argument("--base", nargs="?", const=True, default=False, metavar="MODEL_DIR",
                 help="with RUN_DIR (no value): the base model without the adapter; with a "
                 "Hugging Face checkpoint directory: the base for --adapter")
  p.add_argument("--adapter", action="append", default=[], metavar="NAME=DIR",
                 help="an adapter directory, Orbax (`jaxlora train`'s adapter/) or PEFT "
                 "(adapter_peft/, detected by adapter_config.json); repeatable")
  p.add_argument("--format", choices=("text", "prompt_completion", "chat"),
                 help="data format of --data (--adapter form; default: the adapter's training "
                 "config, else text)")
  p.add_argument("--max-length", type=int, help="data.max_length for --data (--adapter form)")


def _parse_adapters(specs: list[str]) -> dict[str, str]:
  """``NAME=DIR`` (or a bare DIR, named by its last component) -> {name: dir}."""
  from jaxlora_cli.config import ConfigError  # pylint: disable=import-outside-toplevel
  out = {}
  for spec in specs:
    name, eq, path = spec.partition("=")
    if not eq:
      name, path = os.path.basename(os.path.normpath(spec)), spec
    if not name or not path:
      raise ConfigError(f"--adapter {spec!r} must look like NAME=DIR")
    if name in out:
      raise ConfigError(f"--adapter name {name!r} is given twice ({out[name]} and {path}); "
                        "give each adapter its own name")
    out[name] = path
  return out


def _load_adapters(args, run_dir: str | None = None):
  """The base model (loaded once) and {name: wrapped tree} of --adapter, or of a run's adapters/.

  Returns ``(cfg, model, tok, params, trees)``; `cfg` holds the model settings
  and data format of the first Orbax adapter's training config when it has one.
  """
  import jaxlora  # pylint: disable=import-outside-toplevel
  from jaxlora_cli import config as config_lib  # pylint: disable=import-outside-toplevel
  from jaxlora_cli import trainer  # pylint: disable=import-outside-toplevel
  from jaxlora_cli.config import ConfigError  # pylint: disable=import-outside-toplevel

  if run_dir is not None:  # a run that trained several adapters (data.adapter_field)
    cfg = config_lib.load(trainer.run_path(run_dir, "config.yaml"))
    root = trainer.run_path(run_dir, "adapters")
    dirs = {n: os.path.join(root, n) for n in sorted(os.listdir(root))}
  else:
    if not isinstance(args.base, str):
      raise ConfigError("--adapter needs the base model: --base MODEL_DIR (a local Hugging "
                        "Face checkpoint directory)")
    dirs = _parse_adapters(args.adapter)
    cfg = config_lib.load(None)
    for path in dirs.values():
      if os.path.isfile(os.path.join(path, "adapter_config.json")):
        continue
      try:
        saved = jaxlora.checkpoint.info(path).get("metadata", {}).get("config")
      except (FileNotFoundError, ValueError):
        saved = None
      if isinstance(saved, dict):
        for section in ("model", "data"):
          try:
            # pylint: disable-next=protected-access
            config_lib._set(cfg, section, saved.get(section, {}))
          except ConfigError:
            pass  # an older or newer config: keep the defaults
      break
    cfg.model.path = args.base
  cfg.data.adapter_field = None
  cfg.data.packing = False
  if getattr(args, "format", None):
    cfg.data.format = args.format
  if getattr(args, "max_length", None):
    cfg.data.max_length = args.max_length
  model, params = trainer.load_model(cfg)
  tok = trainer.load_tokenizer(cfg.model.path, cfg.model.revision)
  trees = {}
  for name, path in dirs.items():
    if not os.path.isdir(path):
      raise ConfigError(f"--adapter {name}={path}: no such directory")
    try:
      if os.path.isfile(os.path.join(path, "adapter_config.json")):
        trees[name] = jaxlora.peft.load(path, params, model=model)
      else:
        trees[name] = jaxlora.load(path, params)
    except (jaxlora.errors.JaxloraError, FileNotFoundError) as e:  # not a bug's ValueError
      raise ConfigError(f"adapter {name!r} ({path}): {e}") from None
  return cfg, model, tok, params, trees


def _multi_adapter_run(run_dir: str | None) -> bool:
  return (run_dir is not None and not os.path.isdir(os.path.join(run_dir, "adapter"))
          and os.path.isdir(os.path.join(run_dir, "adapters")))


def _cmd_demo(args) -> None:
  from jaxlora_cli import demo  # pylint: disable=import-outside-toplevel
  demo.main_stdout(args)


def _cmd_train(args) -> None:
  from jaxlora_cli import config as config_lib  # pylint: disable=import-outside-toplevel
  from jaxlora_cli import trainer  # pylint: disable=import-outside-toplevel

  cfg = config_lib.load(args.config, args.overrides)
  if cfg.distributed.initialize:
    import jax  # pylint: disable=import-outside-toplevel
    kwargs = {k: getattr(cfg.distributed, k) for k in
              ("coordinator_address", "num_processes", "process_id")
              if getattr(cfg.distributed, k) is not None}
    # CPU processes (tests, laptops) need gloo collectives; accelerators ignore the setting.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(**kwargs)  # TPU pods and SLURM need no arguments
  # SIGTERM/SIGINT: finish the step, checkpoint it, exit with preemption.EXIT_CODE.
  result = trainer.train(cfg, progress=not args.no_progress, handle_signals=True,
                         log=lambda s: print(s, file=sys.stderr))
  if result:  # empty on processes other than 0
    print(json.dumps(result, indent=2))
    print(f"report: {os.path.join(cfg.output_dir, 'report.md')}", file=sys.stderr)


def _cmd_eval(args) -> None:
  import numpy as np  # pylint: disable=import-outside-toplevel
  import jaxlora  # pylint: disable=import-outside-toplevel
  from jaxlora_cli import data as data_lib  # pylint: disable=import-outside-toplevel
  from jaxlora_cli import trainer  # pylint: disable=import-outside-toplevel
  from jaxlora_cli.config import ConfigError  # pylint: disable=import-outside-toplevel

  if args.adapter or _multi_adapter_run(args.run_dir):
    _eval_adapters(args)
    return
  if args.run_dir is None:
    raise ConfigError("eval needs a RUN_DIR, or --base MODEL_DIR --adapter NAME=DIR "
                      "--data FILE")
  loaded = trainer.load_run(args.run_dir)
  cfg, model, tok, params, tree = (loaded.cfg, loaded.model, loaded.tokenizer, loaded.params,
                                   loaded.tree)
  if args.data:
    examples = data_lib.tokenize(data_lib.read_rows(args.data), cfg.data, tok, args.data)
  else:
    _, examples = trainer.load_data(cfg, tok, model.config.max_position_embeddings)
    if not examples:
      raise ConfigError("the run has no evaluation data; pass --data <file>")
  batches = data_lib.eval_batches(examples, cfg.train.batch_size, cfg.data.max_length,
                                  trainer.pad_id(tok))
  run = trainer.make_eval(model, loss_chunk_size=cfg.train.loss_chunk_size)
  t, f = jaxlora.split(tree)
  with_adapter = run(t, f, batches)
  zero = jaxlora.combine(jax_zero_b(t), f)
  base = run(*jaxlora.split(zero), batches)
  # On a quantized (QLoRA) base both losses are on that quantized base.
  qtypes = sorted({q.qtype for q in jaxlora.quantization.records(params).values()})
  print(json.dumps({"examples": len(examples), "quantize": ",".join(qtypes) or None,
                    "eval_loss": with_adapter,
                    "perplexity": float(np.exp(with_adapter)), "base_eval_loss": base,
                    "base_perplexity": float(np.exp(base))}, indent=2))


def _eval_adapters(args) -> None:
  """Per-adapter and base eval loss, one bank and one compiled function for all of them."""
  import numpy as np  # pylint: disable=import-outside-toplevel
  import jaxlora  # pylint: disable=import-outside-toplevel
  from jaxlora_cli import data as data_lib  # pylint: disable=import-outside-toplevel
  from jaxlora_cli import trainer  # pylint: disable=import-outside-toplevel
  from jaxlora_cli.config import ConfigError  # pylint: disable=import-outside-toplevel

  run_dir = args.run_dir if _multi_adapter_run(args.run_dir) else None
  if args.adapter and args.run_dir is not None:
    raise ConfigError("give either RUN_DIR or --base MODEL_DIR --adapter NAME=DIR, not both")
  cfg, model, tok, params, trees = _load_adapters(args, run_dir)
  if args.data:
    examples = data_lib.tokenize(data_lib.read_rows(args.data), cfg.data, tok, args.data)
  elif run_dir is not None:
    _, examples = trainer.load_data(cfg, tok, model.config.max_position_embeddings)
    if not examples:
      raise ConfigError("the run has no evaluation data; pass --data <file>")
  else:
    raise ConfigError("eval --adapter needs the evaluation data: --data FILE")
  batch_size = cfg.train.batch_size if run_dir is not None else args.batch_size
  batches = data_lib.eval_batches(examples, batch_size, cfg.data.max_length,
                                  trainer.pad_id(tok))
  bank = jaxlora.stack(trees)
  run = trainer.make_eval(model, loss_chunk_size=cfg.train.loss_chunk_size)
  t, f = jaxlora.split(bank.tree)

  def loss_with(slot: int) -> float:  # every row with adapter `slot` (-1: the base)
    return run(t, f, [{**b, "adapter_ids": np.full(b["input_ids"].shape[:2] + (1,), slot,
                                                   np.int32)} for b in batches])

  report = {name: loss_with(k) for k, name in enumerate(bank.names)}
  base = loss_with(-1)
  print(json.dumps({"examples": len(examples),
                    "adapters": {n: {"eval_loss": l, "perplexity": float(np.exp(l))}
                                 for n, l in report.items()},
                    "base_eval_loss": base, "base_perplexity": float(np.exp(base))}, indent=2))


def jax_zero_b(trainable):
  """The trainable half with B set to zero: the base model's function."""
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  return jax.tree_util.tree_map_with_path(
      lambda p, x: jnp.zeros_like(x) if p[-1].key == "lora_b" else x, trainable)


def _cmd_generate(args) -> None:
  import jaxlora  # pylint: disable=import-outside-toplevel
  from jaxlora_cli import trainer  # pylint: disable=import-outside-toplevel
  from jaxlora_cli.config import ConfigError  # pylint: disable=import-outside-toplevel

  run_dir, base = args.run_dir, args.base
  if run_dir is None and isinstance(base, str) and not args.adapter and os.path.isfile(
      os.path.join(base, "config.yaml")):
    run_dir, base = base, True  # the old `generate --base RUN_DIR`
  if args.adapter or _multi_adapter_run(run_dir) or (isinstance(base, str) and run_dir is None):
    _generate_adapters(args, run_dir if _multi_adapter_run(run_dir) else None)
    return
  if run_dir is None:
    raise ConfigError("generate needs a RUN_DIR, or --base MODEL_DIR [--adapter NAME=DIR "
                      "--use NAME]")
  if args.use:
    raise ConfigError(f"--use {args.use[0]}: {run_dir} holds one adapter; --use picks among "
                      "--adapter NAME=DIR ones")
  loaded = trainer.load_run(run_dir)
  model, tok, params, tree = loaded.model, loaded.tokenizer, loaded.params, loaded.tree
  args.base = base
  if args.base and jaxlora.quantization.records(params):
    # A quantized base runs through jaxlora.apply's quantized layers: B = 0 gives its function.
    t, f = jaxlora.split(tree)
    use = jaxlora.combine(jax_zero_b(t), f)
  else:
    use = (params if args.base else
           jaxlora.dequantize(jaxlora.merge(tree)) if args.merged else tree)
  _generate_print(args, model, tok, use)


def _generate_print(args, model, tok, use, adapter_ids=None) -> None:
  """Generates from `args.prompt` with `use` (params, tree or bank) and prints JSON lines."""
  import jax  # pylint: disable=import-outside-toplevel
  import jaxlora  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel
  from jaxlora_cli import trainer  # pylint: disable=import-outside-toplevel

  enc = [tok(p)["input_ids"] for p in args.prompt]
  width = max(len(e) for e in enc)
  pid = trainer.pad_id(tok)
  ids = np.array([[pid] * (width - len(e)) + e for e in enc], np.int32)  # left padding
  mask = np.array([[0] * (width - len(e)) + [1] * len(e) for e in enc], np.int32)
  out = jaxlora.generate(model, use, ids, attention_mask=mask,
                         max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                         top_p=args.top_p, key=jax.random.key(args.seed),
                         eos_token_id=tok.eos_token_id, pad_token_id=pid,
                         adapter_ids=adapter_ids)
  for prompt, row in zip(args.prompt, np.asarray(out)):
    row = list(row)
    if tok.eos_token_id is not None and tok.eos_token_id in row:
      row = row[:row.index(tok.eos_token_id)]
    print(json.dumps({"prompt": prompt, "completion": tok.decode(row)}))


def _generate_adapters(args, run_dir: str | None) -> None:
  """`generate --base MODEL --adapter NAME=DIR ... --use NAME ...` (or a multi-adapter run)."""
  import jaxlora  # pylint: disable=import-outside-toplevel
  from jaxlora_cli.config import ConfigError  # pylint: disable=import-outside-toplevel

  if args.merged:
    raise ConfigError("--merged works with RUN_DIR only; the --adapter form runs the "
                      "factored (bank) path")
  if run_dir is None and not args.adapter:  # --base MODEL_DIR alone: the plain base model
    cfg, model, tok, params, trees = _load_adapters(args)
    _generate_print(args, model, tok, params)
    return
  cfg, model, tok, params, trees = _load_adapters(args, run_dir)
  loaded = ", ".join(trees)
  uses = args.use or ([next(iter(trees))] if len(trees) == 1 else [])
  if not uses:
    raise ConfigError(f"several adapters are loaded ({loaded}); choose one with --use NAME "
                      "(or one --use per prompt)")
  for u in uses:
    if u not in trees and u != "base":
      raise ConfigError(f"--use {u}: no such adapter; loaded: {loaded} (or 'base')")
  if len(uses) == 1:
    uses = uses * len(args.prompt)
  if len(uses) != len(args.prompt):
    raise ConfigError(f"{len(uses)} --use values for {len(args.prompt)} prompts; give one "
                      "--use for all prompts, or one per prompt")
  if len(set(uses)) == 1:  # one adapter for all rows: its own tree, no bank needed
    u = uses[0]
    _generate_print(args, model, tok, trees[u] if u in trees else params)
    return
  bank = jaxlora.stack(trees)  # a mixed batch: row i decodes with adapter uses[i]
  _generate_print(args, model, tok, bank,
                  adapter_ids=bank.ids([u if u in trees else None for u in uses]))


def _merged_export(run_dir: str, out: str) -> None:
  import jax  # pylint: disable=import-outside-toplevel
  import jaxlora  # pylint: disable=import-outside-toplevel
  from jaxlora_cli import config as config_lib  # pylint: disable=import-outside-toplevel
  from jaxlora_cli import trainer  # pylint: disable=import-outside-toplevel

  config_lib.check_output_dir(out, "--out")
  loaded = trainer.load_run(run_dir)
  cfg, model, tree = loaded.cfg, loaded.model, loaded.tree
  # A quantized (QLoRA) base merges into float kernels; dequantize any kernel left quantized
  # (one without an adapter), so the checkpoint is a plain float one that transformers loads.
  # Jitted: one compiled program instead of a dozen eager ops per quantized kernel.
  merged = jax.jit(lambda t: jaxlora.dequantize(jaxlora.merge(t)))(tree)
  jaxlora.models.save_pretrained(out, model, merged)
  trainer.copy_tokenizer(trainer.resolve_model(cfg.model.path, cfg.model.revision), out)
  print(f"wrote merged Hugging Face checkpoint to {out}", file=sys.stderr)


def _cmd_merge(args) -> None:
  _merged_export(args.run_dir, args.out)


def _cmd_export(args) -> None:
  if args.format == "hf":
    _merged_export(args.run_dir, args.out)
    return
  import jaxlora  # pylint: disable=import-outside-toplevel
  from jaxlora_cli import config as config_lib  # pylint: disable=import-outside-toplevel
  from jaxlora_cli import trainer  # pylint: disable=import-outside-toplevel

  config_lib.check_output_dir(args.out, "--out")
  loaded = trainer.load_run(args.run_dir)
  cfg, model, tree = loaded.cfg, loaded.model, loaded.tree
  jaxlora.peft.save(args.out, tree, model=model,
                    base_model_name_or_path=trainer.base_name(cfg.model.path))
  print(f"wrote PEFT adapter to {args.out}", file=sys.stderr)


def _cmd_plot(args) -> None:
  from jaxlora_cli import reporting  # pylint: disable=import-outside-toplevel
  from jaxlora_cli.config import ConfigError  # pylint: disable=import-outside-toplevel

  path = reporting.plot(args.run_dir)
  if path is None:
    raise ConfigError(f"{args.run_dir} has no metrics.jsonl yet")
  print(path)


def main(argv: list[str] | None = None) -> int:
  args = _parser().parse_args(argv)
  # Everything reads local files only.
  for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
    os.environ.setdefault(var, "1")
  os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
  from jaxlora_cli.preemption import TrainingPreempted  # pylint: disable=import-outside-toplevel

  commands = {"train": _cmd_train, "eval": _cmd_eval, "generate": _cmd_generate,
              "merge": _cmd_merge, "merge-adapters": merge_adapters_cli.cmd_merge_adapters,
              "export": _cmd_export, "plot": _cmd_plot,
              "demo": _cmd_demo}
  try:
    commands[args.command](args)
  except TrainingPreempted as e:  # the trainer logged where it stopped; rerunning resumes
    return e.exit_code
  except Exception as e:  # pylint: disable=broad-exception-caught  (sorted by _report)
    if args.debug:
      raise
    return _report(e)
  return EXIT_OK


# Exit statuses of `jaxlora` (README, "The command line"); preemption.EXIT_CODE: rerun to resume.
EXIT_OK = 0
EXIT_BUG = 1       # an error inside jaxlora: the traceback is printed, please report it
EXIT_INPUT = 2     # the input needs fixing: a one-line `error: ...` says what and how
EXIT_DIVERGED = 3  # the loss became NaN or infinite; the last good checkpoint is kept

# OS errors that come from the machine, never from a mistake in jaxlora: no permission, a
# read-only file system, a full disk or quota.
_ENVIRONMENT_ERRNOS = frozenset({errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOSPC,
                                 errno.EDQUOT})


def _report(e: Exception) -> int:
  """Prints a command's error for the user and returns the exit status.

  A `jaxlora.errors.JaxloraError` (bad input: the CLI's own checks raise
  `jaxlora_cli.config.ConfigError`, one of them), an OS error of the machine and
  running out of device memory print one line; a diverged run prints its
  message; anything else is a bug in jaxlora and prints its traceback and a
  request to report it.
  """
  from jaxlora import errors  # pylint: disable=import-outside-toplevel
  from jaxlora_cli.trainer import TrainingDiverged  # pylint: disable=import-outside-toplevel

  if isinstance(e, TrainingDiverged):
    print(f"error: {e}", file=sys.stderr)
    return EXIT_DIVERGED
  if isinstance(e, errors.JaxloraError) or (
      isinstance(e, OSError) and e.errno in _ENVIRONMENT_ERRNOS):
    print(f"error: {e}", file=sys.stderr)
    return EXIT_INPUT
  first = (str(e).strip().splitlines() or [""])[0]
  if type(e).__name__ in ("JaxRuntimeError", "XlaRuntimeError") and "RESOURCE_EXHAUSTED" in first:
    # The run does not fit the device: a setting to change, not a bug.
    print(f"error: the device ran out of memory ({first}); lower train.batch_size or "
          "data.max_length (raise train.grad_accum to keep the batch), set model.remat=full, "
          "or shard over more devices (mesh.*)", file=sys.stderr)
    return EXIT_INPUT
  traceback.print_exception(e)
  print("error: this is a bug in jaxlora, not a problem with your input; please report it with "
        "the command line and the traceback above", file=sys.stderr)
  return EXIT_BUG


if __name__ == "__main__":
  sys.exit(main())
