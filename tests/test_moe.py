"""ExpertDense, its LoRA handler and the MoE block against NumPy and transformers."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxlora
from conftest import f64, randomize_adapters
from jaxlora.experts import ExpertDense
from jaxlora.models.moe import MoE, load_balancing_loss

E, H, I, K = 4, 8, 6, 2


def _silu(z):
  return z / (1 + np.exp(-z))


def _grouped_ref(x, w, gs, a=None, b=None, s=0.0):
  """float64 per-expert ``x @ W_e (+ s * (x @ A_e) @ B_e)`` on rows sorted by expert."""
  x, w = f64(x), f64(w)
  out = np.zeros((x.shape[0], w.shape[-1]))
  start = 0
  for e, n in enumerate(np.asarray(gs)):
    rows = x[start:start + n]
    out[start:start + n] = rows @ w[e]
    if a is not None:
      out[start:start + n] += s * (rows @ f64(a)[e]) @ f64(b)[e]
    start += n
  return out


def _gs(n):
  return jnp.array([3, 0, n - 5, 2], jnp.int32)  # an empty group included


@pytest.fixture
def small_tiles(monkeypatch):
  """Tiles of 4 rows, so that tiny inputs take the tiled CPU grouped matmul."""
  monkeypatch.setattr(jaxlora.experts, "_CPU_TILE", 4)


@pytest.mark.parametrize("tile", [4, pytest.param(256, marks=pytest.mark.slow)])
def test_expert_dense_matches_numpy(tile, monkeypatch):
  monkeypatch.setattr(jaxlora.experts, "_CPU_TILE", tile)
  x = jax.random.normal(jax.random.key(0), (11, H))
  layer = ExpertDense(5, E)
  v = layer.init(jax.random.key(1), x, _gs(11))
  y = jax.jit(layer.apply)(v, x, _gs(11))
  np.testing.assert_allclose(y, _grouped_ref(x, v["params"]["kernel"], _gs(11)),
                             rtol=1e-5, atol=1e-6)


def test_lora_on_expert_dense_forward_gradients_and_merge(small_tiles):
  x = jax.random.normal(jax.random.key(0), (11, H))
  layer = ExpertDense(5, E)
  v = layer.init(jax.random.key(1), x, _gs(11))
  lay = jaxlora.trace_layout(layer.apply, v, x, _gs(11))
  assert lay[""].roles == ("batch", "in", "out") and lay[""].kind == "ExpertDense"
  w = randomize_adapters(jaxlora.wrap(v, rank=2, targets=".*", layout=lay,
                                      key=jax.random.key(2)), jax.random.key(3))
  p = w["params"]
  assert p["lora_a"].shape == (E, H, 2) and p["lora_b"].shape == (E, 2, 5)
  fwd = jaxlora.apply(layer.apply)
  ref = _grouped_ref(x, p["kernel"], _gs(11), p["lora_a"], p["lora_b"], float(p["lora_scale"]))
  trainable, frozen = jaxlora.split(w)

  def loss(t, merged):
    tree = jaxlora.combine(t, frozen)
    y = layer.apply(jaxlora.merge(tree), x, _gs(11)) if merged else fwd(tree, x, _gs(11))
    return jnp.sum(jnp.sin(y)), y

  @jax.jit
  def both(t):
    return (jax.value_and_grad(loss, has_aux=True)(t, False),
            jax.value_and_grad(loss, has_aux=True)(t, True))

  ((_, y), g), ((_, y_merged), g_merged) = both(trainable)
  np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(y_merged, ref, rtol=1e-5, atol=1e-5)
  assert sorted(g["params"]) == ["lora_a", "lora_b"]  # gradients for the adapter only
  for k in ("lora_a", "lora_b"):
    assert float(jnp.abs(g["params"][k]).max()) > 0
    np.testing.assert_allclose(g["params"][k], g_merged["params"][k], rtol=1e-4, atol=1e-5)
  back = jaxlora.unmerge(jaxlora.merge(w), jaxlora.adapter(w))
  np.testing.assert_allclose(back["params"]["kernel"], p["kernel"], atol=1e-6)


def _moe_ref(x, p, top_k, norm, shared):
  """float64 NumPy top-k MoE: per token, sum_k w_k * SwiGLU_{e_k}(x) (+ gated shared expert)."""
  x = f64(x).reshape(-1, H)
  logits = x @ f64(p["gate"]["kernel"])
  probs = np.exp(logits - logits.max(-1, keepdims=True))
  probs /= probs.sum(-1, keepdims=True)
  out = np.zeros_like(x)
  gu, dn = f64(p["experts"]["gate_up_proj"]["kernel"]), f64(p["experts"]["down_proj"]["kernel"])
  for n in range(x.shape[0]):
    top = np.argsort(-probs[n], kind="stable")[:top_k]
    wts = probs[n, top] / (probs[n, top].sum() if norm else 1.0)
    for e, wt in zip(top, wts):
      hu = x[n] @ gu[e]
      out[n] += wt * ((_silu(hu[:I]) * hu[I:]) @ dn[e])
  if shared:
    sp = {k: f64(v["kernel"]) for k, v in p["shared_expert"].items()}
    y = (_silu(x @ sp["gate_proj"]) * (x @ sp["up_proj"])) @ sp["down_proj"]
    out += y / (1 + np.exp(-(x @ f64(p["shared_expert_gate"]["kernel"]))))
  return out


# The fast tier compares the ragged path with transformers' Mixtral block instead.
@pytest.mark.slow
@pytest.mark.parametrize("style", ["mixtral", "qwen"])
def test_moe_ragged_equals_dense_and_numpy(style):
  norm, shared = (True, None) if style == "mixtral" else (False, 5)
  h = jax.random.normal(jax.random.key(0), (2, 5, H))
  mk = lambda impl: MoE(H, I, E, K, norm_topk_prob=norm, shared_intermediate_size=shared,
                        implementation=impl)
  params = nn.unbox(mk("ragged").init(jax.random.key(1), h))["params"]
  params = jax.tree.map(lambda w: w * 10, params)  # a router far from uniform

  @jax.jit
  def run(p):
    (yr, state) = mk("ragged").apply({"params": p}, h, mutable="intermediates")
    return yr, mk("dense").apply({"params": p}, h), state["intermediates"]["router_logits"]

  yr, yd, logits = run(params)
  assert logits[0].shape == (10, E)
  np.testing.assert_allclose(yr, yd, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(yr.reshape(-1, H), _moe_ref(h, params, K, norm, shared),
                             rtol=1e-5, atol=1e-5)


def _torch_block(style):
  torch = pytest.importorskip("torch")
  if style == "mixtral":
    from transformers.models.mixtral.configuration_mixtral import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock
    cfg = MixtralConfig(hidden_size=H, intermediate_size=I, num_local_experts=E,
                        num_experts_per_tok=K)
    block = MixtralSparseMoeBlock(cfg)
  else:
    from transformers.models.qwen2_moe.configuration_qwen2_moe import Qwen2MoeConfig
    from transformers.models.qwen2_moe.modeling_qwen2_moe import Qwen2MoeSparseMoeBlock
    cfg = Qwen2MoeConfig(hidden_size=H, moe_intermediate_size=I, num_experts=E,
                         num_experts_per_tok=K, norm_topk_prob=False,
                         shared_expert_intermediate_size=5)
    block = Qwen2MoeSparseMoeBlock(cfg)
  torch.manual_seed(0)
  with torch.no_grad():
    for prm in block.parameters():
      prm.copy_(torch.randn_like(prm) * 0.5)
  return torch, block.eval()


@pytest.mark.parametrize("style", ["mixtral", pytest.param("qwen", marks=pytest.mark.slow)])
def test_moe_matches_transformers_block(style):
  torch, block = _torch_block(style)
  sd = {k: v.detach().numpy() for k, v in block.state_dict().items()}
  params = {"gate": {"kernel": sd["gate.weight"].T},
            "experts": {"gate_up_proj": {"kernel": sd["experts.gate_up_proj"].transpose(0, 2, 1)},
                        "down_proj": {"kernel": sd["experts.down_proj"].transpose(0, 2, 1)}}}
  shared = None
  if style == "qwen":
    shared = 5
    params["shared_expert"] = {n: {"kernel": sd[f"shared_expert.{n}.weight"].T}
                               for n in ("gate_proj", "up_proj", "down_proj")}
    params["shared_expert_gate"] = {"kernel": sd["shared_expert_gate.weight"].T}
  h = np.asarray(jax.random.normal(jax.random.key(0), (2, 5, H)))
  with torch.no_grad():
    want = block(torch.from_numpy(h.copy())).numpy()
  moe = MoE(H, I, E, K, norm_topk_prob=style == "mixtral", shared_intermediate_size=shared)
  got = jax.jit(moe.apply)({"params": params}, h)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_load_balancing_loss_matches_transformers():
  torch = pytest.importorskip("torch")
  from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func
  logits = [np.asarray(jax.random.normal(jax.random.key(i), (6, E))) for i in range(3)]
  mask = np.array([[1, 1, 1], [0, 1, 1]], np.int64)
  for m in (None, mask):
    want = load_balancing_loss_func(tuple(torch.from_numpy(g.copy()) for g in logits), E, K,
                                    None if m is None else torch.from_numpy(m))
    got = load_balancing_loss(logits, E, K, None if m is None else jnp.asarray(m))
    np.testing.assert_allclose(float(got), float(want), rtol=1e-6)
  np.testing.assert_allclose(load_balancing_loss(np.stack(logits), E, K),
                             load_balancing_loss(logits, E, K), rtol=1e-6)


class _ScanMoE(nn.Module):
  @nn.compact
  def __call__(self, h):
    def body(mod, carry, _):
      return carry + mod(carry), None
    scan = nn.scan(body, variable_axes={"params": 0, "intermediates": 0},
                   split_rngs={"params": True}, length=2,
                   metadata_params={nn.PARTITION_NAME: "layers"})
    return scan(MoE(H, I, E, K, norm_topk_prob=True, name="moe"), h, None)[0]


# The fast tier trains expert LoRA inside the decoder's scan in test_families.
@pytest.mark.slow
def test_lora_on_moe_inside_scan_trains_and_refuses_dora():
  h = jax.random.normal(jax.random.key(0), (2, 3, H))
  model = _ScanMoE()
  v = nn.unbox(jax.jit(model.init)(jax.random.key(1), h))
  lay = jaxlora.trace_layout(model.apply, v, h)
  assert lay["moe/experts/gate_up_proj"].roles == ("stack", "batch", "in", "out")
  w = randomize_adapters(jax.jit(lambda v: jaxlora.wrap(v, rank=2, targets="experts", layout=lay,
                                                        key=jax.random.key(2)))(v),
                         jax.random.key(3))
  gu = w["params"]["moe"]["experts"]["gate_up_proj"]
  assert gu["lora_a"].shape == (2, E, H, 2) and gu["lora_b"].shape == (2, E, 2, 2 * I)
  trainable, frozen = jaxlora.split(w)

  @jax.jit
  def step(t):
    loss = lambda t: jnp.sum(jaxlora.apply(model.apply)(jaxlora.combine(t, frozen), h) ** 2)
    return jax.value_and_grad(loss)(t)

  _, g = step(trainable)
  assert all(bool(jnp.all(jnp.isfinite(x))) and float(jnp.abs(x).max()) > 0
             for x in jax.tree.leaves(g))
  with pytest.raises(jaxlora.errors.InputError, match="moe/experts/(gate_up|down)_proj"):
    jaxlora.wrap(v, rank=2, targets="experts", layout=lay, use_dora=True)
  with pytest.raises(jaxlora.errors.InputError, match="moe/experts/down_proj"):
    jaxlora.quantize(v, "int8", targets="down_proj", layout=lay)
