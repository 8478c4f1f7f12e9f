"""Exact top-k over the n² sums of two score vectors (product keys); see ops.py."""

from kernels.product_topk.ops import candidate_pairs, product_topk

__all__ = ["candidate_pairs", "product_topk"]
