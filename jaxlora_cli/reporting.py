"""Progress bar, metrics (JSONL and TensorBoard), loss-curve PNG and the run report."""

from __future__ import annotations

import json
import sys
import time
from typing import Any

from etils import epath

from jaxlora._files import is_remote


def du(path: Any) -> int:
  return sum((root / f).stat().length for root, _, files in epath.Path(path).walk() for f in files)


class Metrics:
  """Appends metric records to metrics.jsonl, and to TensorBoard event files and a Weights &
  Biases run when `report_to` names them.

  metrics.jsonl is always written: it is the run's own record (loss.png, report.md, resuming).
  The W&B run starts at the first record (``wandb.init(**wandb_init)``, imported then) and
  finishes on `close` (or at the end of a ``with`` block, failed when it ends in an error).
  """

  def __init__(self, run_dir: Any, report_to: Any = ("tensorboard", "jsonl"),
               wandb_init: dict[str, Any] | None = None):
    self.path = epath.Path(run_dir) / "metrics.jsonl"
    self.tb_dir = str(epath.Path(run_dir) / "tensorboard")
    self._tb = None
    self._use_tb = "tensorboard" in report_to
    self._wandb_init = wandb_init if "wandb" in report_to else None
    self._wandb = None
    # Object stores cannot append: keep the records and rewrite the file.
    self._records = None
    if is_remote(run_dir):
      self._records = read(self.path) if self.path.exists() else []

  def _writer(self):
    if self._tb is None:
      from tensorboardX import SummaryWriter  # pylint: disable=import-outside-toplevel
      self._tb = SummaryWriter(self.tb_dir)
    return self._tb

  def write(self, record: dict[str, Any]) -> None:
    if self._records is None:
      with self.path.open("a") as f:
        f.write(json.dumps(record) + "\n")
    else:
      self._records.append(record)
      self.path.write_text("".join(json.dumps(r) + "\n" for r in self._records))
    scalars = {k: v for k, v in record.items() if k != "step" and isinstance(v, (int, float))}
    if self._use_tb:
      tb = self._writer()
      for k, v in scalars.items():
        tag = f"eval/{k[5:]}" if k.startswith("eval_") else f"train/{k}"
        tb.add_scalar(tag, v, record["step"])
      tb.flush()
    if self._wandb_init is not None:
      if self._wandb is None:
        import wandb  # pylint: disable=import-outside-toplevel
        self._wandb = wandb.init(**self._wandb_init)
      self._wandb.log(scalars, step=record["step"])

  def close(self, exit_code: int = 0) -> None:
    """Closes the TensorBoard writer and finishes the W&B run (`exit_code` != 0: failed)."""
    if self._tb is not None:
      self._tb.close()
      self._tb = None
    if self._wandb is not None:
      self._wandb.finish(exit_code=exit_code)
      self._wandb = None

  def __enter__(self) -> "Metrics":
    return self

  def __exit__(self, exc_type, exc, tb) -> None:
    self.close(0 if exc is None else getattr(exc, "exit_code", 1))

  def truncate(self, step: int) -> None:
    """Drops records after `step` (a resumed run rewrites them)."""
    if not self.path.exists():
      return
    keep = [l for l in read(self.path) if l["step"] <= step]
    self.path.write_text("".join(json.dumps(l) + "\n" for l in keep))
    if self._records is not None:
      self._records = keep


class NullMetrics:
  """Metrics sink for processes other than process 0."""

  def write(self, record: dict[str, Any]) -> None:
    del record

  def truncate(self, step: int) -> None:
    del step

  def close(self, exit_code: int = 0) -> None:
    del exit_code

  def __enter__(self) -> "NullMetrics":
    return self

  def __exit__(self, exc_type, exc, tb) -> None:
    pass


def check_report_to(report_to: Any) -> None:
  """Refuses a reporter whose package is missing, before anything is loaded or written.

  >>> check_report_to(["jsonl"])
  """
  import importlib.util  # pylint: disable=import-outside-toplevel
  from jaxlora_cli.config import ConfigError  # pylint: disable=import-outside-toplevel

  for name, module, extra in (("wandb", "wandb", "tracking"),
                              ("tensorboard", "tensorboardX", "cli")):
    if name in report_to and importlib.util.find_spec(module) is None:
      raise ConfigError(f"report_to holds {name}, but {module} is not installed; pip install "
                        f"'jaxlora[{extra}]' (or {module}), or leave {name} out of report_to")


def read(path: Any) -> list[dict]:
  return [json.loads(l) for l in epath.Path(path).read_text().splitlines() if l.strip()]


class Progress:
  """Training progress on stderr: step/total, loss, tokens/s and ETA.

  On a terminal, a tqdm bar. Elsewhere (CI logs, ``nohup``, a TPU pod's log
  files), where a bar's carriage-return redraws would pile up, one plain line
  at every `every`-th step, whenever `interval` seconds have passed since the
  last line, and at the last step:

  >>> import io
  >>> clock = iter([0.0, 5.0, 6.0, 7.0, 8.0]).__next__  # the first step compiles
  >>> out = io.StringIO()
  >>> p = Progress(4, 0, stream=out, every=2, clock=clock)
  >>> for step in range(1, 5):
  ...   p.update(step, loss=2.0 / step, tokens_per_s=1000.0)
  >>> p.close()
  >>> print(out.getvalue(), end="")
  step 2/4 (50%), loss 1.0000, 1,000 tok/s, elapsed 0:00:06, ETA 0:00:02
  step 4/4 (100%), loss 0.5000, 1,000 tok/s, elapsed 0:00:08, ETA 0:00:00

  The ETA assumes the pace since the first update: the first step, which
  includes compilation, is left out.
  """

  def __init__(self, total: int, initial: int, enabled: bool = True, *, stream=None,
               every: int = 10, interval: float = 30.0, clock=time.monotonic):
    """Starts the progress display.

    Args:
      total: the run's last step.
      initial: the step it starts from (a resumed run's checkpoint).
      enabled: False shows nothing.
      stream: where to write (default: ``sys.stderr``).
      every: plain lines: one at every multiple of this many steps.
      interval: plain lines: one also once this many seconds passed since the last.
      clock: seconds, for the pace and `interval` (tests pass a fake one).
    """
    self._bar = None
    self._stream = sys.stderr if stream is None else stream
    self._plain = enabled and not _isatty(self._stream)
    self._total, self._every, self._interval, self._clock = total, max(every, 1), interval, clock
    self._first: tuple[int, float] | None = None  # (step, time) of the first update
    self._start = self._last_line = clock() if self._plain else 0.0
    if enabled and not self._plain:
      from tqdm import tqdm  # pylint: disable=import-outside-toplevel
      self._bar = tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True,
                       file=self._stream, smoothing=0.1)

  def update(self, step: int, loss: float, tokens_per_s: float) -> None:
    """Shows that `step` is done, with its loss and the throughput so far."""
    if self._bar is not None:
      self._bar.n = step
      self._bar.set_postfix_str(f"loss {loss:.4f}, {tokens_per_s:,.0f} tok/s", refresh=False)
      self._bar.refresh()
    if not self._plain:
      return
    now = self._clock()
    if self._first is None:
      self._first = (step, now)
      self._last_line = now
    if step % self._every and step != self._total and now - self._last_line < self._interval:
      return
    self._last_line = now
    first_step, first_time = self._first
    pace = (now - first_time) / (step - first_step) if step > first_step else None
    eta = "?" if pace is None else _hms(pace * (self._total - step))
    print(f"step {step}/{self._total} ({100 * step // max(self._total, 1)}%), loss {loss:.4f}, "
          f"{tokens_per_s:,.0f} tok/s, elapsed {_hms(now - self._start)}, ETA {eta}",
          file=self._stream, flush=True)

  def close(self) -> None:
    if self._bar is not None:
      self._bar.close()


def _isatty(stream) -> bool:
  try:
    return stream.isatty()
  except (AttributeError, ValueError):  # no such method, or a closed file
    return False


def _hms(seconds: float) -> str:
  """``H:MM:SS``.

  >>> _hms(3725.4)
  '1:02:05'
  """
  s = int(round(max(seconds, 0.0)))
  return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"


def plot(run_dir: Any) -> str | None:
  """Writes loss.png from metrics.jsonl; returns its path (None without metrics)."""
  path = epath.Path(run_dir) / "metrics.jsonl"
  if not path.exists():
    return None
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel

  recs = read(path)
  train = [(r["step"], r["loss"]) for r in recs if "loss" in r]
  evals = [(r["step"], r["eval_loss"]) for r in recs if "eval_loss" in r]
  fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
  if train:
    ax.plot(*zip(*train), label="train loss")
  if evals:
    ax.plot(*zip(*evals), "o-", label="eval loss")
  ax.set_xlabel("step")
  ax.set_ylabel("cross-entropy")
  ax.set_title(_name(run_dir))
  ax.grid(alpha=0.3)
  ax.legend()
  out = epath.Path(run_dir) / "loss.png"
  fig.tight_layout()
  with out.open("wb") as f:
    fig.savefig(f, format="png")
  plt.close(fig)
  return str(out)


def _name(run_dir: Any) -> str:
  return epath.Path(run_dir if is_remote(run_dir) else epath.Path(run_dir).resolve()).name


def write_report(run_dir: str, cfg, result: dict) -> str:
  lines = [
      f"# Run report: {_name(run_dir)}", "",
      f"- model: {cfg.model.path}",
      f"- LoRA: rank {cfg.lora.rank}, alpha {cfg.lora.alpha or cfg.lora.rank}, targets "
      f"{cfg.lora.targets}, dropout {cfg.lora.dropout}",
      f"- trainable parameters: {result['trainable_params']:,} of {result['total_params']:,} "
      f"({100 * result['trainable_params'] / result['total_params']:.3f}%)",
      f"- steps: {result['steps']} x {cfg.train.batch_size * cfg.train.grad_accum} examples "
      f"({result['train_examples']} training examples)",
      f"- objective: {result.get('objective', 'sft')}; final training loss: "
      f"{result['final_loss']}",
  ]
  if result.get("eval_loss_after") is not None:
    before = result.get("eval_loss_before")
    lines.append(f"- eval loss: {'' if before is None else f'{before:.4f} -> '}"
                 f"{result['eval_loss_after']:.4f}")
  if result.get("eval_reward_after") is not None:
    before = result.get("eval_reward_before")
    lines.append(f"- eval reward (greedy completions): "
                 f"{'' if before is None else f'{before:.4f} -> '}{result['eval_reward_after']:.4f}")
  lines += [
      f"- adapter on disk: {result['adapter_bytes']:,} bytes "
      f"({100 * result['adapter_bytes'] / result['base_bytes']:.2f}% of the base's "
      f"{result['base_bytes']:,})",
      f"- wall time this session: {result['wall_s']:.1f} s", "",
      "Files: `config.yaml`, `metrics.jsonl`, `tensorboard/`, `checkpoints/`, `adapter/` (Orbax, "
      "`jaxlora.load`), `adapter_peft/` (PEFT format), `loss.png`, `result.json`.",
  ]
  path = epath.Path(run_dir) / "report.md"
  path.write_text("\n".join(lines) + "\n")
  return str(path)
