import os
import sys

# The tests compile hundreds of tiny programs, where LLVM's optimisation passes cost more than
# they save (about 30% of the suite's time on CPU). Set before jax starts its backend; the CLI
# subprocesses inherit it, so compared runs compile alike.
if "--xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0"
                             " --xla_llvm_disable_expensive_passes=true").strip()

import jax  # pylint: disable=wrong-import-position
import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(__file__))

# The library must not rely on implicit rank broadcasting. (Strict dtype
# promotion is checked in test_forward; flax's own LayerNorm needs the default.)
jax.config.update("jax_numpy_rank_promotion", "raise")


# The fast tier (`-m "not slow"`) also leaves these out: each one's module keeps cheaper tests of
# the same code path in the fast tier (CI runs everything). Node id prefixes.
SLOW_IN_FAST_TIER = (
    "jaxlora/models/loss.py::jaxlora.models.loss.chunked_cross_entropy",
    "jaxlora/models/moe.py::jaxlora.models.moe.MoE",
    "jaxlora/preference.py::jaxlora.preference.logprobs",
    "jaxlora/sharding.py::jaxlora.sharding.tree_shardings",
    "tests/test_attention.py::test_attend_matches_float64_reference[padding-flash-interpret]",
    "tests/test_attention.py::test_decoder_paths_equal_xla[llama-packed]",
    "tests/test_attention.py::test_generate_falls_back_to_xla_with_a_logged_reason",
    "tests/test_attention.py::test_lora_gradients_on_fast_paths_equal_xla",
    "tests/test_attention.py::test_pallas_kernels_run_per_shard_under_a_mesh",
    "tests/test_attention.py::test_sliding_window_matches_reference[splash-interpret]",
    "tests/test_bank.py::test_bad_input_names_the_adapter_layer_or_value",
    "tests/test_bank.py::test_bank_set_swaps_without_recompiling",
    "tests/test_bank.py::test_each_row_equals_its_single_adapter_run",
    "tests/test_bank.py::test_unstack_gives_the_trees_back_exactly",
    "tests/test_checkpoint.py::test_load_onto_a_base_that_does_not_fit",
    "tests/test_cli.py::test_eval_and_plot",
    "tests/test_cli.py::test_export_matches_the_librarys_loaders",
    "tests/test_cli.py::test_generate_factored_and_merged_agree",
    "tests/test_cli.py::test_module_entry_point_passes_the_exit_status",
    "tests/test_cli.py::test_train_writes_every_output",
    "tests/test_cli_adapters.py::test_eval_several_adapters_in_one_process",
    "tests/test_cli_adapters.py::test_generate_with_base_and_adapters_equals_run_dir",
    "tests/test_cli_adapters.py::test_wrong_use_name_lists_the_loaded_adapters",
    "tests/test_cli_packing.py::test_chunked_loss_equals_full_logits_loss_and_grads",
    "tests/test_cli_variants.py::test_variant_keys_train_export_and_serve_in_peft",
    "tests/test_docs.py::test_guide_nnx",
    "tests/test_dora.py::test_dropout_recomputes_the_base_product_on_the_dropped_input",
    "tests/test_dora.py::test_factored_norm_equals_dense_norm_float64",
    "tests/test_dora.py::test_forward_equals_numpy_dora_merged_model[mlp]",
    "tests/test_dora.py::test_forward_equals_numpy_dora_merged_model[scan_remat]",
    "tests/test_dora.py::test_jaxlora_dora_serves_in_peft",
    "tests/test_dora.py::test_magnitude_shapes_and_initial_identity",
    "tests/test_dora.py::test_qdora_equals_dora_on_the_dequantized_tree",
    "tests/test_dora.py::test_unmerge_round_trip_and_its_norms",
    "tests/test_extras.py::test_exported_adapter_matches_peft[all]",
    "tests/test_extras.py::test_merge_keeps_trained_values_and_unmerge_restores_markers",
    "tests/test_extras.py::test_training_moves_only_the_trained_leaves_and_checkpoints_them",
    "tests/test_forward.py::test_bf16_base_with_fp32_adapters",
    "tests/test_forward.py::test_einsum_matches_numpy_float64[btd,dnh->btnh",
    "tests/test_forward.py::test_einsum_matches_numpy_float64[btf,nfh->btnh",
    "tests/test_forward.py::test_factored_equals_merged[einsum]",
    "tests/test_forward.py::test_identity_at_init_bit_for_bit[einsum]",
    "tests/test_forward.py::test_library_works_under_strict_dtype_promotion",
    "tests/test_forward.py::test_per_layer_scale_inside_scan",
    "tests/test_init.py::test_convert_to_lora_equals_peft_conversion[pissa]",
    "tests/test_init.py::test_pissa_checkpoint_and_default_peft_export_work_on_the_original_base",
    "tests/test_init.py::test_wrapped_model_equals_base_and_factors_match_numpy[pissa]",
    "tests/test_loraplus.py::test_matches_two_optimizers_applied_by_hand[full_tree-0.02]",
    "tests/test_loraplus.py::test_matches_two_optimizers_applied_by_hand[full_tree-schedule]",
    "tests/test_loraplus.py::test_matches_two_optimizers_applied_by_hand[inside_optimizer-0.02]",
    "tests/test_memory_plan.py::test_chunked_loss_saves_what_the_plan_says",
    "tests/test_memory_plan.py::test_plan_matches_xla_memory_analysis_of_the_step[none-4x256]",
    "tests/test_memory_plan.py::test_plan_matches_xla_memory_analysis_of_the_step[none-fsdp8",
    "tests/test_merge.py::test_merge_interleaved_einsum",
    "tests/test_merge.py::test_merge_keeps_kernel_dtype_and_rounds_once",
    "tests/test_merge.py::test_merge_matches_numpy_float64_for_stacked_and_multi_axis_kernels",
    "tests/test_merge.py::test_unmerge_restores_the_wrapped_tree",
    "tests/test_merge_adapters.py::test_dare_masks_keep_density_and_rescale",
    "tests/test_merge_adapters.py::test_matches_peft[magnitude_prune_svd",
    "tests/test_merge_adapters.py::test_matches_peft[svd-abc-3",
    "tests/test_merge_adapters.py::test_matches_peft[ties_svd",
    "tests/test_merge_adapters.py::test_nd_kernels_and_kernel_shaped_masks",
    "tests/test_models.py::test_generation_arguments_and_sampling",
    "tests/test_models.py::test_greedy_generation_matches_transformers[gpt2]",
    "tests/test_models.py::test_greedy_generation_matches_transformers[llama_linear_rope_tied]",
    "tests/test_models.py::test_greedy_generation_matches_transformers[mistral_sliding]",
    "tests/test_models.py::test_greedy_generation_matches_transformers[qwen2_bias_tied]",
    "tests/test_models.py::test_greedy_generation_matches_transformers[qwen3_qk_norm]",
    "tests/test_models.py::test_save_pretrained_refuses_wrapped_params",
    "tests/test_models.py::test_sharded_and_bf16_checkpoints",
    "tests/test_models.py::test_sliding_window_is_applied",
    "tests/test_nnx.py::test_one_training_step_equals_the_linen_path",
    "tests/test_nnx.py::test_orbax_save_load_and_errors",
    "tests/test_objectives.py::test_grpo_run_samples_scores_and_resumes_bit_identically",
    "tests/test_objectives.py::test_pair_step_is_the_same_for_any_micro_batches_and_head_chunks[orpo]",
    "tests/test_packing.py::test_packed_logits_equal_separate_runs[llama]",
    "tests/test_peft.py::test_jaxlora_adapter_serves_in_peft[llama-plain]",
    "tests/test_peft.py::test_target_modules_regex_when_names_are_ambiguous",
    "tests/test_peft.py::test_unsupported_and_broken_adapters",
    "tests/test_preemption.py::test_a_signal_mid_step_stops_after_it_in_process",
    "tests/test_protocol.py::test_param_shardings_of_a_custom_model[LinenModel-fsdp4-tp2]",
    "tests/test_qlora_load.py::test_bnb_nf4_checkpoint",
    "tests/test_qlora_load.py::test_gpt2_conv1d_checkpoints",
    "tests/test_qlora_load.py::test_quantize_on_load_equals_quantizing_the_float_params[fp4-kw1]",
    "tests/test_qlora_load.py::test_quantize_on_load_equals_quantizing_the_float_params[nf4-kw0]",
    "tests/test_quantize.py::test_4bit_bit_exact_with_bitsandbytes[False-fp4]",
    "tests/test_quantize.py::test_4bit_bit_exact_with_bitsandbytes[False-nf4]",
    "tests/test_quantize.py::test_4bit_bit_exact_with_bitsandbytes[True-fp4]",
    "tests/test_quantize.py::test_4bit_bit_exact_with_bitsandbytes[True-nf4]",
    "tests/test_quantize.py::test_decoder_defaults_leave_head_and_embeddings_float",
    "tests/test_quantize.py::test_forward_and_grads_equal_the_dequantized_float_tree[dense-nf4]",
    "tests/test_quantize.py::test_forward_and_grads_equal_the_dequantized_float_tree[dense_general",
    "tests/test_quantize.py::test_plain_flax_on_dequantized_kernels_matches_interceptor",
    "tests/test_sharding.py::test_sharded_checkpoint_load_and_loading_into_shards",
    "tests/test_tokens.py::test_adapter_shardings_follow_the_feature_axis",
    "tests/test_tokens.py::test_chunked_loss_reads_the_trained_rows",
    "tests/test_tokens.py::test_errors",
    "tests/test_tokens.py::test_gradient_reaches_only_the_chosen_rows[untied]",
    "tests/test_tokens.py::test_jaxlora_tokens_serve_in_peft[untied]",
    "tests/test_tokens.py::test_merge_equals_adapted_forward_and_unmerge[untied]",
    "tests/test_tokens.py::test_orbax_round_trip[untied]",
    "tests/test_tokens.py::test_training_changes_only_those_rows[tied]",
    "tests/test_tokens.py::test_tree_form_and_summary[untied]",
    "tests/test_train.py::test_optimizer_on_full_tree_freezes_the_base",
    "tests/test_train.py::test_split_combine_are_exact_inverses",
    "tests/test_train.py::test_training_changes_only_adapters_and_sizes_match",
    "tests/test_trainer_pieces.py::test_checkpoint_restore_then_step_matches",
    "tests/test_trainer_pieces.py::test_export_and_load_run",
    "tests/test_trainer_pieces.py::test_steps_are_deterministic",
    "tests/test_trainer_pieces.py::test_train_logs_plain_progress_lines_when_stderr_is_not_a_terminal",
    "tests/test_wrap.py::test_all_linear_skips_head_and_embeddings",
    "tests/test_wrap.py::test_layout_from_another_model",
    "tests/test_wrap.py::test_nd_kernel_without_layout",
    "tests/test_wrap.py::test_rank_alpha_patterns_and_rslora",
    "tests/test_wrap.py::test_works_under_eval_shape_and_jit",
)


@pytest.hookimpl(tryfirst=True)  # before `-m` deselects by mark
def pytest_collection_modifyitems(items):
  for item in items:
    if item.nodeid.startswith(SLOW_IN_FAST_TIER):
      item.add_marker(pytest.mark.slow)


@pytest.fixture(scope="session", autouse=True)
def compilation_cache(tmp_path_factory):
  """One persistent JAX compilation cache for the test session.

  Many tests build the same small programs again (every CLI run traces a fresh
  step function, subprocesses start cold); on CPU, loading a compiled program
  from disk takes a fraction of compiling it. The cache lives in the session's
  temporary directory, shared by xdist's workers and by the CLI subprocesses
  (through the environment), and never outlives pytest's own temp retention.
  """
  base = tmp_path_factory.getbasetemp()
  if os.environ.get("PYTEST_XDIST_WORKER"):
    base = base.parent  # each worker's basetemp is a folder of the session's
  path = base / "jax-compilation-cache"
  path.mkdir(exist_ok=True)
  settings = {"jax_compilation_cache_dir": str(path),
              # Small programs are what the tests compile: cache them all.
              "jax_persistent_cache_min_compile_time_secs": 0,
              "jax_persistent_cache_min_entry_size_bytes": -1}
  with pytest.MonkeyPatch.context() as mp:
    for k, v in settings.items():
      jax.config.update(k, v)
      mp.setenv(k.upper(), str(v))
    yield path


@pytest.fixture
def rng():
  return np.random.default_rng(0)


def hf_checkpoint(path, hf_model):
  """Saves a transformers model to `path` and reads it back: ``(path, model, params)``."""
  import jaxlora  # pylint: disable=import-outside-toplevel
  hf_model.save_pretrained(str(path))
  model, params = jaxlora.models.from_pretrained(str(path))
  return str(path), model, params


@pytest.fixture(scope="session")
def hf_llama(tmp_path_factory):
  """A tiny 2-layer Llama checkpoint (GQA, untied head) and its jaxlora model and params,
  shared by the tests that compare with PEFT. Tests must not change it."""
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  torch.manual_seed(0)
  hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(
      vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
      num_attention_heads=4, num_key_value_heads=2, initializer_range=0.1)).eval()
  return hf_checkpoint(tmp_path_factory.mktemp("hf-llama"), hf)


def randomize_adapters(tree, key, scale=0.5):
  """Gives every lora_a/lora_b a random non-zero value (B starts at zero)."""
  leaves, treedef = jax.tree_util.tree_flatten_with_path(tree)
  keys = jax.random.split(key, len(leaves))
  out = []
  for k, (path, leaf) in zip(keys, leaves):
    name = getattr(path[-1], "key", None)
    if name in ("lora_a", "lora_b"):
      leaf = scale * jax.random.normal(k, leaf.shape, leaf.dtype)
    out.append(leaf)
  return jax.tree.unflatten(treedef, out)


def f64(x):
  return np.asarray(x, np.float64)


# A tiny Llama checkpoint and data files for the command-line tests.
WORDS = ["abc", "hello", "world", "tiny", "jax", "lora", "fox", "dog", "quick", "lazy"]


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory):
  pytest.importorskip("transformers")
  import tiny_checkpoint
  return tiny_checkpoint.make(str(tmp_path_factory.mktemp("tiny")))


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory):
  import json
  import tiny_checkpoint
  d = tmp_path_factory.mktemp("data")
  rng = np.random.default_rng(0)
  with open(d / "pc.jsonl", "w") as f:
    for _ in range(120):
      w = WORDS[rng.integers(len(WORDS))]
      f.write(json.dumps({"prompt": f"reverse: {w} ->", "completion": " " + w[::-1]}) + "\n")
  with open(d / "chat.jsonl", "w") as f:
    for w in WORDS * 3:
      f.write(json.dumps({"messages": [{"role": "user", "content": f"reverse {w}"},
                                       {"role": "assistant", "content": w[::-1]}]}) + "\n")
  (d / "text.txt").write_text("\n".join(tiny_checkpoint.CORPUS))
  import pandas as pd
  pd.DataFrame({"text": tiny_checkpoint.CORPUS}).to_csv(d / "text.csv", index=False)
  pd.DataFrame({"text": tiny_checkpoint.CORPUS}).to_parquet(d / "text.parquet")
  (d / "empty.jsonl").write_text("")
  (d / "nofield.jsonl").write_text(json.dumps({"prompt": "a", "answer": "b"}) + "\n")
  (d / "long.jsonl").write_text(json.dumps({"prompt": "hello " * 40, "completion": "x"}) + "\n")
  return d


def cli_args(model_dir, data, out, *extra):
  """`jaxlora train` arguments for a short run on the tiny checkpoint."""
  return ["train", "--no-progress", f"model.path={model_dir}", f"data.train_file={data}",
          "data.format=prompt_completion", "data.max_length=32", "train.batch_size=8",
          "train.save_every=4", "train.lr=3e-3", "lora.rank=4", "train.log_every=2",
          f"output_dir={out}", *extra]


# The arguments of `trained_run`, for tests that rerun it (resume) or compare with it.
TRAINED_RUN_ARGS = ("train.steps=6", "data.eval_fraction=0.2", "train.grad_accum=2")


@pytest.fixture(scope="session")
def trained_run(model_dir, data_dir, tmp_path_factory):
  """One finished `jaxlora train` run, shared by the tests that only read a run (eval,
  generate, export, merge, plot, swapping adapters): a training run costs more than all of
  them. Held-out eval and gradient accumulation on, so that the run has every output.
  Tests must not change it: copy it to resume or extend it."""
  from jaxlora_cli.main import main
  out = tmp_path_factory.mktemp("trained") / "run"
  assert main(cli_args(model_dir, data_dir / "pc.jsonl", out, *TRAINED_RUN_ARGS)) == 0
  return out
