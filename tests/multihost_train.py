"""One process of a local multi-process `jaxlora train` job (driven by test_multihost.py).

    python tests/multihost_train.py SLOW_AFTER TRAIN_ARGS...

From batch SLOW_AFTER on, each batch waits 0.5 s, so the test can kill the
job mid-run at a known point; -1 runs at full speed.
"""

import sys
import time

from jaxlora_cli import data
from jaxlora_cli.main import main


def _slow_down(after: int) -> None:
  plain = data.Batcher.next
  count = [0]

  def next_batch(self, *args, **kwargs):
    count[0] += 1
    if count[0] > after:
      time.sleep(0.5)
    return plain(self, *args, **kwargs)

  data.Batcher.next = next_batch


if __name__ == "__main__":
  if int(sys.argv[1]) >= 0:
    _slow_down(int(sys.argv[1]))
  sys.exit(main(sys.argv[2:]))
