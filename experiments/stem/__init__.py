"""STEM (arXiv 2601.10639) at CPU scale: ``python -m experiments.stem --out runs/stem``.

Dense vs STEM on layers 1-3 (the reference's all-but-first), the half / third layer schedules,
the replace-gate and additive (STEM†) variants, and a dense model whose FFN width gives STEM's
forward FLOPs per token (modules.md §1(c): STEM-1/3, 1/2, all; replace gate; STEM†)."""

from experiments.grid import Grid

GRID = Grid("stem", {
    "dense": (),
    "dense_matched": (),
    "stem": ("fiddler:stem",),
    "stem_half": ("fiddler:stem(schedule='half')",),
    "stem_third": ("fiddler:stem(schedule='third')",),
    "replace_gate": ("fiddler:stem(variant='replace_gate')",),
    "additive": ("fiddler:stem(variant='additive')",),
}, match={"dense_matched": ("stem",)})
