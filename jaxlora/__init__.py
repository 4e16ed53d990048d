"""jaxlora: LoRA fine-tuning for JAX/Flax param trees."""

from jaxlora import dora
from jaxlora import errors
from jaxlora import experts
from jaxlora import model_api
from jaxlora import models
from jaxlora import nnx
from jaxlora import peft
from jaxlora import preference
from jaxlora import quantization
from jaxlora import sharding
from jaxlora.bank import Bank, bank_set, stack, unstack
from jaxlora.checkpoint import CheckpointManager, load, save
from jaxlora.combination import merge_adapters
from jaxlora.forward import apply
from jaxlora.generation import generate
# `layout` is the deprecated name of `trace_layout`, kept for one release.
from jaxlora.kernel_layout import KernelLayout, Layout, layout, trace_layout
from jaxlora.optim import loraplus, optimizer
from jaxlora.quantization import QuantizedArray, dequantize, quantize
from jaxlora.transform import (LayerSummary, Summary, adapter, combine, merge, split, summary,
                               unmerge, wrap)

__version__ = "0.1.0"

__all__ = [
    "Bank",
    "CheckpointManager",
    "KernelLayout",
    "LayerSummary",
    "Layout",
    "QuantizedArray",
    "Summary",
    "adapter",
    "apply",
    "bank_set",
    "combine",
    "dequantize",
    "dora",
    "errors",
    "experts",
    "generate",
    "layout",
    "load",
    "loraplus",
    "merge",
    "merge_adapters",
    "model_api",
    "models",
    "nnx",
    "optimizer",
    "peft",
    "preference",
    "quantization",
    "quantize",
    "save",
    "sharding",
    "split",
    "stack",
    "summary",
    "trace_layout",
    "unmerge",
    "unstack",
    "wrap",
]
