"""Inputs the mixer tests share: a TokenContext from NumPy positions / segment ids, and a module with every
parameter moved off its init (zero-initialised routers, gates and convs would hide their paths)."""

import jax
import jax.numpy as jnp
from flax import nnx

from pmem.core.mixer import TokenContext


def ctx(pos, seg) -> TokenContext:
  return TokenContext(None, jnp.asarray(pos, jnp.int32), jnp.asarray(seg, jnp.int32), {})


def perturb(m: nnx.Module, scale: float, seed: int = 1) -> nnx.Module:
  """``m`` with ``scale`` · N(0, 1) added to every parameter (in place; returned)."""
  leaves, tree = jax.tree.flatten(nnx.state(m, nnx.Param))
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  nnx.update(m, jax.tree.unflatten(tree, [v + scale * jax.random.normal(k, v.shape) for v, k in zip(leaves, keys)]))
  return m
