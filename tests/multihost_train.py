"""`jaxlora train` that can be slowed down, so that a test can kill it mid-run at a known point.

    python tests/multihost_train.py SLOW_AFTER[:SECONDS] TRAIN_ARGS...

From step SLOW_AFTER + 1 on, each step waits SECONDS (0.5 unless given) for its batch;
SLOW_AFTER -1 runs at full speed. test_multihost.py runs one process of a local
multi-process job with it, test_cli.py a single-process run.
"""

import sys
import time

from jaxlora_cli import data
from jaxlora_cli.main import main


def _slow_down(after: int, seconds: float) -> None:
  plain = data.Batcher.next
  count = [0]

  def next_batch(self, *args, **kwargs):
    count[0] += 1
    if count[0] > after:
      time.sleep(seconds)
    return plain(self, *args, **kwargs)

  data.Batcher.next = next_batch


if __name__ == "__main__":
  after, _, seconds = sys.argv[1].partition(":")
  if int(after) >= 0:
    _slow_down(int(after), float(seconds or 0.5))
  sys.exit(main(sys.argv[2:]))
