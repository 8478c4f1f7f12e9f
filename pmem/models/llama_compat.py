"""Export a dense pmem decoder to HF ``LlamaForCausalLM`` weights (for parity tests and benchmarks).

PyTorch ``Linear`` weights are ``[out, in]``; pmem keeps ``[in, ...out]``. RoPE conventions match
(rotate_half), so no permutation of q/k is needed."""

from __future__ import annotations

import numpy as np

from pmem.layers.attention import Attention
from pmem.layers.mlp import SwiGLU
from pmem.models.decoder import Decoder, unroll


def layers(model: Decoder) -> list:
  """The blocks in order (scanned stages unstacked by :func:`unroll`)."""
  return [b for stage in unroll(model)[0].stages for b in stage.blocks]


def hf_config(model: Decoder) -> dict:
  c, first = model.cfg, layers(model)[0]
  return {"vocab_size": c.vocab, "hidden_size": c.d_model, "num_hidden_layers": c.n_layers,
          "intermediate_size": first.ch.d_ff, "num_attention_heads": first.seq.n_heads,
          "num_key_value_heads": first.seq.n_kv_heads, "head_dim": first.seq.head_dim,
          "rms_norm_eps": first.norm_seq.eps, "rope_theta": first.seq.rope_theta,
          "tie_word_embeddings": c.tie_embeddings, "max_position_embeddings": 4096}


def to_hf_llama(model: Decoder) -> tuple[dict, dict[str, np.ndarray]]:
  """(HF config kwargs, state dict as float32 numpy)."""
  a = lambda v: np.asarray(v[...], np.float32)
  sd = {"model.embed_tokens.weight": a(model.embed.table), "model.norm.weight": a(model.norm_out.scale)}
  for i, blk in enumerate(layers(model)):
    if not isinstance(blk.seq, Attention) or not isinstance(blk.ch, SwiGLU) or len(blk.aug):
      raise ValueError(f"layer {i} is not attention + SwiGLU; only dense Llama layers export")
    p, (d, n, h) = f"model.layers.{i}.", blk.seq.wq.shape
    sd[p + "input_layernorm.weight"] = a(blk.norm_seq.scale)
    sd[p + "post_attention_layernorm.weight"] = a(blk.norm_ch.scale)
    for name in ("q", "k", "v"):
      w = a(getattr(blk.seq, f"w{name}"))
      sd[p + f"self_attn.{name}_proj.weight"] = w.reshape(d, -1).T
    sd[p + "self_attn.o_proj.weight"] = a(blk.seq.wo).reshape(n * h, d).T
    sd[p + "mlp.gate_proj.weight"] = a(blk.ch.w_gate).T
    sd[p + "mlp.up_proj.weight"] = a(blk.ch.w_up).T
    sd[p + "mlp.down_proj.weight"] = a(blk.ch.w_down).T
  sd["lm_head.weight"] = sd["model.embed_tokens.weight"] if model.cfg.tie_embeddings else a(model.head).T
  return hf_config(model), {k: np.ascontiguousarray(v) for k, v in sd.items()}
