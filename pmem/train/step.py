"""The pure train and eval steps over ``nnx.split`` state."""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from pmem.memory.base import TokenContext


def lm_loss(logits: jax.Array, targets: jax.Array, mask: jax.Array, z_loss: float = 0.0):
  """Masked next-token cross-entropy (+ z-loss ``z_loss * logsumexp^2``); returns (loss, aux)."""
  logits = logits.astype(jnp.float32)
  lse = jax.nn.logsumexp(logits, axis=-1)
  ce = lse - jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
  n = jnp.maximum(mask.sum(), 1.0)
  ce_mean = (ce * mask).sum() / n
  z = (lse ** 2 * mask).sum() / n
  return ce_mean + z_loss * z, {"ce": ce_mean, "z": z, "tokens": mask.sum()}


def forward_loss(graphdef: nnx.GraphDef, params, rest, batch, z_loss: float):
  model = nnx.merge(graphdef, params, rest)
  ctx = TokenContext(batch["inputs"], batch["positions"], batch["segment_ids"])
  logits = model(batch["inputs"], ctx)
  return lm_loss(logits, batch["targets"], batch["loss_mask"], z_loss)


def make_train_step(graphdef: nnx.GraphDef, tx: optax.GradientTransformation,
                    lr: optax.Schedule, z_loss: float) -> Callable:
  """``step(state, batch) -> (state, metrics)``; state = {params, rest, opt, step}."""

  def step(state, batch):
    grad_fn = jax.value_and_grad(forward_loss, argnums=1, has_aux=True)
    (loss, aux), grads = grad_fn(graphdef, state["params"], state["rest"], batch, z_loss)
    updates, opt = tx.update(grads, state["opt"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    metrics = {"loss": loss, "ce": aux["ce"], "z": aux["z"], "grad_norm": optax.tree.norm(grads),
               "learning_rate": lr(state["step"]), "param_norm": optax.tree.norm(params)}
    return {"params": params, "rest": state["rest"], "opt": opt, "step": state["step"] + 1}, metrics

  return step


def make_score_step(graphdef: nnx.GraphDef) -> Callable:
  """``score(state, batch) -> {nll, correct}``: per-position cross-entropy (nats) of the target and
  whether it is the argmax; the evaluator reduces them over loss masks or answer spans."""

  def score(state, batch):
    model = nnx.merge(graphdef, state["params"], state["rest"])
    ctx = TokenContext(batch["inputs"], batch["positions"], batch["segment_ids"])
    logits = model(batch["inputs"], ctx).astype(jnp.float32)
    target = jnp.take_along_axis(logits, batch["targets"][..., None], axis=-1)[..., 0]
    return {"nll": jax.nn.logsumexp(logits, axis=-1) - target,
            "correct": jnp.argmax(logits, axis=-1) == batch["targets"]}

  return score
