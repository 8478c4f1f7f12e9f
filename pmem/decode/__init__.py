"""Decoding: sampling and generation over the decoder's cache (pmem.core.mixer's state protocol).
Imports the model side and nothing from training; ``pmem.load`` gives a trained model to use here."""

from pmem.decode.generate import Generation, Generator, to_host
from pmem.decode.sample import Sampling, sample

__all__ = ["Generation", "Generator", "Sampling", "sample", "to_host"]
