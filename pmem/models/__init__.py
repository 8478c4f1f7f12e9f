"""Model assemblies. Importing this package registers the built-in mixers."""

from pmem.layers import attention as _attention  # noqa: F401  (registers "attention")
from pmem.layers import mlp as _mlp  # noqa: F401  (registers "swiglu")
from pmem.layers import deltanet as _deltanet  # noqa: F401  ("deltanet", "gdn")
from pmem.layers import linear_attention as _linear  # noqa: F401  ("linear_attn", "gla")
from pmem.layers import mamba2 as _mamba2  # noqa: F401  ("mamba2")
from pmem.models.decoder import Decoder, DecoderConfig, LayerOverride  # noqa: F401
