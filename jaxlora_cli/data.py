"""Data from local files: plain text, prompt/completion pairs and chat messages.

By default examples are padded to length buckets (powers of two up to
`max_length`), one per row: every row keeps its own attention and positions,
and the number of compiled shapes stays small (one per bucket). The cost is the
compute spent on padding, which bucketing keeps under 2x.

With `data.packing`, training rows hold several examples each (greedy first-fit
in the shuffled order), marked by `segment_ids`: the model attends only within
a segment and restarts positions there, and the loss never predicts across a
segment boundary, so each example trains as if it were alone. Evaluation
batches stay one example per row.

With `data.adapter_field`, each example carries the name of its adapter
(`Example.adapter`) and batches gain ``adapter_ids`` (``adapter_index`` maps
names to bank slots; -1 marks an empty row).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
from collections.abc import Iterator
from typing import Any

import numpy as np

from jaxlora_cli.config import ConfigError, DataSection

_BUILDERS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet",
             ".txt": "text", ".text": "text"}
_KINDS = {"json": "JSON or JSON lines", "csv": "CSV", "parquet": "Parquet", "text": "text"}


@dataclasses.dataclass
class Example:
  ids: np.ndarray       # int32 token ids
  targets: np.ndarray   # float32, 1 where the token is a training target
  adapter: str | None = None  # the row's adapter name (data.adapter_field), if any
  # data.format=preference: `ids`/`targets` are prompt + chosen, `rejected` prompt + rejected.
  rejected: Example | None = None
  # data.format=prompts: the prompt as text and the row's columns, for the reward function.
  prompt: str | None = None
  columns: dict | None = None
  row: int = -1  # the data row it came from (named in errors)

  def __len__(self) -> int:
    """Tokens of the longer side (both sides of a pair share one padded length)."""
    return max(len(self.ids), 0 if self.rejected is None else len(self.rejected.ids))


@contextlib.contextmanager
def _quiet_datasets() -> Iterator[Any]:
  """`datasets` without progress bars and without its own log lines while it loads: on an
  unreadable file it logs an ERROR before it raises, and from its cache it warns "using the
  cached version"; the callers' errors say what matters, with the path and the fix."""
  import datasets  # pylint: disable=import-outside-toplevel

  datasets.disable_progress_bars()
  logger = logging.getLogger("datasets")
  level = logger.level
  logger.setLevel(logging.CRITICAL)
  try:
    yield datasets
  finally:
    logger.setLevel(level)


def read_rows(path: str) -> Any:
  """The rows of a local jsonl/json/csv/parquet/text file, or the ``train`` split of a Hugging
  Face Hub dataset id (``org/name``, `read_hub_dataset`), through `datasets`."""
  if not path:
    raise ConfigError("no data file given: set data.train_file=<path>")
  if not os.path.exists(path):
    from jaxlora.models import hub  # pylint: disable=import-outside-toplevel
    if hub.is_repo_id(path):
      return read_hub_dataset(path)
  if not os.path.isfile(path):
    raise ConfigError(f"data file {path} not found")
  ext = os.path.splitext(path)[1].lower()
  if ext not in _BUILDERS:
    raise ConfigError(f"data file {path}: unknown extension {ext!r}; use one of "
                      f"{', '.join(sorted(_BUILDERS))}")
  if os.path.getsize(path) == 0:
    raise ConfigError(f"data file {path} holds no rows")
  try:
    with _quiet_datasets() as datasets:
      ds = datasets.load_dataset(_BUILDERS[ext], data_files=path, split="train",
                                 keep_in_memory=True)
  except Exception as e:  # datasets raises many types for unreadable files
    raise ConfigError(f"data file {path} is not valid {_KINDS[_BUILDERS[ext]]}: {_cause(e)}; "
                      "fix the file, or give it the extension of its format (one of "
                      f"{', '.join(sorted(_BUILDERS))})") from None
  if len(ds) == 0:
    raise ConfigError(f"data file {path} holds no rows")
  return ds


def read_hub_dataset(repo_id: str, split: str = "train") -> Any:
  """The `split` of a Hugging Face Hub dataset, ``datasets.load_dataset(repo_id, split=split)``.

  With ``HF_DATASETS_OFFLINE=1`` or ``HF_HUB_OFFLINE=1`` (the command line sets both unless the
  environment has them) `datasets` reads its local cache only: a dataset loaded once before.

  >>> import datasets, pytest
  >>> mp = pytest.MonkeyPatch()
  >>> mp.setattr(datasets.config, "HF_HUB_OFFLINE", True)
  >>> mp.setattr(datasets.config, "HF_DATASETS_CACHE", __import__("tempfile").mkdtemp())
  >>> read_hub_dataset("no-such-org/no-such-data")  # doctest: +ELLIPSIS
  Traceback (most recent call last):
  ...
  jaxlora_cli.config.ConfigError: data file no-such-org/no-such-data is not a local file, ...
  >>> mp.undo()
  """
  try:
    with _quiet_datasets() as datasets:
      ds = datasets.load_dataset(repo_id, split=split, keep_in_memory=True)
  except (ConnectionError, FileNotFoundError) as e:  # offline and not cached; no such dataset
    load = f"datasets.load_dataset('{repo_id}', split='{split}')"
    raise ConfigError(
        f"data file {repo_id} is not a local file, and the Hugging Face Hub dataset {repo_id} "
        f"could not be loaded ({_cause(e)}); offline, only datasets loaded before are in the "
        f"cache: load it once with network access (HF_HUB_OFFLINE=0 HF_DATASETS_OFFLINE=0 "
        f"python -c \"import datasets; {load}\"), or give a local file") from None
  except Exception as e:  # datasets raises many types: no such split, unreadable files, ...
    raise ConfigError(f"Hugging Face Hub dataset {repo_id} (split {split!r}) could not be "
                      f"loaded: {_cause(e)}") from None
  if len(ds) == 0:
    raise ConfigError(f"Hugging Face Hub dataset {repo_id} (split {split!r}) holds no rows")
  return ds


def _cause(e: BaseException) -> str:
  """The first line of the error under `datasets`' wrapper (which says only "An error occurred
  while generating the dataset"), with its type.

  >>> class DatasetGenerationError(Exception): ...
  >>> try:
  ...   raise DatasetGenerationError("An error occurred") from ValueError("bad row 1\\nmore")
  ... except DatasetGenerationError as e:
  ...   print(_cause(e))
  ValueError: bad row 1
  """
  if type(e).__name__ == "DatasetGenerationError" and e.__cause__ is not None:
    e = e.__cause__
  lines = str(e).strip().splitlines()
  return f"{type(e).__name__}: {lines[0] if lines else ''}".rstrip(": ")


def _field(row: dict, name: str, i: int, path: str) -> Any:
  if name not in row or row[name] is None:
    raise ConfigError(f"{path} row {i} has no field '{name}' (fields: {', '.join(row)}); set "
                      f"the data.*_field keys to the file's column names")
  return row[name]


def _encode(tokenizer, text: str) -> list[int]:
  return tokenizer(text, add_special_tokens=False)["input_ids"]


def _bos(tokenizer) -> list[int]:
  return [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []


def _eos(tokenizer) -> list[int]:
  return [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []


def _render(tokenizer, messages: list[dict], i: int, path: str, **kwargs) -> str:
  """`messages` through the chat template; a template's own error names the row."""
  import jinja2  # pylint: disable=import-outside-toplevel

  try:
    return tokenizer.apply_chat_template(messages, tokenize=False, **kwargs)
  except jinja2.TemplateError as e:  # e.g. "Conversation roles must alternate user/assistant"
    raise ConfigError(f"{path} row {i}: the model's chat template refuses these messages: "
                      f"{e}") from None


def _is_messages(value: Any) -> bool:
  return isinstance(value, list) and all(isinstance(m, dict) for m in value)


def _need_template(tokenizer, fmt: str) -> None:
  if not getattr(tokenizer, "chat_template", None):
    raise ConfigError(f"data.format={fmt} with chat messages needs a tokenizer with a chat "
                      "template; this model's tokenizer has none")


def _prompt_tokens(tokenizer, prompt: Any, cfg: DataSection, i: int, path: str
                   ) -> tuple[list[int], str]:
  """A prompt's token ids and text: plain text after BOS, or messages through the chat
  template with the generation prompt (the assistant's turn opened)."""
  if isinstance(prompt, str):
    return _bos(tokenizer) + _encode(tokenizer, prompt), prompt
  if _is_messages(prompt):
    _need_template(tokenizer, cfg.format)
    text = _render(tokenizer, prompt, i, path, add_generation_prompt=True)
    return _encode(tokenizer, text), text
  raise ConfigError(f"{path} row {i}: '{cfg.prompt_field}' must be text or a list of "
                    f"{{\"role\": ..., \"content\": ...}} messages, got {str(prompt)[:60]!r}")


def _completion_tokens(tokenizer, prompt: Any, prompt_ids: list[int], completion: Any,
                       field: str, cfg: DataSection, i: int, path: str) -> list[int]:
  """The tokens of one side of a preference pair, after the prompt's."""
  empty = (not completion.strip() if isinstance(completion, str) else
           _is_messages(completion) and not any(str(m.get("content") or "").strip()
                                                  for m in completion))
  if empty:
    raise ConfigError(f"{path} row {i}: '{field}' is an empty completion; every pair needs a "
                      "non-empty chosen and rejected answer (drop or fix the row)")
  if isinstance(prompt, str) and isinstance(completion, str):
    return _encode(tokenizer, completion) + _eos(tokenizer)
  if _is_messages(prompt) and _is_messages(completion):
    full = _encode(tokenizer, _render(tokenizer, prompt + completion, i, path))
    if full[:len(prompt_ids)] != prompt_ids:
      raise ConfigError(f"{path} row {i}: the chat template does not render the prompt as a "
                        f"prefix of prompt + '{field}'; give plain-text prompt and completions")
    return full[len(prompt_ids):]
  raise ConfigError(f"{path} row {i}: '{cfg.prompt_field}' and '{field}' must both be text or "
                    f"both be lists of messages, got {type(prompt).__name__} and "
                    f"{type(completion).__name__}")


def _fit(ids: list[int], targets: list[float], cfg: DataSection, i: int, path: str,
         what: str = "") -> tuple[list[int], list[float]]:
  """`ids` cut to data.max_length (data.truncate), or an error naming the row."""
  n = cfg.max_length
  if len(ids) <= n:
    return ids, targets
  if not cfg.truncate:
    raise ConfigError(f"{path} row {i}{what} is {len(ids)} tokens, longer than data.max_length="
                      f"{n}; raise data.max_length (up to the model's context), or set "
                      "data.truncate=true")
  return ids[:n], targets[:n]


def _preference_example(row: dict, cfg: DataSection, tokenizer, i: int, path: str
                        ) -> Example | None:
  """A preference row as one example whose `rejected` holds the other side; None when
  truncation leaves a side nothing to score."""
  chosen = _field(row, cfg.chosen_field, i, path)
  rejected = _field(row, cfg.rejected_field, i, path)
  if row.get(cfg.prompt_field) is not None:
    prompt = row[cfg.prompt_field]
  elif _is_messages(chosen) and _is_messages(rejected) and chosen[:-1] == rejected[:-1] \
      and chosen[:-1]:
    # TRL's implicit prompt: whole conversations that differ in the last turn only.
    prompt, chosen, rejected = chosen[:-1], chosen[-1:], rejected[-1:]
  else:
    prompt = _field(row, cfg.prompt_field, i, path)  # raises, naming the missing field
  prompt_ids, _ = _prompt_tokens(tokenizer, prompt, cfg, i, path)
  sides = []
  for field, completion in ((cfg.chosen_field, chosen), (cfg.rejected_field, rejected)):
    reply = _completion_tokens(tokenizer, prompt, prompt_ids, completion, field, cfg, i, path)
    ids, targets = _fit(prompt_ids + reply, [0.0] * len(prompt_ids) + [1.0] * len(reply),
                        cfg, i, path, f" ('{field}')")
    if not any(targets[1:]):
      return None
    sides.append(Example(np.asarray(ids, np.int32), np.asarray(targets, np.float32)))
  sides[0].rejected = sides[1]
  return sides[0]


def _prompt_example(row: dict, cfg: DataSection, tokenizer, i: int, path: str) -> Example:
  """A prompt to sample completions for; the row's other columns go to the reward."""
  prompt = _field(row, cfg.prompt_field, i, path)
  ids, text = _prompt_tokens(tokenizer, prompt, cfg, i, path)
  if len(ids) > cfg.max_length:
    if not cfg.truncate:
      raise ConfigError(f"{path} row {i}: the prompt is {len(ids)} tokens, longer than "
                        f"data.max_length={cfg.max_length}; raise data.max_length or set "
                        "data.truncate=true (keeps the prompt's end)")
    ids = ids[-cfg.max_length:]
  columns = {k: v for k, v in row.items() if k != cfg.prompt_field}
  return Example(np.asarray(ids, np.int32), np.zeros(len(ids), np.float32), prompt=text,
                 columns=columns, row=i)


def tokenize(rows: Any, cfg: DataSection, tokenizer, path: str) -> list[Example]:
  """Turns rows into examples with loss targets, per `cfg.format`."""
  out: list[Example] = []
  n = cfg.max_length
  for i, row in enumerate(rows):
    if cfg.format in ("preference", "prompts"):
      ex = (_preference_example if cfg.format == "preference" else _prompt_example)(
          row, cfg, tokenizer, i, path)
      if ex is not None:
        out.append(ex)
      continue
    adapter = (None if cfg.adapter_field is None else
               str(_field(row, cfg.adapter_field, i, path)))
    if cfg.format == "text":
      ids = _bos(tokenizer) + _encode(tokenizer, str(_field(row, cfg.text_field, i, path)))
      ids += _eos(tokenizer)
      # Long documents are cut into max_length pieces: plain text has no example boundary.
      for start in range(0, max(len(ids) - 1, 1), n):
        piece = ids[start:start + n]
        if len(piece) >= 2:
          out.append(Example(np.asarray(piece, np.int32), np.ones(len(piece), np.float32),
                             adapter))
      continue
    if cfg.format == "prompt_completion":
      prompt = _bos(tokenizer) + _encode(tokenizer, str(_field(row, cfg.prompt_field, i, path)))
      completion = _encode(tokenizer, str(_field(row, cfg.completion_field, i, path)))
      completion += _eos(tokenizer)
      ids = prompt + completion
      targets = [0.0] * len(prompt) + [1.0] * len(completion)
    else:  # chat: the loss covers the assistant turns only
      messages = _field(row, cfg.messages_field, i, path)
      if not getattr(tokenizer, "chat_template", None):
        raise ConfigError("data.format=chat needs a tokenizer with a chat template; this "
                          "model's tokenizer has none")
      if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
        raise ConfigError(f"{path} row {i}: '{cfg.messages_field}' must be a list of "
                          "{\"role\": ..., \"content\": ...} messages, got "
                          f"{str(messages)[:60]!r}")
      ids, targets = [], []
      for j, msg in enumerate(messages):
        if msg.get("role") != "assistant":
          continue
        before = _render(tokenizer, messages[:j], i, path, add_generation_prompt=True) if j else ""
        upto = _render(tokenizer, messages[:j + 1], i, path)
        if not upto.startswith(before):
          raise ConfigError(f"{path} row {i}: the chat template does not render turns as "
                            "prefixes of each other; use data.format=prompt_completion")
        full_before = _encode(tokenizer, before) if before else []
        full_upto = _encode(tokenizer, upto)
        if full_before[:len(ids)] != ids or full_upto[:len(full_before)] != full_before:
          raise ConfigError(f"{path} row {i}: the chat template's turns do not tokenize as "
                            "prefixes of each other; use data.format=prompt_completion")
        new_prompt, reply = full_before[len(ids):], full_upto[len(full_before):]
        ids += new_prompt + reply
        targets += [0.0] * len(new_prompt) + [1.0] * len(reply)
      if not any(targets):
        raise ConfigError(f"{path} row {i} has no assistant message to train on")
    ids, targets = _fit(ids, targets, cfg, i, path)
    if not any(targets[1:]):
      continue  # nothing left to learn from after truncation
    out.append(Example(np.asarray(ids, np.int32), np.asarray(targets, np.float32), adapter))
  if not out:
    raise ConfigError(f"{path}: no usable examples after tokenization")
  return out


def bucket(length: int, max_length: int) -> int:
  """Smallest power of two (at least 16) that holds `length`, capped at `max_length`."""
  b = 16
  while b < length:
    b *= 2
  return min(b, max_length)


class Batcher:
  """Deterministic shuffled batches with a resumable position.

  The order of each epoch is a permutation drawn from ``(seed, epoch)``; the
  position (`state`) is saved in checkpoints so that a resumed run sees exactly
  the batches the uninterrupted run would have seen. With ``packing``, each
  row holds as many examples as fit in ``max_length`` (see `pack`) and batches
  gain ``segment_ids``.
  """

  def __init__(self, examples: list[Example], batch_size: int, max_length: int, seed: int,
               pad_id: int, state: dict | None = None, *, packing: bool = False,
               adapter_index: dict[str, int] | None = None):
    self.examples = examples
    self.batch_size = batch_size
    self.max_length = max_length
    self.seed = seed
    self.pad_id = pad_id
    self.packing = packing
    self.adapter_index = adapter_index
    self.state = dict(state or {"epoch": 0, "index": 0})
    self._order = None
    self._order_epoch = None

  def _perm(self, epoch: int) -> np.ndarray:
    if self._order_epoch != epoch:
      self._order = np.random.default_rng([self.seed, epoch]).permutation(len(self.examples))
      self._order_epoch = epoch
    return self._order

  def _peek(self) -> Example:
    """The example at the current position, without moving past it."""
    return self.examples[self._perm(self.state["epoch"])[self.state["index"]]]

  def _advance(self) -> None:
    i = self.state["index"] + 1
    if i == len(self.examples):
      self.state = {"epoch": self.state["epoch"] + 1, "index": 0}
    else:
      self.state = {"epoch": self.state["epoch"], "index": i}

  def take(self, n: int) -> list[Example]:
    out = []
    for _ in range(n):
      out.append(self._peek())
      self._advance()
    return out

  def pack(self) -> list[list[Example]]:
    """One packed micro-batch: `batch_size` rows, each a list of examples.

    Examples are taken in order and each goes into the first row with room
    for it. The first example that fits in no row is left in place (not
    consumed): it starts the next micro-batch. So the position stays a plain
    (epoch, index) and a resumed run packs exactly the same rows.
    """
    rows: list[list[Example]] = [[] for _ in range(self.batch_size)]
    room = [self.max_length] * self.batch_size
    while True:
      e = self._peek()
      n = len(e.ids)
      if n > self.max_length:  # tokenize() never makes these; an empty row must always fit
        raise ConfigError(f"an example of {n} tokens is longer than data.max_length="
                          f"{self.max_length}; tokenize with the same data.max_length")
      r = next((r for r in range(self.batch_size) if room[r] >= n), None)
      if r is None:
        return rows
      rows[r].append(e)
      room[r] -= n
      self._advance()

  def next(self, accum: int = 1, rows: tuple[int, int] | None = None) -> dict[str, np.ndarray]:
    """``accum`` micro-batches stacked: arrays of shape (accum, batch, length).

    With ``rows=(lo, hi)`` only rows lo..hi-1 of each micro-batch are
    collated (one process's part of a global batch), padded to the global
    batch's length so that the processes' parts form one global array. Every
    process walks the same order (and packs the same global micro-batches),
    so `state` is the same everywhere.
    """
    if self.packing:
      packed = [row for _ in range(accum) for row in self.pack()]
    else:
      packed = [[e] for e in self.take(accum * self.batch_size)]
    length = bucket(max(sum(len(e) for e in row) for row in packed), self.max_length)
    if rows is not None:
      lo, hi = rows
      b = self.batch_size
      packed = [packed[m * b + j] for m in range(accum) for j in range(lo, hi)]
    return _collate_rows(packed, accum, self.pad_id, length, segments=self.packing,
                         adapter_index=self.adapter_index)


def collate(examples: list[Example], accum: int, max_length: int, pad_id: int,
            length: int | None = None, adapter_index: dict[str, int] | None = None) -> dict:
  """One example per row, right-padded to `length` (default: its bucket)."""
  if length is None:
    length = bucket(max(len(e) for e in examples), max_length)
  return _collate_rows([[e] for e in examples], accum, pad_id, length, segments=False,
                       adapter_index=adapter_index)


def _adapter_id(row: list[Example], adapter_index: dict[str, int]) -> int:
  names = {e.adapter for e in row}
  if len(names) > 1:  # config.validate keeps packing and adapter_field apart
    raise ConfigError(f"a packed row mixes the adapters {sorted(map(str, names))}; "
                      "data.adapter_field needs data.packing=false")
  name = names.pop() if names else None
  if name is None:
    return -1
  if name not in adapter_index:
    raise ConfigError(f"an example names adapter {name!r}, which this run does not train (it "
                      f"trains {', '.join(map(repr, adapter_index))}); every "
                      "data.adapter_field value must occur in the training data")
  return adapter_index[name]


def _collate_rows(rows: list[list[Example]], accum: int, pad_id: int, length: int,
                  segments: bool, adapter_index: dict[str, int] | None = None) -> dict:
  """Rows of examples laid end to end and right-padded: arrays (accum, rows // accum, length).

  With `segments`, the batch also holds `segment_ids`: 1, 2, ... for the
  examples of a row in order, 0 on padding. With `adapter_index` ({name: slot}),
  it holds ``adapter_ids`` (accum, rows // accum, 1): each row's bank slot (-1:
  an empty row); the trailing axis lets it share the token arrays' sharding.
  Rows of preference pairs (`Example.rejected`) also give ``rejected_input_ids``,
  ``rejected_attention_mask`` and ``rejected_targets``, the same shape.
  """
  n = len(rows)
  ids = np.full((n, length), pad_id, np.int32)
  mask = np.zeros((n, length), np.int32)
  targets = np.zeros((n, length), np.float32)
  seg = np.zeros((n, length), np.int32)
  for k, row in enumerate(rows):
    start = 0
    for s, e in enumerate(row, start=1):
      end = start + len(e.ids)
      ids[k, start:end] = e.ids
      mask[k, start:end] = 1
      targets[k, start:end] = e.targets
      seg[k, start:end] = s
      start = end
  shape = (accum, n // accum, length)
  out = {"input_ids": ids.reshape(shape), "attention_mask": mask.reshape(shape),
         "targets": targets.reshape(shape)}
  if segments:
    out["segment_ids"] = seg.reshape(shape)
  if any(e.rejected is not None for row in rows for e in row):
    # Preference pairs: the rejected sides, padded to the same length as the chosen ones.
    other = _collate_rows([[e.rejected for e in row if e.rejected is not None] for row in rows],
                          accum, pad_id, length, segments=False)
    out.update({f"rejected_{k}": v for k, v in other.items()})
  if adapter_index is not None:
    aid = np.asarray([_adapter_id(row, adapter_index) for row in rows], np.int32)
    out["adapter_ids"] = aid.reshape(accum, n // accum, 1)
  return out


def eval_batches(examples: list[Example], batch_size: int, max_length: int, pad_id: int,
                 limit: int = 0, pad_rows: bool = False,
                 adapter_index: dict[str, int] | None = None) -> list[dict]:
  """Fixed, unshuffled evaluation batches (length-sorted to limit padding).

  With `pad_rows`, the last batch is filled up to `batch_size` with empty rows
  (no targets), so that every batch splits evenly over a device mesh. With
  `adapter_index`, batches hold each row's ``adapter_ids`` as in `Batcher`.
  """
  order = sorted(range(len(examples)), key=lambda i: len(examples[i]))
  batches = []
  empty = Example(np.asarray([pad_id], np.int32), np.zeros(1, np.float32))
  for s in range(0, len(order), batch_size):
    chunk = [examples[i] for i in order[s:s + batch_size]]
    if pad_rows:
      chunk += [empty] * (batch_size - len(chunk))
    batches.append(collate(chunk, 1, max_length, pad_id, adapter_index=adapter_index))
    if limit and len(batches) >= limit:
      break
  return batches
