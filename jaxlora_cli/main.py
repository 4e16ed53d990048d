"""The `jaxlora` command line: train, eval, generate, merge, export, plot, demo."""

from __future__ import annotations

import argparse
import json
import os
import sys

HELP_OVERRIDES = ("dotted config overrides, e.g. train.lr=1e-4 lora.rank=8 "
                  "data.train_file=data.jsonl (values are parsed as YAML)")


def _config_help() -> str:
  from jaxlora_cli import config as config_lib  # pylint: disable=import-outside-toplevel
  return config_lib.describe()


def _parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(
      prog="jaxlora", description="LoRA fine-tuning for JAX/Flax models from local Hugging Face "
      "checkpoints. Every command works offline.")
  p.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
  sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

  t = sub.add_parser("train", help="train a LoRA adapter (rerun to resume)",
                     description="Train a LoRA adapter from a YAML config plus overrides. The "
                     "run directory (output_dir) receives config.yaml, metrics.jsonl, tensorboard/, "
                     "checkpoints/, adapter/ (Orbax), adapter_peft/ (PEFT), loss.png and "
                     "report.md. Rerunning the same command resumes from the latest checkpoint.",
                     epilog=_config_help(), formatter_class=argparse.RawDescriptionHelpFormatter)
  t.add_argument("--config", help="YAML preset (see configs/); defaults otherwise")
  t.add_argument("--no-progress", action="store_true", help="no progress bar")
  t.add_argument("overrides", nargs="*", help=HELP_OVERRIDES)

  e = sub.add_parser("eval", help="evaluation loss of a run's adapter (and of the base)",
                     description="Mean cross-entropy and perplexity on the run's evaluation "
                     "data (or --data), with the adapter and without it.")
  e.add_argument("run_dir", help="a run directory written by `jaxlora train`")
  e.add_argument("--data", help="a data file in the run's format (default: its eval data)")

  g = sub.add_parser("generate", help="generate text with a run's adapter",
                     description="Generate a continuation of --prompt with the run's adapter "
                     "(factored LoRA path), or with the base model (--base).")
  g.add_argument("run_dir", help="a run directory written by `jaxlora train`")
  g.add_argument("--prompt", required=True, action="append",
                 help="prompt text; repeat for a batch")
  g.add_argument("--max-new-tokens", type=int, default=64, help="tokens to generate (64)")
  g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
  g.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (1.0)")
  g.add_argument("--seed", type=int, default=0, help="sampling seed")
  g.add_argument("--base", action="store_true", help="use the base model without the adapter")
  g.add_argument("--merged", action="store_true", help="merge the adapter into the kernels first")

  m = sub.add_parser("merge", help="write base + adapter as one Hugging Face checkpoint",
                     description="Fold the adapter into the base kernels (W + scale*A@B) and "
                     "write a plain Hugging Face checkpoint with the tokenizer files.")
  m.add_argument("run_dir")
  m.add_argument("--out", required=True, help="output directory")

  x = sub.add_parser("export", help="export a run's adapter as PEFT or merged HF checkpoint",
                     description="--format peft writes adapter_config.json + "
                     "adapter_model.safetensors for PEFT/vLLM; --format hf writes the merged model.")
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
  return p


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
  result = trainer.train(cfg, progress=not args.no_progress,
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

  cfg, model, tok, params, tree = trainer.load_run(args.run_dir)
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


def jax_zero_b(trainable):
  """The trainable half with B set to zero: the base model's function."""
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  return jax.tree_util.tree_map_with_path(
      lambda p, x: jnp.zeros_like(x) if p[-1].key == "lora_b" else x, trainable)


def _cmd_generate(args) -> None:
  import jax  # pylint: disable=import-outside-toplevel
  import jaxlora  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel
  from jaxlora_cli import trainer  # pylint: disable=import-outside-toplevel

  cfg, model, tok, params, tree = trainer.load_run(args.run_dir)
  if args.base and jaxlora.quantization.records(params):
    # A quantized base runs through jaxlora.apply's quantized layers: B = 0 gives its function.
    t, f = jaxlora.split(tree)
    use = jaxlora.combine(jax_zero_b(t), f)
  else:
    use = (params if args.base else
           jaxlora.dequantize(jaxlora.merge(tree)) if args.merged else tree)
  enc = [tok(p)["input_ids"] for p in args.prompt]
  width = max(len(e) for e in enc)
  pid = trainer.pad_id(tok)
  ids = np.array([[pid] * (width - len(e)) + e for e in enc], np.int32)  # left padding
  mask = np.array([[0] * (width - len(e)) + [1] * len(e) for e in enc], np.int32)
  out = jaxlora.generate(model, use, ids, attention_mask=mask,
                         max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                         top_p=args.top_p, key=jax.random.key(args.seed),
                         eos_token_id=tok.eos_token_id, pad_token_id=pid)
  for prompt, row in zip(args.prompt, np.asarray(out)):
    row = list(row)
    if tok.eos_token_id is not None and tok.eos_token_id in row:
      row = row[:row.index(tok.eos_token_id)]
    print(json.dumps({"prompt": prompt, "completion": tok.decode(row)}))


def _merged_export(run_dir: str, out: str) -> None:
  import jax  # pylint: disable=import-outside-toplevel
  import jaxlora  # pylint: disable=import-outside-toplevel
  from jaxlora_cli import trainer  # pylint: disable=import-outside-toplevel

  cfg, model, tok, params, tree = trainer.load_run(run_dir)
  # A quantized (QLoRA) base merges into float kernels; dequantize any kernel left quantized
  # (one without an adapter), so the checkpoint is a plain float one that transformers loads.
  # Jitted: one compiled program instead of a dozen eager ops per quantized kernel.
  merged = jax.jit(lambda t: jaxlora.dequantize(jaxlora.merge(t)))(tree)
  jaxlora.models.save_pretrained(out, model, merged)
  trainer.copy_tokenizer(cfg.model.path, out)
  print(f"wrote merged Hugging Face checkpoint to {out}", file=sys.stderr)


def _cmd_merge(args) -> None:
  _merged_export(args.run_dir, args.out)


def _cmd_export(args) -> None:
  if args.format == "hf":
    _merged_export(args.run_dir, args.out)
    return
  import jaxlora  # pylint: disable=import-outside-toplevel
  from jaxlora_cli import trainer  # pylint: disable=import-outside-toplevel

  cfg, model, tok, params, tree = trainer.load_run(args.run_dir)
  jaxlora.peft.save(args.out, tree, model=model,
                    base_model_name_or_path=os.path.abspath(cfg.model.path))
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
  from jaxlora_cli.config import ConfigError  # pylint: disable=import-outside-toplevel
  from jaxlora_cli.trainer import TrainingDiverged  # pylint: disable=import-outside-toplevel

  commands = {"train": _cmd_train, "eval": _cmd_eval, "generate": _cmd_generate,
              "merge": _cmd_merge, "export": _cmd_export, "plot": _cmd_plot,
              "demo": _cmd_demo}
  try:
    commands[args.command](args)
  except TrainingDiverged as e:
    if args.debug:
      raise
    print(f"error: {e}", file=sys.stderr)
    return 3
  except (ConfigError, FileNotFoundError, ValueError, TypeError) as e:
    if args.debug:
      raise
    print(f"error: {e}", file=sys.stderr)
    return 2
  return 0


if __name__ == "__main__":
  sys.exit(main())
