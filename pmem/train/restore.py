"""``pmem.load(workdir, step=None)``: a trained model, its tokenizer and its config from a training
workdir, without optimizer, data iterator or any other training object.

Reads ``config.json`` (the run's Fiddle config) and, read-only, the parameters of the newest
checkpoint whose arrays read (or of ``step``) from ``checkpoints/`` (Orbax partial restore of the
``params`` and ``rest`` of the train state; host-resident tables come from the checkpoint's
``host`` item as NumPy arrays, their variables holding placeholders as in training). A run with
``train.init_from`` (an imported model, ``experiments.convert``) has a step 0: the model's init with
those weights in place, loaded where it has no checkpoint yet or for ``step=0``. Nothing in the
workdir is written or moved.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

from pmem.core import variables
from pmem.data.pipeline import Pipeline, has_text
from pmem.decode import Generator
from pmem.layers import adapters
from pmem.models import hf
from pmem.models.decoder import Decoder
from pmem.train import host_tables, optim
from pmem.train.checkpoint import CheckpointError, _first_line


@dataclasses.dataclass
class Loaded:
  """A trained model (``model(ids, ctx)``), its tokenizer, the run's ``Experiment`` config, the step
  it was saved at, and its host-resident tables ``{name: [..., V, D]}`` (empty if none)."""
  model: nnx.Module
  tokenizer: Any
  config: Any
  step: int
  host_tables: dict[str, np.ndarray]
  workdir: str

  def generator(self, max_len: int | None = None) -> Generator:
    """A :class:`pmem.decode.Generator` for this model (``max_len``: default the training ``seq_len``)."""
    return Generator(self.model, self.tokenizer, max_len=max_len or self.config.train.seq_len,
                     host_tables=self.host_tables)


def config(workdir: str):
  """The ``Experiment`` a training workdir was run with (its ``config.json``)."""
  import fiddle as fdl
  from fiddle.experimental import serialization
  path = os.path.join(workdir, "config.json")
  if not os.path.exists(path):
    raise FileNotFoundError(f"{workdir} has no config.json; is it a training workdir?")
  with open(path) as f:
    text = f.read()
  try:
    serialized = json.loads(text)
  except json.JSONDecodeError as e:
    raise ValueError(f"{path} is not JSON ({e})") from None
  if not isinstance(serialized, dict) or "objects" not in serialized:  # an HF config.json, say
    raise ValueError(f"{path} is not a pmem run config (no Fiddle serialization); is {workdir} an HF checkpoint? "
                     "import it with experiments.convert --from-hf")
  return fdl.build(serialization.load_json(text))


def tokenizer(exp):
  """The run's tokenizer (None for token-level data)."""
  return Pipeline(exp.data, exp.train.seq_len, exp.train.batch_size, exp.seed).tokenizer if has_text(exp.data) else None


def load(workdir: str, step: int | None = None) -> Loaded:
  """The model of ``workdir``'s newest readable checkpoint (or of ``step``); see the module docstring."""
  exp = config(workdir)
  directory = os.path.abspath(os.path.join(workdir, "checkpoints"))
  steps = sorted((int(n) for n in os.listdir(directory) if n.isdigit()), reverse=True) \
      if os.path.isdir(directory) else []
  if exp.train.init_from and (step == 0 or (step is None and not steps)):  # step 0: the initial weights
    model = Decoder(exp.model, rngs=nnx.Rngs(exp.seed))  # parameters the checkpoint lacks (adapters): their init
    nnx.update(model, hf.load_params(exp.train.init_from, model))
    adapters.reset_magnitudes(model)  # as the Trainer's step 0
    return Loaded(model, tokenizer(exp), exp, 0, {}, workdir)
  if not steps:
    raise CheckpointError(f"{workdir} has no checkpoint to load")
  if step is not None:
    if step not in steps:
      raise CheckpointError(f"no checkpoint of step {step} in {directory} (steps: {sorted(steps)})")
    steps = [step]
  abstract = nnx.eval_shape(lambda: Decoder(exp.model, rngs=nnx.Rngs(exp.seed)))
  graphdef, params, rest = nnx.split(abstract, nnx.Param, ...)
  tx, _ = optim.build(exp.train.optim, exp.train.schedule_steps or exp.train.steps)
  host = host_tables.placement(tx, params)  # the tables training kept on the host: placeholders here
  tables = variables.tables_of(params, lambda name, v: name in host)
  params = nnx.merge_state(params, variables.with_values(
      tables, {n: jax.ShapeDtypeStruct((*v.shape[:-2], 1, v.shape[-1]), v.dtype) for n, (_, v) in tables.items()}))
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device), {"params": params, "rest": rest})
  if host:
    target["host"] = {n: {"table": np.empty(0, v.dtype)} for n, (_, v) in tables.items()}
  manager = ocp.CheckpointManager(directory, item_names=("state", "meta"))
  # the target's shardings as restore arguments (without them Orbax reads the saved ones, with a warning)
  restore = ocp.args.PyTreeRestore(target, restore_args=ocp.checkpoint_utils.construct_restore_args(target),
                                   partial_restore=True)
  errors = []
  for s in steps:
    try:
      state = manager.restore(s, args=ocp.args.Composite(state=restore))
      state = jax.block_until_ready(state["state"])
    except Exception as e:  # unreadable: try the one before
      errors.append(f"step {s}: {type(e).__name__}: {_first_line(e)}")
      continue
    model = nnx.merge(graphdef, state["params"], state["rest"])
    arrays = {n: np.asarray(state["host"][n]["table"]) for n in host}
    return Loaded(model, tokenizer(exp), exp, s, arrays, workdir)
  raise CheckpointError(f"no readable checkpoint in {directory}: {'; '.join(errors)}")
