"""DoRA: factored weight norm, stable compose, merged weights; see README.md."""

from kernels.dora.ops import dora_compose, dora_merge, dora_norm, lora_merge

__all__ = ["dora_compose", "dora_merge", "dora_norm", "lora_merge"]
