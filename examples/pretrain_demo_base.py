"""Pretrains the small base model that `jaxlora demo` ships with.

The corpus is the docstrings of the Python standard library of the running
interpreter (CPython, PSF License: permissive), which every Python install has:
module, class and function docstrings in file order, ASCII only. The model is
a character-level Llama-style decoder (about 1.2M parameters) trained from
scratch with plain full-parameter training on jaxlora's own model code, then
written as a Hugging Face checkpoint (config.json, model.safetensors, char
tokenizer) together with a list of 5-letter words from the same corpus, which
the demo task draws from.

    python examples/pretrain_demo_base.py --out jaxlora_cli/demo_base [--steps 3000]
"""

import argparse
import ast
import collections
import json
import os
import re
import sysconfig
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

import jaxlora

SPECIAL = ["<pad>", "<s>", "</s>", "<unk>"]
CHARS = [chr(i) for i in range(32, 127)] + ["\n"]
SKIP_DIRS = ("site-packages", "test", "tests", "idlelib", "lib2to3", "turtledemo", "ensurepip")


def docstrings(max_chars: int) -> list[str]:
  root = sysconfig.get_paths()["stdlib"]
  out, total = [], 0
  for dirpath, dirnames, filenames in sorted(os.walk(root)):
    dirnames[:] = sorted(d for d in dirnames if d not in SKIP_DIRS and not d.startswith("."))
    for name in sorted(filenames):
      if not name.endswith(".py"):
        continue
      try:
        with open(os.path.join(dirpath, name), encoding="utf-8") as f:
          tree = ast.parse(f.read())
      except (SyntaxError, UnicodeDecodeError, ValueError):
        continue
      for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
          doc = ast.get_docstring(node)
          if not doc or len(doc) < 40 or not doc.isascii():
            continue
          doc = re.sub(r"[ \t]+", " ", doc).strip()
          out.append(doc)
          total += len(doc)
          if total >= max_chars:
            return out
  return out


def make_tokenizer(path: str):
  import transformers
  from tokenizers import Tokenizer, decoders, models

  vocab = {t: i for i, t in enumerate(SPECIAL + CHARS)}
  tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))  # no merges: characters
  tok.decoder = decoders.Fuse()
  tok.add_special_tokens(SPECIAL)
  fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>",
                                              eos_token="</s>", pad_token="<pad>",
                                              unk_token="<unk>")
  fast.save_pretrained(path)
  return fast


def main():
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--out", default="jaxlora_cli/demo_base")
  ap.add_argument("--steps", type=int, default=3000)
  ap.add_argument("--batch", type=int, default=32)
  ap.add_argument("--seq", type=int, default=128)
  ap.add_argument("--max-chars", type=int, default=4_000_000)
  ap.add_argument("--seed", type=int, default=0)
  args = ap.parse_args()
  t0 = time.time()
  docs = docstrings(args.max_chars)
  print(f"corpus: {len(docs)} docstrings, {sum(map(len, docs)):,} characters")
  os.makedirs(args.out, exist_ok=True)
  tok = make_tokenizer(args.out)
  stream = []
  for d in docs:
    stream += [tok.bos_token_id] + tok(d, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
  stream = np.asarray(stream, np.int32)

  cfg = jaxlora.models.ModelConfig(
      "llama", vocab_size=len(tok), hidden_size=128, num_hidden_layers=4, num_attention_heads=4,
      num_key_value_heads=2, head_dim=32, intermediate_size=384, max_position_embeddings=256,
      norm_eps=1e-5, tie_word_embeddings=True, bos_token_id=tok.bos_token_id,
      eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
  model = jaxlora.models.Decoder(cfg)
  params = jaxlora.models.init(model, jax.random.key(args.seed))
  n_params = sum(x.size for x in jax.tree.leaves(params))
  print(f"model: {n_params:,} parameters")
  sched = optax.warmup_cosine_decay_schedule(0.0, 3e-3, 200, args.steps, 3e-4)
  tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(sched, weight_decay=0.01))
  opt = tx.init(params)

  @jax.jit
  def step(params, opt, batch):
    def loss(p):
      logits = model.apply({"params": p}, batch[:, :-1])
      return optax.softmax_cross_entropy_with_integer_labels(logits, batch[:, 1:]).mean()
    l, g = jax.value_and_grad(loss)(params)
    u, opt = tx.update(g, opt, params)
    return optax.apply_updates(params, u), opt, l

  rng = np.random.default_rng(args.seed)
  for i in range(args.steps):
    starts = rng.integers(0, len(stream) - args.seq - 1, size=args.batch)
    batch = np.stack([stream[s:s + args.seq + 1] for s in starts])
    params, opt, l = step(params, opt, batch)
    if i % 250 == 0 or i == args.steps - 1:
      print(f"step {i:5d} loss {float(l):.3f} ({time.time() - t0:.0f} s)", flush=True)

  # Stored in bfloat16 to keep the shipped files small; the demo computes in float32.
  jaxlora.models.save_pretrained(args.out, model, params, dtype=jnp.bfloat16)
  words = collections.Counter(w.lower() for d in docs for w in re.findall(r"\b[a-zA-Z]{5}\b", d))
  with open(os.path.join(args.out, "words.json"), "w") as f:
    json.dump(sorted(w for w, c in words.items() if c >= 2), f)
  with open(os.path.join(args.out, "rl_words.json"), "w") as f:  # `jaxlora demo --grpo`'s prompts
    json.dump(sorted(w for w, c in words.items() if c == 1), f)
  with open(os.path.join(args.out, "PROVENANCE.md"), "w") as f:
    f.write(
        "# Demo base model\n\n"
        f"A {n_params:,}-parameter character-level Llama-style decoder, pretrained from scratch by\n"
        "`examples/pretrain_demo_base.py` on the docstrings of the Python standard library\n"
        "(CPython, Python Software Foundation License, a permissive license), "
        f"{sum(map(len, docs)):,} characters,\n"
        f"{args.steps} steps of {args.batch} x {args.seq} characters; final training loss "
        f"{float(l):.3f} nats/char.\n"
        "`words.json` lists the 5-letter words of that corpus that occur at least twice,\n"
        "`rl_words.json` those that occur once.\n")
  print(f"wrote {args.out} in {time.time() - t0:.0f} s")


if __name__ == "__main__":
  main()
