"""`jaxlora train` with packed rows (data.packing), the chunked loss and model.attention."""

import json
import shutil

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
from conftest import cli_args  # noqa: E402


def _stream(seed, examples_in_order):
  """A list the Batcher walks in exactly this order in epoch 0 (its order is a permutation
  drawn from (seed, epoch))."""
  perm = np.random.default_rng([seed, 0]).permutation(len(examples_in_order))
  out = [None] * len(perm)
  for j, p in enumerate(perm):
    out[p] = examples_in_order[j]
  return out


def _example(token, targets):
  targets = np.asarray(targets, np.float32)
  return data_lib.Example(np.full(len(targets), token, np.int32), targets)


def _expected_weights(rows, length):
  """Per example laid out alone: position i predicts i + 1 within the same example only."""
  w = np.zeros((len(rows), length - 1), np.float32)
  for r, row in enumerate(rows):
    start = 0
    for e in row:
      w[r, start:start + len(e.ids) - 1] = e.targets[1:]
      start += len(e.ids)
  return w


def test_first_fit_layout_segments_targets_and_weights():
  lengths = [6, 5, 4, 3, 7, 2, 2, 9, 8, 1]
  # Example k is token k + 1 repeated, with a targets pattern of its own.
  stream = [_example(k + 1, (np.arange(n) + k) % 3 != 0) for k, n in enumerate(lengths)]
  b = data_lib.Batcher(_stream(3, stream), batch_size=3, max_length=10, seed=3, pad_id=0,
                       packing=True)
  batch = b.next()
  # 6 -> row 0, 5 -> row 1, 4 -> row 0 (full), 3 -> row 1, 7 -> row 2, 2 -> row 1 (full),
  # 2 -> row 2; 9 fits nowhere: the micro-batch is done and 9 starts the next one.
  rows = [[stream[0], stream[2]], [stream[1], stream[3], stream[5]], [stream[4], stream[6]]]
  assert b.state == {"epoch": 0, "index": 7}
  assert set(batch) == {"input_ids", "attention_mask", "targets", "segment_ids"}
  assert all(v.shape == (1, 3, 10) for v in batch.values())
  np.testing.assert_array_equal(batch["input_ids"][0], [
      [1] * 6 + [3] * 4, [2] * 5 + [4] * 3 + [6] * 2, [5] * 7 + [7] * 2 + [0]])
  np.testing.assert_array_equal(batch["segment_ids"][0], [
      [1] * 6 + [2] * 4, [1] * 5 + [2] * 3 + [3] * 2, [1] * 7 + [2] * 2 + [0]])
  assert batch["segment_ids"].dtype == np.int32
  np.testing.assert_array_equal(batch["attention_mask"], batch["segment_ids"] > 0)
  np.testing.assert_array_equal(batch["targets"][0], [
      np.concatenate([e.targets for e in row] + [np.zeros(10 - sum(len(e.ids) for e in row))])
      for row in rows])
  weights = np.asarray(trainer.loss_weights(jax.tree.map(lambda x: x[0], batch)))
  np.testing.assert_array_equal(weights, _expected_weights(rows, 10))
  # The next micro-batch starts with the example that did not fit.
  nxt = b.next()
  np.testing.assert_array_equal(nxt["input_ids"][0, 0, :9], [8] * 9)
  # Rows are padded to the bucket of the longest row, not to max_length: here examples longer
  # than half of max_length, one per row.
  short = data_lib.Batcher([_example(1, [1.0] * 60)] * 4, 2, 100, 0, 0, packing=True).next()
  assert short["input_ids"].shape == (1, 2, 64)
  np.testing.assert_array_equal(short["segment_ids"][0, :, 59:61], [[1, 0], [1, 0]])


def test_every_example_once_per_epoch_and_resume_is_identical():
  rng = np.random.default_rng(0)
  n = 37
  ex = [data_lib.Example(np.concatenate([[1000 + k], rng.integers(1, 50, size=m - 1)])
                         .astype(np.int32), np.ones(m, np.float32))
        for k, m in enumerate(rng.integers(2, 13, size=n))]
  b = data_lib.Batcher(ex, 4, 16, seed=5, pad_id=0, packing=True)
  counts = np.zeros(n, int)
  while b.state["epoch"] < 2:
    batch = b.next(accum=2)
    seg, ids = batch["segment_ids"], batch["input_ids"]
    assert (seg[..., 0] == 1).all()  # no empty row
    starts = (seg > 0) & np.concatenate([np.ones_like(seg[..., :1], bool),
                                         seg[..., 1:] != seg[..., :-1]], axis=-1)
    np.add.at(counts, ids[starts] - 1000, 1)
  r = b.state["index"]
  third = np.random.default_rng([5, 2]).permutation(n)[:r]
  np.testing.assert_array_equal(counts, 2 + np.isin(np.arange(n), third))

  a = data_lib.Batcher(ex, 4, 16, seed=5, pad_id=0, packing=True)
  want = [a.next(accum=2) for _ in range(6)]
  b = data_lib.Batcher(ex, 4, 16, seed=5, pad_id=0, packing=True)
  b.next(accum=2), b.next(accum=2)
  c = data_lib.Batcher(ex, 4, 16, seed=5, pad_id=0, state=b.state, packing=True)
  part = data_lib.Batcher(ex, 4, 16, seed=5, pad_id=0, state=b.state, packing=True)
  for w in want[2:]:
    got = c.next(accum=2)
    rows = part.next(accum=2, rows=(1, 3))  # one process's rows of the same global batch
    assert set(got) == set(w) == set(rows)
    for k in w:
      np.testing.assert_array_equal(got[k], w[k])
      np.testing.assert_array_equal(rows[k], w[k][:, 1:3])
  assert c.state == part.state == a.state


@pytest.fixture(scope="session")
def tiny(model_dir):
  """The tiny checkpoint wrapped everywhere (the untied head included), random adapters."""
  model, params = jaxlora.models.from_pretrained(model_dir)
  tree = jaxlora.wrap(params, rank=2, targets=".*", layout=model, key=jax.random.key(1))
  rng = np.random.default_rng(2)  # on the host: conftest's jitted version compiles for seconds

  def randomize(path, x):
    if getattr(path[-1], "key", None) in ("lora_a", "lora_b"):
      return jnp.asarray(0.2 * rng.normal(size=x.shape), x.dtype)
    return x

  tree = jax.tree_util.tree_map_with_path(randomize, tree)
  assert "lora_a" in tree["lm_head"]
  return model, *jaxlora.split(tree)


def _random_examples(seed, n, vocab, max_len):
  rng = np.random.default_rng(seed)
  out = []
  for m in rng.integers(2, max_len + 1, size=n):
    t = rng.integers(0, 2, size=m).astype(np.float32)
    t[-1] = 1.0  # every example has at least one prediction to make
    out.append(data_lib.Example(rng.integers(1, vocab, size=m).astype(np.int32), t))
  return out


def test_packed_loss_is_the_sum_of_the_examples_alone(tiny):
  model, trainable, frozen = tiny
  # Full logits here; the chunked loss is checked against them below.
  loss = jax.jit(trainer.make_loss(model, 0.0, 0), static_argnums=3)
  ex = _random_examples(0, 12, model.config.vocab_size, 11)
  rows = data_lib.Batcher(ex, 3, 16, seed=1, pad_id=0, packing=True).pack()
  batch = data_lib.Batcher(ex, 3, 16, seed=1, pad_id=0, packing=True).next()
  packed = [e for row in rows for e in row]
  assert len(packed) > len(rows)  # some row holds several examples
  total, count = loss(trainable, frozen, jax.tree.map(lambda x: x[0], batch), None)
  want_total, want_count = 0.0, 0.0
  for e in packed:  # each example alone in a row of its own
    alone = data_lib.collate([e], 1, 16, 0, length=16)
    l, c = loss(trainable, frozen, jax.tree.map(lambda x: x[0], alone), None)
    want_total, want_count = want_total + float(l), want_count + float(c)
  assert float(count) == want_count == sum(float(e.targets[1:].sum()) for e in packed)
  np.testing.assert_allclose(float(total), want_total, rtol=2e-6)


def test_chunked_loss_equals_full_logits_loss_and_grads(tiny):
  model, trainable, frozen = tiny
  ex = _random_examples(1, 20, model.config.vocab_size, 13)
  batch = data_lib.Batcher(ex, 2, 16, seed=0, pad_id=0, packing=True).next()
  mb = jax.tree.map(lambda x: jnp.asarray(x[0]), batch)

  def value_and_grad(chunk):
    fn = trainer.make_loss(model, 0.0, chunk)
    mean = lambda t: (lambda s, n: (s / n, (s, n)))(*fn(t, frozen, mb, None))
    return jax.jit(jax.value_and_grad(mean, has_aux=True))(trainable)

  (_, (full, n_full)), g_full = value_and_grad(0)
  (_, (chunked, n_chunk)), g_chunk = value_and_grad(5)  # 15 positions: 3 chunks
  assert float(n_full) == float(n_chunk) > 0
  np.testing.assert_allclose(float(chunked), float(full), rtol=1e-6)
  leaves = jax.tree_util.tree_leaves_with_path(g_full)
  assert any("lm_head" in jax.tree_util.keystr(p) for p, _ in leaves)
  for (path, a), b in zip(leaves, jax.tree.leaves(g_chunk)):
    np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-4, atol=1e-7,
                               err_msg=jax.tree_util.keystr(path))


def test_chunked_cross_entropy_sum_reduction(tiny):
  model, trainable, frozen = tiny
  params = jaxlora.combine(trainable, frozen)
  rng = np.random.default_rng(2)
  h = jnp.asarray(rng.normal(size=(2, 8, model.config.hidden_size)), jnp.float32)
  labels = jnp.asarray(rng.integers(0, model.config.vocab_size, size=(2, 8)), jnp.int32)
  w = jnp.asarray(rng.integers(0, 2, size=(2, 8)), jnp.float32)
  ce = jaxlora.models.chunked_cross_entropy
  mean = ce(model, params, h, labels, w, chunk_size=3)
  total = ce(model, params, h, labels, w, chunk_size=3, reduction="sum")
  np.testing.assert_allclose(float(total), float(mean) * float(w.sum()), rtol=1e-6)
  with pytest.raises(ValueError, match="reduction must be 'mean', 'sum' or 'none', got 'max'"):
    ce(model, params, h, labels, w, reduction="max")


def _args(model_dir, data_dir, out, *extra):
  args = cli_args(model_dir, data_dir / "pc.jsonl", out, "data.packing=true", *extra)
  keys = [e.split("=")[0] for e in extra]
  return [a for a in args if a.split("=")[0] not in keys] + list(extra)


@pytest.mark.slow
def test_packed_train_resumes_bit_identical(model_dir, data_dir, tmp_path, monkeypatch):
  """A run rolled back to its step-2 checkpoint (what an interruption after step 2 leaves; the
  SIGKILL test in test_cli.py covers the interruption itself) resumes bit-identically."""
  # Full logits and no accumulation compile fastest; both are covered above and in test_cli.py.
  extra = ("train.steps=4", "train.save_every=2", "train.batch_size=8",
           "train.loss_chunk_size=0")
  plain = data_lib.Batcher.next
  seen = []

  def record(self, *args, **kwargs):
    seen.append(plain(self, *args, **kwargs))
    return seen[-1]

  monkeypatch.setattr(data_lib.Batcher, "next", record)
  run = tmp_path / "run"
  assert main(_args(model_dir, data_dir, run, *extra)) == 0
  assert len(seen) == 4 and all(b["segment_ids"].max() > 1 for b in seen)  # rows are packed
  shutil.copytree(run, tmp_path / "ref")
  shutil.rmtree(run / "checkpoints" / "4")
  for name in ("adapter", "adapter_peft"):
    shutil.rmtree(run / name)
  assert main(_args(model_dir, data_dir, run, *extra)) == 0
  assert len(seen) == 6
  for a, b in zip(seen[2:4], seen[4:6]):  # the resumed run's batches are the same ones
    assert set(a) == set(b)
    for k in a:
      np.testing.assert_array_equal(a[k], b[k])
  losses = [[(r["step"], r["loss"]) for r in map(json.loads, (d / "metrics.jsonl").read_text()
                                                 .splitlines()) if "loss" in r]
            for d in (tmp_path / "ref", run)]
  assert losses[0] == losses[1] and [s for s, _ in losses[0]] == [2, 4]
  model, params = jaxlora.models.from_pretrained(model_dir)
  ref = jaxlora.load(str(tmp_path / "ref" / "adapter"), params)
  resumed = jaxlora.load(str(run / "adapter"), params)
  for x, y in zip(jax.tree.leaves(ref), jax.tree.leaves(resumed)):
    np.testing.assert_array_equal(np.asarray(x).view(np.uint8), np.asarray(y).view(np.uint8))


def test_config_errors_name_the_key(model_dir, data_dir, tmp_path, capsys):
  with pytest.raises(config_lib.ConfigError, match="config key 'model.attention' must be one of"):
    config_lib.load(None, ["model.attention=bogus"])
  with pytest.raises(config_lib.ConfigError, match="'train.loss_chunk_size' must be positive"):
    config_lib.load(None, ["train.loss_chunk_size=-1"])
  assert config_lib.load(None, ["model.attention=xla"]).model.attention == "xla"
  assert main(_args(model_dir, data_dir, tmp_path / "r", "model.attention=bogus")) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and "config key 'model.attention'" in err[0], err
  if jax.default_backend() == "cpu":  # an explicit choice this platform cannot run
    assert main(_args(model_dir, data_dir, tmp_path / "r", "model.attention=cudnn")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "config key 'model.attention'" in err[0], err
    assert "needs an NVIDIA GPU" in err[0]
