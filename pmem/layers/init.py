"""Parameter initializers shared by the layers."""

import jax
import jax.numpy as jnp


def fan_in_normal(key, shape, fan_in: int, scale: float = 1.0, dtype=jnp.float32):
  """Truncated normal with std = scale / sqrt(fan_in)."""
  std = scale / (fan_in ** 0.5)
  return (std / 0.87962566) * jax.random.truncated_normal(key, -2.0, 2.0, shape, dtype)
