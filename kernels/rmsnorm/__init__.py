"""Fused residual add + RMSNorm; see README.md."""

from kernels.rmsnorm.ops import fused_add_rmsnorm

__all__ = ["fused_add_rmsnorm"]
