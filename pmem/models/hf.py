"""Hugging Face Llama-family checkpoints <-> pmem's dense decoder: configs, tensors and files.

**Models.** ``LlamaForCausalLM`` (GQA, any ``head_dim``, tied or untied embeddings) and
``Qwen2ForCausalLM`` (the same with q/k/v biases, no output bias: ``Attention(qkv_bias=True)``) are
a :class:`pmem.models.decoder.Decoder` whose layers are all ``attention`` + ``swiglu`` of one shape.
config.json -> pmem (:func:`fields`): ``vocab_size`` -> vocab, ``hidden_size`` -> d_model,
``num_hidden_layers`` -> n_layers, ``num_attention_heads`` -> n_heads, ``num_key_value_heads``
(default n_heads) -> n_kv_heads, ``head_dim`` (default hidden_size / heads) -> head_dim,
``intermediate_size`` -> d_ff, ``rms_norm_eps`` (default 1e-6) -> norm_eps, ``rope_parameters.rope_theta``
(or the older top-level ``rope_theta``; default 10000) -> rope_theta, ``tie_word_embeddings``
(default false) -> tie_embeddings, Qwen2 -> qkv_bias. Refused with a one-line ``ValueError``: other
model types, ``hidden_act`` other than silu, scaled or partial RoPE (``rope_type`` other than
default, ``partial_rotary_factor``), Llama's ``attention_bias`` / ``mlp_bias``, Qwen2's sliding window
(``use_sliding_window``, a ``sliding_attention`` layer type). Dropout, ``max_position_embeddings``
(pmem's RoPE has no limit), ``pretraining_tp`` and token ids do not change the function; an
export keeps them from the source config. RoPE and RMSNorm are the same functions on both sides:
rotate_half over the pairs ``(i, i + h/2)`` with ``inv_freq = theta^(-2i/h)`` (no permutation of
q/k), statistics in float32 times the weight.

**Tensors.** PyTorch ``Linear`` weights are ``[out, in]``; pmem keeps ``[in..., out...]`` (``wq [d,
n, h]``, ``wo [n, h, d]``, biases ``[n, h]``): a transpose and a reshape each way, with the blocks
stacked (scanned) or separate (:func:`pmem.models.decoder.block_paths`). pmem's parameters are
float32; a bfloat16 / float16 source converts exactly, so import -> export in the source's dtypes
is bit-exact (``experiments.convert --to-hf`` writes float32 unless ``--dtype source`` or
``bfloat16``). A tied model stores no ``lm_head.weight``.

**Files.** ``config.json`` and ``model.safetensors``, or shards listed by
``model.safetensors.index.json``, read with ``safetensors``' NumPy API (bfloat16 as
``ml_dtypes.bfloat16``; a truncated or garbled file is a one-line ValueError naming it). An export
writes one ``model.safetensors`` (metadata ``format: pt``, as transformers writes) and a
``config.json``: the source's (of an imported model) with the fields above replaced, else a new
one; ``Qwen2ForCausalLM`` when attention has biases, else ``LlamaForCausalLM``."""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file

from pmem.core.variables import name_of
from pmem.layers import adapters
from pmem.layers.attention import Attention
from pmem.layers.mlp import SwiGLU
from pmem.models.decoder import Decoder, block_paths

ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}
CONFIG, WEIGHTS, INDEX = "config.json", "model.safetensors", "model.safetensors.index.json"
DTYPES = {"F32": np.float32, "F16": np.float16, "BF16": jnp.bfloat16, "F64": np.float64}

# HF name, pmem path below the block / model, pmem's leading input axes of a Linear (0: a vector,
# None: the same layout)
LAYER = (("input_layernorm.weight", ("norm_seq", "scale"), 0),
         ("post_attention_layernorm.weight", ("norm_ch", "scale"), 0),
         *((f"self_attn.{x}_proj.weight", ("seq", f"w{x}"), 1) for x in "qkv"),
         ("self_attn.o_proj.weight", ("seq", "wo"), 2),
         ("mlp.gate_proj.weight", ("ch", "w_gate"), 1), ("mlp.up_proj.weight", ("ch", "w_up"), 1),
         ("mlp.down_proj.weight", ("ch", "w_down"), 1))
BIASES = tuple((f"self_attn.{x}_proj.bias", ("seq", f"b{x}"), 0) for x in "qkv")
TOP = (("model.embed_tokens.weight", ("embed", "table"), None), ("model.norm.weight", ("norm_out", "scale"), 0))
HEAD = ("lm_head.weight", ("head",), 1)


# ------------------------------------------------------------------------------------ configs


def read_config(directory: str) -> dict:
  """A checkpoint directory's config.json; FileNotFoundError (one line) if there is none."""
  if not os.path.isdir(directory):
    raise FileNotFoundError(f"{directory} is not a directory")
  path = os.path.join(directory, CONFIG)
  if not os.path.exists(path):
    raise FileNotFoundError(f"{directory} has no {CONFIG}; is it a Hugging Face checkpoint?")
  with open(path) as f:
    try:
      return json.load(f)
    except json.JSONDecodeError as e:
      raise ValueError(f"{path} is not JSON ({e})") from None


def _rope_theta(cfg: dict) -> float:
  rope = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
  if rope and all(isinstance(v, dict) for v in rope.values()):  # per layer type
    kinds = {json.dumps(v, sort_keys=True) for v in rope.values()}
    if len(kinds) > 1:
      raise ValueError("RoPE parameters that differ between layer types are not supported")
    rope = next(iter(rope.values()))
  kind = rope.get("rope_type", rope.get("type", "default"))
  if kind != "default":
    raise ValueError(f"RoPE scaling rope_type={kind!r} is not supported (only the default RoPE)")
  if rope.get("partial_rotary_factor", cfg.get("partial_rotary_factor", 1.0)) != 1.0:
    raise ValueError("partial rotary embeddings (partial_rotary_factor) are not supported")
  return float(rope.get("rope_theta", cfg.get("rope_theta", 10000.0)))


def fields(cfg: dict) -> dict:
  """pmem's model settings for a HF config (module docstring): ``vocab, d_model, n_layers,
  tie_embeddings, norm_eps`` (DecoderConfig), ``n_heads, n_kv_heads, head_dim, rope_theta,
  qkv_bias`` (Attention), ``d_ff`` (SwiGLU); a one-line ValueError for what pmem does not support."""
  kind = cfg.get("model_type")
  if kind not in ARCHITECTURES:
    raise ValueError(f"model_type {kind!r} is not supported (supported: {', '.join(ARCHITECTURES)})")
  if cfg.get("hidden_act", "silu") != "silu":
    raise ValueError(f"hidden_act={cfg['hidden_act']!r} is not supported (SwiGLU uses silu)")
  if kind == "llama":
    for k in ("attention_bias", "mlp_bias"):
      if cfg.get(k):
        raise ValueError(f"{k}=true is not supported for llama (only Qwen2's q/k/v biases)")
  elif cfg.get("use_sliding_window") or any(t != "full_attention" for t in cfg.get("layer_types") or ()):
    raise ValueError("sliding-window attention (use_sliding_window, layer_types) is not supported")
  missing = [k for k in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size")
             if k not in cfg]
  if missing:
    raise ValueError(f"{CONFIG} has no {', '.join(missing)}")
  n = cfg["num_attention_heads"]
  return {"vocab": cfg["vocab_size"], "d_model": cfg["hidden_size"], "n_layers": cfg["num_hidden_layers"],
          "tie_embeddings": bool(cfg.get("tie_word_embeddings", False)), "norm_eps": float(cfg.get("rms_norm_eps", 1e-6)),
          "n_heads": n, "n_kv_heads": cfg.get("num_key_value_heads") or n,
          "head_dim": cfg.get("head_dim") or cfg["hidden_size"] // n, "rope_theta": _rope_theta(cfg),
          "qkv_bias": kind == "qwen2", "d_ff": cfg["intermediate_size"]}


def _get(obj, path: tuple):
  return functools.reduce(lambda o, k: o[k] if isinstance(k, int) else getattr(o, k), path, obj)


def _blocks(model: Decoder) -> list:
  """Every layer's block (stacked blocks for scanned layers), checked to be one HF layer shape."""
  if model.shared:
    raise ValueError("a model with shared modules (model.shared) has no Hugging Face equivalent")
  blocks = [_get(model, path) for path, _ in block_paths(model)]
  key = lambda b: (b.seq.n_heads, b.seq.n_kv_heads, b.seq.head_dim, b.seq.rope_theta, b.seq.qkv_bias, b.ch.d_ff,  # noqa: E731
                   b.norm_seq.eps, b.norm_ch.eps)
  for i, b in enumerate(blocks):
    if type(b.seq) is not Attention or type(b.ch) is not SwiGLU or len(b.pre) or len(b.aug) or b.seq.window:
      raise ValueError(f"layer {i} is not full attention + SwiGLU; only dense Llama / Qwen2 layers convert")
    if key(b) != key(blocks[0]):
      raise ValueError(f"layer {i} differs in shape from layer 0; Hugging Face layers are all alike")
  return blocks


def hf_config(model: Decoder, base: dict | None = None, dtype: str = "float32") -> dict:
  """The config.json of ``model`` (abstract or not): ``base`` (the source's config) with the fields
  of the module docstring replaced when it is of the same model type, else a new one."""
  b, c = _blocks(model)[0], model.cfg
  kind = "qwen2" if b.seq.qkv_bias else "llama"
  base = base if base and base.get("model_type") == kind else {  # pmem's tokenizers have no special tokens
      "max_position_embeddings": 4096, "bos_token_id": None, "eos_token_id": None, "pad_token_id": None}
  theta = b.seq.rope_theta
  out = {**base, "architectures": [ARCHITECTURES[kind]], "model_type": kind, "vocab_size": c.vocab,
         "hidden_size": c.d_model, "num_hidden_layers": c.n_layers, "intermediate_size": b.ch.d_ff,
         "num_attention_heads": b.seq.n_heads, "num_key_value_heads": b.seq.n_kv_heads, "head_dim": b.seq.head_dim,
         "hidden_act": "silu", "rms_norm_eps": b.norm_seq.eps, "tie_word_embeddings": c.tie_embeddings,
         "rope_theta": theta, "rope_parameters": {"rope_type": "default", "rope_theta": theta},
         "dtype": dtype, "torch_dtype": dtype}  # transformers 5 reads dtype, 4 torch_dtype
  out.pop("rope_scaling", None)
  return out | ({"attention_bias": False, "mlp_bias": False} if kind == "llama" else {"use_sliding_window": False})


# ------------------------------------------------------------------------------------ tensors


def plan(model: Decoder) -> dict[str, tuple[tuple, int | None, int | None]]:
  """HF tensor name -> (pmem parameter path, index into its stacked axis or None, leading input
  axes: see ``LAYER``) for every parameter of ``model``."""
  blocks = _blocks(model)
  out = {name: (path, None, k) for name, path, k in TOP}
  if not model.cfg.tie_embeddings:
    out[HEAD[0]] = (HEAD[1], None, HEAD[2])
  for i, ((prefix, j), b) in enumerate(zip(block_paths(model), blocks)):
    for name, path, k in LAYER + (BIASES if b.seq.qkv_bias else ()):
      out[f"model.layers.{i}.{name}"] = ((*prefix, *path), j, k)
  return out


def _hf_shape(shape: tuple, k: int | None) -> tuple:
  if k is None:
    return tuple(shape)
  return (math.prod(shape),) if k == 0 else (math.prod(shape[k:]), math.prod(shape[:k]))


def _to_hf(a: np.ndarray, k: int | None) -> np.ndarray:
  if k is None:
    return a
  return a.reshape(-1) if k == 0 else a.reshape(math.prod(a.shape[:k]), -1).T


def _layer_shape(v, j: int | None) -> tuple:
  return tuple(v.shape[1:] if j is not None else v.shape)


def expected(model: Decoder) -> dict[str, tuple]:
  """HF tensor name -> shape, of ``model`` (abstract or not)."""
  flat = dict(nnx.to_flat_state(nnx.state(model, nnx.Param)))
  return {name: _hf_shape(_layer_shape(flat[path], j), k) for name, (path, j, k) in plan(model).items()}


def _covered(where: dict) -> set[tuple]:
  return {path for path, _, _ in where.values()}


def export(model: Decoder, dtypes: dict[str, np.dtype] | None = None) -> dict[str, np.ndarray]:
  """``model``'s tensors under HF names, each in ``dtypes[name]`` (default float32), LoRA / DoRA
  adapters merged into their weights (a copy; ``model`` is unchanged); a ValueError if ``model`` has
  other parameters no HF tensor holds."""
  if model.cfg.adapter is not None:
    model = nnx.clone(model)
    adapters.merge(model)
  where = plan(model)
  flat = dict(nnx.to_flat_state(nnx.state(model, nnx.Param)))
  others = [name_of(p) for p in flat if p not in _covered(where)]
  if others:
    raise ValueError(f"parameters {', '.join(others[:3])} have no Hugging Face tensor; only dense Llama / Qwen2 "
                     "models export")
  values = {p: np.asarray(v.get_value()) for p, v in flat.items()}
  out = {}
  for name, (path, j, k) in where.items():
    a = values[path] if j is None else values[path][j]
    out[name] = np.ascontiguousarray(_to_hf(a, k).astype((dtypes or {}).get(name, np.float32)))
  return out


def _to_pmem(w: np.ndarray, shape: tuple, k: int | None) -> np.ndarray:
  return w.reshape(shape) if not k else w.T.reshape(shape)


def load_params(directory: str, model: Decoder) -> nnx.State:
  """``model``'s parameters with a HF checkpoint directory's tensors in their places; parameters no
  tensor holds (adapters) keep ``model``'s values, so ``model`` may be abstract only without them.
  A one-line ValueError names the first tensor missing, unexpected or of another shape."""
  check(directory, model)
  where = plan(model)
  covered = _covered(where)
  flat = list(nnx.to_flat_state(nnx.state(model, nnx.Param)))
  values = {p: np.empty(v.shape, v.dtype) if p in covered else v.get_value() for p, v in flat}
  if any(isinstance(values[p], jax.ShapeDtypeStruct) for p, _ in flat):
    raise ValueError("the model has parameters the checkpoint does not hold; load into an initialized model")
  for name, w in tensors(directory).items():
    path, j, k = where[name]
    a = _to_pmem(np.asarray(w, values[path].dtype), _layer_shape(values[path], j), k)
    if j is None:
      values[path] = a
    else:
      values[path][j] = a
  return nnx.from_flat_state([(p, v.replace(values[p])) for p, v in flat])


# -------------------------------------------------------------------------------------- files


def weight_files(directory: str) -> list[str]:
  """The safetensors files of a checkpoint directory: ``model.safetensors`` or the shards its index lists."""
  index = os.path.join(directory, INDEX)
  if os.path.exists(index):
    with open(index) as f:
      names = sorted(set(json.load(f)["weight_map"].values()))
  elif os.path.exists(os.path.join(directory, WEIGHTS)):
    names = [WEIGHTS]
  else:
    raise FileNotFoundError(f"{directory} has neither {WEIGHTS} nor {INDEX}")
  missing = [n for n in names if not os.path.exists(os.path.join(directory, n))]
  if missing:
    raise FileNotFoundError(f"{directory} lacks {missing[0]}, listed in {INDEX}")
  return [os.path.join(directory, n) for n in names]


@contextlib.contextmanager
def _open(path: str):
  """``safe_open(path)``; a truncated or garbled file is one ValueError naming it."""
  try:
    with safe_open(path, framework="np") as f:
      yield f
  except SafetensorError as e:
    raise ValueError(f"{path}: not a readable safetensors file ({e})") from None


def specs(directory: str) -> dict[str, tuple[tuple, np.dtype]]:
  """Tensor name -> (shape, dtype) of a checkpoint directory, from the files' headers."""
  out = {}
  for path in weight_files(directory):
    with _open(path) as f:
      for name in f.keys():
        s = f.get_slice(name)
        if s.get_dtype() not in DTYPES:
          raise ValueError(f"{path}: tensor {name} has dtype {s.get_dtype()}; supported: {', '.join(DTYPES)}")
        out[name] = (tuple(s.get_shape()), np.dtype(DTYPES[s.get_dtype()]))
  return out


def tensors(directory: str) -> dict[str, np.ndarray]:
  """Every tensor of a checkpoint directory, in its stored dtype."""
  out = {}
  for path in weight_files(directory):
    with _open(path) as f:
      out.update({name: f.get_tensor(name) for name in f.keys()})
  return out


def check(directory: str, model: Decoder) -> None:
  """A one-line ValueError where a directory's tensors are not ``model``'s (names and shapes)."""
  have, want = specs(directory), expected(model)
  for what, names in (("lacks", sorted(want.keys() - have.keys())), ("has unexpected tensors", sorted(have.keys() - want.keys()))):
    if names:
      raise ValueError(f"{directory} {what} {', '.join(names[:3])}{' ...' if len(names) > 3 else ''} "
                       f"for a model of this config")
  for name, shape in want.items():
    if have[name][0] != shape:
      raise ValueError(f"{directory}: tensor {name} has shape {list(have[name][0])}, the config gives {list(shape)}")


def digest(directory: str) -> str:
  """The sha256 of a checkpoint directory's weight files' contents (in name order)."""
  h = hashlib.sha256()
  for path in weight_files(directory):
    with open(path, "rb") as f:
      h.update(hashlib.file_digest(f, "sha256").digest())
  return h.hexdigest()[:16]


def save(directory: str, config: dict, tensors: dict[str, np.ndarray]) -> None:
  """Writes ``config.json`` and ``model.safetensors`` into ``directory`` (made if needed)."""
  os.makedirs(directory, exist_ok=True)
  with open(os.path.join(directory, CONFIG), "w") as f:
    f.write(json.dumps(config, indent=2, sort_keys=True) + "\n")
  save_file(tensors, os.path.join(directory, WEIGHTS), metadata={"format": "pt"})
