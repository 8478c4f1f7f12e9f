"""bioS-style synthetic biographies (Allen-Zhu & Li, Physics of LMs 3.1-3.3, arXiv 2309.14316, 2404.05405).

Each person has a unique full name and six attributes drawn uniformly from fixed domains; employer
fixes employer_city (a 2-hop fact). A biography is one sentence per attribute, every sentence of the
form "{full name} <prefix> <value>.", re-rendered each epoch with fresh templates and a shuffled
attribute order (permutation augmentation). The last ``n_heldout_templates`` templates of each
attribute never occur in training text and serve the held-out (paraphrase) evaluation. All domains
are generated here from syllable inventories with a fixed internal seed.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Sequence

import numpy as np

from pmem.data.tasks import AnswerScore, EvalItem, Segment, accuracy

N_FIRST, N_MIDDLE, N_LAST = 400, 400, 1000
N_CITIES, N_UNIVERSITIES, N_MAJORS, N_EMPLOYERS = 200, 300, 100, 263
MONTHS = ("January", "February", "March", "April", "May", "June", "July", "August", "September",
          "October", "November", "December")
N_DAYS, YEARS = 28, range(1900, 2100)

_ONSETS = ("b", "d", "f", "g", "h", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z", "br", "dr",
           "gr", "kr", "tr", "st", "th", "sh", "ch", "bl", "fl")
_VOWELS = ("a", "e", "i", "o", "u", "a", "e", "o", "ai", "ea")
_FIELDS = ("Physics", "Chemistry", "Biology", "Mathematics", "Economics", "History", "Linguistics",
           "Philosophy", "Psychology", "Sociology", "Engineering", "Architecture", "Music", "Literature",
           "Geology", "Astronomy", "Statistics", "Medicine", "Ecology", "Anthropology")
_QUALIFIERS = ("Applied", "Theoretical", "Computational", "Comparative", "Experimental")
_INDUSTRIES = ("Industries", "Labs", "Systems", "Group", "Holdings", "Dynamics", "Works", "Logistics",
               "Foods", "Motors", "Energy", "Pharma")
_UNIVERSITY = ("University of {}", "{} University", "{} Institute of Technology", "{} College",
               "{} State University")


def _domains() -> dict[str, tuple[str, ...]]:
  """Pronounceable capitalized words, unique across all domains (fixed seed, independent of configs)."""
  rng, used = np.random.default_rng(31415), set()

  def words(n, syllables, endings):
    out = []
    while len(out) < n:
      w = "".join(_ONSETS[rng.integers(len(_ONSETS))] + _VOWELS[rng.integers(len(_VOWELS))]
                  for _ in range(syllables)) + endings[rng.integers(len(endings))]
      if w not in used:
        used.add(w)
        out.append(w.capitalize())
    return tuple(out)

  employers = words(N_EMPLOYERS, 2, ("", "x", "n", "co", "tek", "ra"))
  return dict(
      first=words(N_FIRST, 2, ("", "n", "l", "r", "s", "th")),
      middle=words(N_MIDDLE, 1, ("n", "l", "r", "s", "nd", "rt", "th", "x", "m")),
      last=words(N_LAST, 2, ("son", "ley", "ford", "man", "ton", "berg", "well", "wood", "er", "ski")),
      city=words(N_CITIES, 2, ("ville", "port", "burg", "field", "haven", "dale", "mouth", "stead", "ton")),
      university=tuple(_UNIVERSITY[i % len(_UNIVERSITY)].format(w) for i, w in
                       enumerate(words(N_UNIVERSITIES, 2, ("", "n", "r", "ton", "wick")))),
      major=tuple(f"{q} {f}" for f in _FIELDS for q in _QUALIFIERS),
      employer=tuple(f"{w} {_INDUSTRIES[rng.integers(len(_INDUSTRIES))]}" for w in employers),
      employer_city_index=tuple(int(c) for c in rng.integers(N_CITIES, size=N_EMPLOYERS)))


DOMAINS = _domains()
FIRST_NAMES, MIDDLE_NAMES, LAST_NAMES = DOMAINS["first"], DOMAINS["middle"], DOMAINS["last"]
CITIES, UNIVERSITIES, MAJORS, EMPLOYERS = DOMAINS["city"], DOMAINS["university"], DOMAINS["major"], DOMAINS["employer"]
EMPLOYER_CITY = dict(zip(EMPLOYERS, (CITIES[c] for c in DOMAINS["employer_city_index"])))

ATTRIBUTES = ("birth_date", "birth_city", "university", "major", "employer", "employer_city")
# log2 |domain| per attribute; employer_city carries no bits of its own (it is implied by employer).
DOMAIN_BITS = dict(birth_date=math.log2(len(MONTHS) * N_DAYS * len(YEARS)), birth_city=math.log2(N_CITIES),
                   university=math.log2(N_UNIVERSITIES), major=math.log2(N_MAJORS),
                   employer=math.log2(N_EMPLOYERS), employer_city=0.0)

# "{name} <prefix>" + " <value>." ; the last n_heldout_templates of each list are held out.
TEMPLATES = {
    "birth_date": (
        "{name} was born on", "{name} came into this world on", "{name}'s birthday is",
        "{name} entered the world on", "{name}'s date of birth is", "{name} was brought into the world on",
        "{name} first saw the light of day on", "{name}'s life began on", "{name} has a recorded birth date of",
        "{name} took a first breath on", "{name} celebrates a birthday dating back to",
        "{name} was welcomed into the world on", "{name} started life on", "{name}'s birth took place on",
        "{name} is listed as having been born on", "{name}'s birth certificate gives the date"),
    "birth_city": (
        "{name} was born in", "{name} spent early years in", "{name}'s birthplace is",
        "{name} comes originally from", "{name} hails from", "{name} grew up in", "{name} originated from",
        "{name}'s hometown is", "{name} was brought up in", "{name} comes from the city of",
        "{name}'s native city is", "{name} is a native of", "{name} was born and raised in",
        "{name} began life in", "{name}'s childhood was spent in", "{name}'s place of birth is"),
    "university": (
        "{name} studied at", "{name} received an education at", "{name} graduated from", "{name} attended",
        "{name} completed a degree at", "{name} earned a degree from", "{name} is a graduate of",
        "{name}'s alma mater is", "{name} pursued higher education at", "{name} enrolled at",
        "{name} spent college years at", "{name} was educated at", "{name} completed studies at",
        "{name} holds a diploma from", "{name} took classes at", "{name} was a student at"),
    "major": (
        "{name} majored in", "{name} studied the field of", "{name} focused on the study of",
        "{name} specialized in", "{name} concentrated on", "{name} chose to major in",
        "{name}'s field of study was", "{name} earned a degree in", "{name} pursued coursework in",
        "{name}'s academic focus was", "{name} developed expertise in", "{name} devoted college years to",
        "{name}'s major was", "{name} completed a major in", "{name} trained academically in",
        "{name} took up the study of"),
    "employer": (
        "{name} worked for", "{name} was employed by", "{name} had a job at", "{name} built a career at",
        "{name} was on the staff of", "{name} took a position at", "{name}'s employer was",
        "{name} held a role at", "{name} earned a living at", "{name} joined the team at",
        "{name} spent a career with", "{name} was hired by", "{name} drew a salary from",
        "{name} was a staff member at", "{name} had an office at", "{name} worked as an employee of"),
    "employer_city": (
        "{name} worked in", "{name} was employed in the city of", "{name}'s workplace was in",
        "{name} commuted to work in", "{name} had a job in", "{name} went to the office in",
        "{name} built a career in the city of", "{name} pursued professional work in",
        "{name}'s job was based in", "{name} earned a living in", "{name} held a position in",
        "{name} spent working days in", "{name} practiced a profession in",
        "{name} was employed at an office in", "{name}'s working life was spent in",
        "{name} reported to work in"),
}
_DOC, _EVAL = 1, 2  # rng stream tags


@dataclasses.dataclass(frozen=True)
class BiosConfig:
  n_people: int = 1000
  seed: int = 0
  n_heldout_templates: int = 4
  weight: float = 1.0  # mixture weight (used by the caller)


@dataclasses.dataclass(frozen=True)
class Person:
  name: str
  birth_date: str
  birth_city: str
  university: str
  major: str
  employer: str
  employer_city: str


class Bios:
  """N people with unique names; ``document`` renders a biography, ``eval_items`` asks one question per attribute."""

  domain_bits = DOMAIN_BITS

  def __init__(self, cfg: BiosConfig):
    n_names = N_FIRST * N_MIDDLE * N_LAST
    if not 0 < cfg.n_people <= n_names:
      raise ValueError(f"n_people must be in [1, {n_names}], got {cfg.n_people}")
    if not 0 <= cfg.n_heldout_templates < min(map(len, TEMPLATES.values())):
      raise ValueError(f"n_heldout_templates={cfg.n_heldout_templates} leaves no training templates")
    self.cfg, n = cfg, cfg.n_people
    rng = np.random.default_rng([cfg.seed, 0])
    names = rng.choice(n_names, size=n, replace=False)  # unique (first, middle, last) triples
    f, m, l = names // (N_MIDDLE * N_LAST), names // N_LAST % N_MIDDLE, names % N_LAST
    month, day, year = rng.integers(12, size=n), rng.integers(1, N_DAYS + 1, size=n), rng.choice(YEARS, size=n)
    city, uni, major, emp = (rng.integers(k, size=n) for k in (N_CITIES, N_UNIVERSITIES, N_MAJORS, N_EMPLOYERS))
    self.people = [Person(name=f"{FIRST_NAMES[f[i]]} {MIDDLE_NAMES[m[i]]} {LAST_NAMES[l[i]]}",
                          birth_date=f"{MONTHS[month[i]]} {day[i]}, {year[i]}", birth_city=CITIES[city[i]],
                          university=UNIVERSITIES[uni[i]], major=MAJORS[major[i]], employer=EMPLOYERS[emp[i]],
                          employer_city=EMPLOYER_CITY[EMPLOYERS[emp[i]]]) for i in range(n)]

  def templates(self, attribute: str, kind: str) -> tuple[str, ...]:
    """The "seen" (training) or "heldout" templates of an attribute."""
    t, k = TEMPLATES[attribute], len(TEMPLATES[attribute]) - self.cfg.n_heldout_templates
    return {"seen": t[:k], "heldout": t[k:]}[kind]

  def qa(self, index: int, attribute: str, template: str) -> tuple[str, str]:
    """(question prompt, answer with a leading space) for one person, attribute and template."""
    p = self.people[index]
    return template.format(name=p.name), " " + getattr(p, attribute)

  def num_documents(self, split: str) -> int:
    if split != "train":
      raise ValueError(f"bios has only a 'train' split, got {split!r}")
    return self.cfg.n_people

  def document(self, split: str, index: int, epoch: int) -> list[Segment]:
    """Person ``index``'s biography for ``epoch``: shuffled attribute order, random seen template each."""
    self.num_documents(split)
    rng = np.random.default_rng([self.cfg.seed, _DOC, index, epoch])
    sentences = []
    for a in rng.permutation(len(ATTRIBUTES)):
      seen = self.templates(ATTRIBUTES[a], "seen")
      sentences.append("".join(self.qa(index, ATTRIBUTES[a], seen[rng.integers(len(seen))])) + ".")
    return [(" ".join(sentences), True)]

  def eval_items(self, templates: str = "seen", people: int | None = None) -> list[EvalItem]:
    """One question per (person, attribute) for the first ``people`` people, template fixed by the seed."""
    if templates == "heldout" and not self.cfg.n_heldout_templates:
      raise ValueError("no held-out templates (n_heldout_templates=0)")
    items = []
    for i in range(self.cfg.n_people if people is None else people):
      rng = np.random.default_rng([self.cfg.seed, _EVAL, i, templates == "heldout"])
      for a in ATTRIBUTES:
        options = self.templates(a, templates)
        context, answer = self.qa(i, a, options[rng.integers(len(options))])
        items.append(EvalItem(context, answer, (("attribute", a), ("templates", templates)), key=i))
    return items

  def report(self, items: Sequence[EvalItem], scores: Sequence[AnswerScore],
             generated: Sequence[bool] | None = None) -> dict[str, float]:
    """Accuracy per attribute and template set (``bios/acc/...``; given per-item ``generated`` hits,
    also ``bios/generated_acc/...``), and knowledge bits on the "seen" items.

    Knowledge bits (Physics of LMs 3.3 capacity lower bound, attribute part, simplified):
      bits = sum over people p and independent attributes a of max(0, log2|D_a| - nats(p, a) / ln 2),
    with nats(p, a) the summed cross-entropy of the value tokens given "{name} <prefix>". A perfectly
    recalled value contributes log2|D_a| bits; one no better than uniform guessing contributes 0.
    employer_city is excluded (0 bits: implied by employer). Divide by the parameter count for bits/param.
    """
    out = accuracy("bios", items, scores, generated, lambda g: (f"/{g['attribute']}/{g['templates']}",
                                                                f"/{g['templates']}"))
    bits = {a: 0.0 for a, b in self.domain_bits.items() if b > 0}
    for item, score in zip(items, scores, strict=True):
      g = dict(item.group)
      if g["templates"] == "seen" and g["attribute"] in bits:
        bits[g["attribute"]] += max(0.0, self.domain_bits[g["attribute"]] - score.nats / math.log(2))
    out.update({f"bios/bits/{a}": b for a, b in bits.items()})
    out["bios/knowledge_bits"] = sum(bits.values())
    return out
