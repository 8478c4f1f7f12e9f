"""Model assemblies (the mixers they name register themselves: ``pmem.core.registry``)."""

from pmem.models.decoder import Decoder, DecoderConfig, LayerOverride  # noqa: F401
