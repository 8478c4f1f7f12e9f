"""Knowledge editing through memory rows on bios (issue M1 item 4; metrics of data-and-evals.md §3d).

Trains (or resumes) a bios-only model with token-indexed memory (default
``fiddler:stem(schedule='all')`` on ``bios_small``: an edit at the name's positions reaches the
answer only through attention *after* an edited layer, so STEM in the last layer alone cannot
change an answer), then for pairs of people (A, B) rewrites "A" into "B" through memory rows only —
the input ids stay A's — and measures, teacher-forced, token-level:

- **reliability**: accuracy of B's attribute value after A's question, on the training templates;
- **generalization**: the same on the held-out templates;
- **locality**: fraction of argmax tokens unchanged on the other people's questions;
- **generated reliability** (``inject`` and ``before``): fraction of the reliability probes whose
  greedily generated answer is B's value as a string (:func:`pmem.train.evaluate.greedy_answers`),
  the edited fact coming out of ``generate``; ``samples`` holds the generated answers to the first
  pairs' questions before and after the injection.

Two interventions (:mod:`pmem.memory.edit`): ``context`` (A's name positions read B's name rows,
STEM's editing experiment; other prompts are untouched by construction) and ``inject`` (A's name
tokens' rows are overwritten by B's in every token table; persistent, so name tokens shared with
other people make locality < 1). ``before`` gives the same metrics with no edit (B's value after
A's question, and A's own value: whether the model knew the fact it edits).

  python -m experiments.edit --workdir runs/edit [--steps 1500 --people 100 --edits 20]
Writes ``WORKDIR/edit.json`` and prints a table.
"""

from __future__ import annotations

import argparse
import functools
import json
import os

import fiddle as fdl
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from configs import cli
from pmem.core.runtime import reexec_with_tuned_malloc
from pmem.data import pipeline as pipe
from pmem.data.tasks import EvalItem, matches
from pmem.data.tasks.bios import ATTRIBUTES
from pmem.memory import edit, lookup
from pmem.train import step as step_lib
from pmem.train.evaluate import greedy_answers
from pmem.train.loop import Trainer

SAMPLE_PAIRS = 2  # pairs whose generated answers are recorded and printed


def _encode(tok, texts: list[str]) -> list[np.ndarray]:
  return [np.asarray(x, np.int32) for x in tok.encode_batch(texts)]


def _name_span(tok, template: str, name: str, context: str):
  """(span of the name's tokens in the context's tokens, or None when tokenization crosses its edges)."""
  prefix = template[:template.index("{name}")]
  pre, pre_name, full = _encode(tok, [prefix, prefix + name, context]) if prefix else (
      np.zeros(0, np.int32), *_encode(tok, [name, context]))
  if len(pre_name) > len(full) or (full[:len(pre_name)] != pre_name).any() or (pre_name[:len(pre)] != pre).any():
    return None, None
  return (len(pre), len(pre_name)), pre_name[len(pre):]


def main(argv: list[str] | None = None) -> dict:
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--workdir", required=True)
  ap.add_argument("--steps", type=int, default=1500)
  ap.add_argument("--people", type=int, default=100)
  ap.add_argument("--edits", type=int, default=20, help="edited (A, B) pairs")
  ap.add_argument("--mode", default="auto", choices=edit.MODES)
  ap.add_argument("--quick", action="store_true", help="tiny model for tests")
  ap.add_argument("--config", action="append", default=[], help="extra config commands")
  a = ap.parse_args(argv)
  if 2 * a.edits >= a.people:
    raise SystemExit(f"--edits {a.edits} pairs need more than {2 * a.edits} people (--people {a.people})")
  cmds = ["config:bios_small", "fiddler:stem(schedule='all')", f"set:train.steps={a.steps}", f"set:data.bios.n_people={a.people}",
          "set:eval.every=0", "set:checkpoint.every=0"]
  if a.quick:
    cmds += ["set:model.d_model=32", "set:train.batch_size=8", "set:train.seq_len=64"]
  trainer = Trainer(fdl.build(cli.build_config(cmds + a.config)), os.path.join(a.workdir, "train"))
  trainer.run()
  report = evaluate_edits(trainer, a.edits, a.mode)
  with open(os.path.join(a.workdir, "edit.json"), "w") as f:
    json.dump(report, f, indent=1)
  print("| edit | reliability | generated reliability | generalization | locality | "
        "nats/token of B's value (seen, held-out) |\n|---|---|---|---|---|---|")
  for k, r in report.items():
    if isinstance(r, dict):
      gen = f"{r['generated_reliability']:.3f}" if "generated_reliability" in r else "n/a"
      print(f"| {k} | {r['reliability']:.3f} | {gen} | {r['generalization']:.3f} | {r['locality']:.3f} | "
            f"{r['target_nats']:.2f}, {r['target_nats_heldout']:.2f} |")
  print(f"before editing, accuracy of A's own values: {report['known']:.3f} (seen templates)")
  print("\n| A's question | A's value | B's value | generated before | generated after inject |\n|---|---|---|---|---|")
  for x in report["samples"]:
    print(f"| {x['question']} | {x['a_value'].strip()} | {x['b_value'].strip()} | {x['before']!r} | {x['inject']!r} |")
  return report


def evaluate_edits(trainer: Trainer, n_edits: int, mode: str = "auto") -> dict:
  tok, bios, t1 = trainer.data.tokenizer, trainer.data.tasks["bios"], trainer.exp.train.seq_len + 1
  graphdef = trainer.graphdef

  @jax.jit
  def predict(train_state, batch):
    """Argmax ids and the nll (nats) of the targets."""
    model = nnx.merge(graphdef, train_state["params"], train_state["rest"])
    with lookup.reads(record=True):
      logits = model(batch["inputs"], step_lib.context(batch)).astype(jnp.float32)
    nll = jax.nn.logsumexp(logits, -1) - jnp.take_along_axis(logits, batch["targets"][..., None], -1)[..., 0]
    return logits.argmax(-1), nll

  def items(people, kind, value_of):
    """(probe: person i's question and the value person's answer, span of the name, the name's ids
    there, the value person's name ids in the same template) per attribute."""
    rows = []
    for i in people:
      rng = np.random.default_rng([7, i, kind == "heldout"])
      for attr in ATTRIBUTES:
        options = bios.templates(attr, kind)
        template = options[rng.integers(len(options))]
        context = bios.qa(i, attr, template)[0]
        span, ids_i = _name_span(tok, template, bios.people[i].name, context)
        j = value_of(i)
        _, ids_j = _name_span(tok, template, bios.people[j].name, bios.qa(j, attr, template)[0])
        if span is not None and ids_j is not None:
          rows.append((EvalItem(context, bios.qa(j, attr, template)[1], (("attribute", attr),), key=i), span,
                       ids_i, ids_j))
    return rows

  def run(rows, train_state, edited=False):
    """Argmax ids, target nll and answer mask of each row; ``edited``: a context edit of every
    row's name span to the value person's name."""
    docs = pipe.encode_segments(tok, [[(it.context, False), (it.answer, True)] for it, *_ in rows])
    fields = pipe.window_fields(*pipe.pad_rows(docs, t1, "edit probes"))
    if edited:
      fields |= edit.edit_features(fields["inputs"], [(span, ids_j) for _, span, _, ids_j in rows], mode)
    pred, nll = jax.device_get(predict(train_state, fields))
    return pred, nll, fields["targets"], fields["loss_mask"] > 0

  def scores(rows, train_state, edited=False):
    """Token accuracy (EasyEdit's rewrite / rephrase accuracy) and mean nats per answer token."""
    pred, nll, targets, mask = run(rows, train_state, edited)
    return (float(np.mean([(pred[r] == targets[r])[mask[r]].mean() for r in range(len(rows))])),
            float(nll[mask].mean()))

  pairs = {2 * e: 2 * e + 1 for e in range(n_edits)}
  others = items(range(2 * n_edits, bios.cfg.n_people), "seen", lambda i: i)
  train_state = trainer.train_state
  pred0, _, _, mask0 = run(others, train_state)
  seen, held = items(pairs, "seen", pairs.get), items(pairs, "heldout", pairs.get)
  params = train_state["params"]
  # A's name tokens (as they occur in the prompts: sentence-initial or not) take B's rows
  for ids_a, ids_b in {(tuple(r[2]), tuple(r[3])) for r in seen + held}:
    params = edit.inject(params, np.array(ids_a), np.array(ids_b), mode)
  injected = {**train_state, "params": params}
  # greedy answers to A's questions (no context edit: generate reads the input ids' rows)
  probes = [it for it, *_ in seen]
  answers = {k: greedy_answers(functools.partial(trainer.generate, train_state=s), tok, probes)
             for k, s in (("before", train_state), ("inject", injected))}

  def metrics(train_state, edited=False):
    (rel, rel_nats), (gen, gen_nats) = scores(seen, train_state, edited), scores(held, train_state, edited)
    loc = float((run(others, train_state)[0] == pred0)[mask0].mean())
    return {"reliability": rel, "generalization": gen, "locality": loc,
            "target_nats": rel_nats, "target_nats_heldout": gen_nats}

  report = {"before": metrics(train_state), "context": metrics(train_state, True), "inject": metrics(injected)}
  for k, texts in answers.items():
    report[k]["generated_reliability"] = float(np.mean([matches(t, it.answer) for t, it in zip(texts, probes)]))
  samples = [{"question": it.context, "a_value": " " + getattr(bios.people[it.key], dict(it.group)["attribute"]),
              "b_value": it.answer, **{k: texts[r] for k, texts in answers.items()}}
             for r, it in enumerate(probes) if it.key < 2 * SAMPLE_PAIRS]
  return {**report, "known": scores(items(pairs, "seen", lambda i: i), train_state)[0],
          "pairs": len(pairs), "probes": len(seen) + len(held), "locality_probes": len(others), "samples": samples}


if __name__ == "__main__":
  reexec_with_tuned_malloc()
  main()
