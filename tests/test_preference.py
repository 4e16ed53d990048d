"""jaxlora.preference: the reference tree, log-probs, and the DPO/SimPO/ORPO/GRPO losses vs TRL."""

import collections
import types

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxlora
from jaxlora import preference
from jaxlora.errors import InputError

torch = pytest.importorskip("torch")
trl = pytest.importorskip("trl")

# float64 log-probs (the comparisons are to 1e-6); pairs chosen to cover both signs of the margin.
RNG = np.random.default_rng(0)
PAIRS = 6
POLICY_CHOSEN = RNG.normal(-20.0, 6.0, PAIRS)
POLICY_REJECTED = RNG.normal(-22.0, 6.0, PAIRS)
REF_CHOSEN = POLICY_CHOSEN + RNG.normal(0.0, 2.0, PAIRS)
REF_REJECTED = POLICY_REJECTED + RNG.normal(0.0, 2.0, PAIRS)
CHOSEN_LENGTHS = RNG.integers(1, 9, PAIRS)
REJECTED_LENGTHS = RNG.integers(1, 9, PAIRS)
AVG_CHOSEN = -RNG.uniform(0.05, 3.0, PAIRS)  # length-averaged log-probs (< 0)
AVG_REJECTED = -RNG.uniform(0.05, 3.0, PAIRS)


@pytest.fixture(autouse=True)
def _x64():
  with jax.enable_x64(True):
    yield


def _metrics():
  return collections.defaultdict(lambda: collections.defaultdict(list))


def _accelerator():
  return types.SimpleNamespace(device="cpu", num_processes=1, sync_gradients=True,
                               gather=lambda x: x, gather_for_metrics=lambda x: x,
                               reduce=lambda x, reduction="sum": x)


def _trl_dpo(pair, loss_type, beta, label_smoothing):
  """TRL 1.16 `DPOTrainer._compute_loss` for one pair, from fixed (precomputed) log-probs.

  The stand-in model returns the chosen and rejected rows' summed log-probs as their first
  per-token entry; the completion mask carries the completion lengths (read by 'ipo').
  """
  from trl.trainer.dpo_trainer import DPOTrainer  # pylint: disable=import-outside-toplevel
  t = int(max(CHOSEN_LENGTHS[pair], REJECTED_LENGTHS[pair])) + 1
  completion_mask = torch.zeros(2, t, dtype=torch.long)
  completion_mask[0, 1:1 + CHOSEN_LENGTHS[pair]] = 1
  completion_mask[1, 1:1 + REJECTED_LENGTHS[pair]] = 1
  log_probs = torch.zeros(2, t - 1, dtype=torch.float64)
  log_probs[0, 0], log_probs[1, 0] = POLICY_CHOSEN[pair], POLICY_REJECTED[pair]
  outputs = types.SimpleNamespace(log_probs=log_probs, entropy=torch.zeros(2, t - 1),
                                  mean_logits=torch.zeros(2, t - 1),
                                  is_top1=torch.zeros(2, t - 1, dtype=torch.bool))
  self = types.SimpleNamespace(
      model=types.SimpleNamespace(training=False), accelerator=_accelerator(),
      aux_loss_enabled=False, ld_alpha=None, precompute_ref_logps=True,
      f_divergence_type="reverse_kl", loss_types=[loss_type], loss_weights=[1.0], beta=beta,
      label_smoothing=label_smoothing, use_weighting=False, _metrics=_metrics(),
      _total_train_tokens=0, _tp_size=1, args=types.SimpleNamespace())
  inputs = {"input_ids": torch.zeros(2, t, dtype=torch.long),
            "attention_mask": torch.ones(2, t, dtype=torch.long),
            "completion_mask": completion_mask,
            "ref_chosen_logps": torch.tensor([REF_CHOSEN[pair]], dtype=torch.float64),
            "ref_rejected_logps": torch.tensor([REF_REJECTED[pair]], dtype=torch.float64)}
  loss = DPOTrainer._compute_loss(self, lambda **kwargs: outputs, inputs, False)
  m = self._metrics["eval"]
  return float(loss), m["rewards/chosen"][0], m["rewards/rejected"][0]


@pytest.mark.parametrize("loss_type,beta,label_smoothing", [
    ("sigmoid", 0.1, 0.0), ("sigmoid", 0.5, 0.0), ("hinge", 0.1, 0.0), ("ipo", 0.1, 0.0),
    ("ipo", 0.7, 0.0), ("robust", 0.1, 0.2), ("robust", 0.3, 0.0)])
def test_dpo_losses_equal_trl(loss_type, beta, label_smoothing):
  kwargs = {}
  if loss_type == "ipo":
    kwargs = {"chosen_lengths": CHOSEN_LENGTHS, "rejected_lengths": REJECTED_LENGTHS}
  losses, chosen, rejected = preference.dpo_loss(
      POLICY_CHOSEN, POLICY_REJECTED, REF_CHOSEN, REF_REJECTED, loss_type=loss_type, beta=beta,
      label_smoothing=label_smoothing, **kwargs)
  assert losses.dtype == jnp.float64 and losses.shape == (PAIRS,)
  want = np.array([_trl_dpo(i, loss_type, beta, label_smoothing) for i in range(PAIRS)])
  np.testing.assert_allclose(losses, want[:, 0], rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(chosen, want[:, 1], rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(rejected, want[:, 2], rtol=1e-6, atol=1e-6)
  if loss_type == "ipo":  # length-averaged log-probs without lengths: the same loss
    avg = lambda x, n: x / n
    same, _, _ = preference.dpo_loss(
        avg(POLICY_CHOSEN, CHOSEN_LENGTHS), avg(POLICY_REJECTED, REJECTED_LENGTHS),
        avg(REF_CHOSEN, CHOSEN_LENGTHS), avg(REF_REJECTED, REJECTED_LENGTHS), loss_type="ipo",
        beta=beta)
    np.testing.assert_allclose(same, losses, rtol=1e-9)


def test_sigmoid_label_smoothing_is_conservative_dpo():
  # TRL's `DPOTrainer.dpo_loss` (0.x) 'sigmoid' with label_smoothing (cDPO); TRL 1.16 dropped it.
  beta, ls = 0.2, 0.1
  x = beta * ((POLICY_CHOSEN - REF_CHOSEN) - (POLICY_REJECTED - REF_REJECTED))
  logsig = lambda v: -np.logaddexp(0.0, -v)
  want = -logsig(x) * (1 - ls) - logsig(-x) * ls
  losses, _, _ = preference.dpo_loss(POLICY_CHOSEN, POLICY_REJECTED, REF_CHOSEN, REF_REJECTED,
                                     beta=beta, label_smoothing=ls)
  np.testing.assert_allclose(losses, want, rtol=1e-9)


@pytest.mark.parametrize("beta,gamma,label_smoothing", [(2.0, 0.5, 0.0), (2.5, 1.4, 0.1)])
def test_simpo_equals_trl_cpo_loss(beta, gamma, label_smoothing):
  from trl.experimental.cpo.cpo_trainer import CPOTrainer  # pylint: disable=import-outside-toplevel
  self = types.SimpleNamespace(alpha=0.0, loss_type="simpo", simpo_gamma=gamma, beta=beta,
                               label_smoothing=label_smoothing, accelerator=_accelerator())
  want = CPOTrainer.cpo_loss(self, torch.tensor(AVG_CHOSEN), torch.tensor(AVG_REJECTED))
  got = preference.simpo_loss(AVG_CHOSEN, AVG_REJECTED, beta=beta, gamma=gamma,
                              label_smoothing=label_smoothing)
  for g, w in zip(got, want):
    np.testing.assert_allclose(g, w.numpy(), rtol=1e-6, atol=1e-6)


def test_orpo_equals_trl_odds_ratio_loss():
  from trl.experimental.orpo.orpo_trainer import ORPOTrainer  # pylint: disable=import-outside-toplevel
  beta = 0.25
  self = types.SimpleNamespace(beta=beta, accelerator=_accelerator())
  # Both sides of log1mexp's branch at -log 2.
  c, r = np.concatenate([AVG_CHOSEN, [-0.1, -5.0]]), np.concatenate([AVG_REJECTED, [-0.9, -0.3]])
  losses, chosen, rejected, ratio, log_odds = ORPOTrainer.odds_ratio_loss(
      self, torch.tensor(c), torch.tensor(r))
  got, metrics = preference.orpo_loss(c, r, beta=beta)
  np.testing.assert_allclose(got, -losses.numpy(), rtol=1e-6, atol=1e-6)  # the term to add
  np.testing.assert_allclose(metrics["chosen_rewards"], chosen.numpy(), rtol=1e-6)
  np.testing.assert_allclose(metrics["rejected_rewards"], rejected.numpy(), rtol=1e-6)
  np.testing.assert_allclose(metrics["log_odds_ratio"], ratio.numpy(), rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(metrics["log_odds_chosen"], log_odds.numpy(), rtol=1e-6, atol=1e-6)


def test_preference_metrics():
  _, chosen, rejected = preference.dpo_loss(POLICY_CHOSEN, POLICY_REJECTED, REF_CHOSEN,
                                            REF_REJECTED)
  m = preference.preference_metrics(chosen, rejected)
  c, r = np.asarray(chosen), np.asarray(rejected)
  np.testing.assert_allclose(m["accuracy"], np.mean(c > r))
  np.testing.assert_allclose(m["margin"], np.mean(c - r), rtol=1e-12)


def _trl_group_advantages(rewards, group_size, scale_rewards):
  """The advantages of TRL 1.16 `GRPOTrainer._generate_and_score_completions`
  (multi_objective_aggregation='sum_then_normalize'), restated on a reward vector with TRL's
  own `nanstd`."""
  from trl.trainer.utils import nanstd  # pylint: disable=import-outside-toplevel
  rewards = torch.tensor(rewards)
  mean = torch.nanmean(rewards.view(-1, group_size), dim=1).repeat_interleave(group_size, dim=0)
  if scale_rewards in ("group", "none"):
    std = nanstd(rewards.view(-1, group_size), dim=1).repeat_interleave(group_size, dim=0)
  else:
    std = nanstd(rewards).expand_as(rewards)
  advantages = rewards - mean
  if scale_rewards != "none":
    advantages = advantages / (std + 1e-4)
  return torch.nan_to_num(advantages, nan=0.0).numpy()


@pytest.mark.parametrize("scale_rewards", ["group", "batch", "none"])
def test_group_advantages_equal_trl(scale_rewards):
  rewards = np.round(RNG.normal(size=12), 1)
  rewards[4:8] = 1.0  # a group of equal rewards: advantage 0
  rewards[9] = np.nan  # an unscorable completion
  got = preference.group_advantages(rewards, 4, scale_rewards)
  # (TRL's nanstd takes its Bessel factor count / (count - 1) in float32: 1e-6, not 1e-9.)
  np.testing.assert_allclose(got, _trl_group_advantages(rewards, 4, scale_rewards), rtol=1e-6,
                             atol=1e-6)
  # Hand check of the default: unbiased std, as torch's .std().
  g = rewards[:4]
  np.testing.assert_allclose(preference.group_advantages(rewards[:4], 4),
                             (g - g.mean()) / (g.std(ddof=1) + 1e-4), rtol=1e-9)
  assert preference.group_advantages(rewards[:4], 4, True).tolist() == \
      preference.group_advantages(rewards[:4], 4, "group").tolist()


def _trl_grpo(logps, old, ref, advantages, mask, *, loss_type, beta, epsilon, epsilon_high,
              num_items=None):
  """TRL 1.16 `GRPOTrainer._compute_loss` on fixed per-token log-probs (eval mode: no
  gradient-accumulation scaling)."""
  from trl.trainer.grpo_trainer import GRPOTrainer  # pylint: disable=import-outside-toplevel
  b, t = logps.shape
  logps_t = torch.tensor(logps)
  self = types.SimpleNamespace(
      _get_per_token_logps_and_entropies=lambda *args, **kwargs: (logps_t, torch.zeros(b, t),
                                                                  None),
      aux_loss_enabled=False, top_entropy_quantile=1.0, off_policy_mask_threshold=None,
      importance_sampling_level="token", beta=beta, loss_type=loss_type, epsilon_low=epsilon,
      epsilon_high=epsilon if epsilon_high is None else epsilon_high, use_vllm=False,
      vllm_importance_sampling_correction=False, model=types.SimpleNamespace(training=False),
      current_gradient_accumulation_steps=1, max_completion_length=t,
      accelerator=_accelerator(), _entropy_bonus_enabled=False, _metrics=_metrics(),
      args=types.SimpleNamespace(use_bias_correction_kl=False, delta=None, steps_per_generation=1))
  inputs = {"prompt_ids": torch.zeros(b, 2, dtype=torch.long),
            "prompt_mask": torch.ones(b, 2, dtype=torch.long),
            "completion_ids": torch.zeros(b, t, dtype=torch.long),
            "completion_mask": torch.tensor(mask), "advantages": torch.tensor(advantages),
            "old_per_token_logps": torch.tensor(old), "ref_per_token_logps": torch.tensor(ref),
            "num_items_in_batch": torch.tensor(float(mask.sum() if num_items is None
                                                     else num_items))}
  loss = GRPOTrainer._compute_loss(self, None, inputs)
  return float(loss), {k: v[0] for k, v in self._metrics["eval"].items()}


@pytest.mark.parametrize("loss_type,beta,epsilon_high", [
    ("dapo", 0.0, None), ("dapo", 0.04, 0.28), ("grpo", 0.04, None), ("bnpo", 0.1, None),
    ("dr_grpo", 0.04, 0.3)])
def test_grpo_loss_equals_trl(loss_type, beta, epsilon_high):
  b, t = 4, 7
  old = RNG.normal(-2.0, 1.0, (b, t))
  logps = old + RNG.normal(0.0, 0.3, (b, t))  # ratios on both sides of the clipping range
  ref = old + RNG.normal(0.0, 0.3, (b, t))
  advantages = RNG.normal(size=b)
  lengths = np.array([7, 3, 5, 1])
  mask = (np.arange(t)[None, :] < lengths[:, None]).astype(np.int64)
  want, trl_metrics = _trl_grpo(logps, old, ref, advantages, mask, loss_type=loss_type,
                                beta=beta, epsilon=0.2, epsilon_high=epsilon_high)
  loss, metrics = preference.grpo_loss(logps, old, ref, advantages, mask, beta=beta,
                                       epsilon=0.2, epsilon_high=epsilon_high,
                                       loss_type=loss_type)
  np.testing.assert_allclose(loss, want, rtol=1e-6, atol=1e-6)
  names = ["clip_ratio/low_mean", "clip_ratio/high_mean", "clip_ratio/region_mean"]
  assert 0 < trl_metrics["clip_ratio/region_mean"] < 1
  for name in names + (["kl"] if beta else []):
    np.testing.assert_allclose(metrics[name], trl_metrics[name], rtol=1e-6, atol=1e-6)
  if loss_type == "dapo":  # a global token count, as TRL's num_items_in_batch
    want, _ = _trl_grpo(logps, old, ref, advantages, mask, loss_type=loss_type, beta=beta,
                        epsilon=0.2, epsilon_high=epsilon_high, num_items=40)
    loss, _ = preference.grpo_loss(logps, old, ref, advantages, mask, beta=beta,
                                   epsilon_high=epsilon_high, num_items_in_batch=40)
    np.testing.assert_allclose(loss, want, rtol=1e-6, atol=1e-6)


def test_bad_inputs_name_the_value():
  with pytest.raises(InputError, match="'dpo'"):
    preference.dpo_loss(POLICY_CHOSEN, POLICY_REJECTED, REF_CHOSEN, REF_REJECTED, loss_type="dpo")
  with pytest.raises(InputError, match=r"\(6, 1\)"):
    preference.dpo_loss(POLICY_CHOSEN[:, None], POLICY_REJECTED, REF_CHOSEN, REF_REJECTED)
  with pytest.raises(InputError, match="0.5"):
    preference.dpo_loss(POLICY_CHOSEN, POLICY_REJECTED, REF_CHOSEN, REF_REJECTED,
                        loss_type="robust", label_smoothing=0.5)
  with pytest.raises(InputError, match="group_size=4"):
    preference.group_advantages(np.zeros(6), 4)
  with pytest.raises(InputError, match=r"\(2, 3\)"):
    preference.grpo_loss(np.zeros((2, 4)), np.zeros((2, 3)), None, np.zeros(2), np.ones((2, 4)))
  with pytest.raises(InputError, match="ref_per_token_logps"):
    preference.grpo_loss(np.zeros((2, 4)), np.zeros((2, 4)), None, np.zeros(2), np.ones((2, 4)),
                         beta=0.1)
  with pytest.raises(InputError, match=r"\(2, 5\)"):
    preference.sequence_logprobs(np.zeros((2, 4, 3)), np.zeros((2, 4), int), np.ones((2, 5)))


def test_logprobs_equal_a_float64_reference():
  b, t, v = 3, 6, 11
  logits = RNG.normal(0.0, 3.0, (b, t, v)).astype(np.float32)
  ids = RNG.integers(0, v, (b, t))
  mask = np.array([[0, 0, 1, 1, 1, 0], [0, 1, 1, 1, 1, 1], [0, 0, 0, 0, 1, 1]])
  x = logits.astype(np.float64)
  pred = x[:, :-1]  # position t predicts token t + 1
  lse = np.log(np.exp(pred - pred.max(-1, keepdims=True)).sum(-1)) + pred.max(-1)
  want = (np.take_along_axis(pred, ids[:, 1:, None], -1)[..., 0] - lse) * mask[:, 1:]
  with jax.enable_x64(False):
    per_token = preference.per_token_logprobs(logits, ids, mask)
    total = preference.sequence_logprobs(jnp.asarray(logits, jnp.bfloat16).astype(jnp.float32),
                                         ids, mask)
    assert per_token.dtype == jnp.float32 and per_token.shape == (b, t - 1)
    np.testing.assert_allclose(per_token, want, rtol=1e-6, atol=1e-5)
    np.testing.assert_allclose(preference.sequence_logprobs(logits, ids, mask), want.sum(-1),
                               rtol=1e-6, atol=1e-5)
    np.testing.assert_allclose(preference.sequence_logprobs(logits, ids, mask, average=True),
                               want.sum(-1) / mask[:, 1:].sum(-1), rtol=1e-6, atol=1e-5)
    assert preference.sequence_logprobs(jnp.asarray(logits, jnp.bfloat16), ids,
                                        mask).dtype == jnp.float32
    np.testing.assert_allclose(total, preference.sequence_logprobs(
        jnp.asarray(logits, jnp.bfloat16), ids, mask), rtol=1e-6)
  np.testing.assert_allclose(preference.per_token_logprobs(x, ids, mask), want, rtol=1e-12,
                             atol=1e-12)


def _tiny():
  model = jaxlora.models.Decoder(jaxlora.models.ModelConfig.tiny("llama"))
  params = jaxlora.models.init(model, jax.random.key(0))
  return model, params


def _nonzero_b(tree):
  keys = iter(jax.random.split(jax.random.key(7), 64))
  def visit(node):
    if isinstance(node, dict):
      return {k: (0.3 * jax.random.normal(next(keys), v.shape, v.dtype) if k == "lora_b"
                  else visit(v)) for k, v in node.items()}
    return node
  return visit(tree)


@pytest.mark.slow  # compiles a decoder four times; the fast tier keeps the PiSSA case
def test_reference_tree_is_the_base_without_gradient_or_copy():
  with jax.enable_x64(False):
    model, params = _tiny()
    ids = jnp.array([[1, 5, 7, 3, 2, 9], [4, 4, 1, 8, 3, 0]])
    attention = jnp.array([[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 0]])
    completion = jnp.array([[0, 0, 1, 1, 1, 1], [0, 0, 0, 1, 1, 0]])
    tree = _nonzero_b(jaxlora.wrap(params, rank=2, layout=model, key=jax.random.key(1),
                                   use_dora=False))
    fwd = jaxlora.apply(model.apply)
    ref = preference.reference_tree(tree)
    path = next(p for p, _ in jaxlora._tree.adapter_modules(tree))
    kernel = jaxlora._tree.lookup(tree, path + ("kernel",))
    assert jaxlora._tree.lookup(ref, path + ("kernel",)) is kernel  # the same buffer
    assert not jaxlora._tree.adapter_modules(ref)

    base = jax.jit(model.apply)({"params": params}, ids, attention_mask=attention)
    policy = jax.jit(fwd)({"params": tree}, ids, attention_mask=attention)
    assert not np.allclose(policy, base, atol=1e-3)  # the adapters change the model

    trainable, frozen = jaxlora.split(tree)

    @jax.jit
    def step(trainable, frozen):
      full = jaxlora.combine(trainable, frozen)
      ref_logits = fwd({"params": preference.reference_tree(full)}, ids, attention_mask=attention)
      ref_lp = preference.sequence_logprobs(ref_logits, ids, completion)
      pol_lp = preference.logprobs(fwd, full, ids, completion, attention)
      return ref_logits, ref_lp, pol_lp

    ref_logits, ref_lp, pol_lp = step(trainable, frozen)
    np.testing.assert_allclose(ref_logits, base, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(ref_lp, preference.sequence_logprobs(base, ids, completion),
                               rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(pol_lp, preference.sequence_logprobs(policy, ids, completion),
                               rtol=1e-5, atol=1e-5)

    def ref_only(trainable, frozen):
      full = jaxlora.combine(trainable, frozen)
      return preference.logprobs(fwd, preference.reference_tree(full), ids, completion,
                                 attention).sum()

    grads = jax.jit(jax.grad(ref_only))(trainable, frozen)
    assert all(float(jnp.abs(g).max()) == 0.0 for g in jax.tree.leaves(grads))
    # and the same loss through the policy does reach the adapters
    pol_grads = jax.jit(jax.grad(lambda t: preference.logprobs(
        fwd, jaxlora.combine(t, frozen), ids, completion, attention).sum()))(trainable)
    assert any(float(jnp.abs(g).max()) > 0 for g in jax.tree.leaves(pol_grads))


def test_reference_tree_of_pissa_is_the_original_base():
  with jax.enable_x64(False):
    model = nn.Dense(5)
    x = jax.random.normal(jax.random.key(0), (3, 8))
    variables = model.init(jax.random.key(1), x)
    tree = jaxlora.wrap(variables, rank=2, targets=".*", init="pissa", key=jax.random.key(2))
    assert not np.allclose(tree["params"]["kernel"], variables["params"]["kernel"])  # a residual
    ref = preference.reference_tree(tree)
    assert "lora_init_a" not in ref["params"]
    np.testing.assert_allclose(jaxlora.apply(model.apply)(ref, x), model.apply(variables, x),
                               rtol=1e-5, atol=1e-5)
