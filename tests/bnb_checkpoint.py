"""Tiny Llama checkpoints, float and quantized by transformers + bitsandbytes on the CPU, for tests.

bitsandbytes 0.50's native CPU 4-bit dequantization is wrong when a weight row
is not a whole number of blocks (row length not a multiple of the block size,
or smaller than it); `portable_dequantize_4bit` reaches its portable kernel,
which every other backend agrees with. Checkpoints whose rows are multiples of
64 (hidden 64, intermediate 128) are right either way, so the 4-bit
transformers model itself can be compared with jaxlora.

On CPUs with AVX512-BF16, a `Linear4bit` in eval mode repacks its weight on
its first forward call and computes in bfloat16 whatever
``bnb_4bit_compute_dtype`` says (logits off by ~1e-2 from the float32
computation); `float32_compute` switches that path off.
"""

import os


def llama_config(hidden=64, intermediate=128, layers=2, vocab=96):
  import transformers
  return transformers.LlamaConfig(
      vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate,
      num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
      max_position_embeddings=64, initializer_range=0.05, pad_token_id=0)


def make_float(path: str, seed: int = 0, **config) -> str:
  """A random float32 Llama checkpoint written by transformers."""
  import torch
  import transformers
  torch.manual_seed(seed)
  transformers.LlamaForCausalLM(llama_config(**config)).save_pretrained(path)
  return path


def load_bnb(path: str, *, quant_type: str = "nf4", double_quant: bool = True,
             load_in_8bit: bool = False):
  """The checkpoint at `path` as a transformers model quantized by bitsandbytes on the CPU.

  A float checkpoint is quantized while loading; a bitsandbytes checkpoint
  loads as stored (its own quantization_config wins).
  """
  import torch
  import transformers
  if load_in_8bit:
    qc = transformers.BitsAndBytesConfig(load_in_8bit=True)
  else:
    qc = transformers.BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type=quant_type,
        bnb_4bit_use_double_quant=double_quant, bnb_4bit_compute_dtype=torch.float32)
  with open(os.path.join(path, "config.json")) as f:
    prequantized = "quantization_config" in f.read()
  kw = {} if prequantized else {"quantization_config": qc}
  return float32_compute(transformers.AutoModelForCausalLM.from_pretrained(
      path, device_map="cpu", dtype=torch.float32, **kw).eval())


def float32_compute(model):
  """Keeps bitsandbytes' CPU 4-bit layers on dequantize + float32 matmul (see the module doc)."""
  import bitsandbytes as bnb
  for m in model.modules():
    if isinstance(m, bnb.nn.Linear4bit):
      m.support_avx512bf16_for_cpu = False
  return model


def make_bnb(float_path: str, path: str, **kw):
  """Quantizes `float_path` with bitsandbytes and saves it (transformers' bnb checkpoint format)."""
  model = load_bnb(float_path, **kw)
  model.save_pretrained(path)
  return model


def portable_dequantize_4bit(param):
  """bitsandbytes' portable (reference) 4-bit dequantization of a `Params4bit` weight."""
  import bitsandbytes as bnb
  import torch
  qs = param.quant_state
  absmax = qs.absmax
  if qs.nested:
    absmax = bnb.functional.dequantize_blockwise(qs.absmax, qs.state2) + qs.offset
  keys = torch._C.DispatchKeySet(torch._C.DispatchKey.CompositeExplicitAutograd)
  with torch.compiler.set_stance("force_eager"):  # skip its torch.compile (seconds, same values)
    return torch.ops.bitsandbytes.dequantize_4bit.default.redispatch(
        keys, param.data, absmax.float(), qs.blocksize, qs.quant_type, qs.shape, qs.dtype)


def linear_modules(model):
  """``{'model.layers.0.self_attn.q_proj': module}`` for every quantized Linear of `model`."""
  import bitsandbytes as bnb
  return {n: m for n, m in model.named_modules()
          if isinstance(m, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt))}
