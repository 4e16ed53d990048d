"""Text generation with a KV cache: greedy, temperature and top-p.

Works with any model implementing `jaxlora.model_api.CachedLM` (`jaxlora.models.Decoder` does).
"""

from __future__ import annotations

import functools
from typing import Any, Literal

import jax
import jax.numpy as jnp

from jaxlora import _tree
from jaxlora import bank as bank_lib
from jaxlora import forward
from jaxlora import model_api
from jaxlora import quantization
from jaxlora.errors import InputError


def _sample(logits, key, temperature, top_p):
  if temperature == 0.0:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  logits = logits.astype(jnp.float32) / temperature
  if top_p < 1.0:
    order = jnp.argsort(-logits, axis=-1)
    sorted_logits = jnp.take_along_axis(logits, order, axis=-1)
    probs = jax.nn.softmax(sorted_logits, axis=-1)
    before = jnp.cumsum(probs, axis=-1) - probs  # mass of the tokens ranked above
    sorted_logits = jnp.where(before < top_p, sorted_logits, -jnp.inf)
    logits = jnp.full_like(logits, -jnp.inf).at[
        jnp.arange(logits.shape[0])[:, None], order].set(sorted_logits)
  return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("model", "max_new_tokens", "temperature", "top_p",
                                             "eos", "pad", "lora"))
def _generate(model, params, input_ids, mask, key, adapter_ids, *, max_new_tokens, temperature,
              top_p, eos, pad, lora):
  b, t = input_ids.shape
  fn = model.apply
  if lora:
    lora_fn = forward.apply(model.apply)
    fn = (lora_fn if adapter_ids is None else
          functools.partial(lora_fn, adapter_ids=adapter_ids))
  variables = {"params": params}
  cache = model.init_cache(b, t + max_new_tokens)
  logits, cache = fn(variables, input_ids, attention_mask=mask, cache=cache)
  last = jnp.max(jnp.where(mask, jnp.arange(t)[None, :], 0), axis=-1)
  logits = logits[jnp.arange(b), last]
  eos_ids = jnp.asarray(eos if eos else (-1,), jnp.int32)

  def step(carry, key):
    logits, cache, done = carry
    tok = _sample(logits, key, temperature, top_p)
    tok = jnp.where(done, pad, tok)
    done = done | jnp.isin(tok, eos_ids)
    new_logits, cache = fn(variables, tok[:, None], attention_mask=jnp.ones((b, 1), jnp.int32),
                           cache=cache)
    return (new_logits[:, 0], cache, done), tok

  keys = jax.random.split(key, max_new_tokens)
  _, tokens = jax.lax.scan(step, (logits, cache, jnp.zeros((b,), bool)), keys)
  return tokens.T


def generate(model: model_api.CachedLM, params: Any, input_ids: Any, *, attention_mask: Any = None,
             max_new_tokens: int = 20, temperature: float = 0.0, top_p: float = 1.0,
             key: jax.Array | None = None,
             eos_token_id: int | tuple[int, ...] | Literal["config"] | None = "config",
             pad_token_id: int | None = None, adapter_ids: Any = None) -> jax.Array:
  """Generates tokens with a KV cache; jitted, batched, any padding side.

  Works on plain, merged and LoRA-wrapped params: with adapter leaves present
  the factored LoRA forward (`jaxlora.apply`) is used.

  Args:
    model: a `jaxlora.models.Decoder`, or any model implementing
      `jaxlora.model_api.CachedLM` (``apply`` with a ``cache=``, ``init_cache``).
    params: its params (wrapped or not; with or without ``{'params': ...}``).
    input_ids: int ``(batch, prompt_len)`` prompts.
    attention_mask: ``(batch, prompt_len)``, 0 on padding (left or right).
    max_new_tokens: number of tokens to generate.
    temperature: 0 for greedy decoding, else the sampling temperature.
    top_p: nucleus sampling mass (with temperature > 0).
    key: PRNG key, required when sampling.
    eos_token_id: stop token(s); by default the model's (``model.eos_token_id``).
      After it a row gets `pad_token_id`. None disables stopping.
    pad_token_id: filler after EOS; defaults to ``model.pad_token_id``, else the
      first EOS id, else 0.
    adapter_ids: with an adapter bank (a `jaxlora.Bank` or its ``tree``), the
      adapter of each row, int ``(batch,)`` (-1: the base alone); names are
      accepted too when ``params`` is a `Bank`.

  Returns:
    The new tokens, int32 ``(batch, max_new_tokens)``.

  >>> import jax, jax.numpy as jnp, jaxlora
  >>> cfg = jaxlora.models.ModelConfig.tiny("llama")
  >>> model = jaxlora.models.Decoder(cfg)
  >>> params = jaxlora.models.init(model, jax.random.key(0))
  >>> jaxlora.generate(model, params, jnp.array([[1, 2, 3]]), max_new_tokens=4).shape
  (1, 4)
  """
  model_api.require(model, model_api.CachedLM, "generate")
  if max_new_tokens < 1:
    raise InputError(f"max_new_tokens must be >= 1, got {max_new_tokens}.")
  if temperature < 0 or not 0 < top_p <= 1:
    raise InputError(f"Need temperature >= 0 and 0 < top_p <= 1, got {temperature}, {top_p}.")
  if temperature > 0 and key is None:
    raise InputError("Sampling (temperature > 0) needs a PRNG key: key=jax.random.key(0).")
  input_ids = jnp.asarray(input_ids, jnp.int32)
  if input_ids.ndim != 2:
    raise InputError(f"input_ids must be (batch, length), got shape {input_ids.shape}.")
  total = input_ids.shape[1] + max_new_tokens
  if model.max_positions is not None and total > model.max_positions:
    raise InputError(f"prompt ({input_ids.shape[1]}) + max_new_tokens ({max_new_tokens}) = "
                     f"{total} exceeds the model's {model.max_positions} positions.")
  mask = (jnp.ones(input_ids.shape, bool) if attention_mask is None
          else jnp.asarray(attention_mask).astype(bool))
  if eos_token_id == "config":
    eos_token_id = model.eos_token_id
  eos = (() if eos_token_id is None else
         tuple(eos_token_id) if isinstance(eos_token_id, (tuple, list)) else (int(eos_token_id),))
  if pad_token_id is None:
    pad_token_id = model.pad_token_id
  if pad_token_id is None:
    pad_token_id = eos[0] if eos else 0
  if isinstance(params, bank_lib.Bank):
    if adapter_ids is not None and any(isinstance(i, str) or i is None for i in adapter_ids):
      adapter_ids = params.ids(list(adapter_ids))
    if adapter_ids is not None:
      ids = jnp.asarray(adapter_ids)
      if bool(jnp.any((ids < -1) | (ids >= params.capacity))):
        raise InputError(f"adapter_ids {ids.tolist()} out of range for a bank of "
                         f"{params.capacity} slots (-1 is the base alone).")
    params = params.tree
  if adapter_ids is not None:
    adapter_ids = jnp.asarray(adapter_ids, jnp.int32)
    if adapter_ids.shape != (input_ids.shape[0],):
      raise InputError(f"adapter_ids must hold one id per prompt row, shape "
                       f"({input_ids.shape[0]},), got {tuple(adapter_ids.shape)}.")
  p = _tree.get_params(params)
  return _generate(model, p, input_ids, mask, key if key is not None else jax.random.key(0),
                   adapter_ids,
                   max_new_tokens=max_new_tokens, temperature=float(temperature),
                   top_p=float(top_p), eos=eos, pad=int(pad_token_id),
                   # quantized layers are computed by jaxlora.apply too
                   lora=bool(_tree.adapter_modules(p) or quantization.records(p)))
