"""Standalone ops (embedding gather/bag, fused residual-add + RMSNorm, product-key top-k, DoRA), each with an
XLA reference, a custom_vjp where differentiable, and Pallas/Triton/native-CPU implementations behind
``implementation=``; see README.md.
Imports nothing from ``pmem``."""

from kernels.common import AUTO, IMPLEMENTATIONS, Unavailable
from kernels.dora import dora_compose, dora_merge, dora_norm, lora_merge
from kernels.embedding import (CompactGrad, embedding_bag, embedding_bag_compact_vjp, embedding_bag_table_grad,
                               embedding_gather, embedding_gather_compact_vjp)
from kernels.product_topk import candidate_pairs, product_topk
from kernels.rmsnorm import fused_add_rmsnorm

__all__ = ["AUTO", "IMPLEMENTATIONS", "CompactGrad", "Unavailable", "embedding_bag", "embedding_bag_compact_vjp",
           "embedding_bag_table_grad", "embedding_gather", "embedding_gather_compact_vjp", "fused_add_rmsnorm", "candidate_pairs",
           "product_topk", "dora_compose", "dora_merge", "dora_norm", "lora_merge"]
