"""LoRA (Hu et al. 2021, arXiv 2106.09685) and DoRA (Liu et al. 2024, arXiv 2402.09353) adapters on a
module's projections.

A projection ``base = x W`` (``W`` viewed 2-D as ``[d_in, d_out]``, pmem's [in, out] layout) adapted by
``A [d_in, r]`` (random: ``init``) and ``B [r, d_out]`` (zeros, so step 0 is the base model), scale
``s = alpha / r``:

    LoRA:  y = base + s · (x A) B                                  (LoRA Eq. 3)
    DoRA:  y = base + dora_compose(base, x A B, g, s),  g = m / ‖W + s·A B‖_c      (DoRA Eq. 5)

``‖·‖_c``: each output column's norm over d_in, by ``kernels.dora_norm`` (factored, never forming A B)
and treated as a constant in the backward (DoRA §4.3, as PEFT); ``m [d_out]`` starts at ``‖W‖_c`` so
``g = 1`` at step 0 — after loading other base weights, :func:`reset_magnitudes` sets it again.
``dora_compose`` adds ``(g − 1) ⊙ base + g ⊙ (s·lora)`` in float32 (the naive ``g ⊙ (base + s·lora) −
base`` cancels at g ≈ 1). ``dropout`` p (training steps only: a context key, ``TokenContext.rng``) drops
the adapter's input, ``x̃ = mask ⊙ x / (1 − p)``, a fresh mask per projection, layer and step (LoRA §4.2):
LoRA ``y = base + s·(x̃ A) B``; DoRA, as PEFT, ``y = base + (g − 1) ⊙ x̃ W + g ⊙ s·(x̃ A) B``. Adapters live in the module's ``adapters`` dict under the projection's name
(paths ``.../adapters/<target>/{a,b,m}``; ``train.trainable=('*/adapters/*',)`` trains only them).
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from flax import nnx
from jaxtyping import Array, Float

import kernels
from pmem.core import accounting

KINDS = ("lora", "dora")
INITS = ("kaiming", "gaussian")


@dataclasses.dataclass(frozen=True)
class AdapterConfig:
  kind: str = "lora"  # KINDS
  rank: int = 8
  alpha: float = 16.0
  # projections to adapt, by parameter name: attention's wq / wk / wv / wo, SwiGLU's w_gate / w_up / w_down
  targets: tuple[str, ...] = ("wq", "wv")
  # A's init: "kaiming" (PEFT's default, kaiming-uniform with a = sqrt(5): U(±1/sqrt(d_in))), "gaussian" (N(0, 1/r²))
  init: str = "kaiming"
  implementation: str = "xla"  # kernels.dora_compose's
  dropout: float = 0.0  # probability of dropping an input element of the adapter path (training only)

  def __post_init__(self):
    if self.kind not in KINDS:
      raise ValueError(f"adapter kind must be one of {KINDS}, got {self.kind!r}")
    if self.init not in INITS:
      raise ValueError(f"adapter init must be one of {INITS}, got {self.init!r}")
    if self.rank < 1 or self.alpha <= 0:
      raise ValueError(f"adapter rank must be >= 1 and alpha > 0, got rank={self.rank}, alpha={self.alpha}")
    if not 0.0 <= self.dropout < 1.0:
      raise ValueError(f"adapter dropout must be in [0, 1), got {self.dropout}")

  @property
  def scale(self) -> float:
    return self.alpha / self.rank


class Adapter(nnx.Module):
  """The factors of one projection ``w2 [d_in, d_out]`` (module docstring)."""

  def __init__(self, cfg: AdapterConfig, w2: Float[Array, "d_in d_out"], axes: tuple, *, rngs: nnx.Rngs):
    (d_in, d_out), r = w2.shape, cfg.rank
    self.cfg = cfg
    key = rngs.params()
    a = (jax.random.uniform(key, (d_in, r), jnp.float32, -1.0, 1.0) / math.sqrt(d_in) if cfg.init == "kaiming"
         else jax.random.normal(key, (d_in, r), jnp.float32) / r)
    self.a = nnx.Param(a, axes=(axes[0], None))
    self.b = nnx.Param(jnp.zeros((r, d_out), jnp.float32), axes=(None, axes[1]))
    if cfg.kind == "dora":
      self.m = nnx.Param(jnp.linalg.norm(w2.astype(jnp.float32), axis=0), axes=(axes[1],))

  def __call__(self, x2: Float[Array, "N d_in"], w2: Float[Array, "d_in d_out"],
               base: Float[Array, "N d_out"], rng: jax.Array | None = None) -> Float[Array, "N d_out"]:
    """``x2 @ W`` (given as ``base``) adapted; ``rng``: the dropout key (None: no dropout)."""
    s, dt, p = self.cfg.scale, base.dtype, self.cfg.dropout
    drop = rng is not None and p > 0
    if drop:
      x2 = jnp.where(jax.random.bernoulli(rng, 1.0 - p, x2.shape), x2 / (1.0 - p), 0).astype(x2.dtype)
    lora = (x2 @ self.a[...].astype(dt)) @ self.b[...].astype(dt)
    if self.cfg.kind == "lora":
      return base + s * lora
    a, b = self.a[...].astype(w2.dtype), self.b[...].astype(w2.dtype)
    g = self.m[...] / jax.lax.stop_gradient(kernels.dora_norm(w2, a, b, s))
    scaled = x2 @ w2 if drop else base  # PEFT: the magnitude scales the dropped input's base output
    return base + kernels.dora_compose(scaled, lora, g, s, implementation=self.cfg.implementation)

  def merge(self, w2: Float[Array, "... d_in d_out"]) -> Float[Array, "... d_in d_out"]:
    """The adapted weight, ``x merge(W) = y`` (for export); leading stacked-layer dims map over layers."""
    s, m = self.cfg.scale, self.m[...] if self.cfg.kind == "dora" else None
    f = lambda w, a, b, m: kernels.lora_merge(w, a, b, s) if m is None else kernels.dora_merge(w, a, b, m, s)  # noqa: E731
    for _ in range(w2.ndim - 2):
      f = jax.vmap(f)
    return f(w2, self.a[...], self.b[...], m)

  def cost(self) -> accounting.Cost:
    (d_in, r), d_out = self.a.shape[-2:], self.b.shape[-1]  # costs are per layer (a stage may stack them)
    c = accounting.dense(d_in, r) + accounting.dense(r, d_out)
    return c + accounting.vector(d_out) if self.cfg.kind == "dora" else c


def build(cfg: AdapterConfig | None, module: nnx.Module, names: tuple[str, ...], *, rngs: nnx.Rngs) -> nnx.Dict:
  """``{name: Adapter}`` for the projections ``names`` of ``module`` that ``cfg.targets`` lists (the
  module's ``weight2d(name)`` gives each weight as ``[d_in, d_out]``, ``weight_axes(name)`` its logical
  axes); empty without an adapter."""
  if cfg is None:
    return nnx.Dict({})
  return nnx.Dict({k: Adapter(cfg, module.weight2d(k), module.weight_axes(k), rngs=rngs)
                   for k in names if k in cfg.targets})


def project(module: nnx.Module, name: str, x2: Float[Array, "N d_in"],
            rng: jax.Array | None = None) -> Float[Array, "N d_out"]:
  """``x2 @ W`` for the projection ``name`` of ``module`` (``weight2d``), through its adapter if it has
  one; ``rng`` (the layer's ``TokenContext.rng``) is folded with the projection's index in ``AXES``."""
  w2 = module.weight2d(name).astype(x2.dtype)
  base = x2 @ w2
  if name not in module.adapters:
    return base
  rng = None if rng is None else jax.random.fold_in(rng, list(module.AXES).index(name))
  return module.adapters[name](x2, w2, base, rng)


def cost(module: nnx.Module) -> accounting.Cost:
  return sum((a.cost() for a in module.adapters.values()), accounting.Cost())


def reset_magnitudes(model: nnx.Module) -> None:
  """Sets every DoRA magnitude to ``‖W‖_c`` of its base weight (layer-stacked ones too), in place: the
  adapted model then equals the base model again, e.g. after loading pretrained weights."""
  for _, mod in nnx.iter_graph(model):
    for name, ad in mod.adapters.items() if isinstance(mod, nnx.Module) and hasattr(mod, "adapters") else ():
      if ad.cfg.kind == "dora":
        ad.m[...] = jnp.linalg.norm(mod.weight2d(name).astype(jnp.float32), axis=-2)


def merge(model: nnx.Module) -> None:
  """Folds every adapter into its base weight and drops it, in place: the model computes what the
  adapted one did with the base's parameters alone (export)."""
  for _, mod in list(nnx.iter_graph(model)):
    if isinstance(mod, nnx.Module) and getattr(mod, "adapters", None):
      for name, ad in mod.adapters.items():
        w = getattr(mod, name)
        w[...] = ad.merge(mod.weight2d(name)).reshape(w.shape).astype(w.dtype)
      mod.adapters = nnx.Dict({})
