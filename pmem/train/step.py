"""The pure train and eval steps over ``nnx.split`` state."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from pmem.data.pipeline import FIELDS
from pmem.layers.embed import trusted_ids
from pmem.memory import diagnostics, lookup
from pmem.core import auxiliary
from pmem.core.mixer import TokenContext
from pmem.train import optim, sparse
from pmem.train.loss import linear_lm_loss, lm_loss


def context(batch, rng: jax.Array | None = None) -> TokenContext:
  """The token context of a device batch: every field beyond the pipeline's (and the host tables'
  staged rows) is a host-computed feature (pmem.core.mixer.batch_features); ``rng``: a training
  step's noise key (TokenContext.rng)."""
  features = {k: v for k, v in batch.items() if k not in FIELDS and k != "tables"}
  return TokenContext(batch["inputs"], batch["positions"], batch["segment_ids"], features, rng)


def forward_loss(graphdef: nnx.GraphDef, params, rest, batch, z_loss: float, rng: jax.Array | None = None,
                 loss_chunk: int = 0):
  """(loss, aux) of a batch: the LM loss plus every auxiliary loss the modules added (pmem.core.auxiliary),
  ``aux`` = {ce, z, tokens, aux: {name: value}}; ``loss_chunk`` > 0: the output head and cross-entropy
  fused, that many positions at a time (pmem.train.loss.linear_lm_loss), else from the whole logits."""
  model = nnx.merge(graphdef, params, rest)
  ctx = context(batch, rng)
  with trusted_ids(), auxiliary.collect() as extra:  # Trainer.to_device checked the ids on the host
    if not loss_chunk:
      loss, out = lm_loss(model(batch["inputs"], ctx), batch["targets"], batch["loss_mask"], z_loss)
    else:
      h, _ = model.hidden(batch["inputs"], ctx)
      loss, out = linear_lm_loss(h, model.unembed(), batch["targets"], batch["loss_mask"], z_loss, loss_chunk)
  if extra:
    loss = loss + sum(extra.values())
  return loss, {**out, "aux": dict(extra)}


def make_train_step(graphdef: nnx.GraphDef, tx: optim.Optimizer, lr: optax.Schedule, z_loss: float,
                    trainable: Sequence[str] = ("*",), seed: int = 0, loss_chunk: int = 0) -> Callable:
  """``step(train_state, batch) -> (train_state, metrics)``; train_state = {params, rest, opt, step}. Only the
  parameters ``trainable`` (glob patterns over their paths, :func:`optim.trainable`) are
  differentiated and updated; ``train_state["opt"]`` covers only them and ``grad_norm`` / ``param_norm``
  are theirs. The model's noise key (adapter dropout) is ``fold_in(key(seed), step)``: a function of
  the step alone, so a resumed run draws the same masks. ``loss_chunk``: :func:`forward_loss`. The metrics
  hold each auxiliary loss a module added (pmem.core.auxiliary) under its name, besides ``ce`` and ``z``.

  Row-sparse tables (``tx.row_sparse``) are differentiated through their reads and updated in
  place on the rows the batch touched (:mod:`pmem.train.sparse`); for them ``grad_norm`` counts
  the summed row gradients and ``param_norm`` only the rows written this step, so the step's
  cost does not grow with the table. With host-resident tables (``tx.host``) the batch carries
  their staged rows under ``"tables"`` and the step returns a third output, ``{name: Rows}`` of
  their compact gradients with the learning rate and clip norm to apply on the host
  (:mod:`pmem.train.host_tables`)."""

  def step(train_state, batch):
    params, frozen = optim.trainable(train_state["params"], trainable)
    rng = jax.random.fold_in(jax.random.key(seed), train_state["step"])
    f = lambda p: forward_loss(graphdef, nnx.merge_state(p, frozen), train_state["rest"], batch, z_loss, rng,
                               loss_chunk)
    (loss, aux), grads = sparse.value_and_grad(f, params, tx.row_sparse, staged(tx, batch))
    grads, host = tx.pop_host(grads)
    updates, opt = tx.update(grads, train_state["opt"], params, host_norm_sq=sparse.norm_sq(host))
    params = tx.apply_updates(params, updates)
    metrics = {"loss": loss, "ce": aux["ce"], "z": aux["z"], "grad_norm": tx.grad_norm(grads, host),
               "learning_rate": lr(train_state["step"]), "param_norm": tx.param_norm(params, updates)}
    if clash := set(aux["aux"]) & set(metrics):
      raise ValueError(f"auxiliary losses named {sorted(clash)} shadow the step's metrics; rename them")
    metrics.update(aux["aux"])  # each auxiliary loss, summed over its layers (loss = ce + z_loss * z + their sum)
    new = {"params": nnx.merge_state(params, frozen), "rest": train_state["rest"], "opt": opt,
           "step": train_state["step"] + 1}
    if not tx.host:
      return new, metrics
    return new, metrics, {"grads": host, "lr": tx.table_lr(train_state["opt"]["count"]),
                          "norm": tx.table_norm(grads, host)}

  return step


def staged(tx: optim.Optimizer, batch) -> sparse.Staged:
  """Host tables' rows shipped with the batch (``batch["tables"]``, pmem.train.host_tables)."""
  return {name: (t["rows"], t["slots"], tx.host[name]) for name, t in batch.get("tables", {}).items()}


def make_score_step(graphdef: nnx.GraphDef, tx: optim.Optimizer | None = None, collect: bool = False) -> Callable:
  """``score(train_state, batch) -> {nll, correct}``: per-position cross-entropy (nats) of the target and
  whether it is the argmax; the evaluator reduces them over loss masks or answer spans. Host
  tables (``tx.host``) are read from the rows staged in ``batch["tables"]``. With ``collect`` the
  output also holds what modules reported to :mod:`pmem.memory.diagnostics`: ``usage`` ({name:
  [(ids, num_rows), ...]}) and ``stats`` ({name: [values, ...]}), one entry per reporting layer."""

  def score(train_state, batch):
    params = train_state["params"]
    if tx is not None and tx.host:
      params = sparse.tapped(params, lambda name, v: name in tx.host, staged(tx, batch))
    model = nnx.merge(graphdef, params, train_state["rest"])
    with trusted_ids(), lookup.reads(record=True), \
        diagnostics.collect() if collect else contextlib.nullcontext() as got:
      logits = model(batch["inputs"], context(batch)).astype(jnp.float32)
    target = jnp.take_along_axis(logits, batch["targets"][..., None], axis=-1)[..., 0]
    out = {"nll": jax.nn.logsumexp(logits, axis=-1) - target,
           "correct": jnp.argmax(logits, axis=-1) == batch["targets"]}
    if collect:
      out["usage"] = {k: [(ids, jnp.asarray(n)) for ids, n in v] for k, v in got.usage.items()}
      out["stats"] = got.stats
    return out

  return score
