"""Several adapters in the command line: swapping them over one base, and training them at once."""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

pytest.importorskip("transformers")
pytest.importorskip("datasets")

import jaxlora  # noqa: E402
from jaxlora_cli import config as config_lib  # noqa: E402
from jaxlora_cli import data as data_lib  # noqa: E402
from jaxlora_cli import trainer  # noqa: E402
from jaxlora_cli.main import main  # noqa: E402
from conftest import WORDS, cli_args, randomize_adapters  # noqa: E402

PROMPTS = ["reverse: fox ->", "reverse: abc ->"]


@pytest.fixture(scope="module")
def run(trained_run):
  """One short single-adapter run (conftest's, shared with test_cli), for the swapping tests."""
  return trained_run


@pytest.fixture(scope="module")
def tasks_file(tmp_path_factory):
  """Two tasks in one file: reverse a word, or repeat it."""
  path = tmp_path_factory.mktemp("tasks") / "tasks.jsonl"
  rng = np.random.default_rng(1)
  with open(path, "w") as f:
    for i in range(48):
      w = WORDS[rng.integers(len(WORDS))]
      task = ("rev", "rep")[i % 2]
      done = w[::-1] if task == "rev" else w + w
      f.write(json.dumps({"prompt": f"{task}: {w} ->", "completion": " " + done,
                          "task": task}) + "\n")
  return path


def _lines(capsys):
  return [json.loads(l) for l in capsys.readouterr().out.splitlines()]


def test_generate_with_base_and_adapters_equals_run_dir(run, model_dir, capsys):
  gen = ["--max-new-tokens", "4", *[x for p in PROMPTS for x in ("--prompt", p)]]
  capsys.readouterr()
  assert main(["generate", str(run), *gen]) == 0
  tuned = _lines(capsys)
  assert main(["generate", str(run), "--base", *gen]) == 0
  base = _lines(capsys)
  adapters = ["--base", model_dir, "--adapter", f"orbax={run}/adapter",
              "--adapter", f"peft={run}/adapter_peft"]
  for name in ("orbax", "peft"):
    assert main(["generate", *adapters, "--use", name, *gen]) == 0
    assert _lines(capsys) == tuned, name
  # A mixed batch: the first prompt with the adapter, the second with the base alone.
  assert main(["generate", *adapters, "--use", "orbax", "--use", "base", *gen]) == 0
  assert _lines(capsys) == [tuned[0], base[1]]


def test_wrong_use_name_lists_the_loaded_adapters(run, model_dir, capsys):
  assert main(["generate", "--base", model_dir, "--adapter", f"a={run}/adapter",
               "--adapter", f"b={run}/adapter_peft", "--use", "c", "--prompt", "x"]) == 2
  err = capsys.readouterr().err.strip()
  assert len(err.splitlines()) == 1
  assert "--use c" in err and "loaded: a, b" in err


def test_eval_several_adapters_in_one_process(run, model_dir, data_dir, tmp_path, capsys):
  model, params = jaxlora.models.from_pretrained(model_dir)
  tree = jaxlora.load(str(run / "adapter"), params)
  t, f = jaxlora.split(tree)
  from jaxlora_cli.main import jax_zero_b
  jaxlora.save(str(tmp_path / "zero"), jaxlora.combine(jax_zero_b(t), f))
  data = str(data_dir / "pc.jsonl")
  capsys.readouterr()
  assert main(["eval", str(run), "--data", data]) == 0
  single = json.loads(capsys.readouterr().out)
  assert main(["eval", "--base", model_dir, "--adapter", f"a={run}/adapter",
               "--adapter", f"peft={run}/adapter_peft", "--adapter", f"zero={tmp_path}/zero",
               "--data", data]) == 0
  multi = json.loads(capsys.readouterr().out)
  assert multi["examples"] == single["examples"]
  assert set(multi["adapters"]) == {"a", "peft", "zero"}
  for name in ("a", "peft"):
    assert multi["adapters"][name]["eval_loss"] == pytest.approx(single["eval_loss"], rel=1e-5)
  assert multi["adapters"]["zero"]["eval_loss"] == pytest.approx(single["base_eval_loss"],
                                                                 rel=1e-5)
  assert multi["base_eval_loss"] == pytest.approx(single["base_eval_loss"], rel=1e-5)
  assert multi["base_eval_loss"] > single["eval_loss"]


def test_adapter_field_is_not_combined_with_packing():
  with pytest.raises(config_lib.ConfigError, match="data.adapter_field.*data.packing"):
    config_lib.load(None, ["data.adapter_field=task", "data.packing=true"])


@pytest.mark.slow
def test_train_one_adapter_per_task(model_dir, tasks_file, tmp_path, capsys):
  out = tmp_path / "multi"
  args = cli_args(model_dir, tasks_file, out, "train.steps=3", "data.adapter_field=task",
                  "data.eval_fraction=0.25", "train.save_every=2")
  assert main(args) == 0
  result = json.loads((out / "result.json").read_text())
  assert result["adapters"] == ["rep", "rev"]
  assert set(result["adapter_eval_loss_after"]) == {"rep", "rev"}
  assert result["eval_loss_after"] == pytest.approx(
      np.mean(list(result["adapter_eval_loss_after"].values())))
  assert not (out / "adapter").exists()
  _, params = jaxlora.models.from_pretrained(model_dir)
  rep = jaxlora.load(str(out / "adapters" / "rep"), params)
  rev = jaxlora.load(str(out / "adapters" / "rev"), params)
  # A (different init keys) and B (trained on different rows) both differ; scales are shared.
  pairs = zip(jax.tree.leaves(jaxlora.split(rep)[0]), jax.tree.leaves(jaxlora.split(rev)[0]))
  for x, y in pairs:
    assert not np.allclose(x, y)
  for name in ("rep", "rev"):
    assert (out / "adapters_peft" / name / "adapter_config.json").is_file()
  # Resuming continues from the checkpoint of the bank's trainable half.
  args[args.index("train.steps=3")] = "train.steps=4"
  capsys.readouterr()
  assert main(args) == 0
  assert "from step 3" in capsys.readouterr().err


@pytest.mark.slow
def test_bank_gradient_equals_single_adapter_gradient(model_dir, tasks_file):
  """Adapter k's gradient in a mixed bank step is its gradient alone on its own rows."""
  cfg = config_lib.load(None, [f"model.path={model_dir}", "lora.rank=4",
                               "data.format=prompt_completion", "data.max_length=32",
                               "data.adapter_field=task"])
  model, params = trainer.load_model(cfg)
  tok = trainer.load_tokenizer(model_dir)
  examples = data_lib.tokenize(data_lib.read_rows(str(tasks_file)), cfg.data, tok, "tasks")
  names = ["rep", "rev"]
  singles = {n: randomize_adapters(trainer.wrap(cfg, params, model, trainer.adapter_key(0, n)),
                                   jax.random.key(i + 7), scale=0.1)
             for i, n in enumerate(names)}
  bank = jaxlora.stack(singles)
  # Two micro-batches of 4 rows, with 2 and 6 rows per adapter (different token counts).
  rows = [e for e in examples if e.adapter == "rev"][:2] + \
         [e for e in examples if e.adapter == "rep"][:6]
  rows = [rows[i] for i in (0, 2, 3, 4, 1, 5, 6, 7)]
  pid = trainer.pad_id(tok)
  batch = data_lib.collate(rows, 2, 32, pid, length=32, adapter_index={"rep": 0, "rev": 1})
  assert batch["adapter_ids"][..., 0].tolist() == [[1, 0, 0, 0], [1, 0, 0, 0]]
  key, chunk = jax.random.key(0), 16  # the chunked loss, as in training by default
  t, f = jaxlora.split(bank.tree)
  g_bank, m = jax.jit(trainer.make_grads(model, loss_chunk_size=chunk, capacity=2))(
      t, f, batch, key)
  per_adapter = jaxlora.unstack(dataclasses.replace(bank, tree=jaxlora.combine(g_bank, f)))
  single_grads = jax.jit(trainer.make_grads(model, loss_chunk_size=chunk))
  losses = []
  for name in names:
    own = [e for e in rows if e.adapter == name]
    empty = data_lib.Example(np.asarray([pid], np.int32), np.zeros(1, np.float32))
    # Padded with empty rows to one shape (one compilation); they add no loss and no tokens.
    b = data_lib.collate(own + [empty] * (8 - len(own)), 1, 32, pid, length=32)
    g, ms = single_grads(*jaxlora.split(singles[name]), b, key)
    losses.append(float(ms["loss"]))
    got = jaxlora.split(per_adapter[name])[0]
    for x, y in zip(jax.tree.leaves(got), jax.tree.leaves(g)):
      np.testing.assert_allclose(x, y, rtol=2e-4, atol=1e-6)
    assert any(float(jnp.abs(y).max()) > 0 for y in jax.tree.leaves(g))
  assert float(m["loss"]) == pytest.approx(np.mean(losses), rel=1e-5)
