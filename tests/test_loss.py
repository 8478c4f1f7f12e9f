"""pmem.train.loss: the fused head + cross-entropy against a float64 NumPy transcription (loss, ce, z
and the gradients of h and W, with masked positions, a last partial chunk and the z-loss), against the
loss of the whole logits, and the model's gradients with and without it (untied and tied heads)."""

import dataclasses

import fiddle as fdl
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs.base import experiment
from pmem.models.decoder import Decoder
from pmem.train.loss import linear_lm_loss, lm_loss
from pmem.train.step import forward_loss
from tests.tolerances import assert_close

B, T, D, V = 3, 11, 8, 50


def reference(h, w, y, m, zeta):
  """float64 (loss, ce, z, dh, dW) of the module docstring's equations."""
  h, w = np.asarray(h, np.float64), np.asarray(w, np.float64)
  l = h @ w  # [B, T, V]
  lse = np.log(np.exp(l - l.max(-1, keepdims=True)).sum(-1)) + l.max(-1)
  ce = lse - np.take_along_axis(l, y[..., None], -1)[..., 0]
  n = max(m.sum(), 1.0)
  p = np.exp(l - lse[..., None])
  g = (p * (1 + 2 * zeta * lse)[..., None] - (np.arange(V) == y[..., None])) * (m / n)[..., None]
  return ((ce + zeta * lse ** 2) * m).sum() / n, (ce * m).sum() / n, (lse ** 2 * m).sum() / n, g @ w.T, \
      np.einsum("btd,btv->dv", h, g)


def inputs(seed: int):
  rng = np.random.default_rng(seed)
  h = rng.standard_normal((B, T, D), np.float32)
  w = rng.standard_normal((D, V), np.float32)
  y = rng.integers(0, V, (B, T)).astype(np.int32)
  m = (rng.random((B, T)) < 0.7).astype(np.float32)
  return h, w, y, m


@pytest.mark.parametrize("chunk", [1, 4, T, 64])
@pytest.mark.parametrize("zeta", [0.0, 0.3])
def test_against_float64(chunk, zeta):
  h, w, y, m = inputs(chunk)
  def f(h, w):  # a cotangent of 2.5: the backward scales the gradients the forward saved
    loss, aux = linear_lm_loss(h, w, y, m, zeta, chunk)
    return 2.5 * loss, (loss, aux)
  (_, (loss, aux)), (dh, dw) = jax.value_and_grad(f, (0, 1), has_aux=True)(h, w)
  want = list(reference(h, w, y, m, zeta))
  want[3:] = [2.5 * x for x in want[3:]]
  # logits: D products; lse: V terms (+ exp, log); the means: B·T terms; dh: V terms; dW: B·T terms
  lse_terms = D + V + 4
  for name, x, r, terms in zip(("loss", "ce", "z", "dh", "dw"), (loss, aux["ce"], aux["z"], dh, dw), want,
                               (lse_terms + B * T, lse_terms + B * T, 2 * lse_terms + B * T, lse_terms + V,
                                lse_terms + B * T)):
    # scale: what is summed — |l| for the loss terms, |g||W| per dh term, |h||g| per dW term
    scale = {"dh": np.abs(w).max() * 2, "dw": np.abs(h).max() * 2}.get(name, float(np.abs(h @ w).max()) * (1 + zeta))
    assert_close(x, r, terms=terms, scale=scale, k=0.5, err_msg=name)
  assert float(aux["tokens"]) == m.sum()


def test_equals_the_loss_of_the_whole_logits():
  h, w, y, m = inputs(7)
  f = lambda h, w: linear_lm_loss(h, w, y, m, 0.1, 4)[0]  # noqa: E731
  g = lambda h, w: lm_loss(jnp.einsum("btd,dv->btv", h, w), y, m, 0.1)[0]  # noqa: E731
  for a, b in zip(jax.value_and_grad(f, (0, 1))(h, w), jax.value_and_grad(g, (0, 1))(h, w)):
    for x, r in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
      assert_close(x, r, terms=2 * (D + V + B * T), scale=float(np.abs(r).max()) + 1)


def test_chunk_must_be_positive():
  h, w, y, m = inputs(0)
  with pytest.raises(ValueError, match="chunk must be >= 1"):
    linear_lm_loss(h, w, y, m, 0.0, 0)


@pytest.mark.parametrize("tie", [False, True])
def test_model_gradients_fused_equal_unfused(tie):
  """The tiny model's loss and every parameter's gradient with ``loss_chunk`` 5 (T = 16: a partial last
  chunk) and 0 (the whole logits), within float32 rounding of each other; with a tied head the
  embedding's gradient sums its head and lookup parts."""
  exp = fdl.build(experiment(vocab=64, d_model=32, n_layers=2, n_heads=2, n_kv_heads=1, d_ff=64, seq_len=16,
                             batch_size=2, steps=3))
  model = Decoder(dataclasses.replace(exp.model, tie_embeddings=tie), rngs=nnx.Rngs(0))
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  rng = np.random.default_rng(0)
  ids = rng.integers(0, 64, (2, 17)).astype(np.int32)
  batch = {"inputs": ids[:, :-1], "targets": ids[:, 1:], "segment_ids": np.ones((2, 16), np.int32),
           "positions": np.broadcast_to(np.arange(16, dtype=np.int32), (2, 16)).copy(),
           "loss_mask": (rng.random((2, 16)) < 0.8).astype(np.float32)}
  out = {c: jax.value_and_grad(lambda p: forward_loss(graphdef, p, rest, batch, 1e-2, None, c), has_aux=True)(params)
         for c in (0, 5)}
  terms = 4 * (32 + 64 + 32)  # a gradient passes the head (V terms), the loss mean (B·T) and the layers' D-sums
  (l5, aux5), g5 = out[5]
  (l0, aux0), g0 = out[0]
  for x, r in ((l5, l0), (aux5["ce"], aux0["ce"]), (aux5["z"], aux0["z"])):
    assert_close(x, r, terms=terms)
  leaves5, leaves0 = jax.tree.leaves(g5), jax.tree.leaves(g0)
  assert len(leaves5) == len(leaves0)
  for x, r in zip(leaves5, leaves0):
    assert_close(x, r, terms=terms, scale=float(np.abs(r).max()))
