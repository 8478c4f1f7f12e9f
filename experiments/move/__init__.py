"""MoVE (arXiv 2601.22887) at CPU scale: ``python -m experiments.move --out runs/move``.

Dense vs LaVE (nanochat value embeddings on alternating layers) vs MoVE with one shared bank of
M = 1, 2, 4 value slots per token, and a dense model whose FFN width gives the largest MoVE's
forward FLOPs per token (modules.md §3(c): MoVE beats dense on bits per byte, more slots help,
MoVE×1 ≈ LaVE)."""

from experiments.grid import Grid

GRID = Grid("move", {
    "dense": (),
    "dense_matched": (),
    "lave": ("fiddler:lave",),
    "move_m1": ("fiddler:move(n_slots=1)",),
    "move_m2": ("fiddler:move(n_slots=2)",),
    "move_m4": ("fiddler:move(n_slots=4)",),
}, match={"dense_matched": ("move_m4",)})
