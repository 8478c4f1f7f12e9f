"""The training loop: mesh, sharded init, jitted donated step, logging, summary."""

from __future__ import annotations

import dataclasses
import fcntl
import functools
import json
import math
import os
import shutil
import socket
import sys
import time
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from pmem.core import accounting, mesh as mesh_lib, rules
from pmem.core.rules import param_shardings
from pmem.data import corpus as corpus_lib
from pmem.data.pipeline import FIELDS, DataConfig, Pipeline
from pmem.core.mixer import batch_features
from pmem.decode import Generator
from pmem.layers import adapters
from pmem.models import hf
from pmem.models.decoder import Decoder, DecoderConfig
from pmem.train import checkpoint as ckpt_lib, host_tables, inspect, optim, sparse, step as step_lib
from pmem.train.evaluate import EvalConfig, Evaluator


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  steps: int = 100  # where to stop; extending a run changes nothing else
  # the learning-rate schedule's horizon; None: the first run's ``steps`` (stored with checkpoints)
  schedule_steps: int | None = None
  batch_size: int = 16
  seq_len: int = 128
  log_every: int = 1
  z_loss: float = 0.0
  # positions per chunk of the fused output head + cross-entropy (pmem.train.loss.linear_lm_loss; no
  # [B, T, V] logits); 0: the loss of the whole logits
  loss_chunk: int = 64
  optim: optim.OptimConfig = optim.OptimConfig()
  progress: bool = True
  # step 0's parameters: a Hugging Face checkpoint directory (pmem.models.hf; an imported model's
  # copy in its workdir, experiments.convert) instead of the random init
  init_from: str | None = None
  # glob patterns over parameter paths (e.g. 'stages/*/seq/*', '*lora*'): the rest is frozen
  trainable: tuple[str, ...] = ("*",)


@dataclasses.dataclass(frozen=True)
class Experiment:
  model: DecoderConfig
  train: TrainConfig = TrainConfig()
  mesh: mesh_lib.MeshConfig = mesh_lib.MeshConfig()
  data: DataConfig = DataConfig()
  checkpoint: ckpt_lib.CheckpointConfig = ckpt_lib.CheckpointConfig()
  eval: EvalConfig = EvalConfig()
  seed: int = 0

  def fingerprint(self, contents: dict, schedule_steps: int) -> dict:
    """What a resumed run must share with the run that wrote the checkpoint: every setting but
    :data:`RESUMABLE`, the schedule's horizon and the data's contents (corpus checksums, tokenizer)."""
    fp = ckpt_lib.fingerprint(**{f.name: getattr(self, f.name) for f in dataclasses.fields(self)})
    for path in RESUMABLE:
      *head, last = path.split(".")
      functools.reduce(lambda d, k: d[k], head, fp).pop(last)
    fp["train"]["schedule_steps"] = schedule_steps
    return {**fp, "data_contents": contents}


# settings a resumed run may change: where to stop, the NaN stop's remedies (learning rate, clipping),
# what changes speed or reporting but no result (logging, prefetch, mesh, kernels, evaluation,
# checkpoint cadence), and the paths of files whose contents are fingerprinted instead (data_contents)
RESUMABLE = ("train.steps", "train.schedule_steps", "train.log_every", "train.progress", "train.optim.lr",
             "train.optim.clip_norm", "train.optim.tables.clip_norm", "data.prefetch", "model.kernel_impl", "mesh",
             "checkpoint", "eval", "train.init_from", "data.tokenizer.path")
RUN_FILES = ("metrics.jsonl", "summary.json", "tb", "usage_histograms.json")  # what a run writes beside checkpoints


def data_contents(p: Pipeline, init_from: str | None = None) -> dict:
  """Checksums of what the run reads: the corpus splits, the tokenizer and the initial weights (if any)."""
  c = p.cfg.corpus
  out = {"corpus": {s: corpus_lib.checksum(c, s) for s in ("train", "valid")} if c else None,
         "tokenizer": p.tokenizer.fingerprint if p.tokenizer else None}
  return out | ({"init": hf.digest(init_from)} if init_from else {})


def lock_workdir(workdir: str):
  """An exclusive lock on ``workdir`` held while the returned file is open (for the process's life):
  flock on ``.lock`` (``.lock.<i>`` for process i > 0 of a multi-process run, so the processes of one
  run share the workdir and those of another are refused), which the kernel drops when the holder
  dies; the file names its holder for the refusal."""
  os.makedirs(workdir, exist_ok=True)
  i = jax.process_index()
  f = open(os.path.join(workdir, f".lock.{i}" if i else ".lock"), "a+")
  try:
    fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
  except BlockingIOError:
    f.seek(0)
    holder = f.read().strip() or "another process"  # a holder that has not written itself yet
    f.close()
    raise ValueError(f"{workdir} is in use by {holder}; wait for it or use another --workdir") from None
  f.truncate(0)
  f.write(f"pid {os.getpid()} on {socket.gethostname()} (started {time.strftime('%Y-%m-%d %H:%M:%S')})")
  f.flush()
  return f


def shardings_like(tree, abs_params, params_sh, default):
  """Shardings for a tree (optimizer state) whose leaves mirror parameters: a leaf whose key
  path ends with a parameter's path and has its shape gets that parameter's sharding."""
  flat = jax.tree_util.tree_flatten_with_path
  by_path = {tuple(p): (a.shape, s) for (p, a), s in zip(flat(abs_params)[0], jax.tree.leaves(params_sh))}
  def one(path, leaf):
    for k in range(len(path)):
      shape, sh = by_path.get(tuple(path[k:]), (None, None))
      if shape == leaf.shape:
        return sh
    return default
  return jax.tree_util.tree_map_with_path(one, tree)


def count_params(state: nnx.State) -> int:
  return int(sum(np.prod(x.shape) for x in jax.tree.leaves(state)))


class Trainer:
  """A run in stages a notebook can call one by one: :meth:`build` (mesh, data, model, optimizer, step 0's
  train state, jitted steps, evaluator), :meth:`restore` (a checkpoint, ``train.init_from`` or a fresh
  start), :meth:`loop` (training to ``train.steps``) and :meth:`report` (summary.json).
  ``Trainer(exp, workdir)`` is build + restore and :meth:`run` loop + report. With a ``workdir`` it resumes
  from the newest readable checkpoint there (or ``step``); a fresh start in a workdir that holds another
  run's logs needs ``overwrite``; ``lock`` (the launcher's) holds :func:`lock_workdir` from before the
  first write to it. ``train_state``: ``{"params", "rest", "opt", "step"}``."""

  def __init__(self, exp: Experiment, workdir: str | None = None, *, overwrite: bool = False,
               step: int | None = None, lock: bool = False):
    self._build(exp, workdir, lock)
    self.restore(step, overwrite=overwrite)

  @classmethod
  def build(cls, exp: Experiment, workdir: str | None = None, *, lock: bool = False) -> Trainer:
    """A trainer at step 0 of a fresh train state, nothing restored yet (:meth:`restore` next). The workdir's
    lock and checkpointer come before the optimizer: its schedule's horizon may be the checkpoints'."""
    trainer = cls.__new__(cls)
    trainer._build(exp, workdir, lock)
    return trainer

  def _build(self, exp: Experiment, workdir: str | None, lock: bool) -> None:
    self._configure(exp)
    with jax.set_mesh(self.mesh):
      abs_params, abs_rest = self._model()
      self._open(workdir, lock)
      abs_params = self._optimizer(abs_params, abs_rest)
      self._init(abs_params, abs_rest)
      self._compile(abs_params)
    self._inputs()

  def _configure(self, exp: Experiment) -> None:
    """Checks the run's sizes; the mesh, the data pipeline and the batch sharding."""
    self.exp, t = exp, exp.train
    if t.steps < 1 or t.batch_size < 1 or t.seq_len < 1:
      raise ValueError(f"train.steps, train.batch_size and train.seq_len must be >= 1, got "
                       f"{t.steps}, {t.batch_size}, {t.seq_len}")
    self.mesh = mesh_lib.make_mesh(exp.mesh)
    n_batch = exp.mesh.data * exp.mesh.fsdp
    if t.batch_size % n_batch:
      raise ValueError(f"train.batch_size={t.batch_size} must be divisible by mesh.data*mesh.fsdp={n_batch}")
    self.data = Pipeline(exp.data, t.seq_len, t.batch_size, exp.seed)
    if self.data.vocab > exp.model.vocab:
      raise ValueError(f"the data has ids up to {self.data.vocab - 1} (tokenizer/task vocabulary) but "
                       f"model.vocab={exp.model.vocab}")
    self.batch_sharding = NamedSharding(self.mesh, rules.logical_to_spec(("batch", "length")))

  def _fresh(self):
    """(graphdef, params, rest, (cost, decode-state bytes)) of the seeded model: every call makes the same."""
    exp, n = self.exp, self.exp.train.seq_len
    model = Decoder(exp.model, rngs=nnx.Rngs(exp.seed))
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    return graphdef, params, rest, (model.cost(n), model.state_bytes(n))

  def _model(self) -> tuple[nnx.State, nnx.State]:
    """The abstract (params, rest), the graphdef and the cost, allocating nothing (a bad config fails here)."""
    self.graphdef, abs_params, abs_rest, (self.cost, self.state_bytes) = _abstract(self._fresh)
    if self.exp.train.init_from:  # its tensors fit the model (names, shapes), before anything is written
      hf.check(self.exp.train.init_from, nnx.merge(self.graphdef, abs_params, abs_rest))
    return abs_params, abs_rest

  def _open(self, workdir: str | None, lock: bool) -> None:
    """The first things written to the workdir: the lock, checkpoints/ (checked writable); the schedule's
    horizon (given, else the one the checkpoints were written with, else train.steps); the fingerprint."""
    t = self.exp.train
    self.workdir, self.ckpt, stored = workdir, None, None
    if workdir:
      self._lock = lock_workdir(workdir) if lock else None  # held while this Trainer lives
      self.ckpt = ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints"), self.exp.checkpoint)
      stored = self.ckpt.latest_meta()
    self.schedule_steps = t.schedule_steps or (stored or {}).get("schedule_steps") or t.steps
    self.fingerprint = self.exp.fingerprint(data_contents(self.data, t.init_from), self.schedule_steps)

  def _optimizer(self, abs_params: nnx.State, abs_rest: nnx.State) -> nnx.State:
    """The optimizer, host-computed batch fields, host-resident tables, parameter counts and the checks of
    ``train.trainable``; the abstract parameters as on the device."""
    t = self.exp.train
    self.tx, self.lr = optim.build(t.optim, self.schedule_steps)
    # host-computed batch fields of modules that have them (Engram's hashed n-gram ids), read
    # from the abstract model's static attributes
    self.features = batch_features(nnx.merge(self.graphdef, abs_params, abs_rest), self.data.tokenizer)
    example = self.featurize({k: np.zeros((1, t.seq_len), np.int32) for k in FIELDS})
    self.fields = FIELDS + tuple(sorted(example.keys() - set(FIELDS)))
    # row-sparse tables past tables.device_budget_bytes live on the host (pmem.train.host_tables):
    # placeholders in params, never materialized on the device
    self.tx, self.host = host_tables.HostTables.create(self.tx, abs_params, lambda: self._fresh()[1],
                                                       {k: t.batch_size * v.size for k, v in example.items()})
    self.params_total = count_params(abs_params)
    optim.check_trainable(abs_params, t.trainable)
    trained = optim.trainable(abs_params, t.trainable)[0]
    self.params_trainable = count_params(trained)
    names = {sparse.name_of(p) for p, _ in nnx.to_flat_state(trained)}
    if frozen := [n for n in (self.host.tables if self.host else ()) if n not in names]:
      raise ValueError(f"host-resident table {frozen[0]} is frozen by train.trainable; only device tables "
                       "can be frozen (raise train.optim.tables.device_budget_bytes)")
    return self._on_device(abs_params)

  def _on_device(self, params: nnx.State) -> nnx.State:
    return self.host.placeholders(params) if self.host else params

  def _init(self, abs_params: nnx.State, abs_rest: nnx.State) -> None:
    """Step 0's ``train_state``, initialized sharded (the optimizer's state: of the trained parameters)."""
    trainable, replicated = self.exp.train.trainable, NamedSharding(self.mesh, P())
    p_sh, r_sh = param_shardings(self.mesh, abs_params), param_shardings(self.mesh, abs_rest)

    def fresh():
      _, params, rest, _ = self._fresh()
      return self._on_device(params), rest

    params, rest = jax.jit(fresh, out_shardings=(p_sh, r_sh))()
    init_opt = lambda p: self.tx.init(optim.trainable(p, trainable)[0])  # noqa: E731
    abs_opt = jax.eval_shape(init_opt, abs_params)
    opt_sh = self.tx.row_state_shardings(shardings_like(abs_opt, abs_params, p_sh, replicated), p_sh)
    opt = jax.jit(init_opt, out_shardings=opt_sh)(params)
    self.sync_save = self.host is not None or bool(jax.tree.leaves(opt["rows"]))  # row-sparse / host tables
    self.train_state = {"params": params, "rest": rest, "opt": opt,
                        "step": jax.device_put(jnp.zeros((), jnp.int32), replicated)}

  def _compile(self, abs_params: nnx.State) -> None:
    """The jitted train step (donating the train state) and score step (host tables: staging their rows)."""
    t, replicated = self.exp.train, NamedSharding(self.mesh, P())
    train_state_sh = jax.tree.map(lambda x: x.sharding, self.train_state)
    batch_sh = {k: self.batch_sharding for k in self.fields} | ({"tables": replicated} if self.host else {})
    self.step_fn = jax.jit(step_lib.make_train_step(self.graphdef, self.tx, self.lr, t.z_loss, t.trainable,
                                                    self.exp.seed, t.loss_chunk),
                           in_shardings=(train_state_sh, batch_sh),
                           out_shardings=(train_state_sh, replicated) + ((replicated,) if self.host else ()),
                           donate_argnums=0)
    # models with memory tables report row usage / statistics while scoring (pmem.train.inspect)
    self.tables = sparse.tables_of(abs_params, lambda name, v: True)
    self.score_fn = jax.jit(step_lib.make_score_step(self.graphdef, self.tx, collect=bool(self.tables)),
                            in_shardings=(train_state_sh, batch_sh),
                            out_shardings=replicated)
    if self.host:
      self.step_fn, self.score_fn = self.host.train_step(self.step_fn), self.host.score_step(self.score_fn)

  def _inputs(self) -> None:
    """This process's rows of the batch, the training iterator, the evaluator."""
    t = self.exp.train
    shape = (t.batch_size, t.seq_len)
    index = self.batch_sharding.addressable_devices_indices_map(shape)
    self.rows = sorted({r for idx in index.values() for r in range(*idx[0].indices(shape[0]))})
    self.it = self.data.iterator(self.rows, t.steps, self.featurize)
    if self.host:
      self.it = self.host.prefetch(self.it)  # stages the next batch's rows during the step
    self.evaluator = Evaluator(self.exp.eval, self.data, self.score, self.generate)
    self._generator: tuple[Any, Generator | None] = (None, None)  # (the params it was built from, it)

  def restore(self, step: int | None = None, *, overwrite: bool = False) -> None:
    """The train state to start from (once, after :meth:`build`): the workdir's newest readable checkpoint
    (or ``step``'s), else step 0 (:meth:`_fresh_start`; ``train.init_from``: its weights); sets
    ``start_step`` and the iterator's position."""
    t = self.exp.train
    self.start_step = 0
    if self.workdir:
      abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                              self.train_state)
      restored = self.ckpt.restore({**abstract, "host": self.host.abstract()} if self.host else abstract,
                                   self.fingerprint, step)
      if restored is not None:
        self.train_state, meta = restored
        if self.host:
          self.host.restore(self.train_state.pop("host"))
        self.start_step = int(meta["data"]["next_step"])
        if self.start_step > t.steps:  # before the iterator (of train.steps steps) is set past its end
          raise ValueError(f"{self.workdir} has a checkpoint at step {self.start_step}, past train.steps={t.steps}; "
                           f"set train.steps >= {self.start_step}")
        self.it.set_state(meta["data"]["iterator"])
      elif step is not None:
        raise ckpt_lib.CheckpointError(f"checkpoint {step} in {self.ckpt.directory} is unreadable")
      else:
        self._fresh_start(overwrite)
    self.reached = self.start_step  # the last step dispatched (loop() advances it; :meth:`interrupted`)
    if t.init_from and self.start_step == 0:
      self._load_init_from()

  def _load_init_from(self) -> None:
    """A fresh start's step 0: ``train.init_from``'s weights (adapters: their init)."""
    params, rest = self.train_state["params"], self.train_state["rest"]
    shardings = jax.tree.map(lambda x: x.sharding, params)
    with jax.set_mesh(self.mesh):
      model = nnx.merge(self.graphdef, params, rest)
      model = nnx.merge(self.graphdef, hf.load_params(self.exp.train.init_from, model), rest)
      adapters.reset_magnitudes(model)  # DoRA's m = ‖W‖_c of the loaded W: step 0 is the loaded model
      self.train_state["params"] = jax.device_put(nnx.state(model, nnx.Param), shardings)

  def _fresh_start(self, overwrite: bool) -> None:
    """Step 0 in a workdir: refuse (unless ``overwrite``) if it holds the logs of a run that left no
    checkpoint to resume, so they are never overwritten silently; with ``overwrite``, remove them."""
    found = self._run_files()
    if not found or self.ckpt.set_aside:  # checkpoints existed but were unreadable: the run restarts
      return
    if not overwrite:
      raise ValueError(f"{self.workdir} holds a run's {', '.join(found)} but no checkpoint to resume; pass "
                       "--overwrite to start it over, or use another --workdir")
    if jax.process_index() == 0:
      for f in found:
        path = os.path.join(self.workdir, f)
        shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)

  def _run_files(self) -> list[str]:
    return [f for f in RUN_FILES if os.path.exists(os.path.join(self.workdir, f))]

  def featurize(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """``batch`` with the model's host-computed fields added (pmem.core.mixer.batch_features)."""
    return {**batch, **self.features(batch)} if self.features else batch

  def to_device(self, local: dict[str, np.ndarray], rows: Sequence[int]) -> dict[str, jax.Array]:
    """The global batch from this process's rows ``rows`` of it; ids are checked here because XLA
    gathers clamp out-of-range ids silently. Rows are ``train.seq_len`` long, or longer (evaluation probes
    beyond the length trained on)."""
    shape = (self.exp.train.batch_size, local["inputs"].shape[1])
    lo, hi = int(local["inputs"].min()), int(local["inputs"].max())
    if lo < 0 or hi >= self.exp.model.vocab:
      raise ValueError(f"batch has token ids in [{lo}, {hi}], outside [0, model.vocab={self.exp.model.vocab})")
    where = {r: i for i, r in enumerate(rows)}
    def array(x):
      pick = lambda idx: x[[where[r] for r in range(*idx[0].indices(shape[0]))]][:, idx[1]]
      return jax.make_array_from_callback(shape + x.shape[2:], self.batch_sharding, pick)
    return {k: array(local[k]) for k in self.fields}

  def score(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Per-position nll / correct of a global batch held in full by every process."""
    with jax.set_mesh(self.mesh):
      out = self.score_fn(self.train_state, self.to_device(self.featurize(batch), range(self.exp.train.batch_size)))
    return jax.device_get(out)

  def generate(self, prompts: Sequence[Sequence[int]], max_new_tokens: int, train_state: dict | None = None
               ) -> list[np.ndarray]:
    """Greedy continuations (``max_new_tokens`` tokens each) of token-id prompts under ``train_state``
    (default: the current one), in batches of ``train.batch_size`` (the last filled up with copies of
    its first prompt), by one :class:`pmem.decode.Generator` (compiled once) given the parameters
    whenever they change."""
    train_state = self.train_state if train_state is None else train_state
    if self._generator[0] is not train_state["params"]:
      model = nnx.merge(self.graphdef, train_state["params"], train_state["rest"])
      gen = self._generator[1]
      if gen is None:
        gen = Generator(model, self.data.tokenizer, max_len=self.exp.train.seq_len,
                        host_tables=self.host.tables if self.host else None, mesh=self.mesh)
      else:
        gen.set_model(model)
      self._generator = train_state["params"], gen
    gen, b, out = self._generator[1], self.exp.train.batch_size, []
    for lo in range(0, len(prompts), b):
      part = list(prompts[lo:lo + b])
      out += gen.generate(part + part[:1] * (b - len(part)), max_new_tokens).tokens[:len(part)]
    return out

  def evaluate(self) -> dict[str, float]:
    out = self.evaluator.run()
    if self.tables:
      out.update(inspect.angular_spread(self.table_samples()))
      if self.workdir and jax.process_index() == 0 and self.evaluator.histograms:
        with open(os.path.join(self.workdir, "usage_histograms.json"), "w") as f:
          json.dump(self.evaluator.histograms, f)
    if "bios/knowledge_bits" in out:  # Physics of LMs 3.3 capacity ratio, over all and active params
      out["bios/bits_per_param"] = out["bios/knowledge_bits"] / self.params_total
      out["bios/bits_per_active_param"] = out["bios/knowledge_bits"] / max(self.cost.active_params, 1)
    return out

  def table_samples(self) -> dict[str, np.ndarray]:
    """A fixed sample of rows of every memory table (device or host resident), for inspection."""
    out = {}
    for name, (path, v) in self.tables.items():
      host = self.host is not None and name in self.host.tables
      n = (self.host.tables[name] if host else v).shape[sparse.row_axis(v)]
      rows = np.sort(np.random.default_rng(0).choice(n, min(inspect.SPREAD_ROWS, n), replace=False))
      if host:
        out[name] = np.take(self.host.tables[name], rows, axis=-2)
      else:
        value = dict(nnx.to_flat_state(self.train_state["params"]))[path].get_value()
        out[name] = np.asarray(jax.device_get(jnp.take(value, rows, axis=-2)))
    return out

  def summary_header(self) -> dict[str, Any]:
    c = self.cost
    return {"params_total": self.params_total, "params_trainable": self.params_trainable,
            "optimizer_bytes": sum(x.nbytes for x in jax.tree.leaves(self.train_state["opt"])),
            "params_active_per_token": c.active_params,
            "flops_per_token": c.flops, "train_flops_per_token": accounting.train_flops(c),
            "bytes_read_per_token": c.bytes_read, "decode_state_bytes_per_sequence": self.state_bytes,
            "devices": int(np.prod(self.exp.mesh.shape)),
            "processes": jax.process_count(), "mesh": dataclasses.asdict(self.exp.mesh)}

  def finished(self) -> dict | None:
    """The stored summary of a run that already reached ``train.steps`` and was evaluated."""
    path = os.path.join(self.workdir or "", "summary.json")
    if self.start_step == self.exp.train.steps and self.workdir and os.path.exists(path):
      with open(path) as f:
        return json.load(f)
    return None

  def nan_stop(self, name: str, value: float, step: int) -> FloatingPointError:
    """The NaN stop's message: where the run can go on from, and what may change when it does."""
    o = self.exp.train.optim
    kept = self.ckpt.committed() if self.ckpt else []
    where = (f"rerunning resumes from the newest checkpoint, step {kept[-1]}" if kept else
             "no checkpoint was saved yet, so a rerun starts over")
    fix = f"a lower set:train.optim.lr (now {o.lr:g})" + (
        "" if o.clip_norm is not None else " or clipping, set:train.optim.clip_norm=1.0")
    return FloatingPointError(f"{name} is {value} at step {step}; stopped before saving it; {where}; "
                              f"a resumed run may change the learning rate and clipping: try {fix}")

  def interrupted(self, command: str) -> str:
    """The Ctrl-C line (after :meth:`run`'s saves finished): the step reached, the newest checkpoint
    and how to go on (``command``: the one that started the run)."""
    kept = self.ckpt.committed() if self.ckpt else []
    if kept:
      where = (f"the last checkpoint is step {kept[-1]} ({os.path.join(self.ckpt.directory, str(kept[-1]))}); "
               f"resume with: {command}")
    else:  # logs without a checkpoint refuse a plain rerun
      where = f"no checkpoint was saved yet; start over with: {command}" + (
          " --overwrite" if self.workdir and self._run_files() else "")
    return f"pmem: interrupted at step {self.reached} of {self.exp.train.steps}; {where}"

  def run(self) -> dict[str, Any]:
    """:meth:`loop` then :meth:`report`; a run that reached ``train.steps`` and was evaluated reports its
    stored summary and changes nothing."""
    if (done := self.finished()) is None:
      return self.report(self.loop())
    if jax.process_index() == 0:
      print(f"pmem: {self.workdir} finished {self.exp.train.steps} steps already; stored results: "
            + json.dumps({k: v for k, v in done.get("eval", {}).items() if k.count("/") == 1}), flush=True)
    if self.ckpt is not None:
      self.ckpt.close()
    return done

  def loop(self) -> dict[str, Any]:
    """Trains from ``start_step`` to ``train.steps``: logs, checkpoints, evaluations; the outcome (final loss,
    steady tokens/s, seconds waiting for data, the last evaluation's results) for :meth:`report`."""
    t, ev, lead = self.exp.train, self.exp.eval, jax.process_index() == 0
    final_only = self.start_step == t.steps  # stopped during the last evaluation: only that is left
    log = _Writer(self.workdir if lead else None, self.start_step, final_only)
    if lead:
      self._announce()
    bar = _progress(t.steps, self.start_step, lead and t.progress)
    meter = _Meter(t.batch_size * t.seq_len, self.start_step)
    results: dict[str, float] = {}
    pending = None  # (step, metrics) of a logged step whose metrics are read once the next step is dispatched

    def logged(step: int, m: dict[str, float]) -> None:
      m = {**m, **meter.interval(step)}
      log.metrics({"step": step, **m})
      bar.set_postfix(step=step, loss=f"{m['loss']:.4f}", tok_s=f"{m['tokens_per_s']:.0f}")

    def evaluate(step: int) -> dict[str, float]:
      out = self.evaluate()
      if out:
        log.metrics({"step": step, **out})
      return out

    try:
      with jax.set_mesh(self.mesh):
        for s in range(self.start_step, t.steps):
          batch = meter.data(lambda: self.to_device(next(self.it), self.rows))
          self.train_state, metrics = self.step_fn(self.train_state, batch)
          step = self.reached = s + 1
          if pending is not None:  # the previous step's metrics, read while this step runs
            logged(pending[0], self._read(meter, *pending))
            pending = None
          if self.ckpt is not None:
            self.ckpt.check()  # an asynchronous save that failed stops the run by the next step
          log_now = step % t.log_every == 0 or step == t.steps
          save_now = self.ckpt is not None and self.ckpt.should_save(step, t.steps)
          eval_now = step == t.steps or (ev.every and step % ev.every == 0)
          if save_now or eval_now:  # read now: a checkpoint is saved only after its step proved finite
            m = self._read(meter, step, metrics)
            if log_now:
              logged(step, m)
          elif log_now:
            pending = step, metrics
          if save_now:
            self._save(step)
          if eval_now:
            results = evaluate(step)
            meter.skip()  # evaluation time is not training throughput
          bar.update(1)
        if final_only:
          results = evaluate(t.steps)
    finally:
      bar.close()
      log.close()
      if self.ckpt is not None:
        self.ckpt.close()
    return {"final_loss": log.last_loss, "steps": t.steps, "tokens_per_s": meter.steady(),
            "data_seconds": meter.data_total, "eval": results}

  def _announce(self) -> None:
    """The run's header line (:meth:`summary_header`) and where it resumed from."""
    head = self.summary_header()
    print("pmem: " + ", ".join(f"{k}={v:,}" if isinstance(v, int) else f"{k}={v}" for k, v in head.items()),
          flush=True)
    if self.start_step:
      print(f"pmem: resumed from the step-{self.start_step} checkpoint in {self.ckpt.directory}", flush=True)

  def _read(self, meter: _Meter, step: int, metrics) -> dict[str, float]:
    """A step's metrics on the host; the NaN stop."""
    m = meter.read(metrics)
    # the loss is that of the parameters entering this step, param_norm that of the parameters it produced
    if bad := [k for k in ("loss", "param_norm") if not math.isfinite(m[k])]:
      raise self.nan_stop(bad[0], m[bad[0]], step)
    return m

  def _save(self, step: int) -> None:
    """Saves the train state, the iterator's position and the schedule's horizon; tables are saved without
    a copy (``sync_save``): finished before the next step writes them."""
    train_state = {**self.train_state, "host": self.host.arrays()} if self.host else self.train_state
    self.ckpt.save(step, train_state, {"data": {"next_step": step, "iterator": self.it.get_state()},
                                       "schedule_steps": self.schedule_steps}, wait=self.sync_save)

  def report(self, outcome: dict[str, Any]) -> dict[str, Any]:
    """The summary of :meth:`loop`'s ``outcome`` (after :meth:`summary_header`): written to summary.json
    and its headline printed by process 0."""
    summary = {**self.summary_header(), **outcome}
    if jax.process_index() == 0:
      if self.workdir:
        with open(os.path.join(self.workdir, "summary.json"), "w") as f:
          json.dump(summary, f, indent=2)
      brief = {k: v for k, v in outcome["eval"].items() if k.count("/") == 1}
      print("pmem: " + json.dumps({"final_loss": summary["final_loss"], "tokens_per_s": summary["tokens_per_s"],
                                   **brief}), flush=True)
    return summary


class _Meter:
  """The loop's clock: per logged interval tokens/s and the fractions of wall time spent waiting for
  batches (``data``) and blocked reading metrics (``read``); the median steady tokens/s."""

  def __init__(self, tokens: int, start_step: int):
    self.tokens, self.start, self.last_step, self.tokens_per_s = tokens, start_step, start_step, []
    self.data_s = self.sync_s = self.data_total = 0.0
    self.last_t = time.perf_counter()

  def data(self, next_batch):
    t0 = time.perf_counter()
    batch = next_batch()
    self.data_s += time.perf_counter() - t0
    return batch

  def read(self, metrics) -> dict[str, float]:
    t0 = time.perf_counter()
    m = {k: float(v) for k, v in jax.device_get(metrics).items()}
    self.sync_s += time.perf_counter() - t0
    return m

  def skip(self) -> None:
    """Leaves the time until now (an evaluation) out of the interval."""
    self.last_t = time.perf_counter()

  def interval(self, step: int) -> dict[str, float]:
    """The interval since the last logged step, ending at ``step``."""
    now = time.perf_counter()
    out = {"tokens_per_s": self.tokens * (step - self.last_step) / (now - self.last_t),
           "data_fraction": self.data_s / (now - self.last_t),  # time waiting for batches / wall time
           "sync_fraction": self.sync_s / (now - self.last_t)}  # time blocked reading metrics / wall time
    self.data_total, self.data_s, self.sync_s = self.data_total + self.data_s, 0.0, 0.0
    if self.last_step > self.start:  # exclude the compiling first interval
      self.tokens_per_s.append(out["tokens_per_s"])
    self.last_t, self.last_step = now, step
    return out

  def steady(self) -> float | None:
    return float(np.median(self.tokens_per_s)) if self.tokens_per_s else None


def _abstract(init):
  """Abstract (graphdef, params, rest, cost) without allocating parameters."""
  out = {}
  def shapes():
    graphdef, params, rest, cost = init()
    out.update(graphdef=graphdef, cost=cost)
    return params, rest
  params, rest = jax.eval_shape(shapes)
  return out["graphdef"], params, rest, out["cost"]


class _Writer:
  """metrics.jsonl (appended to on resume, dropping rows past the restored step) and TensorBoard
  scalars under ``tb/`` (a new event file per run; on resume it starts with a ``SessionLog.START``
  that purges the earlier files' steps past the restored one); written by process 0 only."""

  def __init__(self, workdir: str | None, start_step: int, final_only: bool = False):
    self.workdir, self.last_loss = workdir, None
    if not workdir:
      return
    os.makedirs(workdir, exist_ok=True)
    path = os.path.join(workdir, "metrics.jsonl")
    rows = []
    if start_step and os.path.exists(path):  # ``final_only``: the last evaluation's row is written again
      rows = [r for r in map(json.loads, open(path).read().splitlines())
              if r["step"] < start_step or (r["step"] == start_step and ("loss" in r or not final_only))]
      self.last_loss = next((r["loss"] for r in reversed(rows) if "loss" in r), None)
    self.f = open(path, "w")
    for r in rows:
      self.f.write(json.dumps(r) + "\n")
    from tensorboard.compat.proto import event_pb2
    from tensorboard.summary.writer.event_file_writer import EventFileWriter  # TF-free writer
    earlier = os.path.isdir(os.path.join(workdir, "tb")) and os.listdir(os.path.join(workdir, "tb"))
    self.tb = EventFileWriter(os.path.join(workdir, "tb"))
    if earlier:  # TensorBoard drops the earlier files' events from this step on (a killed run's tail)
      self.tb.add_event(event_pb2.Event(wall_time=time.time(), step=start_step + 1,
                                        session_log=event_pb2.SessionLog(status=event_pb2.SessionLog.START)))

  def metrics(self, m: dict) -> None:
    self.last_loss = m.get("loss", self.last_loss)
    if self.workdir:
      self.f.write(json.dumps(m) + "\n")
      self.f.flush()
      from tensorboard.compat.proto import event_pb2, summary_pb2
      values = [summary_pb2.Summary.Value(tag=k if "/" in k else f"train/{k}", simple_value=v)
                for k, v in m.items() if k != "step"]
      self.tb.add_event(event_pb2.Event(wall_time=time.time(), step=m["step"], summary=summary_pb2.Summary(value=values)))
      self.tb.flush()

  def close(self) -> None:
    if self.workdir:
      self.f.close()
      self.tb.close()


def _progress(total: int, initial: int, enabled: bool):
  """A tqdm bar on a terminal; plain lines (one per logged step) when stderr is a file or pipe."""
  if enabled and not sys.stderr.isatty():
    return _Lines(total, initial)
  from tqdm.auto import tqdm
  return tqdm(total=total, initial=initial, disable=not enabled, unit="step", dynamic_ncols=True)


class _Lines:

  def __init__(self, total: int, initial: int):
    self.total, self.n, self.start, self.t0 = total, initial, initial, time.perf_counter()

  def update(self, n: int) -> None:
    self.n += n

  def set_postfix(self, step: int, **kw) -> None:
    done = max(self.n, step) - self.start  # a logged step is shown just before or after its update()
    eta = (time.perf_counter() - self.t0) / max(done, 1) * (self.total - self.start - done)
    fields = " ".join(f"{k}={v}" for k, v in kw.items())
    print(f"step {step}/{self.total} {fields} eta={eta:.0f}s", file=sys.stderr, flush=True)

  def close(self) -> None:
    pass
