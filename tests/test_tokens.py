"""Trainable tokens (`jaxlora.wrap(..., trainable_tokens=...)`) against PEFT and NumPy float64."""

import dataclasses
import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

import jaxlora
from conftest import f64, randomize_adapters

IDS = [3, 17, 50]


def _hf_llama(tied):
  transformers = pytest.importorskip("transformers")
  return transformers.LlamaForCausalLM(transformers.LlamaConfig(
      vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
      num_attention_heads=4, num_key_value_heads=2, initializer_range=0.1,
      tie_word_embeddings=tied))


@pytest.fixture(scope="module", params=[False, True], ids=["untied", "tied"])
def base(request, tmp_path_factory):
  torch = pytest.importorskip("torch")
  torch.manual_seed(0)
  hf = _hf_llama(request.param).eval()
  path = str(tmp_path_factory.mktemp("base"))
  hf.save_pretrained(path)
  model, params = jaxlora.models.from_pretrained(path)
  assert model.config.tie_word_embeddings == request.param
  return request.param, path, model, params


def _batch():
  rng = np.random.default_rng(1)
  ids = rng.integers(0, 96, size=(2, 10))
  ids[0, 2], ids[0, 5], ids[1, 7], ids[1, 8] = 3, 50, 17, 3  # trained tokens in the input
  return ids


_JIT = {}
_LAYOUTS = {}


def _wrap(model, params, **kw):
  return jaxlora.wrap(params, rank=2, layout=_layout(model, params), **kw)


def _layout(model, params):
  """The model's kernel layout, traced once per model (wrap would trace it on every call)."""
  if model not in _LAYOUTS:
    _LAYOUTS[model] = model.lora_layout(params)
  return _LAYOUTS[model]


def _run(model, tree, ids, plain=False):
  """Logits of the adapted model (`jaxlora.apply`), or of plain flax with ``plain``; jitted."""
  key = (model, plain)
  if key not in _JIT:
    fwd = model.apply if plain else jaxlora.apply(model.apply)
    _JIT[key] = jax.jit(lambda t, ids: fwd({"params": t}, ids))
  return _JIT[key](tree, ids)


def _changed_tree(params, model, **kw):
  """Wrapped with trained tokens, then LoRA factors and token rows moved off their init."""
  tree = _wrap(model, params, targets=r"(q|v)_proj", key=jax.random.key(0), trainable_tokens=IDS,
               **kw)
  tree = randomize_adapters(tree, jax.random.key(1), scale=0.2)
  rows = tree["embed_tokens"]["lora_token_rows"]
  tree["embed_tokens"]["lora_token_rows"] = rows + jax.random.normal(jax.random.key(2), rows.shape)
  return tree


def _peft_logits(base_path, adapter_path, ids):
  torch, transformers, peft = (pytest.importorskip(m) for m in ("torch", "transformers", "peft"))
  hf = transformers.AutoModelForCausalLM.from_pretrained(base_path)
  pm = peft.PeftModel.from_pretrained(hf, adapter_path).eval()
  with torch.no_grad():
    return pm(input_ids=torch.tensor(ids)).logits.numpy()


def test_tree_form_and_summary(base):
  tied, _, model, params = base
  tree = _wrap(model, params, targets="q_proj", trainable_tokens=IDS)
  emb = tree["embed_tokens"]
  assert emb["lora_token_ids"].dtype == jnp.int32 and emb["lora_token_ids"].tolist() == IDS
  np.testing.assert_array_equal(emb["lora_token_rows"], np.asarray(params["embed_tokens"]
                                                                   ["embedding"])[IDS])
  trainable, frozen = jaxlora.split(tree)
  assert sorted(trainable["embed_tokens"]) == ["lora_token_rows"]
  assert sorted(frozen["embed_tokens"]) == ["embedding", "lora_token_ids"]
  assert sorted(jaxlora.adapter(tree)["embed_tokens"]) == ["lora_token_ids", "lora_token_rows"]
  lora_only = jaxlora.summary(_wrap(model, params, targets="q_proj"))
  s = jaxlora.summary(tree)
  assert s.trainable - lora_only.trainable == len(IDS) * 32
  # Identity at init: the rows are the table's own (a tied head recomputes their logits in a
  # separate product, so equal up to float32 rounding).
  ids = _batch()
  np.testing.assert_allclose(_run(model, tree, ids),
                             _run(model, params, ids, plain=True), atol=1e-6, rtol=0)


def test_jaxlora_tokens_serve_in_peft(base, tmp_path):
  tied, base_path, model, params = base
  tree = _changed_tree(params, model)
  jaxlora.peft.save(str(tmp_path), tree, model=model, base_model_name_or_path=base_path)
  cfg = json.load(open(tmp_path / "adapter_config.json"))
  assert cfg["trainable_token_indices"] == IDS
  ids = _batch()
  ref = _peft_logits(base_path, str(tmp_path), ids)
  out = np.asarray(_run(model, tree, ids))
  np.testing.assert_allclose(out, ref, atol=1e-5, rtol=0)
  reset = dict(tree, embed_tokens=dict(tree["embed_tokens"], lora_token_rows=jnp.asarray(
      params["embed_tokens"]["embedding"])[jnp.array(IDS)]))
  assert np.abs(np.asarray(_run(model, reset, ids)) - ref).max() > 1e-2  # the rows matter
  # And back: bit-exact.
  back = jaxlora.peft.load(str(tmp_path), params, model=model)
  for k in ("lora_token_ids", "lora_token_rows"):
    np.testing.assert_array_equal(back["embed_tokens"][k], tree["embed_tokens"][k])


@pytest.mark.parametrize("form", ["list", "dict"])
def test_peft_tokens_load_in_jaxlora(base, form, tmp_path):
  torch, peft = pytest.importorskip("torch"), pytest.importorskip("peft")
  transformers = pytest.importorskip("transformers")
  tied, base_path, model, params = base
  torch.manual_seed(1)
  hf = transformers.AutoModelForCausalLM.from_pretrained(base_path)
  indices = IDS if form == "list" else (
      {"embed_tokens": IDS, "lm_head": IDS} if tied else {"embed_tokens": IDS})
  pm = peft.get_peft_model(hf, peft.LoraConfig(r=2, target_modules=["q_proj", "v_proj"],
                                               init_lora_weights=False,
                                               trainable_token_indices=indices)).eval()
  with torch.no_grad():
    for name, p in pm.named_parameters():
      if "trainable_tokens_delta" in name:
        p.add_(torch.randn_like(p))
  pm.save_pretrained(str(tmp_path))
  ids = _batch()
  with torch.no_grad():
    ref = pm(input_ids=torch.tensor(ids)).logits.numpy()
  tree = jaxlora.peft.load(str(tmp_path), params, model=model)
  assert tree["embed_tokens"]["lora_token_ids"].tolist() == IDS
  out = np.asarray(_run(model, tree, ids))
  np.testing.assert_allclose(out, ref, atol=1e-5, rtol=0)


def test_untied_head_tokens_from_peft_are_refused(tmp_path):
  torch, peft = pytest.importorskip("torch"), pytest.importorskip("peft")
  torch.manual_seed(0)
  hf = _hf_llama(False)
  hf.save_pretrained(str(tmp_path / "base"))
  model, params = jaxlora.models.from_pretrained(str(tmp_path / "base"))
  pm = peft.get_peft_model(hf, peft.LoraConfig(r=2, target_modules=["q_proj"],
                                               trainable_token_indices={"lm_head": [1, 2]}))
  pm.save_pretrained(str(tmp_path / "a"))
  with pytest.raises(ValueError, match="'lm_head'.*no embedding"):
    jaxlora.peft.load(str(tmp_path / "a"), params, model=model)


class _Toy(nn.Module):
  """Embedding -> tanh(Dense) -> head (tied: the embedding's `attend`)."""
  tied: bool

  @nn.compact
  def __call__(self, tokens):
    embed = nn.Embed(12, 5, name="embed")
    h = jnp.tanh(nn.Dense(5, use_bias=False, name="mix")(embed(tokens)))
    return embed.attend(h) if self.tied else nn.Dense(12, use_bias=False, name="head")(h)


def _toy_grad_f64(params, tokens, labels, tied):
  """d mean-CE / d embedding of the full-embedding model, by hand in float64."""
  e, w = f64(params["embed"]["embedding"]), f64(params["mix"]["kernel"])
  head = e.T if tied else f64(params["head"]["kernel"])
  x = e[tokens]
  h = np.tanh(x @ w)
  z = h @ head
  p = np.exp(z - z.max(-1, keepdims=True))
  p /= p.sum(-1, keepdims=True)
  dz = p.copy()
  np.put_along_axis(dz, labels[..., None], np.take_along_axis(p, labels[..., None], -1) - 1, -1)
  dz /= labels.size
  dx = ((dz @ head.T) * (1 - h ** 2)) @ w.T
  de = np.zeros_like(e)
  np.add.at(de, tokens, dx)
  if tied:
    de += np.einsum("btv,btf->vf", dz, h)
  return de


def _out_shapes(jaxpr):
  """The shapes of every value a jaxpr computes, nested jaxprs (jit, scan, remat) included."""
  out = set()
  for eqn in jaxpr.eqns:
    out |= {tuple(v.aval.shape) for v in eqn.outvars if hasattr(v.aval, "shape")}
    for param in eqn.params.values():
      for sub in param if isinstance(param, (tuple, list)) else (param,):
        inner = getattr(sub, "jaxpr", sub)
        if hasattr(inner, "eqns"):
          out |= _out_shapes(inner)
  return out


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_gradient_reaches_only_the_chosen_rows(tied):
  model = _Toy(tied)
  tokens = jnp.array([[1, 4, 7, 4, 0], [9, 11, 4, 2, 7]])
  labels = jnp.array([[4, 7, 0, 1, 3], [4, 4, 2, 7, 11]])
  params = model.init(jax.random.key(0), tokens)["params"]
  params["embed"]["embedding"] = params["embed"]["embedding"] * 3  # larger logits
  chosen = [4, 11, 5]  # 5 is in no input: its gradient comes from the tied head alone
  tree = jaxlora.wrap(params, rank=2, targets="mix", trainable_tokens=chosen)
  trainable, frozen = jaxlora.split(tree)
  fwd = jaxlora.apply(model.apply)

  @jax.jit
  def grad(t, frozen):
    def loss(t):
      z = fwd({"params": jaxlora.combine(t, frozen)}, tokens)
      return optax.softmax_cross_entropy_with_integer_labels(z, labels).mean()
    return jax.grad(loss)(t)

  g = grad(trainable, frozen)
  assert jax.tree.map(jnp.shape, g["embed"]) == {"lora_token_rows": (3, 5)}
  # No table-sized array is made in the step (e.g. no `E.at[ids].set(rows)`, no table gradient).
  shapes = _out_shapes(jax.make_jaxpr(grad)(trainable, frozen).jaxpr)
  assert (12, 5) not in shapes and (3, 5) in shapes
  ref = _toy_grad_f64(params, np.asarray(tokens), np.asarray(labels), tied)
  np.testing.assert_allclose(g["embed"]["lora_token_rows"], ref[chosen], atol=1e-6, rtol=1e-5)
  assert np.abs(ref[chosen]).min(axis=1).max() > 0  # no row is trivially zero
  if not tied:  # an id in no input gets no gradient from an untied model
    np.testing.assert_array_equal(g["embed"]["lora_token_rows"][2], 0)


def test_merge_equals_adapted_forward_and_unmerge(base):
  tied, _, model, params = base
  tree = _changed_tree(params, model)
  merged = jaxlora.merge(tree)
  assert sorted(merged["embed_tokens"]) == ["embedding"]
  table, orig = np.asarray(merged["embed_tokens"]["embedding"]), np.asarray(
      params["embed_tokens"]["embedding"])
  np.testing.assert_array_equal(table[IDS], tree["embed_tokens"]["lora_token_rows"])
  others = np.setdiff1d(np.arange(96), IDS)
  np.testing.assert_array_equal(table[others], orig[others])
  ids = _batch()
  np.testing.assert_allclose(_run(model, merged, ids, plain=True),
                             _run(model, tree, ids), atol=1e-5, rtol=0)
  # The adapter alone does not hold the rows merge overwrote: refused, with the fix.
  with pytest.raises(ValueError, match="embed_tokens.*original.*wrapped tree itself"):
    jaxlora.unmerge(merged, jaxlora.adapter(tree))
  back = jaxlora.unmerge(merged, tree)
  np.testing.assert_array_equal(back["embed_tokens"]["embedding"], orig)
  for k in ("lora_token_ids", "lora_token_rows"):
    np.testing.assert_array_equal(back["embed_tokens"][k], tree["embed_tokens"][k])


def _tiny(tied):
  cfg = dataclasses.replace(jaxlora.models.ModelConfig.tiny("llama"), tie_word_embeddings=tied)
  model = jaxlora.models.Decoder(cfg)
  return model, jaxlora.models.init(model, jax.random.key(0))


@pytest.mark.parametrize("tied", [pytest.param(False, marks=pytest.mark.slow), True],
                         ids=["untied", "tied"])
def test_training_changes_only_those_rows(tied):
  model, params = _tiny(tied)
  chosen = [3, 17, 30]
  tree = _wrap(model, params, targets="q_proj", trainable_tokens=chosen)
  ids = _batch() % 32
  ids[0, 5] = 30  # every chosen token in the input
  fwd = jaxlora.apply(model.apply)

  def loss(t):
    z = fwd({"params": t}, ids[:, :-1])
    return optax.softmax_cross_entropy_with_integer_labels(z, ids[:, 1:]).mean()

  # The split way: gradients and state for the trainable half only.
  trainable, frozen = jaxlora.split(tree)
  tx = optax.adam(1e-2)
  state = tx.init(trainable)
  step = jax.jit(lambda t, s, f: _step(tx, lambda t: loss(jaxlora.combine(t, f)), t, s))
  for _ in range(2):
    trainable, state = step(trainable, state, frozen)
  trained = jaxlora.combine(trainable, frozen)
  orig = np.asarray(params["embed_tokens"]["embedding"])
  np.testing.assert_array_equal(trained["embed_tokens"]["embedding"], orig)
  table = np.asarray(jaxlora.merge(trained)["embed_tokens"]["embedding"])
  assert np.nonzero(np.any(table != orig, axis=1))[0].tolist() == chosen
  assert np.any(trained["layers"]["self_attn"]["q_proj"]["lora_b"] != 0)


def test_full_tree_optimizer_freezes_table_and_ids():
  model = _Toy(True)
  tokens = jnp.array([[1, 4, 7, 4, 0]])
  params = model.init(jax.random.key(0), tokens)["params"]
  tree = jaxlora.wrap(params, rank=2, targets="mix", trainable_tokens=[4, 9])

  def loss(t):
    z = jaxlora.apply(model.apply)({"params": t}, tokens)
    return optax.softmax_cross_entropy_with_integer_labels(z, tokens).mean()

  # The full-tree way: jaxlora.optimizer freezes the rest (the int ids need allow_int).
  tx = jaxlora.optimizer(optax.adam(1e-2), tree)
  step = jax.jit(lambda t, s: _step(tx, loss, t, s, allow_int=True))
  full, state = step(tree, tx.init(tree))
  # The split way takes the same step.
  trainable, frozen = jaxlora.split(tree)
  half_tx = optax.adam(1e-2)
  half, _ = jax.jit(lambda t, s: _step(half_tx, lambda t: loss(jaxlora.combine(t, frozen)), t,
                                       s))(trainable, half_tx.init(trainable))
  np.testing.assert_array_equal(full["embed"]["embedding"], params["embed"]["embedding"])
  np.testing.assert_array_equal(full["embed"]["lora_token_ids"], [4, 9])
  assert full["embed"]["lora_token_ids"].dtype == jnp.int32
  np.testing.assert_allclose(full["embed"]["lora_token_rows"], half["embed"]["lora_token_rows"],
                             atol=1e-7)
  assert np.all(full["embed"]["lora_token_rows"] != tree["embed"]["lora_token_rows"])


def _step(tx, loss, t, state, allow_int=False):
  g = jax.grad(loss, allow_int=allow_int)(t)
  u, state = tx.update(g, state, t)
  return optax.apply_updates(t, u), state


def test_chunked_loss_reads_the_trained_rows():
  model, params = _tiny(True)
  tree = _wrap(model, params, targets="q_proj", trainable_tokens=[1, 5])
  tree["embed_tokens"]["lora_token_rows"] = tree["embed_tokens"]["lora_token_rows"] * -3.0
  ids = jnp.array([[1, 5, 2, 5, 7, 1]])
  fwd = jaxlora.apply(model.apply)

  @jax.jit
  def both(tree):
    hidden = fwd({"params": tree}, ids[:, :-1], return_hidden=True)
    chunked = jaxlora.models.chunked_cross_entropy(model, tree, hidden, ids[:, 1:], chunk_size=2)
    merged = jaxlora.merge(tree)  # the plain model on the merged tree: an independent path
    full = optax.softmax_cross_entropy_with_integer_labels(
        model.apply({"params": merged}, ids[:, :-1]), ids[:, 1:]).mean()
    return chunked, full

  chunked, full = both(tree)
  np.testing.assert_allclose(chunked, full, rtol=1e-5)


def test_adapter_shardings_follow_the_feature_axis():
  mesh = jax.make_mesh((1,), ("fsdp",), axis_types=(jax.sharding.AxisType.Auto,))
  table = jax.device_put(jnp.ones((10, 4)), NamedSharding(mesh, P(None, "fsdp")))
  kernel = jax.device_put(jnp.ones((4, 4)), NamedSharding(mesh, P("fsdp", None)))
  tree = jaxlora.wrap({"embed": {"embedding": table}, "d": {"kernel": kernel}}, rank=2,
                      trainable_tokens=[2, 3])
  sh = jaxlora.sharding.adapter_shardings(tree)
  assert sh["embed"]["lora_token_rows"].spec == P(None, "fsdp")
  assert sh["embed"]["lora_token_ids"].spec == P()
  assert sh["d"]["lora_a"].spec == P("fsdp", None)
  # Through the model's own logical axes: the table's ("vocab", "embed") -> (None, "fsdp").
  model, params = _tiny(True)
  mesh = jaxlora.sharding.make_mesh(fsdp=-1)
  tree = _wrap(model, params, trainable_tokens=[1, 2])
  sh = jaxlora.sharding.tree_shardings(tree, jaxlora.sharding.param_shardings(model, mesh))
  table = sh["embed_tokens"]["embedding"].spec
  assert sh["embed_tokens"]["lora_token_rows"].spec == P(None, table[1])
  assert sh["embed_tokens"]["lora_token_ids"].spec == P()


@pytest.mark.slow
def test_generation_with_trained_tokens_equals_the_merged_model():
  model, params = _tiny(True)
  tree = _wrap(model, params, targets="q_proj", trainable_tokens=[1, 5, 9])
  rows = tree["embed_tokens"]["lora_token_rows"]
  tree["embed_tokens"]["lora_token_rows"] = rows + 2 * jax.random.normal(jax.random.key(3),
                                                                         rows.shape)
  prompt = jnp.array([[1, 2, 5], [7, 9, 9]])
  out = jaxlora.generate(model, tree, prompt, max_new_tokens=6)
  ref = jaxlora.generate(model, jaxlora.merge(tree), prompt, max_new_tokens=6)
  np.testing.assert_array_equal(out, ref)


def test_orbax_round_trip(base, tmp_path):
  tied, _, model, params = base
  tree = _changed_tree(params, model)
  jaxlora.save(str(tmp_path / "ckpt"), tree)
  back = jaxlora.load(str(tmp_path / "ckpt"), params)
  for k in ("lora_token_ids", "lora_token_rows"):
    np.testing.assert_array_equal(back["embed_tokens"][k], tree["embed_tokens"][k])
  assert back["embed_tokens"]["lora_token_ids"].dtype == jnp.int32
  ids = _batch()
  np.testing.assert_array_equal(_run(model, back, ids),
                                _run(model, tree, ids))


def test_works_under_eval_shape():
  cfg = jaxlora.models.ModelConfig.tiny("llama")
  model = jaxlora.models.Decoder(cfg)
  params = jax.eval_shape(lambda: jaxlora.models.init(model, jax.random.key(0)))
  tree = jax.eval_shape(lambda p: jaxlora.wrap(p, rank=2, targets="q_proj", layout=model,
                                               trainable_tokens=[0, 9]), params)
  assert tree["embed_tokens"]["lora_token_rows"].shape == (2, cfg.hidden_size)
  assert tree["embed_tokens"]["lora_token_ids"].dtype == jnp.int32


def test_errors():
  gpt2 = jaxlora.models.Decoder(jaxlora.models.ModelConfig.tiny("gpt2"))
  params = jaxlora.models.init(gpt2, jax.random.key(0))
  vocab = params["wte"]["embedding"].shape[0]
  layout = gpt2.lora_layout(params)
  wrap = lambda tokens, **kw: jaxlora.wrap(params, rank=2, targets="c_attn", layout=layout,
                                           trainable_tokens=tokens, **kw)
  # A list goes to the input embedding (wte), not the position table (wpe).
  assert "lora_token_ids" in wrap([1])["wte"] and "lora_token_ids" not in wrap([1])["wpe"]
  with pytest.raises(ValueError, match=f"token id {vocab} is outside the vocabulary of {vocab}"):
    wrap([1, vocab])
  with pytest.raises(ValueError, match="token id -1 is outside"):
    wrap([-1])
  with pytest.raises(ValueError, match="token id 4 is listed twice"):
    wrap([4, 2, 4])
  with pytest.raises(ValueError, match="empty"):
    wrap([])
  with pytest.raises(TypeError, match="integer token ids; 1.5"):
    wrap([1, 1.5])
  with pytest.raises(TypeError, match="integer token ids; True"):
    wrap([True])
  with pytest.raises(TypeError, match="list of token ids"):
    wrap("12")
  with pytest.raises(TypeError, match="integer ids"):
    wrap(np.array([1.0, 2.0]))
  with pytest.raises(ValueError, match=r"'lm_head\$' matches no embedding.*\['wpe', 'wte'\]"):
    wrap({"lm_head$": [1]})
  with pytest.raises(ValueError, match="matches several embeddings"):
    wrap({"w": [1]})
  assert wrap({"wpe": np.array([0, 3])})["wpe"]["lora_token_ids"].tolist() == [0, 3]
  # Several tables none of which is named as an input embedding: the dict form is needed.
  two = {"a": {"embedding": jnp.ones((5, 2))}, "b": {"embedding": jnp.ones((5, 2))},
         "d": {"kernel": jnp.ones((2, 2))}}
  with pytest.raises(ValueError, match=r"several embeddings \['a', 'b'\].*dict form"):
    jaxlora.wrap(two, rank=1, trainable_tokens=[1])
  with pytest.raises(ValueError, match="no embedding"):
    jaxlora.wrap({"d": {"kernel": jnp.ones((2, 2))}}, rank=1, trainable_tokens=[1])
  with pytest.raises(ValueError, match="trained in full"):
    wrap([1], train_extra="wte")


class _OwnLookup(nn.Module):
  """Reads its table with its own `jnp.take`: the interceptor cannot see it."""

  @nn.compact
  def __call__(self, tokens):
    table = self.param("embedding", nn.initializers.normal(1.0), (7, 3))
    return nn.Dense(3, name="d")(jnp.take(table, tokens, axis=0))


class _Net(nn.Module):
  @nn.compact
  def __call__(self, tokens):
    return _OwnLookup(name="embed")(tokens)


def test_tokens_never_reached_are_an_error():
  model = _Net()
  tokens = jnp.array([[1, 2]])
  params = model.init(jax.random.key(0), tokens)["params"]
  tree = jaxlora.wrap(params, rank=1, targets="d", trainable_tokens=[2])
  with pytest.raises(ValueError, match=r"\['embed'\] were never reached.*nn.Embed"):
    jaxlora.apply(model.apply)({"params": tree}, tokens)


def test_banks_and_adapter_merging_refuse_trained_tokens():
  base = {"embed": {"embedding": jnp.ones((6, 2))}, "d": {"kernel": jnp.ones((2, 2))}}
  tree = jaxlora.wrap(base, rank=1, trainable_tokens=[1])
  plain = jaxlora.wrap(base, rank=1)
  with pytest.raises(ValueError, match="'embed' trains tokens.*a bank"):
    jaxlora.stack({"a": plain, "b": tree})
  with pytest.raises(ValueError, match="'embed' trains tokens.*merge_adapters"):
    jaxlora.merge_adapters([plain, tree], [0.5, 0.5])


@pytest.mark.slow
def test_gpt2_tokens_serve_in_peft(tmp_path):
  torch, transformers = pytest.importorskip("torch"), pytest.importorskip("transformers")
  torch.manual_seed(0)
  transformers.GPT2LMHeadModel(transformers.GPT2Config(
      vocab_size=96, n_embd=32, n_layer=2, n_head=4, n_positions=64,
      initializer_range=0.1)).save_pretrained(str(tmp_path / "base"))
  model, params = jaxlora.models.from_pretrained(str(tmp_path / "base"))
  tree = jaxlora.wrap(params, rank=2, targets="c_attn", layout=model, trainable_tokens=IDS)
  assert "lora_token_rows" in tree["wte"] and "lora_token_rows" not in tree["wpe"]
  rows = tree["wte"]["lora_token_rows"]
  tree["wte"]["lora_token_rows"] = rows + jax.random.normal(jax.random.key(2), rows.shape)
  jaxlora.peft.save(str(tmp_path / "a"), tree, model=model)
  ids = _batch()
  ref = _peft_logits(str(tmp_path / "base"), str(tmp_path / "a"), ids)
  np.testing.assert_allclose(_run(model, tree, ids), ref, atol=1e-5, rtol=1e-6)  # logits ~30
  back = jaxlora.peft.load(str(tmp_path / "a"), params, model=model)
  np.testing.assert_array_equal(back["wte"]["lora_token_rows"], tree["wte"]["lora_token_rows"])
