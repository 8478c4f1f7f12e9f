"""The language-model loss: masked next-token cross-entropy plus the z-loss.

For token ``i`` with logits ``l_i = h_i W`` (``W [D, V]``), target ``y_i`` and mask ``m_i``:
``lse_i = log Σ_v exp l_iv``, ``ce_i = lse_i − l_iy``, and with ``n = max(Σ m, 1)``

  loss = Σ_i m_i (ce_i + ζ lse_i²) / n,   ∂loss/∂l_iv = m_i / n · (p_iv (1 + 2ζ lse_i) − [v = y_i])

(``p = softmax(l)``, ``ζ`` the z-loss weight). :func:`lm_loss` takes the logits; :func:`linear_lm_loss`
takes the hidden states and ``W`` and never holds more than ``[B, chunk, V]`` logits: per chunk of
positions it forms the logits, their loss and, because the loss is a scalar, already its gradients
``dh = g Wᵀ`` and ``dW += hᵀ g`` (the backward scales them by the loss's cotangent), so nothing is
recomputed and no ``[B, T, V]`` array is ever written.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int

from pmem.core.rules import constrain


def lm_loss(logits: Float[Array, "B T V"], targets: Int[Array, "B T"], mask: Float[Array, "B T"],
            z_loss: float = 0.0):
  """(loss, {ce, z, tokens}) from the logits."""
  logits = logits.astype(jnp.float32)
  lse = jax.nn.logsumexp(logits, axis=-1)
  ce = lse - jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
  n = jnp.maximum(mask.sum(), 1.0)
  ce_mean = (ce * mask).sum() / n
  z = (lse ** 2 * mask).sum() / n
  return ce_mean + z_loss * z, {"ce": ce_mean, "z": z, "tokens": mask.sum()}


def linear_lm_loss(h: Float[Array, "B T D"], w: Float[Array, "D V"], targets: Int[Array, "B T"],
                   mask: Float[Array, "B T"], z_loss: float = 0.0, chunk: int = 64):
  """:func:`lm_loss` of ``h @ w``, ``chunk`` positions at a time (the batch axis stays whole, so a
  batch-sharded ``h`` stays sharded); float32."""
  if chunk < 1:
    raise ValueError(f"chunk must be >= 1, got {chunk}")
  loss, ce, z = _fused(z_loss, min(chunk, h.shape[1]), h.astype(jnp.float32), w.astype(jnp.float32),
                       targets, mask.astype(jnp.float32))
  return loss, {"ce": jax.lax.stop_gradient(ce), "z": jax.lax.stop_gradient(z), "tokens": mask.sum()}


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _fused(z_loss, chunk, h, w, targets, mask):
  return _fused_fwd(z_loss, chunk, h, w, targets, mask)[0]


def _fused_fwd(zeta, c, h, w, targets, mask):
  b, t, d = h.shape
  pad = -t % c
  h, targets, mask = (jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2)) for x in (h, targets, mask))
  n = jnp.maximum(mask.sum(), 1.0)
  split = lambda x: x.reshape(b, -1, c, *x.shape[2:]).swapaxes(0, 1)  # noqa: E731  [T/c, B, c, ...]

  def body(dw, xs):
    hc, yc, mc = xs  # [B, c, D], [B, c], [B, c]
    l = constrain(jnp.einsum("bcd,dv->bcv", hc, w), ("batch", "length", "act_vocab"))
    mx = jax.lax.stop_gradient(l.max(-1, keepdims=True))
    e = jnp.exp(l - mx)
    s = e.sum(-1, keepdims=True)
    lse = (mx + jnp.log(s))[..., 0]
    ce = lse - jnp.take_along_axis(l, yc[..., None], axis=-1)[..., 0]
    hit = jnp.arange(l.shape[-1]) == yc[..., None]
    g = (e / s * (1 + 2 * zeta * lse)[..., None] - hit) * (mc / n)[..., None]  # ∂loss/∂l
    dw = dw + jnp.einsum("bcd,bcv->dv", hc, g)
    return dw, ((ce * mc).sum(), (lse ** 2 * mc).sum(), jnp.einsum("bcv,dv->bcd", g, w))

  dw, (ce, z, dh) = jax.lax.scan(body, jnp.zeros_like(w), (split(h), split(targets), split(mask)))
  ce, z = ce.sum() / n, z.sum() / n
  dh = dh.swapaxes(0, 1).reshape(b, t + pad, d)[:, :t]
  return (ce + zeta * z, ce, z), (dh, dw)


def _fused_bwd(zeta, c, res, cot):
  dh, dw = res
  g = cot[0]  # ce and z leave linear_lm_loss through stop_gradient: their cotangents are zero
  return dh * g, dw * g, None, None


_fused.defvjp(_fused_fwd, _fused_bwd)
