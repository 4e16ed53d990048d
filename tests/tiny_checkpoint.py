"""A tiny Llama checkpoint with a byte-level BPE tokenizer and a chat template, for CLI tests."""

import os

CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}")

CORPUS = [
    "the quick brown fox jumps over the lazy dog",
    "question: what is two plus two? answer: four",
    "hello world, this is a tiny tokenizer for tests",
    "reverse the letters: abc -> cba, xyz -> zyx",
] * 20


def make(path: str, *, max_positions: int = 128, seed: int = 0) -> str:
  import torch
  import transformers
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

  os.makedirs(path, exist_ok=True)
  tok = Tokenizer(models.BPE(unk_token=None))
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  special = ["<pad>", "<s>", "</s>", "<|user|>", "<|assistant|>", "<|system|>", "<|end|>"]
  trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=special,
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
  tok.train_from_iterator(CORPUS, trainer)
  fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>",
                                              eos_token="</s>", pad_token="<pad>")
  fast.chat_template = CHAT_TEMPLATE
  fast.save_pretrained(path)
  torch.manual_seed(seed)
  cfg = transformers.LlamaConfig(
      vocab_size=len(fast), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=max_positions,
      bos_token_id=fast.bos_token_id, eos_token_id=fast.eos_token_id,
      pad_token_id=fast.pad_token_id, initializer_range=0.05)
  transformers.LlamaForCausalLM(cfg).save_pretrained(path)
  return path
