"""`jaxlora demo`: LoRA-fine-tune the shipped small base model on a task it cannot do.

The base (see demo_base/PROVENANCE.md) is a character-level model pretrained on
Python standard-library docstrings. The task is ROT13 of 5-letter words
(``rot13: hello => uryyb``): every character maps to the one 13 letters on.
Training and evaluation words are disjoint, so the exact-match score measures
whether the adapter learned the mapping rather than memorised answers.

`jaxlora demo --grpo` continues with GRPO from the SFT adapter: it samples answers
for other words of the corpus (`rl_words.json`, used by neither split), rewards the
right ones and measures exact match on the same unseen words again.
"""

from __future__ import annotations

import codecs
import json
import os
import sys
import time

import numpy as np

DEMO_BASE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "demo_base")


def rot13(word: str) -> str:
  return codecs.encode(word, "rot13")


def prompt(word: str) -> str:
  return f"rot13: {word} =>"


def write_task(data_dir: str, seed: int, n_eval: int = 200) -> tuple[list[str], list[str]]:
  with open(os.path.join(DEMO_BASE, "words.json")) as f:
    words = json.load(f)
  order = np.random.default_rng(seed).permutation(len(words))
  eval_words = [words[i] for i in order[:n_eval]]
  train_words = [words[i] for i in order[n_eval:]]
  os.makedirs(data_dir, exist_ok=True)
  for name, ws in (("train.jsonl", train_words), ("eval.jsonl", eval_words)):
    with open(os.path.join(data_dir, name), "w") as f:
      for w in ws:
        f.write(json.dumps({"prompt": prompt(w), "completion": " " + rot13(w)}) + "\n")
  return train_words, eval_words


def demo_config(out_dir: str, steps: int, seed: int, rank: int = 8, **overrides):
  from jaxlora_cli import config as config_lib  # pylint: disable=import-outside-toplevel

  data = os.path.join(out_dir, "data")
  items = {
      "output_dir": os.path.join(out_dir, "run"), "model.path": DEMO_BASE,
      "data.train_file": os.path.join(data, "train.jsonl"),
      "data.eval_file": os.path.join(data, "eval.jsonl"), "data.format": "prompt_completion",
      "data.max_length": 32, "data.seed": seed, "lora.rank": rank, "lora.alpha": 2 * rank,
      "lora.targets": "all-linear", "train.steps": steps, "train.batch_size": 32,
      "train.lr": 4e-3, "train.warmup_steps": 20, "train.eval_every": max(steps // 4, 1),
      "train.save_every": 100, "train.log_every": 20, "train.seed": seed, **overrides}
  return config_lib.load(None, [f"{k}={json.dumps(v) if not isinstance(v, str) else v}"
                                for k, v in items.items()])


def exact_match(model, tree, tok, words: list[str], batch: int = 200) -> tuple[float, list[str]]:
  """Greedy completions of the task prompts and the share that are exactly right."""
  import jaxlora  # pylint: disable=import-outside-toplevel

  outs = []
  for s in range(0, len(words), batch):
    chunk = words[s:s + batch]
    # As training saw them (data.format=prompt_completion): BOS, then the prompt.
    bos = [] if tok.bos_token_id is None else [tok.bos_token_id]
    ids = np.array([bos + tok(prompt(w), add_special_tokens=False)["input_ids"] for w in chunk],
                   np.int32)  # one length: every word has 5 letters
    gen = np.asarray(jaxlora.generate(model, tree, ids, max_new_tokens=7,
                                      eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id))
    for row in gen:
      row = list(row)
      if tok.eos_token_id in row:
        row = row[:row.index(tok.eos_token_id)]
      outs.append(tok.decode(row).strip())
  acc = float(np.mean([o == rot13(w) for o, w in zip(outs, words)]))
  return acc, outs


def run(out_dir: str = "runs/demo", steps: int = 800, seed: int = 0, progress: bool = True,
        log=print) -> dict:
  import jax  # pylint: disable=import-outside-toplevel
  import jaxlora  # pylint: disable=import-outside-toplevel
  from jaxlora_cli import config as config_lib  # pylint: disable=import-outside-toplevel
  from jaxlora_cli import reporting, trainer  # pylint: disable=import-outside-toplevel

  t0 = time.time()
  config_lib.check_output_dir(out_dir, "--out")  # before the task's data is written there
  _, eval_words = write_task(os.path.join(out_dir, "data"), seed)
  cfg = demo_config(out_dir, steps, seed)
  model, params = trainer.load_model(cfg)
  tok = trainer.load_tokenizer(DEMO_BASE)
  acc_before, before = exact_match(model, params, tok, eval_words)
  log(f"base model, before fine-tuning: exact match {100 * acc_before:.1f}% on "
      f"{len(eval_words)} unseen words")
  result = trainer.train(cfg, progress=progress, log=log)
  tree = jaxlora.load(os.path.join(cfg.output_dir, "adapter"), params)
  acc_after, after = exact_match(model, tree, tok, eval_words)
  _, merged = exact_match(model, jaxlora.merge(tree), tok, eval_words)
  agree = float(np.mean([a == m for a, m in zip(after, merged)]))
  s = jaxlora.summary(tree)
  adapter_bytes = reporting.du(os.path.join(cfg.output_dir, "adapter"))
  base_bytes = sum(os.path.getsize(os.path.join(DEMO_BASE, f)) for f in os.listdir(DEMO_BASE)
                   if f.endswith(".safetensors"))
  lines = [
      "", "jaxlora demo: ROT13 of 5-letter words (a task the base model cannot do)",
      f"  exact match on {len(eval_words)} unseen words: base {100 * acc_before:.1f}% -> "
      f"LoRA {100 * acc_after:.1f}%",
      f"  eval loss: {result['eval_loss_before']:.3f} -> {result['eval_loss_after']:.3f}",
      f"  trainable parameters: {s.trainable:,} of {s.total:,} "
      f"({100 * s.trainable_fraction:.2f}%), rank {cfg.lora.rank} on all linear layers",
      f"  adapter on disk: {adapter_bytes:,} bytes vs base weights {base_bytes:,} bytes",
      f"  merged vs factored generations agree on {100 * agree:.1f}% of prompts",
      "  samples (prompt: base | LoRA | expected):"]
  for w, b, a in list(zip(eval_words, before, after))[:6]:
    lines.append(f"    {prompt(w)!r:24s} {b!r:>10s} | {a!r:>8s} | {rot13(w)!r}")
  lines += [f"  run directory: {os.path.abspath(cfg.output_dir)} (report.md, loss.png, adapter/, "
            "adapter_peft/, metrics.jsonl, tensorboard/)",
            f"  total time: {time.time() - t0:.0f} s"]
  log("\n".join(lines))
  out = {"exact_match_before": acc_before, "exact_match_after": acc_after,
         "merged_factored_agreement": agree, "trainable_params": s.trainable,
         "total_params": s.total, "adapter_bytes": adapter_bytes, "base_bytes": base_bytes,
         "eval_loss_before": result["eval_loss_before"],
         "eval_loss_after": result["eval_loss_after"], "seconds": time.time() - t0}
  with open(os.path.join(out_dir, "demo.json"), "w") as f:
    json.dump(out, f, indent=2)
  if agree < 1.0:
    log("warning: merged and factored generations differ on some prompts")
  return out


def write_rl_prompts(path: str) -> int:
  """GRPO's prompts: the corpus's 5-letter words that occur once (`rl_words.json`), none of
  them a training or evaluation word of the SFT demo; their answers are only read by the
  reward. Returns how many."""
  with open(os.path.join(DEMO_BASE, "rl_words.json")) as f:
    words = json.load(f)
  with open(path, "w") as f:
    for w in words:
      f.write(json.dumps({"prompt": prompt(w), "completion": " " + rot13(w)}) + "\n")
  return len(words)


def grpo_config(out_dir: str, steps: int, seed: int, **overrides):
  """GRPO after the SFT demo: its adapter is merged into the base (so the KL term's reference,
  the adapters off, is the SFT model) and a fresh adapter trains on top. The reward checks each
  sampled answer: exact match, plus partial credit per character."""
  data = os.path.join(out_dir, "data")
  return demo_config(
      out_dir, steps, seed, **{
          "output_dir": os.path.join(out_dir, "grpo"),
          "data.train_file": os.path.join(data, "rl_prompts.jsonl"),
          "data.format": "prompts", "train.objective": "grpo",
          "reward.fn": ["exact_match", "jaxlora_cli.demo:char_match"],
          "reward.answer_field": "completion",
          "model.merge_adapter": os.path.join(out_dir, "run", "adapter"),
          "grpo.num_generations": 16, "grpo.max_completion_length": 7,
          # Sampling hotter than greedy makes mistakes to learn from: at 1.0 most groups of the
          # SFT model's answers are all right, and a group without spread has no advantage.
          "grpo.temperature": 1.5, "grpo.beta": 0.04,
          "train.batch_size": 16, "train.lr": 4e-3, "train.warmup_steps": 0,
          "train.save_every": 25, "train.log_every": 5, **overrides})


def run_grpo(out_dir: str = "runs/demo", steps: int = 150, sft_steps: int = 800, seed: int = 0,
             progress: bool = True, log=print) -> dict:
  """The SFT demo (or its finished run in `out_dir`), then GRPO from its adapter; exact match
  on the same unseen words after each."""
  import jaxlora  # pylint: disable=import-outside-toplevel
  from jaxlora_cli import trainer  # pylint: disable=import-outside-toplevel

  t0 = time.time()
  sft_dir = os.path.join(out_dir, "run")
  if os.path.isfile(os.path.join(sft_dir, "result.json")):
    log(f"using the finished SFT demo run in {sft_dir}")
    _, eval_words = write_task(os.path.join(out_dir, "data"), seed)
  else:
    run(out_dir, steps=sft_steps, seed=seed, progress=progress, log=log)
    _, eval_words = write_task(os.path.join(out_dir, "data"), seed)
  n_prompts = write_rl_prompts(os.path.join(out_dir, "data", "rl_prompts.jsonl"))
  cfg = grpo_config(out_dir, steps, seed)
  model, merged = trainer.load_model(cfg)  # the base with the SFT adapter merged in
  tok = trainer.load_tokenizer(DEMO_BASE)
  acc_sft, _ = exact_match(model, merged, tok, eval_words)
  result = trainer.train(cfg, progress=progress, log=log)
  tree = jaxlora.load(os.path.join(cfg.output_dir, "adapter"), merged)
  acc_rl, after = exact_match(model, tree, tok, eval_words)
  lines = [
      "", "jaxlora demo --grpo: GRPO after the SFT adapter, rewarded for right answers",
      f"  exact match on {len(eval_words)} unseen words: SFT {100 * acc_sft:.1f}% -> "
      f"GRPO {100 * acc_rl:.1f}%",
      f"  {steps} steps x {cfg.train.batch_size} prompts x {cfg.grpo.num_generations} sampled "
      f"completions, prompts from {n_prompts} other words (reward: exact match + share of "
      "right characters)",
      f"  run directory: {os.path.abspath(cfg.output_dir)}",
      f"  total time: {time.time() - t0:.0f} s"]
  log("\n".join(lines))
  out = {"exact_match_sft": acc_sft, "exact_match_grpo": acc_rl, "steps": steps,
         "eval_reward_before": result.get("eval_reward_before"),
         "eval_reward_after": result.get("eval_reward_after"), "seconds": time.time() - t0}
  with open(os.path.join(out_dir, "demo_grpo.json"), "w") as f:
    json.dump(out, f, indent=2)
  return out


def main_stdout(args) -> None:
  log = lambda s: print(s, file=sys.stdout, flush=True)
  if args.grpo:
    run_grpo(args.out, steps=args.grpo_steps, sft_steps=args.steps, seed=args.seed,
             progress=not args.no_progress, log=log)
    return
  run(args.out, steps=args.steps, seed=args.seed, progress=not args.no_progress, log=log)


def char_match(prompts: list[str], completions: list[str], completion: list[str],
               **columns) -> list[float]:
  """The share of the answer's characters the completion gets right, position by position
  (a reward with partial credit for `jaxlora demo --grpo`).

  >>> char_match(["rot13: hello =>"], ["uryxx"], completion=[" uryyb"])
  [0.6]
  """
  del prompts, columns
  out = []
  for c, a in zip(completions, completion):
    c, a = c.strip(), a.strip()
    out.append(sum(x == y for x, y in zip(c, a)) / max(len(a), len(c), 1))
  return out
