"""The dense baseline: ``tiny`` (tests, seconds) and ``demo`` (``make run``), plus generic fiddlers."""

from __future__ import annotations

import fiddle as fdl

from configs import config, fiddler
from pmem.core.mesh import MeshConfig
from pmem.core.registry import CHANNEL_MIXERS, SEQUENCE_MIXERS
from pmem.data.pipeline import DataConfig
from pmem.data.tokenizer import TokenizerConfig
from pmem.models import DecoderConfig
from pmem.train import optim
from pmem.train.checkpoint import CheckpointConfig
from pmem.train.evaluate import EvalConfig
from pmem.train.loop import Experiment, TrainConfig


def mixer(registry, name: str, **kwargs) -> fdl.Partial:
  """A mixer factory chosen by registry name."""
  return fdl.Partial(registry[name], **kwargs)


def experiment(*, vocab=256, d_model=64, n_layers=4, n_heads=4, n_kv_heads=2, d_ff=128,
               steps=20, batch_size=16, seq_len=64, lr=3e-3) -> fdl.Config:
  return fdl.Config(
      Experiment,
      model=fdl.Config(
          DecoderConfig, vocab=vocab, d_model=d_model, n_layers=n_layers,
          sequence_mixer=mixer(SEQUENCE_MIXERS, "attention", n_heads=n_heads, n_kv_heads=n_kv_heads),
          channel_mixer=mixer(CHANNEL_MIXERS, "swiglu", d_ff=d_ff)),
      train=fdl.Config(TrainConfig, steps=steps, batch_size=batch_size, seq_len=seq_len,
                       optim=fdl.Config(optim.OptimConfig, lr=lr, tables=fdl.Config(optim.TableOptimConfig))),
      mesh=fdl.Config(MeshConfig),
      data=fdl.Config(DataConfig, tokenizer=fdl.Config(TokenizerConfig)),
      checkpoint=fdl.Config(CheckpointConfig),
      eval=fdl.Config(EvalConfig),
      seed=0)


@config("tiny", "4-layer d=64 byte-level LM on the English corpus, 20 steps of 16x64 tokens (tests)")
def tiny() -> fdl.Config:
  return experiment()


@config("demo", "4-layer d=256 GQA LM, BPE-8192 on the English corpus (Shakespeare, KJV, Austen), "
                "200 steps of 16x256 tokens (make run)")
def demo() -> fdl.Config:
  cfg = experiment(vocab=8192, d_model=256, n_layers=4, n_heads=4, n_kv_heads=2, d_ff=688, steps=200,
                   seq_len=256, lr=2e-3)
  cfg.data.tokenizer.kind = "bpe"
  cfg.data.tokenizer.vocab_size = 8192
  cfg.train.log_every = 10
  cfg.checkpoint.every = 50
  cfg.eval.valid_batches = 16
  return cfg


@fiddler("tied", "tie the input embedding and the output head")
def tied(cfg: fdl.Config) -> None:
  cfg.model.tie_embeddings = True


@fiddler("no_scan", "build every layer separately instead of scanning stacked layers")
def no_scan(cfg: fdl.Config) -> None:
  cfg.model.scan_layers = False


@fiddler("remat", "rematerialize each layer with a named policy: remat(policy='full'|'dots'|'dots_no_batch')")
def remat(cfg: fdl.Config, policy: str = "full") -> None:
  cfg.model.remat = policy


@fiddler("z_loss", "add the z-loss weight * logsumexp^2: z_loss(weight=1e-4)")
def z_loss(cfg: fdl.Config, weight: float = 1e-4) -> None:
  cfg.train.z_loss = weight
