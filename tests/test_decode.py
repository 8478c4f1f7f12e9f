"""The decode-state protocol (pmem.core.mixer) and generation (pmem.decode): prefill + token-by-token
decode == the full forward for every registered config with a memory module, scanned and unrolled,
on one device and on a 2x2x2 mesh; packed documents reset state; Engram's decode hashes are the
training ones; host-table decode == device-table decode; sampling; pmem.load and the generate CLI."""

import functools
import json
import shutil
import subprocess
import sys

import fiddle as fdl
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding

import configs
from configs import cli
from kernels import native
from pmem.core import mesh as mesh_lib, rules
from pmem.core.mixer import TokenContext, batch_features
from pmem.data.tokenizer import ByteTokenizer
from pmem.core.variables import name_of
from pmem.decode import Generator, Sampling, to_host
from pmem.decode import generate as generate_lib
from pmem.layers import recurrence
from pmem.layers.conv import ShortConv
from pmem.models.decoder import Decoder, unstack
from tests import coverage
from tests.conftest import ROOT, needs_devices, run_launcher
from tests.tolerances import assert_close, assert_matches_reference

# every registered config (tests/coverage.py), scanned and unrolled, on one device and on a 2x2x2 mesh; `make test`
# runs scanned on one device one config per distinct set of module classes, unrolled on one device and scanned on
# the mesh one per distinct set of decode-state implementations, unrolled on the mesh the first config and each
# layered stack (hybrids, periods); `make test-slow` the rest
SCANNED_FAST, STATE_FAST = coverage.first_per(coverage.classes), coverage.first_per(coverage.state_kinds)
LAYOUT_FAST = {min(STATE_FAST, key=len)} | {n for n in STATE_FAST if coverage.layered(n)}
ONE_DEVICE = coverage.cases(SCANNED_FAST, None, True) + coverage.cases(STATE_FAST, None, False)
MESH_CASES = coverage.cases(STATE_FAST, None, True) + coverage.cases(LAYOUT_FAST, None, False)
B, T, P, MAX_LEN = 4, 16, 7, 20  # rows, tokens, prompt, cache


def model_of(name: str, scan: bool = True, window: int | None = None, kernel_impl: str = "xla",
             scan_unroll: int = 1, dtype: str = "float32", perturb: bool = True) -> Decoder:
  """The config's model with every parameter perturbed (zero-initialised routers, gates and convs
  would hide their decode paths)."""
  cfg = cli.build_config([f"config:{name}"])
  cfg.model.scan_layers = scan
  cfg.model.kernel_impl, cfg.model.scan_unroll, cfg.model.dtype = kernel_impl, scan_unroll, dtype
  if window is not None:
    cfg.model.sequence_mixer.window = window
  model = Decoder(fdl.build(cfg.model), rngs=nnx.Rngs(0))
  if perturb:
    rng = np.random.default_rng(1)  # NumPy noise: no XLA compile per parameter shape (~0.5 s each on CPU)
    nnx.update(model, jax.tree.map(lambda x: jnp.asarray((np.asarray(x) + 0.05 * rng.standard_normal(x.shape))
                                                         .astype(x.dtype)), nnx.state(model, nnx.Param)))
  return model


def float64_copy(model: Decoder, name: str, scan: bool = True, window: int | None = None) -> Decoder:
  """``model`` in float64: the same config with ``dtype="float64"`` and a float64 copy of every float
  variable (build and run it under ``jax.enable_x64``; the XLA kernels, whose statistics are float32 for
  float32 inputs, keep float64's)."""
  ref = model_of(name, scan, window, dtype="float64", perturb=False)
  wide = lambda x: jnp.asarray(np.asarray(x, np.float64)) if jnp.issubdtype(x.dtype, jnp.floating) else x  # noqa: E731
  nnx.update(ref, jax.tree.map(wide, nnx.state(model)))
  return ref


def stream(seed: int = 0, b: int = B, t: int = T):
  ids = np.random.default_rng(seed).integers(0, 256, (b, t)).astype(np.int32)
  return ids, np.tile(np.arange(t, dtype=np.int32), (b, 1)), np.ones((b, t), np.int32)


def packed_stream():
  """Rows of 3 documents, starting in the prompt (position 3) and in the decode steps (position 10 / 12)."""
  ids, pos, seg = stream()
  for r, starts in enumerate([(3, 10), (5, 12), (3, 12), (6, 10)]):
    for d, s in enumerate(starts):
      pos[r, s:] = np.arange(T - s)
      seg[r, s:] = d + 2
  return ids, pos, seg


def features(model, ids, pos, seg) -> dict[str, np.ndarray]:
  fn = batch_features(model, ByteTokenizer())
  return fn({"inputs": ids, "positions": pos, "segment_ids": seg}) if fn else {}


def full_and_incremental(model, ids, pos, seg, mesh=None, incremental=True):
  """(full-forward logits, logits of prefill [:P] then one token at a time) of the same stream (None without
  ``incremental``)."""
  graphdef, state = nnx.split(model)
  feats = features(model, ids, pos, seg)
  put = jax.device_put
  if mesh is not None:
    state = jax.jit(lambda s: s, out_shardings=rules.param_shardings(mesh, state))(state)  # rows need not divide
    put = lambda x: jax.device_put(x, jax.tree.map(  # noqa: E731
        lambda a: NamedSharding(mesh, rules.logical_to_spec(("batch", "length") + (None,) * (a.ndim - 2))), x))

  def run(state, ids, pos, seg, feats, cache=None):
    m = nnx.merge(graphdef, state)
    return m(ids, TokenContext(ids, pos, seg, feats), cache=cache)

  cols = lambda a, b: put(tuple(x[:, a:b] for x in (ids, pos, seg)) + ({k: v[:, a:b] for k, v in feats.items()},))  # noqa: E731
  with jax.set_mesh(mesh) if mesh is not None else _nothing():
    full = jax.jit(run)(state, *cols(0, T))
    if not incremental:
      return np.asarray(full), None, None
    step = jax.jit(run, donate_argnums=5)
    cache = jax.jit(lambda s: nnx.merge(graphdef, s).init_cache(ids.shape[0], MAX_LEN))(state)
    out, cache = step(state, *cols(0, P), cache)
    outs = [out]
    for t in range(P, T):
      out, cache = step(state, *cols(t, t + 1), cache)
      outs.append(out)
  return np.asarray(full), np.asarray(jnp.concatenate(outs, 1)), cache


class _nothing:
  def __enter__(self):
    return self

  def __exit__(self, *exc):
    return False


def check_decode(name: str, scan: bool = True, mesh=None, data=None, window: int | None = None, **kw):
  """Prefill + decode against the full forward, both against the float64 model's full forward
  (``tests.tolerances.assert_matches_reference``): in float32 within 4x the full forward's own distance to
  it, and (one device) the float64 model's prefill + decode within the float64 image of that bound, which a
  state wrong by one float32 ulp already exceeds. Returns (full, incremental, cache) of the float32 model."""
  data = stream() if data is None else data
  model = model_of(name, scan, window, **kw)
  full, inc, cache = full_and_incremental(model, *data, mesh=mesh)
  with jax.enable_x64(True):
    full64, inc64, _ = full_and_incremental(float64_copy(model, name, scan, window), *data,
                                            incremental=mesh is None)
  assert_matches_reference(inc, full, full64, inc64, what=f"{name} prefill + decode: ")
  return full, inc, cache


def test_every_registered_config_is_a_decode_case():
  """The cases come from the registry (tests/coverage.py), none is listed here: every registered config, scanned
  and unrolled, on one device and on the mesh, in `make test` or `make test-slow`."""
  want = {(n, s) for n in configs.CONFIGS for s in (True, False)}
  for cases in (ONE_DEVICE, MESH_CASES):
    assert {tuple(getattr(c, "values", c)) for c in cases} == want


@pytest.mark.parametrize("name, scan", ONE_DEVICE, ids=lambda x: {True: "scanned", False: "unrolled"}.get(x, x))
def test_prefill_then_decode_equals_full_forward(name, scan):
  check_decode(name, scan)


@needs_devices(8)
@pytest.mark.parametrize("name, scan", MESH_CASES, ids=lambda x: {True: "scanned", False: "unrolled"}.get(x, x))
def test_prefill_then_decode_equals_full_forward_on_a_mesh(name, scan):
  mesh = mesh_lib.make_mesh(mesh_lib.MeshConfig(data=2, fsdp=2, tensor=2))
  _, _, cache = check_decode(name, scan, mesh=mesh)
  # rows over data+fsdp, heads over tensor: a KV cache [(L,) B, S, K, H], a recurrent state [(L,) B, H, K, V]
  want = {"k": (("data", "fsdp"), None, "tensor", None), "S": (("data", "fsdp"), "tensor", None, None)}
  for path, x in jax.tree_util.tree_flatten_with_path(cache)[0]:
    if path[-1] in {jax.tree_util.DictKey(n) for n in want} and jax.tree_util.DictKey("conv") not in path:
      spec = (*x.sharding.spec, *[None] * (x.ndim - len(x.sharding.spec)))
      heads = x.shape[x.ndim - 4 + want[path[-1].key].index("tensor")]  # a head count tensor (2) cannot split stays whole
      expect = tuple(a if a != "tensor" or heads % 2 == 0 else None for a in want[path[-1].key])
      assert spec[-4:] == expect, (path, spec)


@pytest.mark.parametrize("name", ["gdn_tiny", "mamba2_tiny", "hybrid_periodic"])
def test_prefill_then_decode_of_packed_documents(name):
  """Documents that start in the prompt and in the decode steps: the states reset where the full forward's do."""
  check_decode(name, data=packed_stream())


def _shift_tail(call):
  def shifted(self, x, positions, tail=None):
    y, new = call(self, x, positions, tail)
    return y, jnp.roll(new, 1, axis=1)  # the tail one token late
  return shifted


def _drop_decode_reset(step):
  return lambda S, q, k, v, a, beta=None, reset=None: step(S, q, k, v, a, beta, None)


def _ulp_off_state(chunked):
  def off(*args, **kw):
    o, S = chunked(*args, **kw)
    return o, S * (1 + 2.0 ** -23)  # the state leaving a chunk (the prompt's, into decode) one float32 ulp up
  return off


FAULTS = {"state one ulp off at a chunk boundary": (recurrence, "chunked", _ulp_off_state, "gdn_tiny"),
          "document reset dropped in decode": (recurrence, "step", _drop_decode_reset, "gdn_tiny"),
          "conv tail shifted by one token": (ShortConv, "__call__", _shift_tail, "deltanet_tiny")}


@pytest.mark.parametrize("fault", FAULTS)
def test_decode_check_catches_state_faults(monkeypatch, fault):
  """Each fault injected into a correct mixer makes :func:`check_decode` fail (the bound is not loose)."""
  owner, attr, wrap, name = FAULTS[fault]
  monkeypatch.setattr(owner, attr, wrap(getattr(owner, attr)))
  with pytest.raises(AssertionError, match="prefill \\+ decode"):
    check_decode(name, data=packed_stream())


@pytest.mark.skipif(jax.default_backend() != "cpu" or native.available() is not None, reason="native CPU kernels unavailable")
def test_native_attention_full_forward_equals_prefill_then_decode():
  """With ``model.kernel_impl="auto"`` (on CPU: the native attention; the norms have no native kernel and stay
  XLA's) the full forward runs the native attention, prefill and decode over the cache XLA's: the same logits
  within rounding."""
  check_decode("tiny", kernel_impl="auto")


def test_unrolled_scan_full_forward_equals_prefill_then_decode():
  """``model.scan_unroll`` past the stage's length (no loop left) keeps the stacked cache: prefill + decode give
  the full forward's logits, and the model's logits are the rolled scan's within rounding."""
  full, _, _ = check_decode("tiny", scan_unroll=8)
  model = model_of("tiny")
  rolled, _, _ = full_and_incremental(model, *stream(), incremental=False)
  with jax.enable_x64(True):
    full64, _, _ = full_and_incremental(float64_copy(model, "tiny"), *stream(), incremental=False)
  assert_matches_reference(full, rolled, full64, what="scan_unroll=8 vs rolled: ")


def test_sliding_window_cache_is_a_ring_of_window_slots():
  full, _, cache = check_decode("tiny", window=5)  # the prompt (7) is longer than the ring (5)
  assert cache["stages"][0]["seq"]["k"].shape[2] == 5
  wide, _, _ = full_and_incremental(model_of("tiny"), *stream(), incremental=False)
  assert np.abs(wide[:, 5:] - full[:, 5:]).max() > 1e-3  # the window changes what positions >= 5 see


@pytest.mark.parametrize("name", ["tiny", "engram_tiny", "move_tiny"])
def test_packed_documents_do_not_leak(name):
  """A row packing documents a | b gives b the logits b has alone (attention's segments, Engram's
  hashes and conv taps reset at the document start)."""
  model = model_of(name)
  ids, _, _ = stream(b=1)
  pos = np.concatenate([np.arange(8), np.arange(T - 8)])[None].astype(np.int32)
  seg = np.concatenate([np.ones(8), 2 * np.ones(T - 8)])[None].astype(np.int32)
  run = lambda i, p, s: np.asarray(model(jnp.asarray(i), TokenContext(  # noqa: E731
      jnp.asarray(i), jnp.asarray(p), jnp.asarray(s), features(model, i, p, s))))
  packed, alone = run(ids, pos, seg), run(ids[:, 8:], pos[:, 8:], np.ones_like(seg[:, 8:]))
  assert_close(packed[:, 8:], alone, terms=model.cfg.d_model)


def test_engram_decode_hashes_are_the_training_hashes():
  model = model_of("engram_tiny")
  gen = Generator(model, ByteTokenizer(), max_len=MAX_LEN)
  ids, pos, seg = stream()
  train = features(model, ids, pos, seg)
  assert train and gen.history == 2
  steps = [gen.host_features(ids[:, :P], pos[:, :P], seg[:, :P], P)]
  steps += [gen.host_features(ids[:, :t + 1], pos[:, :t + 1], seg[:, :t + 1], 1) for t in range(P, T)]
  for k, v in train.items():
    np.testing.assert_array_equal(np.concatenate([s[k] for s in steps], 1), v)  # the same function: bit for bit


def generate(model, prompts, n=10, sampling=Sampling(), **kw):
  return Generator(model, ByteTokenizer(), max_len=MAX_LEN, **kw).generate(prompts, n, sampling)


PROMPTS = [[5, 6, 7, 8, 9, 10, 11], [12, 13, 14], [200, 3, 9, 40, 41]]


# `make test` generates with tiny; the memory configs (~35-55 s each) in `make test-slow`
@pytest.mark.parametrize("name", ["tiny", *(pytest.param(n, marks=pytest.mark.slow) for n in ("engram_tiny", "move_tiny"))])
def test_greedy_generation_follows_the_full_forward(name):
  """Each greedy token is the argmax of the full forward over the prompt and the tokens before it,
  and a row generates the same alone as left-padded beside longer prompts."""
  model = model_of(name)
  gen = Generator(model, ByteTokenizer(), max_len=MAX_LEN)
  out = gen.generate(PROMPTS, 10)
  for r, p in enumerate(PROMPTS):
    seq = np.asarray([p + out.tokens[r].tolist()], np.int32)
    i, pos, seg = seq[:, :-1], np.arange(seq.shape[1] - 1, dtype=np.int32)[None], np.ones_like(seq[:, :-1])
    logits = np.asarray(model(jnp.asarray(i), TokenContext(jnp.asarray(i), jnp.asarray(pos), jnp.asarray(seg),
                                                           features(model, i, pos, seg))))[0, len(p) - 1:]
    top2 = np.sort(logits, -1)[:, -2:]
    clear = top2[:, 1] - top2[:, 0] > 1e-4  # not a near tie
    np.testing.assert_array_equal(logits.argmax(-1)[clear], out.tokens[r][clear])
    alone = gen.generate([p], 10)
    np.testing.assert_array_equal(alone.tokens[0], out.tokens[r])
    assert_close(alone.logprobs[0], out.logprobs[r], terms=model.cfg.d_model)
  assert out.decode_steps == 9 and out.tokens_per_s > 0


def test_sampling_is_seeded_and_top_k_1_is_greedy():
  gen = Generator(model_of("tiny"), ByteTokenizer(), max_len=MAX_LEN)
  greedy = gen.generate(PROMPTS, 10)
  again = Generator(model_of("tiny"), ByteTokenizer(), max_len=MAX_LEN).generate(PROMPTS, 10)
  assert all((a == b).all() for a, b in zip(greedy.tokens, again.tokens))
  top1 = gen.generate(PROMPTS, 10, Sampling(temperature=1.0, top_k=1, seed=4))
  assert all((a == b).all() for a, b in zip(greedy.tokens, top1.tokens))
  s = lambda seed, **kw: gen.generate(PROMPTS, 10, Sampling(temperature=1.0, seed=seed, **kw)).tokens  # noqa: E731
  for kw in ({}, {"top_k": 20}, {"top_p": 0.9}):
    a, b, c = s(1, **kw), s(1, **kw), s(2, **kw)
    assert all((x == y).all() for x, y in zip(a, b))
    assert any((x != z).any() for x, z in zip(a, c))


def test_top_p_keeps_the_smallest_nucleus():
  from pmem.decode.sample import filtered
  logits = jnp.log(jnp.asarray([[0.5, 0.3, 0.15, 0.05]]))
  kept = np.isfinite(np.asarray(filtered(logits, Sampling(temperature=1.0, top_p=0.8))))
  np.testing.assert_array_equal(kept, [[True, True, False, False]])
  # within the top 3, renormalised (0.53, 0.32, 0.16): 0.85 needs all three
  kept = np.isfinite(np.asarray(filtered(logits, Sampling(temperature=1.0, top_k=3, top_p=0.85))))
  np.testing.assert_array_equal(kept, [[True, True, True, False]])


def test_eos_stops_a_row():
  model = model_of("tiny")
  first = generate(model, PROMPTS)
  eos = int(first.tokens[0][2])
  out = Generator(model, ByteTokenizer(), max_len=MAX_LEN).generate(PROMPTS, 10, eos_id=eos)
  assert out.tokens[0].tolist() == first.tokens[0][:3].tolist()
  for r in range(len(PROMPTS)):
    hits = np.nonzero(first.tokens[r] == eos)[0]
    assert len(out.tokens[r]) == (hits[0] + 1 if hits.size else 10)


@pytest.mark.parametrize("name", ["stem_tiny", "engram_tiny", "lave_tiny"])
def test_host_table_decode_equals_device_table_decode(name):
  model = model_of(name)
  device = generate(model, PROMPTS, device_loop=False)  # host tables decode one device call per token
  state, host = to_host(nnx.state(model))
  assert host and all(v.shape[-2] > 1 for v in host.values())
  out = generate(nnx.merge(nnx.graphdef(model), state), PROMPTS, host_tables=host)
  for a, b in zip(out.tokens + out.logprobs, device.tokens + device.logprobs):
    np.testing.assert_array_equal(a, b)  # the same rows read in the same order: bit for bit


def test_device_loop_equals_one_call_per_token(monkeypatch):
  """The on-device loop (chunks of DEVICE_STEPS tokens, here 3: chunk ends, a partial last chunk,
  a stop inside a chunk) gives the per-token loop's tokens, with and without EOS and sampling."""
  monkeypatch.setattr(generate_lib, "DEVICE_STEPS", 3)
  model = model_of("stem_tiny")
  on, off = (Generator(model, ByteTokenizer(), max_len=MAX_LEN, device_loop=d) for d in (True, False))
  first = off.generate(PROMPTS, 10)
  for kw in ({}, {"eos_id": int(first.tokens[1][4])}, {"sampling": Sampling(temperature=1.0, top_k=20, seed=3)}):
    a, b = on.generate(PROMPTS, 10, **kw), off.generate(PROMPTS, 10, **kw)
    for x, y in zip(a.tokens, b.tokens):
      np.testing.assert_array_equal(x, y)
    for x, y in zip(a.logprobs, b.logprobs):
      assert_close(x, y, terms=model.cfg.d_model)
  assert a.decode_steps == 9
  with pytest.raises(ValueError, match="device_loop=True needs a model without host features"):
    Generator(model_of("engram_tiny"), ByteTokenizer(), max_len=MAX_LEN, device_loop=True)


@pytest.mark.parametrize("name", ["stem_tiny", "hybrid_periodic"])
def test_unroll_keeps_every_value(name):
  """The decoding copy of a scanned model: each stacked layer's slice, the same logits."""
  model = model_of(name)
  flat, (unrolled, sources) = dict(nnx.to_flat_state(nnx.state(model))), unstack(model)
  assert not any(s.scan for s in unrolled.stages) and any(j is not None for _, j in sources.values())
  by_name = {name_of(p): v.get_value() for p, v in flat.items()}
  for p, v in nnx.to_flat_state(nnx.state(unrolled)):
    src, j = sources[name_of(p)]
    np.testing.assert_array_equal(v.get_value(), by_name[src] if j is None else by_name[src][j])
  ids, pos, seg = stream()
  ctx = TokenContext(jnp.asarray(ids), jnp.asarray(pos), jnp.asarray(seg), {})
  assert_close(np.asarray(unrolled(ctx.ids, ctx)), np.asarray(model(ctx.ids, ctx)), terms=model.cfg.d_model)


@pytest.mark.parametrize("bad, match", [
    (dict(prompts=[[]]), "prompt 0 has no tokens"),
    (dict(prompts=[[1] * 16], n=5), "exceeds max_len=20"),
    (dict(prompts=[[1, 300]]), r"outside \[0, vocab=256\)"),
    (dict(prompts=[[1]], n=0), "max_new_tokens must be >= 1")])
def test_bad_generation_input_is_refused(bad, match):
  gen = Generator(model_of("tiny"), ByteTokenizer(), max_len=MAX_LEN)
  with pytest.raises(ValueError, match=match):
    gen.generate(bad["prompts"], bad.get("n", 4))
  nonfinite = [({k: float(x)}, k) for k in ("temperature", "top_p") for x in ("nan", "inf", "-inf")]
  for kw, m in ((dict(temperature=-1.0), "temperature"), (dict(top_k=-1), "top_k"), (dict(top_p=0.0), "top_p"),
                *nonfinite):
    with pytest.raises(ValueError, match=m):
      Sampling(**kw)


# ------------------------------------------------------------------------------ trained workdirs


@functools.cache
def _trained(root: str, name: str, *extra: str) -> str:
  workdir = f"{root}/{name}"
  r = run_launcher("--config", f"config:{name}", "--config", "set:train.steps=2", "--config", "set:eval.valid_batches=0",
                   *[a for e in extra for a in ("--config", e)], "--workdir", workdir)
  assert r.returncode == 0, r.stderr[-3000:]
  return workdir


@pytest.fixture(scope="module")
def workdirs(tmp_path_factory):
  root = str(tmp_path_factory.mktemp("decode"))
  return lambda name, *extra: _trained(root, name, *extra)


def test_load_gives_the_checkpointed_model(workdirs):
  import pmem
  from pmem.train.loop import Trainer
  wd = workdirs("tiny")
  loaded = pmem.load(wd)
  assert loaded.step == 2 and loaded.tokenizer.vocab_size == 256 and not loaded.host_tables
  trainer = Trainer(loaded.config, wd)
  for a, b in zip(jax.tree.leaves(nnx.state(loaded.model, nnx.Param)), jax.tree.leaves(trainer.train_state["params"])):
    np.testing.assert_array_equal(a, b)


@pytest.mark.slow  # ~55 s; host tables train and resume in `make test` (test_tables)
def test_load_serves_host_tables(workdirs):
  import pmem
  wd = workdirs("stem_tiny", "set:train.optim.tables.update='row_sparse'", "set:train.optim.tables.device_budget_bytes=0")
  loaded = pmem.load(wd)
  assert loaded.host_tables and all(v.shape[-2] == 256 for v in loaded.host_tables.values())
  out = loaded.generator(MAX_LEN).generate(PROMPTS, 6)
  # the same tables put back into the model: device decode, bit for bit
  state = nnx.state(loaded.model)
  from pmem.core import variables
  tables = variables.tables_of(state, lambda n, v: n in loaded.host_tables)
  state = nnx.merge_state(state, variables.with_values(tables, {n: jnp.asarray(a) for n, a in loaded.host_tables.items()}))
  device = generate(nnx.merge(nnx.graphdef(loaded.model), state), PROMPTS, n=6)
  for a, b in zip(out.tokens, device.tokens):
    np.testing.assert_array_equal(a, b)


def _cli(*args: str) -> subprocess.CompletedProcess:
  return subprocess.run([sys.executable, "-m", "experiments.generate", *args], cwd=ROOT, capture_output=True,
                        text=True, timeout=300)


def test_generate_cli(workdirs, tmp_path):
  import pmem
  wd = workdirs("tiny")
  r = _cli("--workdir", wd, "--prompt", "To be, or not", "--max-new-tokens", "6", "--json")
  assert r.returncode == 0, r.stderr[-2000:]
  out = json.loads(r.stdout.strip().splitlines()[-1])
  assert set(out) == {"text", "token_ids", "logprobs", "tokens_per_s"} and out["tokens_per_s"] > 0
  loaded = pmem.load(wd)
  gen = loaded.generator()
  ref = gen.generate([list(loaded.tokenizer.encode_batch(["To be, or not"])[0])], 6)
  assert out["token_ids"] == ref.tokens[0].tolist() and out["text"] == gen.text(ref.tokens[0])
  empty = tmp_path / "empty"
  empty.mkdir()
  shutil.copy(f"{wd}/config.json", empty / "config.json")
  for args, msg in (((f"--workdir={empty}", "--prompt=x"), "has no checkpoint"),
                    ((f"--workdir={wd}", "--prompt="), "the prompt has no tokens"),
                    ((f"--workdir={wd}", "--prompt=" + "x" * 70), "exceeds max_len=64"),
                    ((f"--workdir={wd}", "--prompt=x", "--top-p=1.5"), "top_p must lie in"),
                    ((f"--workdir={wd}", "--prompt=x", "--temperature=-2"), "temperature must be >= 0"),
                    ((f"--workdir={wd}", "--prompt=x", "--temperature=inf"), "and finite, got inf")):
    r = _cli(*args)
    assert r.returncode != 0 and r.stderr.strip().splitlines()[-1].startswith("error: ") and msg in r.stderr, r.stderr
