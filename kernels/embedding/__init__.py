"""Embedding gather and bag with dense or compact (row-sparse) gradients; see README.md."""

from kernels.embedding.ops import (CompactGrad, embedding_bag, embedding_bag_compact_vjp, embedding_bag_table_grad,
                                   embedding_gather, embedding_gather_compact_vjp)

__all__ = ["CompactGrad", "embedding_bag", "embedding_bag_compact_vjp", "embedding_bag_table_grad", "embedding_gather",
           "embedding_gather_compact_vjp"]
