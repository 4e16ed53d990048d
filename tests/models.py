"""Small linen models covering every layer kind jaxlora adapts."""

import flax.linen as nn
import jax.numpy as jnp


class MLP(nn.Module):
  """Plain 2-D Dense kernels, plus a head."""
  hidden: int = 16
  out: int = 5
  dtype: object = None
  param_dtype: object = jnp.float32

  @nn.compact
  def __call__(self, x):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    h = nn.gelu(nn.Dense(self.hidden, name="fc1", **kw)(x))
    h = nn.gelu(nn.Dense(self.hidden, name="fc2", **kw)(h))
    return nn.Dense(self.out, name="head", **kw)(h)


class Attention(nn.Module):
  """DenseGeneral with multi-axis kernels (d -> heads x head_dim and back)."""
  heads: int = 2
  head_dim: int = 3

  @nn.compact
  def __call__(self, x):
    q = nn.DenseGeneral((self.heads, self.head_dim), name="q")(x)
    k = nn.DenseGeneral((self.heads, self.head_dim), name="k")(x)
    v = nn.DenseGeneral((self.heads, self.head_dim), name="v")(x)
    w = jnp.einsum("bqhd,bkhd->bhqk", q, k) / jnp.sqrt(self.head_dim)
    o = jnp.einsum("bhqk,bkhd->bqhd", nn.softmax(w), v)
    return nn.DenseGeneral(x.shape[-1], axis=(-2, -1), name="o")(o)


class EinsumNet(nn.Module):
  """nn.Einsum layers: plain, per-head (batch letter) and interleaved kernel axes."""

  @nn.compact
  def __call__(self, x):  # x: (b, t, 6)
    h = nn.Einsum((6, 2, 4), "btd,dnh->btnh", name="proj")(x)
    h = nn.Einsum((2, 4, 5), "btnh,nhe->btne", name="per_head")(h)   # n is a batch letter
    h = nn.Einsum((2, 5, 6), "btne,nef->btf", name="merge_heads")(h)
    return nn.Einsum((3, 6, 4), "btf,nfh->btnh", name="interleaved")(h)  # out, in, out


class Block(nn.Module):
  d: int = 8

  @nn.compact
  def __call__(self, x, _):
    h = nn.LayerNorm(name="ln")(x)
    h = Attention(heads=2, head_dim=4, name="attn")(h)
    x = x + h
    h = nn.Dense(2 * self.d, name="up")(nn.LayerNorm(name="ln2")(x))
    return x + nn.Dense(self.d, name="down")(nn.gelu(h)), None


class Stack(nn.Module):
  """Layers stacked with nn.scan over nn.remat, between an embedding and a head."""
  layers: int = 3
  d: int = 8
  vocab: int = 11

  @nn.compact
  def __call__(self, tokens):
    x = nn.Embed(self.vocab, self.d, name="embed")(tokens)
    body = nn.scan(nn.remat(Block), variable_axes={"params": 0},
                   split_rngs={"params": True, "dropout": True},
                   length=self.layers)
    x, _ = body(d=self.d, name="layers")(x, None)
    return nn.Dense(self.vocab, name="lm_head")(nn.LayerNorm(name="ln_f")(x))


class _TanhLayer(nn.Module):
  d: int = 6

  @nn.compact
  def __call__(self, x, _):
    return jnp.tanh(nn.Dense(self.d, name="dense")(x)), None


class ScanDense(nn.Module):
  """tanh(Dense) layers under nn.scan and nn.remat: simple enough for a NumPy reference."""
  layers: int = 3
  d: int = 6

  @nn.compact
  def __call__(self, x):
    body = nn.scan(nn.remat(_TanhLayer), variable_axes={"params": 0},
                   split_rngs={"params": True, "dropout": True}, length=self.layers)
    x, _ = body(d=self.d, name="layers")(x, None)
    return x
