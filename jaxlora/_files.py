"""Atomic file and directory writes, and the local-or-URL path test, for every jaxlora writer.

A reader never sees a half-written file: a file is written to a temporary
sibling and renamed over its target, a set of files is staged and then moved
in one by one (the file that marks the set complete last), and a directory is
swapped in whole.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from typing import IO, Any

from etils import epath


def is_remote(path: Any) -> bool:
  """True for a URL such as ``gs://bucket/run`` (written through etils.epath), not a local path.

  >>> is_remote("gs://bucket/run"), is_remote("runs/demo")
  (True, False)
  """
  return "://" in str(path)


def _umask() -> int:
  mask = os.umask(0)
  os.umask(mask)
  return mask


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "wb") -> Iterator[IO[Any]]:
  """Opens a temporary sibling of local file `path`; renames it over `path` once written.

  The data is flushed and synced before the rename, so `path` holds either its
  old content or the complete new one. When the ``with`` body raises, the
  temporary file is removed and `path` is left as it was.

  Args:
    path: the file to (re)place.
    mode: an ``open`` mode for writing (``"wb"`` or ``"w"``).

  Yields:
    The open temporary file.

  >>> import os, tempfile
  >>> p = os.path.join(tempfile.mkdtemp(), "a.txt")
  >>> with atomic_write(p, "w") as f:
  ...   _ = f.write("done")
  >>> open(p).read()
  'done'
  """
  path = os.fspath(path)
  d = os.path.dirname(os.path.abspath(path))
  fd, tmp = tempfile.mkstemp(dir=d, prefix=".tmp-", suffix=os.path.splitext(path)[1])
  try:
    with os.fdopen(fd, mode) as f:
      yield f
      f.flush()
      os.fsync(f.fileno())
    os.chmod(tmp, 0o666 & ~_umask())  # mkstemp creates 0600; give the usual permissions
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise


@contextlib.contextmanager
def staging_dir(path: str | os.PathLike, prefix: str = ".tmp-") -> Iterator[str]:
  """A fresh local directory in which to write the files that `publish` moves into `path`.

  For a local `path` it is made beside `path` (so that publishing renames
  instead of copying); for a URL, in the system's temporary directory. It is
  removed, with whatever is left in it, when the ``with`` block ends.

  Args:
    path: the directory the staged files are meant for.
    prefix: the start of the staging directory's name.

  Yields:
    The staging directory's path.
  """
  parent = None
  if not is_remote(path):
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
  stage = tempfile.mkdtemp(prefix=prefix, dir=parent)
  try:
    yield stage
  finally:
    shutil.rmtree(stage, ignore_errors=True)


def publish(stage: str, path: str | os.PathLike, names: Sequence[str]) -> None:
  """Moves the files `names` from `stage` into directory `path` (made if missing), in order.

  Each file lands whole: a rename for a local `path`, an overwriting copy for a
  URL. Name last the file that marks the directory complete (its config).

  >>> import os, tempfile
  >>> dest = os.path.join(tempfile.mkdtemp(), "out")
  >>> with staging_dir(dest) as stage:
  ...   for name in ("weights", "config"):
  ...     with open(os.path.join(stage, name), "w") as f:
  ...       _ = f.write(name)
  ...   publish(stage, dest, ["weights", "config"])
  >>> sorted(os.listdir(dest)), len(os.listdir(os.path.dirname(dest)))
  (['config', 'weights'], 1)
  """
  remote = is_remote(path)
  dest = epath.Path(path)
  dest.mkdir(parents=True, exist_ok=True)
  for name in names:
    if remote:
      epath.Path(stage, name).copy(dest / name, overwrite=True)
    else:
      os.replace(os.path.join(stage, name), os.path.join(path, name))


def replace_dir(src: epath.Path, dst: epath.Path, aside: epath.Path) -> None:
  """Renames the complete directory `src` to `dst`, replacing any directory there.

  An existing `dst` is renamed to `aside` first and deleted only once `src`
  is in place, so at every moment `dst` or `aside` holds a complete directory.

  Args:
    src: the newly written directory.
    dst: where it goes.
    aside: an unused sibling name for the old `dst` while it is being replaced.
  """
  if dst.exists():
    dst.rename(aside)
    src.rename(dst)
    aside.rmtree()
  else:
    src.rename(dst)
