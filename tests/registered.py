"""A test-only sequence mixer: retention (RetNet, Sun et al. 2023, eq. 5 without the xPos rotation) as a
:class:`~pmem.layers.linear_recurrence.LinearRecurrence` with a fixed decay per head ``γ_h = 1 − 2^(−5−h)``
(log decay ``log1p(−2^(−5−h))``) and identity features, registered as the sequence mixer ``retnet`` and the config
``retnet_tiny``. Imported by ``tests/conftest.py``, so every test process registers it before collecting."""

import fiddle as fdl
import jax.numpy as jnp

from configs import config
from configs.base import experiment
from configs.sequence import hybrid, mixer
from pmem.core.registry import SEQUENCE_MIXERS
from pmem.layers.linear_recurrence import LinearRecurrence


@SEQUENCE_MIXERS.register("retnet")
class Retention(LinearRecurrence):
  def decay(self, x2, b, t):
    a = jnp.log1p(-2.0 ** (-5.0 - jnp.arange(self.n_heads)))  # [H]
    return jnp.broadcast_to(a, (b, t, self.n_heads))


@config("retnet_tiny", "tiny with the test-only retention mixer (tests/registered.py) in all 4 layers")
def retnet_tiny() -> fdl.Config:
  cfg = experiment()
  mixer(cfg, "retnet")
  return cfg


@config("hybrid_periodic", "tiny, 6 layers: 2 repetitions of Mamba2 / window-5 attention / attention")
def hybrid_periodic() -> fdl.Config:
  cfg = experiment(n_layers=6)
  hybrid(cfg, pattern="GWA", G="mamba2", window=5)
  return cfg
