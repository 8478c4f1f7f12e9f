"""Causal GQA self-attention over packed documents (FlashAttention-2 backward); see ops.py."""

from kernels.attention.ops import IMPLEMENTATIONS, attention, segment_causal_mask

__all__ = ["IMPLEMENTATIONS", "attention", "segment_causal_mask"]
