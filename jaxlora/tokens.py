"""Trainable tokens: a few rows of an embedding table trained on their own.

`jaxlora.wrap(..., trainable_tokens=...)` gives an embedding's module dict
(``{'embedding': E}``, ``E`` of shape ``(vocab, features)``) two more leaves:

- ``lora_token_ids``: int32 ``(k,)``, the token ids, frozen;
- ``lora_token_rows``: ``(k, features)``, the trained rows, initialised to
  ``E[ids]``.

The trained rows replace those rows of ``E`` (PEFT's ``trainable_token_indices``
stores the new values the same way, not a difference). Under `jaxlora.apply`,
``nn.Embed.__call__`` returns the trained row for a trained id, and
``nn.Embed.attend`` (an output head tied to the embedding) returns
``x @ rows.T`` in those logit columns. Both are computed from the ``k`` rows
alone, by comparison and gather: the table itself is never copied or
differentiated in a training step, so gradients and optimizer state exist for
the ``k`` rows only. `jaxlora.merge` writes the rows into ``E``.

Which embedding a plain list of ids applies to: the tree's only ``nn.Embed``
table (a 2-D ``embedding`` leaf), or, if there are several (GPT-2's token and
position tables), the one whose module name is one of
`INPUT_EMBEDDING_NAMES`; a tied output head reads that same table. Any other
choice takes the dict form ``{path regex: ids}``.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Union

import jax
import jax.numpy as jnp
import numpy as np

from jaxlora import _multihost
from jaxlora import _tree
from jaxlora._tree import EXTRA_KEY, TOKEN_IDS_KEY, TOKEN_ROWS_KEY
from jaxlora.errors import InputError, InputTypeError

EMBEDDING_KEY = "embedding"  # nn.Embed's param
# Module names that mark a model's input (token) embedding when a tree has several tables.
INPUT_EMBEDDING_NAMES = ("embed_tokens", "wte", "word_embeddings", "tok_embeddings",
                         "embed_in", "token_embedding", "token_embeddings")

TokenSelector = Union[Sequence[int], Mapping[str, Sequence[int]]]
_PEFT_DELTA = "token_adapter.trainable_tokens_delta"


def embedding_modules(params: Mapping) -> list[tuple[_tree.Path, Mapping]]:
  """Module dicts holding a 2-D ``embedding`` leaf (``nn.Embed`` tables)."""
  out = []
  for path, mod in _tree.iter_modules(params):
    e = mod.get(EMBEDDING_KEY)
    if e is not None and not isinstance(e, Mapping) and len(getattr(e, "shape", ())) == 2:
      out.append((path, mod))
  return out


def token_modules(params: Mapping) -> list[tuple[_tree.Path, Mapping]]:
  """Module dicts that carry trained tokens (a ``lora_token_ids`` leaf)."""
  return [(p, m) for p, m in _tree.iter_modules(params) if TOKEN_IDS_KEY in m]


def input_embedding(params: Mapping) -> _tree.Path:
  """The path of the table a plain list of token ids applies to (see the module notes).

  Args:
    params: a param tree (no outer ``{'params': ...}``).

  Returns:
    The module path of the input embedding.

  Raises:
    InputError: no embedding, or several and none (or more than one) named as
      an input embedding.

  >>> import jax, jaxlora
  >>> model = jaxlora.models.Decoder(jaxlora.models.ModelConfig.tiny("gpt2"))
  >>> input_embedding(jaxlora.models.init(model, jax.random.key(0)))  # not 'wpe'
  ('wte',)
  """
  tables = embedding_modules(params)
  if not tables:
    raise InputError("trainable_tokens: the tree has no embedding (a module dict holding a 2-D "
                     "'embedding' leaf, as nn.Embed makes), so there are no token rows to train.")
  if len(tables) == 1:
    return tables[0][0]
  named = [p for p, _ in tables if p[-1] in INPUT_EMBEDDING_NAMES]
  if len(named) == 1:
    return named[0]
  paths = [_tree.join(p) for p, _ in tables]
  raise InputError(
      f"trainable_tokens: the tree has several embeddings {paths}, and which one reads the input "
      "ids cannot be told from the tree. Name it with the dict form, e.g. "
      f"trainable_tokens={{{paths[0]!r}: [ids]}}.")


def _check_ids(value: Any, where: str, vocab: int) -> np.ndarray:
  """`value` as int32 ids: integers in ``[0, vocab)``, no repeats; else an error naming them."""
  if isinstance(value, (str, bytes, Mapping)) or not hasattr(value, "__len__"):
    raise InputTypeError(f"trainable_tokens for '{where}' must be a list of token ids (ints), "
                         f"got {type(value).__name__}: {value!r}.")
  if isinstance(value, (np.ndarray, jax.Array)):
    if isinstance(value, jax.core.Tracer):
      raise InputTypeError(f"trainable_tokens for '{where}': token ids must be concrete values "
                           "(a list or a NumPy array), not traced ones.")
    arr = np.asarray(value)
    if arr.ndim != 1 or not (np.issubdtype(arr.dtype, np.integer) or arr.size == 0):
      raise InputTypeError(f"trainable_tokens for '{where}' must be a 1-D list of integer ids, "
                           f"got an array of {arr.dtype} {arr.shape}.")
    ids = [int(i) for i in arr]
  else:
    bad = [i for i in value if isinstance(i, bool) or not isinstance(i, (int, np.integer))]
    if bad:
      raise InputTypeError(f"trainable_tokens for '{where}' must hold integer token ids; "
                           f"{bad[0]!r} ({type(bad[0]).__name__}) is not one.")
    ids = [int(i) for i in value]
  if not ids:
    raise InputError(f"trainable_tokens for '{where}' is empty; give at least one token id.")
  out = [i for i in ids if not 0 <= i < vocab]
  if out:
    raise InputError(f"trainable_tokens for '{where}': token id {out[0]} is outside the "
                     f"vocabulary of {vocab} rows (ids 0 to {vocab - 1}).")
  seen: set[int] = set()
  for i in ids:
    if i in seen:  # two trained rows for one token: which one wins would be arbitrary
      raise InputError(f"trainable_tokens for '{where}': token id {i} is listed twice; list "
                       "each id once.")
    seen.add(i)
  return np.asarray(ids, np.int32)


def resolve(params: Mapping, selector: TokenSelector) -> dict[_tree.Path, np.ndarray]:
  """Checks `selector` against the tree: ``{embedding path: int32 ids}``.

  Args:
    params: a param tree (no outer ``{'params': ...}``).
    selector: a list of ids (the input embedding, see `input_embedding`), or
      ``{regex: ids}`` where each regex is searched in the '/'-joined module
      paths of the tree's embeddings and must find exactly one.

  Returns:
    The token ids per embedding module.

  Raises:
    InputError: ids outside the vocabulary, repeated ids, an empty list, a
      regex matching no embedding (or several), two regexes for one table.
    InputTypeError: anything but integer ids.

  >>> import jax, jaxlora
  >>> model = jaxlora.models.Decoder(jaxlora.models.ModelConfig.tiny("gpt2"))
  >>> params = jaxlora.models.init(model, jax.random.key(0))
  >>> resolve(params, {"wpe": [0, 2]})
  {('wpe',): array([0, 2], dtype=int32)}
  """
  tables = dict(embedding_modules(params))
  if isinstance(selector, Mapping):
    out: dict[_tree.Path, np.ndarray] = {}
    for rx, ids in selector.items():
      if not isinstance(rx, str):
        raise InputTypeError(f"trainable_tokens keys must be module path regexes (str), got "
                             f"{rx!r}.")
      try:
        pattern = re.compile(rx)
      except re.error as e:
        raise InputError(f"trainable_tokens key {rx!r} is not a valid regex ({e}).") from None
      hits = [p for p in tables if pattern.search(_tree.join(p))]
      paths = [_tree.join(p) for p in tables] or "none"
      if len(hits) != 1:
        what = "no embedding" if not hits else f"several embeddings {[_tree.join(p) for p in hits]}"
        raise InputError(f"trainable_tokens key {rx!r} matches {what}; it must match exactly one "
                         f"of the tree's embedding modules (paths: {paths}).")
      if hits[0] in out:
        raise InputError(f"trainable_tokens: two keys select '{_tree.join(hits[0])}'; give each "
                         "embedding one list of ids.")
      out[hits[0]] = _check_ids(ids, _tree.join(hits[0]), tables[hits[0]][EMBEDDING_KEY].shape[0])
    if not out:
      raise InputError("trainable_tokens is an empty dict; give {module regex: [ids]}.")
    return out
  path = input_embedding(params)
  return {path: _check_ids(selector, _tree.join(path), tables[path][EMBEDDING_KEY].shape[0])}


def add(params: Mapping, selector: TokenSelector, *, dtype: Any = None) -> dict:
  """`params` with trained-token leaves on the selected embeddings (`jaxlora.wrap`'s step).

  Args:
    params: a param tree (no outer ``{'params': ...}``); arrays or tracers.
    selector: see `resolve`.
    dtype: dtype of the trained rows; default float32 for a low-precision
      table, else the table's dtype.

  Returns:
    A new tree; each selected module gains ``lora_token_ids`` and
    ``lora_token_rows`` (``= E[ids]``).

  >>> import jax.numpy as jnp
  >>> t = add({"emb": {"embedding": jnp.arange(8.).reshape(4, 2)}}, [3, 1])
  >>> t["emb"]["lora_token_rows"].tolist()
  [[6.0, 7.0], [2.0, 3.0]]
  """
  new = {}
  for path, ids in resolve(params, selector).items():
    mod = _tree.lookup(params, path)
    if TOKEN_IDS_KEY in mod:
      raise InputError(f"'{_tree.join(path)}' already trains tokens; wrap the base params.")
    if EXTRA_KEY in mod:
      raise InputError(f"'{_tree.join(path)}' is already trained in full; train either the whole "
                       "embedding or some of its tokens, not both.")
    table = mod[EMBEDDING_KEY]
    wide = np.float64 if jnp.dtype(table.dtype) == np.float64 else np.float32
    rows_dtype = jnp.dtype(dtype) if dtype is not None else np.dtype(wide)
    out = dict(mod)
    out[TOKEN_IDS_KEY] = jnp.asarray(ids)
    out[TOKEN_ROWS_KEY] = jnp.take(table, jnp.asarray(ids), axis=0).astype(rows_dtype)
    new[path] = out
  return _tree.replace_modules(params, new)


# --- the forward pass (dispatched from jaxlora.forward's interceptor) -----------------------

def replace_rows(y: jax.Array, inputs: jax.Array, ids: jax.Array, rows: jax.Array) -> jax.Array:
  """Embedding lookups `y` (``(*batch, features)``) with trained ids' rows taken from `rows`.

  A ``(*batch, k)`` comparison and a gather of ``k`` rows: no copy of the
  table, and the gather's transpose sends each position's gradient to its row.

  >>> import jax.numpy as jnp
  >>> y = jnp.zeros((3, 2)); rows = jnp.array([[1., 1.], [2., 2.]])
  >>> replace_rows(y, jnp.array([5, 0, 9]), jnp.array([9, 5]), rows).tolist()
  [[2.0, 2.0], [0.0, 0.0], [1.0, 1.0]]
  """
  inputs = jnp.asarray(inputs)
  match = inputs[..., None] == ids.astype(inputs.dtype).reshape((1,) * inputs.ndim + (-1,))
  hit = jnp.any(match, axis=-1, keepdims=True)
  picked = jnp.take(rows.astype(y.dtype), jnp.argmax(match, axis=-1), axis=0)
  return jnp.where(hit, picked, y)


def replace_columns(logits: jax.Array, query: jax.Array, ids: jax.Array,
                    rows: jax.Array, precision: Any = None) -> jax.Array:
  """Tied-head logits with the trained ids' columns recomputed as ``query @ rows.T``.

  `query` and `rows` come already in the head's compute dtype. Only ``k``
  columns are written (a scatter into the logits, not into the table).

  >>> import jax.numpy as jnp
  >>> out = replace_columns(jnp.zeros((1, 4)), jnp.ones((1, 2)), jnp.array([2]),
  ...                       jnp.array([[3., 4.]]))
  >>> out.tolist()
  [[0.0, 0.0, 7.0, 0.0]]
  """
  z = jnp.dot(query, rows.T, precision=precision)
  return logits.at[..., ids].set(z.astype(logits.dtype))


def _leaves(module: Any) -> tuple[jax.Array, jax.Array, jax.Array] | None:
  if not module.has_variable("params", TOKEN_IDS_KEY):
    return None
  table = module.get_variable("params", EMBEDDING_KEY)
  ids = module.get_variable("params", TOKEN_IDS_KEY)
  # Rounded to the table's dtype first, as `merge` stores them: the factored and the merged
  # model compute the same values.
  rows = jnp.asarray(module.get_variable("params", TOKEN_ROWS_KEY)).astype(table.dtype)
  return table, ids, rows


def _call(module: Any, next_fun: Callable[..., Any], args: tuple, kwargs: dict,
          reached: set[str]):
  """The table's own result, and its token leaves (None without any; else marked reached)."""
  y = next_fun(*args, **kwargs)
  leaves = _leaves(module)
  if leaves is not None:
    reached.add(_tree.join(module.path))
  return y, leaves


def lookup(module: Any, next_fun: Callable[..., Any], args: tuple, kwargs: dict,
           reached: set[str]) -> jax.Array:
  """``nn.Embed.__call__`` with trained rows (a `jaxlora.apply` interceptor entry)."""
  y, leaves = _call(module, next_fun, args, kwargs, reached)
  if leaves is None:
    return y
  _, ids, rows = leaves
  (rows,) = module.promote_dtype(rows, dtype=module.dtype, inexact=False)
  return replace_rows(y, args[0] if args else kwargs["inputs"], ids, rows)


def attend(module: Any, next_fun: Callable[..., Any], args: tuple, kwargs: dict,
           reached: set[str]) -> jax.Array:
  """``nn.Embed.attend`` (a tied output head) with trained rows (an interceptor entry)."""
  y, leaves = _call(module, next_fun, args, kwargs, reached)
  if leaves is None:
    return y
  _, ids, rows = leaves
  query, rows = module.promote_dtype(args[0] if args else kwargs["query"], rows,
                                     dtype=module.dtype)
  return replace_columns(y, query, ids, rows)


# --- merge, unmerge, counts, shardings --------------------------------------------------------

def merge_rows(params: Mapping) -> dict:
  """Writes each module's trained rows into its table and drops the token leaves.

  >>> import jax.numpy as jnp
  >>> t = add({"emb": {"embedding": jnp.zeros((3, 2))}}, [1])
  >>> t["emb"]["lora_token_rows"] = jnp.ones((1, 2))
  >>> merge_rows(t)["emb"]["embedding"].tolist()
  [[0.0, 0.0], [1.0, 1.0], [0.0, 0.0]]
  """
  new = {}
  for path, mod in token_modules(params):
    table = jnp.asarray(mod[EMBEDDING_KEY])
    out = {k: v for k, v in mod.items() if k not in (TOKEN_IDS_KEY, TOKEN_ROWS_KEY)}
    out[EMBEDDING_KEY] = table.at[mod[TOKEN_IDS_KEY]].set(
        jnp.asarray(mod[TOKEN_ROWS_KEY]).astype(table.dtype))
    new[path] = out
  return _tree.replace_modules(params, new)


def unmerge_rows(merged: Mapping, adapter: Mapping) -> dict:
  """Puts the token leaves of `adapter` back on `merged`, restoring the tables' rows.

  Merging overwrote the trained rows, and an adapter (`jaxlora.adapter`) holds
  the trained values only, so the original rows come from the table in
  `adapter` itself: pass the wrapped tree. Without it this is an error rather
  than a tree whose embedding silently keeps the trained rows.

  Raises:
    InputError: `adapter` holds no table to restore the rows from, or the
      table does not fit.
  """
  new = {}
  for path, amod in token_modules(adapter):
    where = _tree.join(path)
    node = _tree.lookup(merged, path, None)
    if not isinstance(node, Mapping) or EMBEDDING_KEY not in node:
      raise InputError(f"The adapter trains tokens of '{where}' but the merged params have no "
                       f"embedding at '{where}/embedding'; the adapter belongs to another model.")
    ids = amod[TOKEN_IDS_KEY]
    original = amod.get(EMBEDDING_KEY)
    if original is None:
      raise InputError(
          f"'{where}' trains tokens {np.asarray(ids).tolist()[:8]}: merging overwrote those rows "
          "of the embedding, and the adapter holds only their trained values, not the original "
          "ones. Pass the wrapped tree itself as `adapter_tree` (its embedding holds the "
          "originals), or wrap the base params again and load the adapter onto them.")
    table = jnp.asarray(node[EMBEDDING_KEY])
    if tuple(original.shape) != tuple(table.shape):
      raise InputError(f"'{where}/embedding' is {tuple(table.shape)} in the merged params but "
                       f"{tuple(original.shape)} in `adapter_tree`; they belong to other models.")
    out = dict(node)
    out[EMBEDDING_KEY] = table.at[ids].set(jnp.take(jnp.asarray(original), ids, axis=0)
                                           .astype(table.dtype))
    out[TOKEN_IDS_KEY] = ids
    out[TOKEN_ROWS_KEY] = amod[TOKEN_ROWS_KEY]
    new[path] = out
  return _tree.replace_modules(merged, new)


def count(params: Mapping) -> int:
  """The number of trained token parameters, ``k * features`` per table.

  >>> import jax.numpy as jnp
  >>> count(add({"emb": {"embedding": jnp.zeros((9, 4))}}, [1, 5]))
  8
  """
  return sum(int(np.prod(m[TOKEN_ROWS_KEY].shape)) for _, m in token_modules(params))


def shardings(params: Mapping) -> dict[_tree.Path, dict[str, Any]]:
  """``{module path: {leaf: sharding}}`` for the token leaves of `params`.

  The rows take the table's feature-axis sharding (their ``k`` axis is
  unsharded); the ids are replicated. A table without a `NamedSharding` gives
  its own sharding to both. Tables absent from `params` (an adapter alone)
  leave their leaves out.
  """
  from jax.sharding import NamedSharding, PartitionSpec  # pylint: disable=import-outside-toplevel
  out = {}
  for path, mod in token_modules(params):
    sharding = getattr(mod.get(EMBEDDING_KEY), "sharding", None)
    if sharding is None:
      continue
    if isinstance(sharding, NamedSharding):
      spec = tuple(sharding.spec) + (None,) * (2 - len(sharding.spec))
      out[path] = {TOKEN_IDS_KEY: NamedSharding(sharding.mesh, PartitionSpec()),
                   TOKEN_ROWS_KEY: NamedSharding(sharding.mesh, PartitionSpec(None, spec[1]))}
    else:
      out[path] = {TOKEN_IDS_KEY: sharding, TOKEN_ROWS_KEY: sharding}
  return out


def refuse(params: Mapping, what: str) -> None:
  """Raises an `InputError` if `params` trains tokens: `what` takes LoRA adapters only.

  >>> refuse({"d": {"lora_a": 0}}, "jaxlora.stack")
  """
  mods = token_modules(params)
  if mods:
    raise InputError(
        f"'{_tree.join(mods[0][0])}' trains tokens (lora_token_rows); {what} takes LoRA "
        "adapters without trained tokens (their rows replace table rows, which neither add up "
        "nor route per row). Merge that adapter into its base (jaxlora.merge) instead.")


# --- the PEFT format (PEFT's `trainable_token_indices`) ---------------------------------------

def peft_export(params: Mapping, model: Any, dtype: Any = None) -> tuple[dict, Any]:
  """The PEFT tensors and ``trainable_token_indices`` value of the trained tokens.

  PEFT saves the trained rows of each wrapped embedding under
  ``base_model.model.<module>.token_adapter.trainable_tokens_delta``
  (``(k, features)``, the new values themselves); a head tied to the embedding
  shares them and saves nothing of its own. The config holds a list of ids
  when only the input embedding trains tokens, else ``{module name: ids}``.

  Args:
    params: a wrapped param tree (no outer ``{'params': ...}``).
    model: names modules as Hugging Face does (`jaxlora.model_api.HubNames`).
    dtype: tensor dtype on disk (default: the rows').

  Returns:
    ``(tensors, trainable_token_indices)``; ``({}, None)`` without tokens.
  """
  mods = token_modules(params)
  if not mods:
    return {}, None
  tensors, per_name = {}, {}
  for path, mod in mods:
    name = model.hf_module_name(path, None)
    rows = _multihost.host_value(mod[TOKEN_ROWS_KEY])
    tensors[f"base_model.model.{name}.{_PEFT_DELTA}"] = np.ascontiguousarray(
        rows.astype(dtype) if dtype is not None else rows)
    per_name[name] = [int(i) for i in _multihost.host_value(mod[TOKEN_IDS_KEY])]
  try:
    only_input = len(mods) == 1 and mods[0][0] == input_embedding(params)
  except InputError:
    only_input = False
  return tensors, (next(iter(per_name.values())) if only_input else per_name)


def is_peft_key(key: str) -> bool:
  """True for a PEFT tensor name holding trained token rows."""
  return _peft_name(key) is not None


def _peft_name(key: str) -> str | None:
  m = re.fullmatch(rf"(?:base_model\.model\.)?(.+)\.{re.escape(_PEFT_DELTA)}(?:\.[A-Za-z0-9_]+)?",
                   key)
  return None if m is None else m.group(1)


def peft_import(source: str, indices: Any, weights: Mapping[str, np.ndarray], params: Mapping,
                model: Any, dtype: Any) -> dict:
  """`params` with the token leaves a PEFT adapter's ``trainable_token_indices`` describes.

  Args:
    source: the adapter's path, for messages.
    indices: the config's ``trainable_token_indices``: a list, or
      ``{module name: ids}`` matched as PEFT does (a suffix of the module
      name), or None (then the weights must hold no token rows).
    weights: the adapter's tensors (those that are not token rows are ignored).
    params: the base param tree (no outer ``{'params': ...}``).
    model: names modules as Hugging Face does (`jaxlora.model_api.HubNames`).
    dtype: dtype of the trained rows.

  Returns:
    The new tree (`params` itself without tokens).

  Raises:
    InputError: names that match no embedding, ids that do not fit, rows
      missing from the weights or of the wrong shape, rows nobody asked for.
  """
  tables = dict(embedding_modules(params))
  names = {model.hf_module_name(p, None): p for p in tables}
  rows_by_path: dict[_tree.Path, tuple[str, np.ndarray]] = {}
  for key, value in weights.items():
    name = _peft_name(key)
    if name is not None:
      rows_by_path[model.flax_module_path(name)[0]] = (key, np.asarray(value))
  wanted: dict[_tree.Path, Any] = {}
  if indices is None:
    pass
  elif isinstance(indices, Mapping):
    for suffix, ids in indices.items():
      hits = [p for n, p in names.items() if n == suffix or n.endswith("." + suffix)]
      if len(hits) == 1:
        wanted[hits[0]] = ids
        continue
      # PEFT lists a head tied to the embedding too (it shares the embedding's rows and saves no
      # tensor): a name with no module here, with the same ids as another entry, is that head.
      tied = (not hits and _tree.lookup(params, model.flax_module_path(suffix)[0], None) is None
              and any(v == ids for k, v in indices.items() if k != suffix))
      if not tied:
        raise InputError(f"{source}: trainable_token_indices names {suffix!r}, which matches "
                         f"{'several' if hits else 'no'} embedding of this model (embeddings: "
                         f"{sorted(names)}); jaxlora trains tokens of nn.Embed tables only.")
  else:
    wanted = {input_embedding(params): indices}
  new = {}
  for path, ids in wanted.items():
    where = _tree.join(path)
    checked = _check_ids(ids, where, tables[path][EMBEDDING_KEY].shape[0])
    if path not in rows_by_path:
      raise InputError(f"{source}: trainable_token_indices covers "
                       f"{model.hf_module_name(path, None)!r} but the weights hold no "
                       f"'...{_PEFT_DELTA}' tensor for it.")
    key, rows = rows_by_path.pop(path)
    features = tables[path][EMBEDDING_KEY].shape[1]
    if rows.shape != (len(checked), features):
      raise InputError(f"{source}: {key!r} is {rows.shape}; {len(checked)} token ids on a table "
                       f"of {features} features need ({len(checked)}, {features}).")
    mod = dict(tables[path])
    mod[TOKEN_IDS_KEY] = jnp.asarray(checked)
    mod[TOKEN_ROWS_KEY] = jnp.asarray(rows, dtype)
    new[path] = mod
  if rows_by_path:
    key = next(iter(rows_by_path.values()))[0]
    raise InputError(f"{source}: tensor {key!r} holds token rows that trainable_token_indices "
                     "does not list.")
  return _tree.replace_modules(params, new)
