"""The errors jaxlora raises when its input is wrong.

Every error here derives from `JaxloraError`, so a caller (the `jaxlora` command
line, a training script) can tell "the input needs fixing" from a bug. They also
derive from `ValueError` or `TypeError`, so code written against the built-in
types keeps working.

>>> import jaxlora
>>> try:
...   jaxlora.wrap({"dense": {"kernel": [[1.0]]}}, rank=0)
... except jaxlora.errors.JaxloraError as e:
...   print(type(e).__name__, isinstance(e, ValueError))
InputError True
"""

from __future__ import annotations


class JaxloraError(Exception):
  """Base of the errors that report bad input: the message says what to fix."""


class InputError(JaxloraError, ValueError):
  """A value, shape, path or key that jaxlora cannot use (a `ValueError`)."""


class InputTypeError(JaxloraError, TypeError):
  """An argument of the wrong type (a `TypeError`)."""


class NotFoundError(JaxloraError, FileNotFoundError):
  """A file or directory that should exist but does not (a `FileNotFoundError`)."""


class CheckpointError(InputError):
  """A checkpoint or adapter directory that is missing, incomplete or does not fit the base."""


class ConfigError(InputError):
  """A configuration key or value that is unknown or out of range."""


__all__ = ["CheckpointError", "ConfigError", "InputError", "InputTypeError", "JaxloraError",
           "NotFoundError"]
