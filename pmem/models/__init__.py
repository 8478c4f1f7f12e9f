"""Model assemblies. Importing this package registers the built-in mixers."""

from pmem.layers import attention as _attention  # noqa: F401  (registers "attention")
from pmem.layers import mlp as _mlp  # noqa: F401  (registers "swiglu")
from pmem.models.decoder import Decoder, DecoderConfig, LayerOverride  # noqa: F401
