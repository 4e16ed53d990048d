"""Former home of `jaxlora.safetensors_io`, which moved to the core (PEFT I/O reads it too).

Kept so that ``from jaxlora.models import safetensors_io`` goes on working.

>>> from jaxlora.models import safetensors_io
>>> import jaxlora.safetensors_io
>>> safetensors_io.save_file is jaxlora.safetensors_io.save_file
True
"""

from jaxlora.safetensors_io import SafetensorsFile, save_file

__all__ = ["SafetensorsFile", "save_file"]
