"""Hugging Face import / export (pmem.models.hf, experiments.convert): logits and greedy generation
vs transformers on checkpoints it saved (experiments/oracles/hf_models.py: Llama GQA untied, Llama
tied stored in bfloat16, Qwen2 with q/k/v biases in shards), bit-exact round trips, the hf tokenizer
kind, fine-tuning and resuming a converted workdir through the launchers, and bad input."""

import functools
import json
import os
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import save_file
from tokenizers import Tokenizer, decoders, models

from experiments import convert, generate
from pmem.core.mixer import TokenContext
from pmem.data import tokenizer as tok_lib
from pmem.layers.attention import Attention
from pmem.layers.mlp import SwiGLU
from pmem.models import Decoder, DecoderConfig, LayerOverride, hf
from tests.conftest import ROOT, run_launcher, run_oracle
from tests.tolerances import tol

ORACLE = str(ROOT / "experiments/oracles/hf_models.py")
NAMES = ("llama", "llama_tied_bf16", "qwen2")
VOCAB, T, NEW = 300, 37, 16
TRAIN = ("set:train.batch_size=2", "set:train.seq_len=32", "set:train.optim.lr=1e-3", "set:eval.valid_batches=0",
         "set:train.progress=False")


def logits(model, ids: np.ndarray) -> np.ndarray:
  ids = jnp.asarray(ids, jnp.int32)
  ctx = TokenContext(ids, jnp.broadcast_to(jnp.arange(ids.shape[1]), ids.shape), jnp.ones_like(ids))
  return np.asarray(model(ids, ctx))


def inputs(path) -> str:
  rng = np.random.default_rng(0)
  np.savez(path, input_ids=rng.integers(0, VOCAB, (2, T)), prompt=rng.integers(0, VOCAB, (1, 11)), new=NEW)
  return str(path)


def same_tensors(a: dict, b: dict) -> bool:
  return a.keys() == b.keys() and all(a[k].dtype == b[k].dtype and a[k].shape == b[k].shape
                                      and a[k].tobytes() == b[k].tobytes() for k in a)


def to_hf(workdir: str, out, *step: str) -> str:
  convert.main(["--to-hf", str(out), "--workdir", workdir, *step])
  return str(out)


@pytest.fixture(scope="module")
def oracle(tmp_path_factory):
  """(root, the inputs, transformers' outputs, converted workdirs by name): one oracle run."""
  root = tmp_path_factory.mktemp("hf")
  inp = inputs(root / "in.npz")
  run_oracle(ORACLE, "make", str(root / "models"), inp, str(root / "out.npz"))
  out = np.load(root / "out.npz")
  assert tuple(json.loads(str(out["names"]))) == NAMES
  workdirs = {}
  for name in NAMES:
    workdirs[name] = str(root / "work" / name)
    convert.main(["--from-hf", str(root / "models" / name), "--workdir", workdirs[name]])
  return root, np.load(inp), out, workdirs


# ------------------------------------------------------------------------------ vs transformers


@pytest.mark.oracle
@pytest.mark.parametrize("name", NAMES)
def test_import_logits_and_greedy_generation_match_transformers(oracle, name):
  import pmem
  root, inp, out, workdirs = oracle
  loaded = pmem.load(workdirs[name])
  assert loaded.step == 0 and loaded.tokenizer.fingerprint.startswith("hf-")
  ours, theirs = logits(loaded.model, inp["input_ids"]), out[f"logits_{name}"]
  diff = np.abs(ours - theirs).max()
  print(f"{name}: max |pmem - transformers| logits = {diff:.3e} (max |logit| {np.abs(theirs).max():.2f})")
  # two float32 implementations (orders): per layer reductions of <= 128 terms (d 64, 4 heads x 32,
  # d_ff 96, 37 keys) of O(1) values, logits <= ~6: 128·eps·6 ≈ 1e-4
  assert diff <= 1e-4, diff
  assert np.abs(theirs).max() > 1.0  # logits are not degenerate
  gen = loaded.generator().generate([inp["prompt"][0].tolist()], NEW)
  np.testing.assert_array_equal(gen.tokens[0], out[f"generated_{name}"][0])


@pytest.mark.oracle
def test_export_round_trip_is_bit_exact_and_loads_in_transformers(oracle, tmp_path):
  root, inp, out, workdirs = oracle
  exported = []
  for name in NAMES:
    src = str(root / "models" / name)
    exported.append(to_hf(workdirs[name], tmp_path / name, "--dtype", "source"))
    assert same_tensors(hf.tensors(exported[-1]), hf.tensors(src)), name  # dtypes kept: bfloat16 too
    source, written = hf.read_config(src), hf.read_config(exported[-1])
    assert {k: written[k] for k in source} == source  # every source field kept; head_dim etc. added
    assert open(os.path.join(exported[-1], "tokenizer.json")).read() == open(os.path.join(src, "tokenizer.json")).read()
  run_oracle(ORACLE, "run", *exported, str(root / "in.npz"), str(tmp_path / "out.npz"))
  back = np.load(tmp_path / "out.npz")
  for i, name in enumerate(NAMES):  # the same tensors and function: transformers' own outputs, bit for bit
    np.testing.assert_array_equal(back[f"logits_{i}"], out[f"logits_{name}"])
    np.testing.assert_array_equal(back[f"generated_{i}"], out[f"generated_{name}"])


@pytest.mark.slow  # ~90 s: four launcher processes; the import / export tests above cover the tensors
@pytest.mark.oracle
def test_cli_fine_tunes_resumes_generates_and_exports(oracle, tmp_path):
  import pmem
  from pmem.train.loop import Trainer
  root, inp, _, _ = oracle
  wd = str(tmp_path / "w")
  r = subprocess.run([sys.executable, "-m", "experiments.convert", "--from-hf", str(root / "models" / "qwen2"),
                      "--workdir", wd], cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert r.returncode == 0, r.stderr[-2000:]
  imported = pmem.load(wd)
  # step 0 of a fine-tune is the imported model, bit for bit
  trainer = Trainer(imported.config)
  params = trainer.train_state["params"]
  for a, b in zip(jax.tree.leaves(nnx.state(imported.model, nnx.Param)), jax.tree.leaves(params)):
    np.testing.assert_array_equal(a, b)
  # the workdir's config.json is the base config; the imported tokenizer is the data's
  r = run_launcher("--workdir", wd, *[a for s in ("set:train.steps=2", *TRAIN) for a in ("--config", s)])
  assert r.returncode == 0, r.stderr[-3000:]
  r = run_launcher("--workdir", wd, "--config", "set:train.steps=3")
  assert r.returncode == 0 and "resumed from the step-2 checkpoint" in r.stdout, r.stdout + r.stderr[-3000:]
  tuned = pmem.load(wd)
  assert tuned.step == 3 and tuned.tokenizer.fingerprint == imported.tokenizer.fingerprint
  assert np.abs(logits(tuned.model, inp["input_ids"]) - logits(imported.model, inp["input_ids"])).max() > 1e-4
  r = subprocess.run([sys.executable, "-m", "experiments.generate", "--workdir", wd, "--prompt", "To be, or not",
                      "--max-new-tokens", "6", "--json"], cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert r.returncode == 0, r.stderr[-2000:]
  ids = [int(i) for i in tuned.tokenizer.encode_batch(["To be, or not"])[0]]
  ref = tuned.generator().generate([ids], 6)
  assert json.loads(r.stdout.strip().splitlines()[-1])["token_ids"] == ref.tokens[0].tolist()
  # the fine-tuned model exports (in float32, the default) and transformers computes its logits
  out = to_hf(wd, tmp_path / "tuned")
  run_oracle(ORACLE, "run", out, str(root / "in.npz"), str(tmp_path / "out.npz"))
  diff = np.abs(np.load(tmp_path / "out.npz")["logits_0"] - logits(tuned.model, inp["input_ids"])).max()
  assert diff <= 1e-4, diff


# ----------------------------------------------------------------------------- without torch


def small(tied=False, bias=False, scan=True, overrides=()) -> DecoderConfig:
  return DecoderConfig(vocab=VOCAB, d_model=32, n_layers=3, tie_embeddings=tied, scan_layers=scan, overrides=overrides,
                       sequence_mixer=functools.partial(Attention, n_heads=4, n_kv_heads=2, head_dim=16, rope_theta=5e5,
                                                        qkv_bias=bias),
                       channel_mixer=functools.partial(SwiGLU, d_ff=48))


def decoder(cfg: DecoderConfig) -> Decoder:
  """``cfg``'s model with every parameter drawn from N(0, 1) (biases and norm scales nonzero, distinct)."""
  m = Decoder(cfg, rngs=nnx.Rngs(1))
  for v in jax.tree.leaves(nnx.state(m, nnx.Param), is_leaf=lambda x: isinstance(x, nnx.Variable)):
    v[...] = np.random.default_rng(v.size).standard_normal(v.shape, np.float32)
  return m


def abstract(cfg: DecoderConfig) -> Decoder:
  return nnx.eval_shape(lambda: Decoder(cfg, rngs=nnx.Rngs(0)))


@pytest.mark.parametrize("tied,bias", [(False, False), (True, True)])
def test_tensors_round_trip_between_scanned_and_unrolled_layouts(tmp_path, tied, bias):
  m = decoder(small(tied, bias))
  assert m.cost(8).params == sum(x.size for x in jax.tree.leaves(nnx.state(m, nnx.Param)))  # biases counted
  config = hf.hf_config(m)
  assert config["architectures"] == ["Qwen2ForCausalLM" if bias else "LlamaForCausalLM"]
  assert ("lm_head.weight" in hf.export(m)) != tied
  for dtype in (np.float32, jnp.bfloat16):
    dtypes = {k: np.dtype(dtype) for k in hf.export(m)}
    saved = hf.export(m, dtypes)
    hf.save(str(tmp_path / np.dtype(dtype).name), config, saved)
    for scan in (True, False):  # either layout reads the tensors and writes the same bits back
      other = abstract(small(tied, bias, scan))
      model = nnx.merge(nnx.graphdef(other), hf.load_params(str(tmp_path / np.dtype(dtype).name), other))
      assert same_tensors(hf.export(model, dtypes), saved)
  assert hf.fields(hf.read_config(str(tmp_path / "float32"))) == dict(
      vocab=VOCAB, d_model=32, n_layers=3, tie_embeddings=tied, norm_eps=1e-6, n_heads=4, n_kv_heads=2, head_dim=16,
      rope_theta=5e5, qkv_bias=bias, d_ff=48)


def test_only_dense_uniform_models_convert():
  half = LayerOverride(layers=(1,), channel_mixer=functools.partial(SwiGLU, d_ff=16))
  with pytest.raises(ValueError, match="layer 1 differs in shape from layer 0"):
    hf.hf_config(abstract(small(overrides=(half,))))
  window = LayerOverride(layers=(2,), sequence_mixer=functools.partial(Attention, n_heads=4, n_kv_heads=2, window=4))
  with pytest.raises(ValueError, match="layer 2 is not full attention"):
    hf.plan(abstract(small(overrides=(window,))))


def test_hf_tokenizer_kind_is_fingerprinted_by_content(tmp_path):
  vocab = {"\u2581the": 0, "<0x41>": 1, "é": 2, "<s>": 3, "x": 4}
  tok = Tokenizer(models.WordLevel(vocab, unk_token="x"))
  tok.decoder = decoders.Metaspace()
  tok.add_special_tokens(["<s>"])
  path = tmp_path / "tokenizer.json"
  tok.save(str(path))
  loaded = tok_lib.build(tok_lib.TokenizerConfig(kind="hf", path=str(path)), texts=None, key="")
  assert loaded.fingerprint.startswith("hf-") and loaded.vocab_size == 5
  np.testing.assert_array_equal(loaded.token_bytes, [4, 1, 2, 0, 1])  # "▁" a space, a byte, UTF-8, special: none
  tok.add_tokens(["y"])
  tok.save(str(path))
  assert tok_lib.build(tok_lib.TokenizerConfig(kind="hf", path=str(path)), None, "").fingerprint != loaded.fingerprint
  for cfg, msg in ((tok_lib.TokenizerConfig(kind="hf"), "needs data.tokenizer.path"),
                   (tok_lib.TokenizerConfig(kind="hf", path=str(tmp_path / "none.json")), "cannot read the tokenizer")):
    with pytest.raises((ValueError, FileNotFoundError), match=msg):
      tok_lib.build(cfg, None, "")


LLAMA = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "vocab_size": VOCAB, "hidden_size": 32,
         "num_hidden_layers": 3, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16,
         "intermediate_size": 48, "rope_parameters": {"rope_type": "default", "rope_theta": 5e5}, "rms_norm_eps": 1e-6}


def test_bad_input_is_one_line_and_writes_nothing(tmp_path):
  good = tmp_path / "good"
  tensors = hf.export(decoder(small()))
  hf.save(str(good), LLAMA, tensors)
  for name in ("truncated", "garbled"):
    shutil.copytree(good, tmp_path / name)
  weights = good / hf.WEIGHTS
  os.truncate(tmp_path / "truncated" / hf.WEIGHTS, weights.stat().st_size // 2)
  (tmp_path / "garbled" / hf.WEIGHTS).write_bytes(np.random.default_rng(0).bytes(weights.stat().st_size))
  sharded, names = tmp_path / "sharded", sorted(tensors)
  sharded.mkdir()
  (sharded / "config.json").write_text(json.dumps(LLAMA))
  shards = {f"model-0000{i + 1}-of-00002.safetensors": names[i::2] for i in range(2)}
  for file, part in shards.items():
    save_file({n: tensors[n] for n in part}, str(sharded / file))
  (sharded / hf.INDEX).write_text(json.dumps({"weight_map": {n: f for f, part in shards.items() for n in part}}))
  last = sharded / "model-00002-of-00002.safetensors"
  os.truncate(last, last.stat().st_size - 1)  # one byte short
  bad_shape = tmp_path / "bad_shape"
  tensors["model.layers.1.mlp.up_proj.weight"] = np.zeros((47, 32), np.float32)
  hf.save(str(bad_shape), LLAMA, tensors)
  unreadable = "not a readable safetensors file"
  cases = {"missing": (None, "is not a directory"), "empty": ({}, "has no config.json"),
           "mistral": (LLAMA | {"model_type": "mistral"}, "model_type 'mistral' is not supported"),
           "gelu": (LLAMA | {"hidden_act": "gelu"}, "hidden_act='gelu' is not supported"),
           "llama3_rope": (LLAMA | {"rope_parameters": {"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0}},
                           "rope_type='llama3' is not supported"),
           "old_rope": (LLAMA | {"rope_parameters": None, "rope_theta": 1e4, "rope_scaling": {"type": "linear"}},
                        "rope_type='linear' is not supported"),
           "bias": (LLAMA | {"attention_bias": True}, "attention_bias=true is not supported for llama"),
           "sliding": (LLAMA | {"model_type": "qwen2", "use_sliding_window": True}, "sliding-window attention"),
           "no_weights": (LLAMA, "has neither model.safetensors nor model.safetensors.index.json"),
           "bad_shape": ("keep", "model.layers.1.mlp.up_proj.weight has shape [47, 32], the config gives [48, 32]"),
           "truncated": ("keep", f"truncated/{hf.WEIGHTS}: {unreadable} (Error while deserializing header"),
           "garbled": ("keep", f"garbled/{hf.WEIGHTS}: {unreadable}"),
           "sharded": ("keep", f"sharded/model-00002-of-00002.safetensors: {unreadable}")}
  for name, (config, msg) in cases.items():
    src = tmp_path / name
    if config not in (None, "keep"):
      src.mkdir()
      if config:
        (src / "config.json").write_text(json.dumps(config))
    with pytest.raises(SystemExit) as e:
      convert.main(["--from-hf", str(src), "--workdir", str(tmp_path / "w")])
    assert str(e.value.code).startswith("error: ") and msg in str(e.value.code) and "\n" not in str(e.value.code), name
    assert not (tmp_path / "w").exists(), name
  (tmp_path / "w").mkdir()
  (tmp_path / "w" / "keep.txt").write_text("x")
  r = subprocess.run([sys.executable, "-m", "experiments.convert", "--from-hf", str(good), "--workdir",
                      str(tmp_path / "w")], cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert r.returncode == 1 and r.stderr.strip().splitlines()[-1].startswith("error: ") and "is not empty" in r.stderr
  assert os.listdir(tmp_path / "w") == ["keep.txt"]
  with pytest.raises(SystemExit, match="has no config.json; is it a pmem workdir"):
    to_hf(str(tmp_path / "missing"), tmp_path / "out")
  # an HF checkpoint where a workdir belongs
  for cli in (functools.partial(to_hf, str(good), tmp_path / "out"),
              functools.partial(generate.main, ["--workdir", str(good), "--prompt", "x"])):
    with pytest.raises(SystemExit) as e:
      cli()
    assert str(e.value.code) == (f"error: {good}/config.json is not a pmem run config (no Fiddle serialization); "
                                 f"is {good} an HF checkpoint? import it with experiments.convert --from-hf")
  # an imported workdir whose weights were cut short afterwards
  convert.main(["--from-hf", str(good), "--workdir", str(tmp_path / "w2")])
  os.truncate(tmp_path / "w2" / convert.HF_DIR / hf.WEIGHTS, weights.stat().st_size // 2)
  with pytest.raises(SystemExit, match=f"^error: .*/w2/hf/{hf.WEIGHTS}: {unreadable} "):
    to_hf(str(tmp_path / "w2"), tmp_path / "out")
  assert not (tmp_path / "out").exists() and sorted(os.listdir(good)) == ["config.json", hf.WEIGHTS]


def test_converted_workdir_without_tokenizer_is_token_level(tmp_path):
  import pmem
  src = tmp_path / "src"
  m = decoder(small(tied=True))
  hf.save(str(src), LLAMA | {"tie_word_embeddings": True}, hf.export(m))
  wd = str(tmp_path / "w")
  convert.main(["--from-hf", str(src), "--workdir", wd])
  loaded = pmem.load(wd)
  assert loaded.tokenizer is None and loaded.config.data.corpus is None and loaded.step == 0
  np.testing.assert_array_equal(logits(loaded.model, np.arange(9)[None]), logits(m, np.arange(9)[None]))
  assert loaded.config.model.tie_embeddings
  assert same_tensors(hf.tensors(to_hf(wd, tmp_path / "out", "--step", "0")), hf.tensors(str(src)))


def checkpoint(workdir: str, model: Decoder, step: int) -> None:
  """Saves ``model`` as ``workdir``'s checkpoint of ``step`` (the train state's items ``pmem.load`` restores)."""
  from pmem.train.checkpoint import CheckpointConfig, Checkpointer
  _, params, rest = nnx.split(model, nnx.Param, ...)
  ckpt = Checkpointer(os.path.join(workdir, "checkpoints"), CheckpointConfig(async_save=False))
  ckpt.save(step, {"params": params, "rest": rest}, {})
  ckpt.close()


def test_fine_tuned_bfloat16_import_exports_as_trained(tmp_path, capsys):
  import pmem
  src, wd = str(tmp_path / "src"), str(tmp_path / "w")
  m = decoder(small())
  hf.save(src, LLAMA, hf.export(m, dict.fromkeys(hf.export(m), np.dtype(jnp.bfloat16))))
  convert.main(["--from-hf", src, "--workdir", wd])
  model = pmem.load(wd).model
  rng = np.random.default_rng(0)  # a fine-tune's updates: mostly below bfloat16's spacing (2^-8 relative)
  nnx.update(model, jax.tree.map(lambda x: x + 1e-3 * rng.standard_normal(x.shape, np.float32),
                                 nnx.state(model, nnx.Param)))
  checkpoint(wd, model, 1)
  tuned = pmem.load(wd)
  assert tuned.step == 1
  r = subprocess.run([sys.executable, "-m", "experiments.convert", "--to-hf", str(tmp_path / "default"),
                      "--workdir", wd], cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert r.returncode == 0 and "Sharding info" not in r.stderr and "warning" not in r.stderr, r.stderr
  assert same_tensors(hf.tensors(str(tmp_path / "default")), hf.export(tuned.model))  # float32, as trained
  to_hf(wd, tmp_path / "bfloat16", "--dtype", "bfloat16")
  warned = [line for line in capsys.readouterr().err.splitlines() if "warning" in line]
  assert len(warned) == 1 and warned[0].startswith("pmem: warning: --dtype bfloat16 rounds 30 of 30 trained tensors")
  ids = np.arange(T)[None]
  ref = logits(tuned.model, ids)
  # both sides are pmem's float32 forward: three layers of reductions of <= 64 terms (4 heads x 16, d_ff 48, 37 keys)
  within = tol(np.float32, np.abs(ref).max(), 3 * 64)
  for name in ("default", "bfloat16"):
    convert.main(["--from-hf", str(tmp_path / name), "--workdir", str(tmp_path / f"w_{name}")])
    close = np.allclose(logits(pmem.load(str(tmp_path / f"w_{name}")).model, ids), ref, **within)
    assert close == (name == "default"), name  # bfloat16 loses the fine-tune
