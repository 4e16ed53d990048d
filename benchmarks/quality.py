"""Task quality of LoRA ranks vs full fine-tuning on the demo task, same step budget.

    python benchmarks/quality.py [--steps 400] [--ranks 1 4 16] [--out runs/quality]

For each variant: exact match on 200 unseen words (ROT13 of 5-letter words, as in
`jaxlora demo`), eval loss, trainable parameters and wall time. LoRA variants
use the demo's settings (alpha = 2r, lr 4e-3, all linear layers); full
fine-tuning trains every base parameter with adamw at lr 1e-3 (4e-3 diverges)
on the same batches.
"""

import argparse
import os
import shutil
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

import jaxlora
from jaxlora_cli import data as data_lib
from jaxlora_cli import demo, trainer


def full_finetune(cfg, model, params, tok, train_ex, steps, lr):
  tx = optax.chain(optax.clip_by_global_norm(1.0),
                   optax.adamw(optax.warmup_cosine_decay_schedule(0.0, lr, 20, steps, 0.1 * lr)))
  opt = tx.init(params)

  @jax.jit
  def step(p, opt, batch):
    mb = jax.tree.map(lambda x: x[0], batch)

    def loss(p):
      logits = model.apply({"params": p}, mb["input_ids"], attention_mask=mb["attention_mask"])
      w = mb["targets"][:, 1:] * mb["attention_mask"][:, 1:]
      ce = optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], mb["input_ids"][:, 1:])
      return jnp.sum(ce * w) / jnp.maximum(jnp.sum(w), 1.0)
    l, g = jax.value_and_grad(loss)(p)
    u, opt = tx.update(g, opt, p)
    return optax.apply_updates(p, u), opt, l

  batcher = data_lib.Batcher(train_ex, cfg.train.batch_size, cfg.data.max_length, cfg.data.seed,
                             trainer.pad_id(tok))
  for _ in range(steps):
    params, opt, _ = step(params, opt, batcher.next())
  return params


def main():
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--steps", type=int, default=800)
  ap.add_argument("--ranks", type=int, nargs="+", default=[1, 4, 16])
  ap.add_argument("--full-lr", type=float, default=1e-3)
  ap.add_argument("--out", default="runs/quality")
  ap.add_argument("--seed", type=int, default=0)
  args = ap.parse_args()
  shutil.rmtree(args.out, ignore_errors=True)
  _, eval_words = demo.write_task(os.path.join(args.out, "data"), args.seed)
  rows = []
  base_cfg = demo.demo_config(args.out, args.steps, args.seed)
  model, params = trainer.load_model(base_cfg)
  tok = trainer.load_tokenizer(demo.DEMO_BASE)
  acc, _ = demo.exact_match(model, params, tok, eval_words)
  total = sum(x.size for x in jax.tree.leaves(params))
  rows.append(("base model (no training)", 0, acc, None, 0.0))
  for r in args.ranks:
    out = os.path.join(args.out, f"r{r}")
    cfg = demo.demo_config(out, args.steps, args.seed, rank=r)
    cfg.data.train_file = os.path.join(args.out, "data", "train.jsonl")
    cfg.data.eval_file = os.path.join(args.out, "data", "eval.jsonl")
    t0 = time.time()
    res = trainer.train(cfg, progress=False, log=lambda s: None)
    seconds = time.time() - t0
    tree = jaxlora.load(os.path.join(cfg.output_dir, "adapter"), params)
    acc, _ = demo.exact_match(model, tree, tok, eval_words)
    rows.append((f"LoRA r={r}", res["trainable_params"], acc, res["eval_loss_after"], seconds))
  t0 = time.time()
  train_ex, eval_ex = trainer.load_data(base_cfg, tok, model.config.max_position_embeddings)
  tuned = full_finetune(base_cfg, model, params, tok, train_ex, args.steps, args.full_lr)
  seconds = time.time() - t0
  acc, _ = demo.exact_match(model, tuned, tok, eval_words)
  ev = trainer.make_eval(model)
  batches = data_lib.eval_batches(eval_ex, 32, base_cfg.data.max_length, trainer.pad_id(tok))
  # make_eval takes (trainable, frozen); a tree without adapters goes in as the frozen half.
  wrapped = jaxlora.wrap(tuned, rank=1, targets="all-linear", layout=model, key=jax.random.key(0))
  t, f = jaxlora.split(jax.tree_util.tree_map_with_path(
      lambda p, x: jnp.zeros_like(x) if p[-1].key == "lora_b" else x, wrapped))
  rows.append((f"full fine-tuning (lr {args.full_lr:g})", total, acc, ev(t, f, batches), seconds))
  print(f"ROT13 of unseen 5-letter words, {args.steps} steps x 32 examples, {len(eval_words)} "
        "eval words")
  print(f"{'variant':32s}{'trainable':>12s}{'share':>9s}{'exact match':>13s}{'eval loss':>11s}"
        f"{'time':>8s}")
  for name, n, acc, loss, sec in rows:
    loss_s = "" if loss is None else f"{loss:.3f}"
    print(f"{name:32s}{n:>12,d}{100 * n / total:>8.2f}%{100 * acc:>12.1f}%{loss_s:>11s}"
          f"{sec:>7.0f}s")


if __name__ == "__main__":
  main()
