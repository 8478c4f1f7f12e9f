"""The headline comparison (``make run``): ``python -m experiments.headline --out runs/demo``.

Dense vs STEM vs Engram on corpus + bios at CPU scale (``experiments.grid.BASE`` at 400 steps: BPE-2048
fitted to the English corpus and 50 people's biographies, 4 layers, d=64, 16x128 tokens a step; at
200 steps no model has learned the biographies yet), two seeds each, the dense model's FFN width
set so its forward FLOPs per token equal the larger memory model's (no memory model gets more
compute than the baseline). MoVE, PKM and the ablations are in the papers' grids
(``experiments.<paper>``, ``notebooks/``). Prints the table
(mean ± std over seeds) and, per memory model, its gain over dense on held-out bits per byte and
on bios knowledge bits with a verdict only beyond two standard errors; the plot (error bars: std
over seeds) is ``OUT/headline.png``. Takes the grid options (``--seeds``, ``--steps``, ``--quick``,
``--only``, ``--config``)."""

from __future__ import annotations

from experiments import grid
from pmem.core.runtime import reexec_with_tuned_malloc

MEMORY = {
    "stem": ("fiddler:stem",),
    "engram": ("fiddler:engram(layers=(1,))",),
}
GRID = grid.Grid("headline", {"dense": (), **MEMORY}, base=(*grid.BASE, "set:train.steps=400"), seeds=2,
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
