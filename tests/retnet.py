"""A test-only sequence mixer: retention (RetNet, Sun et al. 2023, eq. 5 without the xPos rotation) as a
:class:`~pmem.layers.recurrent.LinearRecurrence` with a fixed decay per head ``γ_h = 1 − 2^(−5−h)`` (log decay
``log1p(−2^(−5−h))``) and identity features, registered as the sequence mixer ``retnet`` and the config
``retnet_tiny``. Imported by ``tests/conftest.py``, so every test process registers it before collecting."""

import fiddle as fdl
import jax.numpy as jnp

from configs import config
from configs.base import experiment
from configs.sequence import _heads
from pmem.core.registry import SEQUENCE_MIXERS
from pmem.layers.recurrent import LinearRecurrence


@SEQUENCE_MIXERS.register("retnet")
class Retention(LinearRecurrence):
  def decay(self, x2, b, t):
    a = jnp.log1p(-2.0 ** (-5.0 - jnp.arange(self.n_heads)))  # [H]
    return jnp.broadcast_to(a, (b, t, self.n_heads))


@config("retnet_tiny", "tiny with the test-only retention mixer (tests/retnet.py) in all 4 layers")
def retnet_tiny() -> fdl.Config:
  cfg = experiment()
  cfg.model.sequence_mixer = fdl.Partial(Retention, n_heads=_heads(cfg))
  return cfg
