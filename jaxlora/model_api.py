"""What jaxlora asks of a model: small protocols, one per capability.

The core (`wrap`, sharding, memory planning, PEFT I/O, generation) never
imports a model class. It asks the model for what it needs through these
`typing.Protocol`s, which `jaxlora.models.Decoder` implements in full and a
user's own model implements as far as it needs:

- `AbstractModel` (``abstract_variables()``): its variables, shapes and
  logical axis names, for `jaxlora.sharding.param_shardings` and
  `jaxlora.sharding.memory_plan`.
- `LayoutProvider` (``lora_layout(params)``): how its kernels are used, for
  ``jaxlora.wrap(..., layout=model)``, ``jaxlora.quantize(..., layout=model)``
  and `jaxlora.sharding.memory_plan`.
- `ActivationPlanner` (``activation_bytes(mesh, ...)``): a training step's
  activations, for ``memory_plan(..., batch=, seq=)``.
- `HubNames` (``hf_module_name``, ``flax_module_path``, ``fan_in_fan_out``):
  Hugging Face module names, for `jaxlora.peft.save` and `jaxlora.peft.load`.
- `CachedLM` (``apply``, ``init_cache``, ``eos_token_id``, ``pad_token_id``,
  ``max_positions``): decoding with a KV cache, for `jaxlora.generate`.

A plain linen module whose params carry logical axis names
(``nn.with_logical_partitioning``) gets the first two through `LinenModel`,
which traces it on example inputs. A model that lacks a capability a function
needs gets an `InputTypeError` naming the missing members.

>>> import jax, jax.numpy as jnp, flax.linen as nn, jaxlora
>>> class Net(nn.Module):
...   @nn.compact
...   def __call__(self, x):
...     init = nn.with_logical_partitioning(nn.initializers.lecun_normal(), ("embed", "mlp"))
...     return nn.Dense(8, kernel_init=init, name="up")(x)
>>> model = jaxlora.model_api.LinenModel(Net(), (jnp.ones((1, 4)),))
>>> isinstance(model, jaxlora.model_api.AbstractModel)
True
>>> model.abstract_variables()["params"]["up"]["kernel"].names
('embed', 'mlp')
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any, Protocol, runtime_checkable

import flax.linen as nn
import jax

from jaxlora import _tree
from jaxlora import kernel_layout as layout_lib
from jaxlora.errors import InputTypeError


@runtime_checkable
class AbstractModel(Protocol):
  """A model that describes its variables without allocating them.

  ``abstract_variables()`` returns what ``model.init`` would, as
  `jax.ShapeDtypeStruct` leaves, with params that carry logical axis names
  left boxed (``nn.LogicallyPartitioned`` from ``nn.with_logical_partitioning``):
  sharding rules map those names to mesh axes. A param without names is
  replicated.

  >>> import jax.numpy as jnp, flax.linen as nn, jaxlora
  >>> isinstance(jaxlora.model_api.LinenModel(nn.Dense(2), (jnp.ones((1, 3)),)), AbstractModel)
  True
  """

  def abstract_variables(self) -> Mapping[str, Any]:
    ...


@runtime_checkable
class LayoutProvider(Protocol):
  """A model that knows how its kernels are used (input, output, stacked axes).

  ``lora_layout(params)`` returns the model's `jaxlora.Layout` for `params`
  (with or without ``{'params': ...}``; arrays or ShapeDtypeStructs), usually
  by calling `jaxlora.trace_layout` on example inputs. This is what
  ``jaxlora.wrap(params, layout=model)`` calls.

  >>> import jax.numpy as jnp, flax.linen as nn, jaxlora
  >>> isinstance(jaxlora.model_api.LinenModel(nn.Dense(2), (jnp.ones((1, 3)),)), LayoutProvider)
  True
  """

  def lora_layout(self, params: Any) -> layout_lib.Layout:
    ...


@runtime_checkable
class ActivationPlanner(Protocol):
  """A model that can count the bytes one training step's activations take per device.

  ``activation_bytes`` returns ``{'activations': ..., 'logits': ...}`` for
  `jaxlora.sharding.memory_plan`, which passes ``mesh`` and, by keyword,
  ``rules``, the float ``params`` (unboxed ShapeDtypeStructs) and their
  ``shardings``, the ``wrapped`` abstract tree, ``batch``, ``seq``,
  ``loss_chunk_size``, ``adapter_bytes`` (per device), and any model-specific
  options the caller gave (`jaxlora.models.Decoder` takes ``remat`` and
  ``attention``).

  >>> import jax.numpy as jnp, flax.linen as nn, jaxlora
  >>> isinstance(jaxlora.model_api.LinenModel(nn.Dense(2), (jnp.ones((1, 3)),)),
  ...            ActivationPlanner)
  False
  """

  def activation_bytes(self, mesh: Any, **kwargs: Any) -> dict[str, int]:
    ...


@runtime_checkable
class HubNames(Protocol):
  """A model whose modules have Hugging Face (PyTorch) names, for the PEFT format.

  ``hf_module_name(module_path, layer)`` gives the PyTorch module name of a
  flax module path (``layer``: the index into a stacked module, else None);
  ``flax_module_path(name)`` is its inverse. ``fan_in_fan_out`` is PEFT's flag
  for PyTorch weights stored ``(in, out)`` (GPT-2's Conv1D).

  >>> import jaxlora
  >>> cfg = jaxlora.models.ModelConfig.tiny("gpt2")
  >>> model = jaxlora.models.Decoder(cfg)
  >>> isinstance(model, HubNames), model.fan_in_fan_out
  (True, True)
  >>> model.hf_module_name(("h", "attn", "c_attn"), 0)
  'transformer.h.0.attn.c_attn'
  """

  @property
  def fan_in_fan_out(self) -> bool:
    ...

  def hf_module_name(self, module_path: tuple[str, ...], layer: int | None) -> str:
    ...

  def flax_module_path(self, name: str) -> tuple[tuple[str, ...], int | None]:
    ...


@runtime_checkable
class CachedLM(Protocol):
  """A causal language model that decodes with a KV cache, for `jaxlora.generate`.

  ``apply(variables, input_ids, attention_mask=..., cache=cache)`` returns
  ``(logits, new_cache)``, logits ``(batch, seq, vocab)``; ``init_cache(batch,
  max_length)`` returns an empty cache. ``eos_token_id`` and ``pad_token_id``
  are the defaults of `generate` (None if the model has none);
  ``max_positions`` is the longest sequence the model can encode, or None if
  unbounded (rotary positions).

  >>> import jaxlora
  >>> cfg = jaxlora.models.ModelConfig.tiny("llama", eos_token_id=2)
  >>> model = jaxlora.models.Decoder(cfg)
  >>> isinstance(model, CachedLM), model.eos_token_id, model.max_positions
  (True, 2, None)
  """

  @property
  def eos_token_id(self) -> int | tuple[int, ...] | None:
    ...

  @property
  def pad_token_id(self) -> int | None:
    ...

  @property
  def max_positions(self) -> int | None:
    ...

  def apply(self, variables: Any, *args: Any, **kwargs: Any) -> Any:
    ...

  def init_cache(self, batch: int, max_length: int) -> Any:
    ...


# How to give a model each capability, for error messages.
_HOW: dict[type, tuple[str, str]] = {
    AbstractModel: ("abstract_variables", "add a method `abstract_variables()` returning "
                    "jax.eval_shape(lambda: model.init(key, *example_inputs)), or wrap a linen "
                    "module as jaxlora.model_api.LinenModel(module, example_inputs)"),
    LayoutProvider: ("lora_layout", "add a method `lora_layout(params)` returning "
                     "jaxlora.trace_layout(model.apply, {'params': params}, *example_inputs), "
                     "or wrap a linen module as jaxlora.model_api.LinenModel(module, "
                     "example_inputs)"),
    ActivationPlanner: ("activation_bytes", "add a method `activation_bytes(mesh, **kwargs)` (see "
                        "jaxlora.model_api.ActivationPlanner), or plan without batch and seq "
                        "(params, adapters and optimizer state only)"),
    HubNames: ("hf_module_name, flax_module_path, fan_in_fan_out",
               "add them (see jaxlora.model_api.HubNames); jaxlora.models.Decoder has them"),
    CachedLM: ("apply, init_cache, eos_token_id, pad_token_id, max_positions",
               "add them (see jaxlora.model_api.CachedLM); jaxlora.models.Decoder has them"),
}


def require(model: Any, protocol: type, needed_by: str) -> Any:
  """Returns `model` if it implements `protocol`, else raises an `InputTypeError` saying how.

  Args:
    model: the model a jaxlora function was given.
    protocol: one of this module's protocols.
    needed_by: the function that needs it, for the message.

  Returns:
    `model`, unchanged.

  Raises:
    InputTypeError: naming the members `model` lacks and how to provide them.

  >>> import jaxlora
  >>> try:
  ...   require(object(), jaxlora.model_api.AbstractModel, "param_shardings")
  ... except jaxlora.errors.InputTypeError as e:
  ...   print(str(e)[:72])
  param_shardings needs a model with `abstract_variables`; object lacks it
  """
  if isinstance(model, protocol):
    return model
  members, how = _HOW[protocol]
  missing = [m.strip() for m in members.split(",") if not hasattr(model, m.strip())]
  raise InputTypeError(
      f"{needed_by} needs a model with `{members}`; {type(model).__name__} lacks "
      f"{'it' if len(missing) <= 1 else ', '.join(missing)} (protocol "
      f"jaxlora.model_api.{protocol.__name__}). To provide it, {how}.")


@dataclasses.dataclass(frozen=True, eq=False)
class LinenModel:
  """A flax.linen module seen through the model protocols, traced on example inputs.

  Implements `AbstractModel` (``module.init`` under `jax.eval_shape`; params
  annotated with ``nn.with_logical_partitioning`` keep their axis names) and
  `LayoutProvider` (`jaxlora.trace_layout` of ``module.apply``), so that
  `jaxlora.sharding.param_shardings`, `jaxlora.sharding.memory_plan` and
  ``jaxlora.wrap(..., layout=model)`` work for any linen model.

  Attributes:
    module: the linen module.
    inputs: example positional inputs of ``module.__call__`` (arrays or
      ShapeDtypeStructs; their sizes only need to be valid).
    kwargs: example keyword inputs (e.g. ``{'train': False}``).

  >>> import jax, jax.numpy as jnp, flax.linen as nn, jaxlora
  >>> model = jaxlora.model_api.LinenModel(nn.Dense(3), (jnp.ones((1, 4)),))
  >>> params = model.module.init(jax.random.key(0), jnp.ones((1, 4)))["params"]
  >>> model.lora_layout(params)
  Layout({'': Dense('in', 'out')})
  """

  module: nn.Module
  inputs: Sequence[Any] = ()
  kwargs: Mapping[str, Any] = dataclasses.field(default_factory=dict)

  def __post_init__(self):
    if not isinstance(self.module, nn.Module):
      raise InputTypeError(f"LinenModel wraps a flax.linen Module, got "
                           f"{type(self.module).__name__}.")
    if not isinstance(self.inputs, (tuple, list)):
      raise InputTypeError(f"LinenModel(inputs=...) takes a tuple of example inputs, got "
                           f"{type(self.inputs).__name__}; write inputs=(x,).")

  def abstract_variables(self) -> Mapping[str, Any]:
    """The variables ``module.init`` makes, as ShapeDtypeStructs (logical names kept)."""
    return jax.eval_shape(lambda: self.module.init(jax.random.key(0), *self.inputs,
                                                   **self.kwargs))

  def lora_layout(self, params: Any) -> layout_lib.Layout:
    """The module's `jaxlora.Layout`, traced abstractly on the example inputs."""
    return layout_lib.trace_layout(self.module.apply, {"params": _tree.get_params(params)},
                                   *self.inputs, **self.kwargs)


def resolve_layout(layout: Any, params: Any) -> layout_lib.Layout | None:
  """The `Layout` that ``layout=`` of `wrap`/`quantize` stands for.

  Args:
    layout: None, a `jaxlora.Layout` (from `jaxlora.trace_layout`), or a model
      implementing `LayoutProvider`, which is asked for the layout of `params`.
    params: the params being wrapped or quantized.

  Returns:
    The layout, or None.

  Raises:
    InputTypeError: for anything else.

  >>> import jax.numpy as jnp, flax.linen as nn, jaxlora
  >>> model = jaxlora.model_api.LinenModel(nn.Dense(3), (jnp.ones((1, 4)),))
  >>> resolve_layout(model, {"kernel": jnp.ones((4, 3)), "bias": jnp.ones(3)})
  Layout({'': Dense('in', 'out')})
  """
  if layout is None or isinstance(layout, layout_lib.Layout):
    return layout
  if isinstance(layout, LayoutProvider):
    found = layout.lora_layout(params)
    if not isinstance(found, layout_lib.Layout):
      raise InputTypeError(f"{type(layout).__name__}.lora_layout(params) returned "
                           f"{type(found).__name__}; it must return a jaxlora.Layout (from "
                           "jaxlora.trace_layout).")
    return found
  if isinstance(layout, nn.Module):
    hint = (" For a linen module, pass layout=jaxlora.model_api.LinenModel(module, "
            "(example_input,)).")
  elif callable(layout):  # most likely model.apply, passed instead of a traced layout
    hint = (" To trace a function, pass layout=jaxlora.trace_layout(model.apply, "
            "{'params': params}, *example_inputs).")
  else:
    hint = ""
  raise InputTypeError(
      f"`layout` must be a jaxlora.Layout (from jaxlora.trace_layout) or a model that provides "
      f"one through `lora_layout(params)` (jaxlora.models.Decoder, "
      f"jaxlora.model_api.LinenModel); got {type(layout).__name__}.{hint}")


__all__ = ["AbstractModel", "ActivationPlanner", "CachedLM", "HubNames", "LayoutProvider",
           "LinenModel", "require", "resolve_layout"]
