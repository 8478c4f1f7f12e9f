"""LoRA / DoRA adapters (pmem.layers.adapters) against float64 NumPy transcriptions of their equations;
step 0 equals the base model; merged weights give the adapted output; fine-tuning moves only adapters."""

import dataclasses

import fiddle as fdl
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs import cli
from pmem.core.mixer import TokenContext
from pmem.layers import adapters
from pmem.layers.adapters import Adapter, AdapterConfig
from pmem.models import Decoder
from pmem.train.loop import Trainer
from tests.tolerances import assert_close

D_IN, D_OUT, R, N = 48, 40, 4, 6


def _adapter(kind: str, seed: int = 0):
  """An adapter with nonzero B and a magnitude away from ‖W‖ (as after training), its W and inputs."""
  k = jax.random.split(jax.random.key(seed), 4)
  w = jax.random.normal(k[0], (D_IN, D_OUT)) / np.sqrt(D_IN)
  ad = Adapter(AdapterConfig(kind=kind, rank=R, alpha=8.0), w, ("embed", "mlp"), rngs=nnx.Rngs(seed))
  ad.b[...] = 0.1 * jax.random.normal(k[1], (R, D_OUT))
  if kind == "dora":
    ad.m[...] = ad.m[...] * (1 + 0.05 * jax.random.normal(k[2], (D_OUT,)))
  return ad, w, jax.random.normal(k[3], (N, D_IN))


def _reference(ad, w, x) -> np.ndarray:
  """LoRA Eq. 3 / DoRA Eq. 5 in float64: y = x W + s x A B, times m / ‖W + s A B‖_c for DoRA."""
  f = lambda v: np.asarray(v, np.float64)
  s, a, b = ad.cfg.scale, f(ad.a[...]), f(ad.b[...])
  v = f(w) + s * a @ b
  y = f(x) @ v
  return y if ad.cfg.kind == "lora" else y * f(ad.m[...]) / np.linalg.norm(v, axis=0)


@pytest.mark.parametrize("kind", ["lora", "dora"])
def test_adapter_matches_its_equation(kind):
  ad, w, x = _adapter(kind)
  y = ad(x, w, x @ w)
  assert_close(y, _reference(ad, w, x), terms=D_IN + 2 * R + 8, k=0.5)  # dot products of d_in (+ r) terms
  assert_close(x @ ad.merge(w), _reference(ad, w, x), terms=D_IN + 2 * R + 8, k=0.5)  # the exported weight


@pytest.mark.parametrize("kind", ["lora", "dora"])
def test_dora_magnitude_gets_a_gradient_and_b_starts_the_base(kind):
  ad, w, x = _adapter(kind)
  ad.b[...] = jnp.zeros_like(ad.b[...])
  if kind == "dora":
    ad.m[...] = jnp.linalg.norm(w, axis=0)  # g = 1: the base projection again
  graph, p = nnx.split(ad)
  f = lambda p: jnp.sum(nnx.merge(graph, p)(x, w, x @ w) ** 2)
  g = jax.grad(f)(p)
  assert float(jnp.abs(g["b"][...]).max()) > 0  # B = 0 trains: its gradient is x A's
  assert float(jnp.abs(g["a"][...]).max()) == 0  # and A's is B's, zero at step 0 (LoRA §4.1)
  y = nnx.merge(graph, p)(x, w, x @ w)
  if kind == "lora":
    np.testing.assert_array_equal(y, x @ w)  # base + s · 0, exactly
  else:
    assert float(jnp.abs(g["m"][...]).max()) > 0
    assert_close(y, np.asarray(x, np.float64) @ np.asarray(w, np.float64), terms=D_IN + 8, k=0.5)


@pytest.mark.parametrize("kind", ["lora", "dora"])
def test_dropout_matches_its_equation_and_is_off_without_a_key(kind):
  ad, w, x = _adapter(kind)
  ad.cfg = dataclasses.replace(ad.cfg, dropout=0.25)
  np.testing.assert_array_equal(ad(x, w, x @ w, None), ad(x, w, x @ w))  # no key (evaluation): no noise
  key = jax.random.key(7)
  keep = np.asarray(jax.random.bernoulli(key, 0.75, x.shape))  # the mask the layer draws from its key
  assert 0 < keep.mean() < 1
  f = lambda v: np.asarray(v, np.float64)
  s, a, b, xd = ad.cfg.scale, f(ad.a[...]), f(ad.b[...]), np.where(keep, f(x) / 0.75, 0.0)
  ref = f(x) @ f(w) + s * xd @ a @ b  # LoRA §4.2: dropout on the adapter's input only
  if kind == "dora":  # PEFT's DoRA: the magnitude scales the dropped input's base output
    g = f(ad.m[...]) / np.linalg.norm(f(w) + s * a @ b, axis=0)
    ref = f(x) @ f(w) + (g - 1) * (xd @ f(w)) + g * s * (xd @ a @ b)
  assert_close(ad(x, w, x @ w, key), ref, terms=D_IN + 2 * R + 8, k=0.5)


def _tiny(kind: str, targets=("wq", "wv", "w_up", "w_down")):
  cfg = fdl.build(cli.build_config(["config:tiny"]).model)
  return cfg, dataclasses.replace(cfg, adapter=AdapterConfig(kind=kind, rank=4, targets=targets))


@pytest.mark.parametrize("kind", ["lora", "dora"])
def test_an_adapted_model_starts_as_its_base_and_reset_restores_it(kind):
  base_cfg, cfg = _tiny(kind)
  base, model = Decoder(base_cfg, rngs=nnx.Rngs(0)), Decoder(cfg, rngs=nnx.Rngs(0))
  nnx.update(model, nnx.state(base, nnx.Param))  # the base weights, e.g. loaded from a checkpoint
  ids = (jnp.arange(24).reshape(2, 12) * 37) % base_cfg.vocab
  ctx = TokenContext(ids, jnp.broadcast_to(jnp.arange(12), ids.shape), jnp.ones(ids.shape, jnp.int32), {})
  adapters.reset_magnitudes(model)
  y0, y = base(ids, ctx), model(ids, ctx)
  # LoRA adds s · (x A) 0 = +0 exactly (bitwise in the layer test above), but the two models are different
  # programs, whose fusions contract multiply-adds (RoPE's) into FMAs differently: the same values within the
  # rounding each layer's d_model-term sums carry on; DoRA's g = m / ‖W‖_c is 1 within that rounding, per layer
  assert_close(y, y0, terms=(4 if kind == "dora" else 1) * (base_cfg.d_model + 8) * base_cfg.n_layers)
  found = {"/".join(map(str, p)) for p, _ in nnx.to_flat_state(nnx.state(model, nnx.Param)) if "adapters" in p}
  assert {p.split("/adapters/")[1] for p in found} >= {"w_up/a", "w_down/b"} | ({"w_up/m"} if kind == "dora" else set())
  assert model.cost(12).params - base.cost(12).params == sum(
      np.prod(v.shape) for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param)) if "adapters" in p)


def test_a_target_that_names_nothing_fails_clearly():
  _, cfg = _tiny("lora", targets=("w_up", "w_nope"))
  with pytest.raises(ValueError, match="'w_nope' names no projection"):
    Decoder(cfg, rngs=nnx.Rngs(0))


@pytest.mark.parametrize("kind", ["lora", pytest.param("dora", marks=pytest.mark.slow)])  # dora trains in test-slow (~45 s)
def test_fiddler_trains_only_the_adapters(kind):
  exp = fdl.build(cli.build_config(["config:tiny", f"fiddler:{kind}(rank=4, targets=('w_up', 'w_down'))",
                                    "set:train.steps=3", "set:train.progress=False", "set:eval.valid_batches=0"]))
  t = Trainer(exp)
  flat = lambda: {"/".join(map(str, p)): np.asarray(v.get_value())
                  for p, v in nnx.to_flat_state(t.train_state["params"])}
  before = flat()
  t.run()
  after = flat()
  moved = {n for n in before if not np.array_equal(before[n], after[n])}
  assert moved and all("/adapters/" in n for n in moved)
  assert t.summary_header()["params_trainable"] == sum(v.size for n, v in before.items() if "/adapters/" in n)


def _ctx(ids):
  return TokenContext(ids, jnp.broadcast_to(jnp.arange(ids.shape[1]), ids.shape), jnp.ones(ids.shape, jnp.int32), {})


@pytest.mark.parametrize("kind", ["lora", "dora"])
def test_export_merges_the_adapters_into_the_weights(kind, tmp_path):
  from pmem.models import hf
  base_cfg, cfg = _tiny(kind)
  model = Decoder(cfg, rngs=nnx.Rngs(0))
  for i, (_, v) in enumerate(p for p in nnx.to_flat_state(nnx.state(model, nnx.Param)) if "adapters" in p[0]):
    v[...] = v[...] + 0.05 * jax.random.normal(jax.random.key(i), v.shape)  # as after training: B != 0, g != 1
  base = nnx.eval_shape(lambda: Decoder(base_cfg, rngs=nnx.Rngs(0)))
  hf.save(str(tmp_path), hf.hf_config(base), hf.export(model))
  merged = nnx.merge(nnx.graphdef(base), hf.load_params(str(tmp_path), base))
  ids = (jnp.arange(24).reshape(2, 12) * 37) % base_cfg.vocab
  y, y_merged = model(ids, _ctx(ids)), merged(ids, _ctx(ids))
  assert_close(y_merged, y, terms=4 * (base_cfg.d_model + 16) * base_cfg.n_layers)
  assert len(model.stages[0].blocks.ch.adapters) == 2  # the model itself keeps its adapters


@pytest.mark.parametrize("kind", ["lora", "dora"])
def test_dropout_keys_follow_the_layer_scanned_or_unrolled(kind):
  from pmem.models.decoder import unstack
  _, cfg = _tiny(kind)
  model = Decoder(dataclasses.replace(cfg, adapter=dataclasses.replace(cfg.adapter, dropout=0.5)), rngs=nnx.Rngs(0))
  for i, (_, v) in enumerate(p for p in nnx.to_flat_state(nnx.state(model, nnx.Param)) if "adapters" in p[0]):
    v[...] = v[...] + 0.05 * jax.random.normal(jax.random.key(i), v.shape)  # B != 0: dropout shows
  ids = (jnp.arange(24).reshape(2, 12) * 37) % cfg.vocab
  train = lambda m, k: m(ids, dataclasses.replace(_ctx(ids), rng=jax.random.key(k)))  # noqa: E731
  y0, y1 = train(model, 0), train(model, 1)
  assert float(jnp.abs(y0 - y1).max()) > 1e-3  # a new step's key draws new masks
  np.testing.assert_array_equal(y0, train(model, 0))  # the same key the same masks
  assert float(jnp.abs(y0 - model(ids, _ctx(ids))).max()) > 1e-3  # evaluation has none
  flat = unstack(model)[0]  # the same layers as separate blocks: each folds in its own layer index
  assert_close(train(flat, 0), y0, terms=4 * (cfg.d_model + 16) * cfg.n_layers)
  assert float(jnp.abs(train(flat, 0) - train(flat, 1)).max()) > 1e-3


def test_training_with_dropout_is_a_function_of_the_step():
  cmds = ["config:tiny", "fiddler:lora(rank=4, targets=('w_up', 'w_down'), dropout=0.5)", "set:train.steps=3",
          "set:train.progress=False", "set:eval.valid_batches=0"]
  runs = [Trainer(fdl.build(cli.build_config(c))) for c in (cmds, cmds, [*cmds, "set:model.adapter.dropout=0.0"])]
  out = [t.run() for t in runs]
  flat = lambda t: [np.asarray(v.get_value()) for _, v in nnx.to_flat_state(t.train_state["params"])]  # noqa: E731
  for a, b in zip(flat(runs[0]), flat(runs[1])):
    np.testing.assert_array_equal(a, b)  # the masks come from (seed, step): reruns are bit-identical
  assert any(not np.array_equal(a, b) for a, b in zip(flat(runs[0]), flat(runs[2])))  # and they are drawn
  assert out[0]["final_loss"] != out[2]["final_loss"]
