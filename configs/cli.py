"""Ordered config commands: ``config:NAME``, ``fiddler:NAME[(k=v, ...)]``, ``set:PATH=VALUE``.
``config:DIR`` starts from a workdir's ``config.json`` (an imported model's, ``experiments.convert``,
or another run's).

Every mistake is one line naming the bad part and suggesting close matches. Values are checked
against their annotations (``int``, ``float``, ``X | None``, ``Literal``, ``tuple[...]``, nested; of
dataclass fields and of module constructors' arguments) and the ranges in :data:`RULES` when set,
and the whole config once more after the last command (values fiddlers set, attention heads), all
before anything runs."""

from __future__ import annotations

import ast
import collections.abc
import dataclasses
import functools
import inspect
import os
import types
import typing
from collections.abc import Callable
from typing import Any

import fiddle as fdl

import configs
import kernels
from pmem.core.mesh import MeshConfig
from pmem.core.registry import suggest, unknown
from pmem.data import corpus as corpus_lib, tokenizer as tok_lib
from pmem.data.pipeline import DataConfig
from pmem.data.tasks.bios import BiosConfig
from pmem.data.tasks.mqar import MqarConfig
from pmem.data.tasks.passkey import PasskeyConfig
from pmem.models.decoder import REMAT_POLICIES, DecoderConfig
from pmem.train import optim, sparse
from pmem.train.checkpoint import CheckpointConfig
from pmem.train.evaluate import EvalConfig
from pmem.train.loop import Experiment, TrainConfig


class ConfigError(ValueError):
  pass


# ------------------------------------------------------------------------------ value rules


@dataclasses.dataclass(frozen=True)
class Rule:
  """What a field's value (each element of a tuple) must be; ``None`` passes where the type allows it."""
  ok: Callable[[Any], bool]
  text: str
  choices: tuple = ()  # a choice of values: reported instead of the type


def _at_least(n) -> Rule:
  return Rule(lambda v: v >= n, f">= {n}")


def _above(x) -> Rule:
  return Rule(lambda v: v > x, f"> {x}")


def _one_of(*choices) -> Rule:
  return Rule(lambda v: v in choices, "one of " + ", ".join(map(repr, choices)), choices)


SIZE, OFF_OR_MORE, POSITIVE = _at_least(1), _at_least(0), _above(0)  # OFF_OR_MORE: 0 = off / none
UNIT, BETA = Rule(lambda v: 0 <= v <= 1, "in [0, 1]"), Rule(lambda v: 0 <= v < 1, "in [0, 1)")
RULES: dict[Any, dict[str, Rule]] = {  # config class -> field -> rule
    Experiment: {"seed": OFF_OR_MORE},
    TrainConfig: {"steps": SIZE, "schedule_steps": SIZE, "batch_size": SIZE, "seq_len": SIZE, "log_every": SIZE,
                  "z_loss": OFF_OR_MORE, "loss_chunk": OFF_OR_MORE},
    optim.OptimConfig: {"lr": POSITIVE, "warmup_steps": OFF_OR_MORE, "min_lr_ratio": UNIT, "b1": BETA, "b2": BETA,
                        "eps": POSITIVE, "weight_decay": OFF_OR_MORE, "clip_norm": POSITIVE},
    optim.TableOptimConfig: {"update": _one_of(*optim.UPDATES), "optimizer": _one_of(*sparse.OPTIMIZERS),
                             "sparse_min_rows": OFF_OR_MORE, "lr_mult": OFF_OR_MORE, "weight_decay": OFF_OR_MORE,
                             "clip_norm": POSITIVE, "b1": BETA, "b2": BETA, "adagrad_init": OFF_OR_MORE,
                             "device_budget_bytes": OFF_OR_MORE, "max_unique": SIZE,
                             "implementation": _one_of(*sparse.ROW_IMPLEMENTATIONS)},
    MeshConfig: {"data": SIZE, "fsdp": SIZE, "tensor": SIZE},
    DataConfig: {"corpus": _one_of(*corpus_lib.CORPORA, None), "corpus_weight": OFF_OR_MORE, "prefetch": OFF_OR_MORE},
    tok_lib.TokenizerConfig: {"kind": _one_of(*tok_lib.KINDS), "vocab_size": SIZE},
    BiosConfig: {"n_people": SIZE, "n_heldout_templates": OFF_OR_MORE, "weight": POSITIVE},
    MqarConfig: {"vocab_size": SIZE, "seq_len": SIZE, "num_kv_pairs": SIZE, "power_a": POSITIVE, "n_train": SIZE,
                 "n_test": SIZE, "weight": POSITIVE},
    PasskeyConfig: {"lengths": SIZE, "depths": UNIT, "digits": SIZE, "n_train": SIZE, "n_eval": SIZE,
                    "weight": POSITIVE},
    CheckpointConfig: {"every": OFF_OR_MORE, "keep": SIZE, "keep_period": SIZE},
    EvalConfig: {"every": OFF_OR_MORE, "valid_batches": OFF_OR_MORE, "bios_people": OFF_OR_MORE,
                 "mqar_examples": OFF_OR_MORE},
    DecoderConfig: {"vocab": SIZE, "d_model": SIZE, "n_layers": SIZE, "norm_eps": POSITIVE, "scan_unroll": SIZE,
                    "remat": _one_of(*REMAT_POLICIES), "kernel_impl": _one_of(*kernels.IMPLEMENTATIONS)},
}
# arguments of module constructors and other factories, by name: widths, counts and sizes
MODULE_RULES = {**dict.fromkeys(("vocab", "d_model", "d_ff", "d_mem", "d_k", "d_v", "head_dim", "n_heads", "n_kv_heads",
                                 "heads", "n_keys", "n_slots", "k", "branches", "max_order", "gate_channels",
                                 "table_sizes", "n_memories", "topk"), SIZE),
                "rope_theta": POSITIVE, "eps": POSITIVE, "balance": OFF_OR_MORE}


def _rule(fn, name: str) -> Rule | None:
  return RULES.get(fn, {}).get(name) if dataclasses.is_dataclass(fn) else MODULE_RULES.get(name)


def _target(fn):
  """What ``fn``'s arguments are read from: a class's own ``__init__`` (a dataclass's fields)."""
  return fn.__init__ if isinstance(fn, type) and not dataclasses.is_dataclass(fn) else fn


@functools.cache
def _hints(fn) -> dict[str, Any]:
  try:
    return typing.get_type_hints(_target(fn))
  except Exception:  # unresolvable annotations: nothing to check against
    return {}


def _fits(v, hint) -> bool:
  """Whether ``v`` has type ``hint``; a sub-config (Buildable) fits, its own fields are checked."""
  origin, args = typing.get_origin(hint), typing.get_args(hint)
  if isinstance(v, fdl.Buildable) or hint is Any or isinstance(hint, typing.TypeVar):
    return True
  if origin in (typing.Union, types.UnionType):
    return any(_fits(v, a) for a in args)
  if origin is typing.Literal:
    return v in args
  if hint in (int, float):
    return isinstance(v, (int, float) if hint is float else int) and not isinstance(v, bool)
  if origin is tuple:
    if not isinstance(v, tuple):
      return False
    if len(args) == 2 and args[1] is Ellipsis:
      return all(_fits(x, args[0]) for x in v)
    return not args or (len(args) == len(v) and all(map(_fits, v, args)))
  if origin is collections.abc.Sequence:
    return isinstance(v, collections.abc.Sequence) and not isinstance(v, str) and all(_fits(x, args[0]) for x in v)
  if origin is collections.abc.Callable or hint is collections.abc.Callable:
    return callable(v)
  if isinstance(origin or hint, type):
    return isinstance(v, origin or hint)
  return True  # a type this checker does not know


def _name(hint) -> str:
  if typing.get_origin(hint) in (typing.Union, types.UnionType):
    return " | ".join(map(_name, typing.get_args(hint)))
  if hint is type(None):
    return "None"
  return hint.__name__ if isinstance(hint, type) else str(hint).replace("typing.", "").replace("collections.abc.", "")


def _check(where: str, fn, name: str, value) -> None:
  """A ConfigError where ``value`` has not the type, or is outside the range, of argument ``name`` of ``fn``."""
  rule, hint = _rule(fn, name), _hints(fn).get(name)
  if rule is not None and rule.choices:
    if value not in rule.choices:
      close = suggest(value, [c for c in rule.choices if isinstance(c, str)]) if isinstance(value, str) else ""
      raise ConfigError(f"{where}: expected {rule.text}, got {value!r}{close}")
    return
  if hint is not None and not _fits(value, hint):
    raise ConfigError(f"{where}: expected {_name(hint)}, got {value!r}")
  nums = [x for x in (value if isinstance(value, (tuple, list)) else (value,))
          if isinstance(x, (int, float)) and not isinstance(x, bool)]
  if rule is not None and not all(map(rule.ok, nums)):
    raise ConfigError(f"{where}: must be {rule.text}, got {value!r}")


def _heads(where: str, b: fdl.Buildable, d_model) -> None:
  """Heads of an attention-like factory (arguments ``d_model``, ``n_heads``, ``n_kv_heads``,
  ``head_dim``): ``n_kv_heads`` divides ``n_heads``, which divides the model width unless ``head_dim``
  is set."""
  params = inspect.signature(_target(fdl.get_callable(b))).parameters
  if not {"d_model", "n_heads", "n_kv_heads", "head_dim"} <= set(params):
    return
  args = {k: p.default for k, p in params.items()} | {"d_model": d_model} | b.__arguments__
  d, n, kv, h = (args[k] for k in ("d_model", "n_heads", "n_kv_heads", "head_dim"))
  if not all(isinstance(x, int) and x >= 1 for x in (n, kv)):
    return
  if n % kv:
    raise ConfigError(f"{where}: n_heads={n} must be a multiple of n_kv_heads={kv}")
  if h is None and isinstance(d, int) and d % n:
    raise ConfigError(f"{where}: d_model={d} is not a multiple of n_heads={n}; change one or set {where}.head_dim")


def _walk(x, path: str, d_model) -> None:
  """Checks every value set in ``x`` and the configs inside it (also inside tuples)."""
  if isinstance(x, (tuple, list)):
    for i, y in enumerate(x):
      _walk(y, f"{path}[{i}]", d_model)
    return
  if isinstance(x, fdl.Buildable):
    fn, values = fdl.get_callable(x), x.__arguments__
  elif dataclasses.is_dataclass(x) and not isinstance(x, type):
    fn, values = type(x), {f.name: getattr(x, f.name) for f in dataclasses.fields(x)}
  else:
    return
  for name, value in values.items():
    sub = f"{path}.{name}" if path else name
    _check(sub, fn, name, value)
    _walk(value, sub, d_model)
  if isinstance(x, fdl.Buildable):
    _heads(path, x, d_model)


def validate(cfg: fdl.Buildable) -> None:
  """Types and ranges of every value in ``cfg`` and the attention heads; a ConfigError naming the first bad one."""
  model = cfg.__arguments__.get("model")
  _walk(cfg, "", model.__arguments__.get("d_model") if isinstance(model, fdl.Buildable) else None)


def _args(b: fdl.Buildable) -> list[str]:
  sig = inspect.signature(_target(fdl.get_callable(b)))
  return [n for n, p in sig.parameters.items()
          if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD) and n not in ("rngs", "self")]


def _child(b: fdl.Buildable, name: str):
  """The sub-config at ``name``; a dataclass default is turned into a Config so it can be edited."""
  value = getattr(b, name)
  if dataclasses.is_dataclass(value) and not isinstance(value, type):
    value = fdl.Config(type(value), **{f.name: getattr(value, f.name) for f in dataclasses.fields(value)})
    setattr(b, name, value)
  return value


def built(value, path: str = "") -> list[str]:
  """``"path: module.Class"`` for every Buildable under ``value`` (tuples, lists, dicts followed; ``Partial``
  marked), outermost first: what ``config.txt`` records, since the flattened values alone do not say which
  class a node builds (two mixers with the same arguments print alike)."""
  if isinstance(value, fdl.Buildable):
    fn = fdl.get_callable(value)
    kind = " (Partial)" if isinstance(value, fdl.Partial) else ""
    out = [f"{path or '<root>'}: {fn.__module__}.{fn.__qualname__}{kind}"]
    items = fdl.ordered_arguments(value).items()
  elif isinstance(value, (list, tuple)):
    out, items = [], enumerate(value)
  elif isinstance(value, dict):
    out, items = [], value.items()
  else:
    return []
  for k, v in items:
    out += built(v, f"{path}.{k}" if path else str(k))
  return out


def paths(b: fdl.Buildable, prefix: str = "") -> list[str]:
  """Every settable path under ``b``."""
  out = []
  for name in _args(b):
    value = getattr(b, name, None)
    if isinstance(value, fdl.Buildable) or (dataclasses.is_dataclass(value) and not isinstance(value, type)):
      out += paths(_child(b, name), f"{prefix}{name}.")
    else:
      out.append(prefix + name)
  return out


def set_path(cfg: fdl.Config, path: str, value) -> None:
  obj, parts = cfg, path.split(".")
  for i, part in enumerate(parts):
    if not isinstance(obj, fdl.Buildable) or part not in _args(obj):
      raise ConfigError(f"unknown config path {path!r}{suggest(path, paths(cfg))}")
    if i == len(parts) - 1:
      _check(f"set:{path}", fdl.get_callable(obj), part, value)
      setattr(obj, part, value)
    else:
      obj = _child(obj, part)


def _value(text: str):
  try:
    return ast.literal_eval(text)
  except (ValueError, SyntaxError):
    return text


def _call(text: str) -> tuple[str, dict]:
  """``name`` or ``name(k=v, ...)`` with literal values."""
  if "(" not in text:
    return text, {}
  node = ast.parse(text, mode="eval").body
  if not isinstance(node, ast.Call) or not isinstance(node.func, ast.Name) or node.args:
    raise ConfigError(f"bad fiddler call {text!r}; use fiddler:NAME or fiddler:NAME(key=value, ...)")
  return node.func.id, {k.arg: ast.literal_eval(k.value) for k in node.keywords}


def stored(workdir: str) -> fdl.Config:
  """The Fiddle config a workdir's ``config.json`` holds."""
  from fiddle.experimental import serialization
  with open(os.path.join(workdir, "config.json")) as f:
    try:
      return serialization.load_json(f.read())
    except Exception as e:  # fiddle raises several types for a bad file
      raise ConfigError(f"{workdir}/config.json does not read as a Fiddle config ({type(e).__name__})") from None


def build_config(commands: list[str]) -> fdl.Config:
  """Applies the commands in order; the first must be ``config:NAME`` or ``config:DIR``."""
  configs.load_all()
  cfg = None
  for cmd in commands:
    kind, sep, arg = cmd.partition(":")
    if not sep or kind not in ("config", "fiddler", "set"):
      raise ConfigError(f"bad --config {cmd!r}; use config:NAME, fiddler:NAME or set:PATH=VALUE")
    if kind == "config":
      if cfg is not None:
        raise ConfigError(f"config:{arg} given after another config:; give exactly one, first")
      if arg in configs.CONFIGS:
        cfg = configs.CONFIGS[arg]()
      elif os.path.isfile(os.path.join(arg, "config.json")):
        cfg = stored(arg)
      else:
        raise ConfigError(f"{unknown('config', arg, configs.CONFIGS)}; see --list (nor a workdir holding "
                          "config.json)")
      continue
    if cfg is None:
      raise ConfigError(f"--config {cmd!r} comes before config:NAME; start with config:NAME")
    if kind == "fiddler":
      name, kwargs = _call(arg)
      if name not in configs.FIDDLERS:
        raise ConfigError(f"{unknown('fiddler', name, configs.FIDDLERS)}; see --list")
      fn = configs.FIDDLERS[name]
      bad = set(kwargs) - set(inspect.signature(fn).parameters)
      if bad:
        raise ConfigError(f"fiddler {name!r} takes no argument {sorted(bad)[0]!r}")
      try:
        inspect.signature(fn).bind(cfg, **kwargs)
      except TypeError as e:  # a required argument missing
        raise ConfigError(f"fiddler {name!r}: {e}") from None
      fn(cfg, **kwargs)
    else:
      path, eq, text = arg.partition("=")
      if not eq:
        raise ConfigError(f"bad set:{arg!r}; use set:PATH=VALUE")
      set_path(cfg, path.strip(), _value(text.strip()))
  if cfg is None:
    raise ConfigError("no config given; pass --config config:NAME (see --list)")
  validate(cfg)
  return cfg


def listing() -> str:
  configs.load_all()
  rows = [(f"{r.kind}:{n}", r.doc(n)) for r in (configs.CONFIGS, configs.FIDDLERS) for n in sorted(r)]
  w = max(len(r[0]) for r in rows)
  return "\n".join(f"{a:<{w}}  {b}" for a, b in rows)
