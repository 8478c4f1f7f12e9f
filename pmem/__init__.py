"""pmem: parametric memory for language models in JAX / Flax NNX.

``pmem.load(workdir, step=None)`` gives a trained run's model, tokenizer and config
(:mod:`pmem.train.restore`); ``loaded.generator().generate(...)`` continues prompts (:mod:`pmem.decode`)."""


def load(workdir: str, step: int | None = None):
  """The model, tokenizer and config of a training workdir's checkpoint (:func:`pmem.train.restore.load`)."""
  from pmem.train.restore import load as _load
  return _load(workdir, step)
