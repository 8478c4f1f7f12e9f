"""Decoder logits vs HF transformers LlamaForCausalLM (eager attention) on identical weights."""

import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from tests.conftest import ROOT, run_oracle
from pmem.layers.attention import Attention
from pmem.layers.mlp import SwiGLU
from pmem.core.mixer import TokenContext
from pmem.models import Decoder, DecoderConfig
from pmem.models import hf


@pytest.mark.oracle
@pytest.mark.parametrize("tied,scan", [(False, True), (True, False)])
def test_logits_match_hf_llama(tmp_path, tied, scan):
  cfg = DecoderConfig(vocab=97, d_model=64, n_layers=3, tie_embeddings=tied, scan_layers=scan,
                      sequence_mixer=functools.partial(Attention, n_heads=4, n_kv_heads=2, head_dim=16),
                      channel_mixer=functools.partial(SwiGLU, d_ff=96))
  model = Decoder(cfg, rngs=nnx.Rngs(3))
  # Non-trivial norm scales so a swapped or dropped norm cannot hide.
  for v in jax.tree.leaves(nnx.state(model, nnx.Param), is_leaf=lambda x: isinstance(x, nnx.Variable)):
    if v.get_metadata()["axes"] == ("embed",):
      v[...] = v[...] + 0.3 * jax.random.normal(jax.random.key(v.size), v.shape)
  ids = np.random.default_rng(0).integers(0, cfg.vocab, (2, 40)).astype(np.int32)
  t = ids.shape[1]
  ctx = TokenContext(jnp.asarray(ids), jnp.broadcast_to(jnp.arange(t), ids.shape), jnp.ones_like(ids))
  ours = np.asarray(model(jnp.asarray(ids), ctx))
  hf_cfg, sd = hf.hf_config(model), hf.export(model)
  np.savez(tmp_path / "in.npz", config=json.dumps(hf_cfg), input_ids=ids, **{"w:" + k: v for k, v in sd.items()})
  run_oracle(str(ROOT / "experiments/oracles/hf_llama.py"), "logits", str(tmp_path / "in.npz"), str(tmp_path / "out.npz"))
  theirs = np.load(tmp_path / "out.npz")["logits"]
  diff = np.abs(ours - theirs).max()
  print(f"max |pmem - hf| = {diff:.3e}")
  # two float32 implementations (orders): per layer reductions of ≲ 300 terms (d_model 64, d_ff 96,
  # 40 keys) of O(1), logits ≲ 3: 300·eps·3 ≈ 1e-4 abs
  assert diff <= 1e-4, diff
  assert np.abs(theirs).max() > 1.0  # logits are not degenerate
