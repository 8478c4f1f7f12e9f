"""The headline comparison (``make run``): ``python -m experiments.headline --out runs/demo``.

Dense vs STEM vs Engram vs MoVE on corpus + bios at CPU scale (``experiments.grid.BASE``, 150 steps), the
dense model's FFN width set so its forward FLOPs per token equal the largest memory model's (no
memory model gets more compute than the baseline). Prints the table and, per memory model, whether
it beat dense on held-out bits per byte and on bios knowledge bits; the plot is ``OUT/headline.png``.
Takes the grid options (``--seeds``, ``--steps``, ``--quick``, ``--only``, ``--config``)."""

from __future__ import annotations

from experiments import grid
from pmem.core.runtime import reexec_with_tuned_malloc

MEMORY = {
    "stem": ("fiddler:stem",),
    "engram": ("fiddler:engram(layers=(1,))",),
    "move": ("fiddler:move(n_slots=2)",),
}
GRID = grid.Grid("headline", {"dense": (), **MEMORY}, base=(*grid.BASE, "set:train.steps=150"), seeds=1,
                 match={"dense": tuple(MEMORY)}, plot="headline.png")


def verdicts(records) -> list[str]:
  """One line per (memory model, metric) present in the results: its gain over dense."""
  have = set(grid.variants(records))
  return [grid.say(grid.compare(records, m, "dense", path, higher))
          for m in MEMORY if m in have and "dense" in have
          for path, higher in (("eval.valid/bpb", False), ("eval.bios/knowledge_bits", True))]


def main(argv=None) -> None:
  records = grid.main(GRID, argv, default_out="runs/demo")
  if records:
    print("\n".join(verdicts(records)))


if __name__ == "__main__":
  reexec_with_tuned_malloc()
  main()
