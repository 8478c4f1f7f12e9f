"""Ordered config commands: ``config:NAME``, ``fiddler:NAME[(k=v, ...)]``, ``set:PATH=VALUE``.

Every mistake is one line naming the bad part and suggesting close matches."""

from __future__ import annotations

import ast
import dataclasses
import inspect
import typing

import fiddle as fdl

import configs
from pmem.core.registry import suggest


class ConfigError(ValueError):
  pass


def _args(b: fdl.Buildable) -> list[str]:
  fn = fdl.get_callable(b)
  sig = inspect.signature(fn.__init__ if isinstance(fn, type) and not dataclasses.is_dataclass(fn) else fn)
  return [n for n, p in sig.parameters.items()
          if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD) and n not in ("rngs", "self")]


def _child(b: fdl.Buildable, name: str):
  """The sub-config at ``name``; a dataclass default is turned into a Config so it can be edited."""
  value = getattr(b, name)
  if dataclasses.is_dataclass(value) and not isinstance(value, type):
    value = fdl.Config(type(value), **{f.name: getattr(value, f.name) for f in dataclasses.fields(value)})
    setattr(b, name, value)
  return value


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


def _check_type(path: str, b: fdl.Buildable, name: str, value) -> None:
  fn = fdl.get_callable(b)
  try:
    hint = typing.get_type_hints(fn).get(name) if dataclasses.is_dataclass(fn) else None
  except Exception:  # unresolvable annotations: nothing to check against
    hint = None
  simple = {int: (int,), float: (int, float), bool: (bool,), str: (str,)}
  if hint in simple and not (isinstance(value, simple[hint]) and not (hint is not bool and isinstance(value, bool))):
    raise ConfigError(f"set:{path}: expected {hint.__name__}, got {value!r}")


def set_path(cfg: fdl.Config, path: str, value) -> None:
  obj, parts = cfg, path.split(".")
  for i, part in enumerate(parts):
    if not isinstance(obj, fdl.Buildable) or part not in _args(obj):
      raise ConfigError(f"unknown config path {path!r}{suggest(path, paths(cfg))}")
    if i == len(parts) - 1:
      _check_type(path, obj, part, value)
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


def build_config(commands: list[str]) -> fdl.Config:
  """Applies the commands in order; the first must be ``config:NAME``."""
  configs.load_all()
  cfg = None
  for cmd in commands:
    kind, sep, arg = cmd.partition(":")
    if not sep or kind not in ("config", "fiddler", "set"):
      raise ConfigError(f"bad --config {cmd!r}; use config:NAME, fiddler:NAME or set:PATH=VALUE")
    if kind == "config":
      if cfg is not None:
        raise ConfigError(f"config:{arg} given after another config:; give exactly one, first")
      if arg not in configs.CONFIGS:
        raise ConfigError(f"unknown config {arg!r}{suggest(arg, configs.CONFIGS)} (see --list)")
      cfg = configs.CONFIGS[arg][0]()
      continue
    if cfg is None:
      raise ConfigError(f"--config {cmd!r} comes before config:NAME; start with config:NAME")
    if kind == "fiddler":
      name, kwargs = _call(arg)
      if name not in configs.FIDDLERS:
        raise ConfigError(f"unknown fiddler {name!r}{suggest(name, configs.FIDDLERS)} (see --list)")
      fn = configs.FIDDLERS[name][0]
      bad = set(kwargs) - set(inspect.signature(fn).parameters)
      if bad:
        raise ConfigError(f"fiddler {name!r} takes no argument {sorted(bad)[0]!r}")
      fn(cfg, **kwargs)
    else:
      path, eq, text = arg.partition("=")
      if not eq:
        raise ConfigError(f"bad set:{arg!r}; use set:PATH=VALUE")
      set_path(cfg, path.strip(), _value(text.strip()))
  if cfg is None:
    raise ConfigError("no config given; pass --config config:NAME (see --list)")
  return cfg


def listing() -> str:
  configs.load_all()
  rows = [("config:" + n, d) for n, (_, d) in sorted(configs.CONFIGS.items())]
  rows += [("fiddler:" + n, d) for n, (_, d) in sorted(configs.FIDDLERS.items())]
  w = max(len(r[0]) for r in rows)
  return "\n".join(f"{a:<{w}}  {b}" for a, b in rows)
