import os
import sys

# The tests compile hundreds of tiny programs, where LLVM's optimisation passes cost more than
# they save (about 30% of the suite's time on CPU). Set before jax starts its backend; the CLI
# subprocesses inherit it, so compared runs compile alike.
if "--xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0"
                             " --xla_llvm_disable_expensive_passes=true").strip()

import jax  # pylint: disable=wrong-import-position
import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(__file__))

# The library must not rely on implicit rank broadcasting. (Strict dtype
# promotion is checked in test_forward; flax's own LayerNorm needs the default.)
jax.config.update("jax_numpy_rank_promotion", "raise")


@pytest.fixture(scope="session", autouse=True)
def compilation_cache(tmp_path_factory):
  """One persistent JAX compilation cache for the test session.

  Many tests build the same small programs again (every CLI run traces a fresh
  step function, subprocesses start cold); on CPU, loading a compiled program
  from disk takes a fraction of compiling it. The cache lives in the session's
  temporary directory, shared by xdist's workers and by the CLI subprocesses
  (through the environment), and never outlives pytest's own temp retention.
  """
  base = tmp_path_factory.getbasetemp()
  if os.environ.get("PYTEST_XDIST_WORKER"):
    base = base.parent  # each worker's basetemp is a folder of the session's
  path = base / "jax-compilation-cache"
  path.mkdir(exist_ok=True)
  settings = {"jax_compilation_cache_dir": str(path),
              # Small programs are what the tests compile: cache them all.
              "jax_persistent_cache_min_compile_time_secs": 0,
              "jax_persistent_cache_min_entry_size_bytes": -1}
  with pytest.MonkeyPatch.context() as mp:
    for k, v in settings.items():
      jax.config.update(k, v)
      mp.setenv(k.upper(), str(v))
    yield path


@pytest.fixture
def rng():
  return np.random.default_rng(0)


def randomize_adapters(tree, key, scale=0.5):
  """Gives every lora_a/lora_b a random non-zero value (B starts at zero)."""
  leaves, treedef = jax.tree_util.tree_flatten_with_path(tree)
  keys = jax.random.split(key, len(leaves))
  out = []
  for k, (path, leaf) in zip(keys, leaves):
    name = getattr(path[-1], "key", None)
    if name in ("lora_a", "lora_b"):
      leaf = scale * jax.random.normal(k, leaf.shape, leaf.dtype)
    out.append(leaf)
  return jax.tree.unflatten(treedef, out)


def f64(x):
  return np.asarray(x, np.float64)


# A tiny Llama checkpoint and data files for the command-line tests.
WORDS = ["abc", "hello", "world", "tiny", "jax", "lora", "fox", "dog", "quick", "lazy"]


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory):
  pytest.importorskip("transformers")
  import tiny_checkpoint
  return tiny_checkpoint.make(str(tmp_path_factory.mktemp("tiny")))


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory):
  import json
  import tiny_checkpoint
  d = tmp_path_factory.mktemp("data")
  rng = np.random.default_rng(0)
  with open(d / "pc.jsonl", "w") as f:
    for _ in range(120):
      w = WORDS[rng.integers(len(WORDS))]
      f.write(json.dumps({"prompt": f"reverse: {w} ->", "completion": " " + w[::-1]}) + "\n")
  with open(d / "chat.jsonl", "w") as f:
    for w in WORDS * 3:
      f.write(json.dumps({"messages": [{"role": "user", "content": f"reverse {w}"},
                                       {"role": "assistant", "content": w[::-1]}]}) + "\n")
  (d / "text.txt").write_text("\n".join(tiny_checkpoint.CORPUS))
  import pandas as pd
  pd.DataFrame({"text": tiny_checkpoint.CORPUS}).to_csv(d / "text.csv", index=False)
  pd.DataFrame({"text": tiny_checkpoint.CORPUS}).to_parquet(d / "text.parquet")
  (d / "empty.jsonl").write_text("")
  (d / "nofield.jsonl").write_text(json.dumps({"prompt": "a", "answer": "b"}) + "\n")
  (d / "long.jsonl").write_text(json.dumps({"prompt": "hello " * 40, "completion": "x"}) + "\n")
  return d


def cli_args(model_dir, data, out, *extra):
  """`jaxlora train` arguments for a short run on the tiny checkpoint."""
  return ["train", "--no-progress", f"model.path={model_dir}", f"data.train_file={data}",
          "data.format=prompt_completion", "data.max_length=32", "train.batch_size=8",
          "train.save_every=4", "train.lr=3e-3", "lora.rank=4", "train.log_every=2",
          f"output_dir={out}", *extra]


# The arguments of `trained_run`, for tests that rerun it (resume) or compare with it.
TRAINED_RUN_ARGS = ("train.steps=6", "data.eval_fraction=0.2", "train.grad_accum=2")


@pytest.fixture(scope="session")
def trained_run(model_dir, data_dir, tmp_path_factory):
  """One finished `jaxlora train` run, shared by the tests that only read a run (eval,
  generate, export, merge, plot, swapping adapters): a training run costs more than all of
  them. Held-out eval and gradient accumulation on, so that the run has every output.
  Tests must not change it: copy it to resume or extend it."""
  from jaxlora_cli.main import main
  out = tmp_path_factory.mktemp("trained") / "run"
  assert main(cli_args(model_dir, data_dir / "pc.jsonl", out, *TRAINED_RUN_ARGS)) == 0
  return out
