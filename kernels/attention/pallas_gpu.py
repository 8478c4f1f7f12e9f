"""Pallas GPU: ``jax.experimental.pallas.ops.gpu.attention.mha`` (FlashAttention-2 forward and backward,
segment ids, causal; Pallas lowered through Triton, so any CUDA GPU, no jax-triton) under the op's GQA and
padding rules (``library.py``). Interpreted on CPU (``interpret=True``: forward and backward).

(The Mosaic GPU flash kernel, ``attention_mgpu``, needs Hopper and takes no segment ids.)"""

from __future__ import annotations

from jax.experimental.pallas.ops.gpu import attention as mha

from kernels import common
from kernels.attention import library


def check(dtype, shape, window) -> None:
  del dtype
  library.check(shape, window, "pallas_gpu", 256)


def attention(q, k, v, seg, pos, window, *, interpret=None):
  """``interpret``: run the kernel in Pallas's interpreter (default: on CPU only)."""
  del pos, window  # causal by index; check refused windows
  interpret = common.platform() == "cpu" if interpret is None else interpret
  call = lambda q, k, v, seg: mha.mha(q, k, v, seg, sm_scale=q.shape[3] ** -0.5, causal=True,  # noqa: E731
                                      interpret=interpret)
  return library.attention(call, q, k, v, seg)
