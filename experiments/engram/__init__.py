"""Engram (arXiv 2601.07372) at CPU scale: ``python -m experiments.engram --out runs/engram``.

Dense vs Engram before layer 1's attention (orders 2-3, 8 hash heads, 5·V rows per order) and the
paper's structural ablations: no tokenizer compression, no context gate, no causal conv, bigrams
only, 2 hash heads, the capacity-one control, and a dense model whose FFN width gives Engram's
forward FLOPs per token (modules.md §2(c))."""

from experiments.grid import Grid

ENGRAM = "fiddler:engram(layers=(1,))"

GRID = Grid("engram", {
    "dense": (),
    "dense_matched": (),
    "engram": (ENGRAM,),
    "no_compress": (ENGRAM, "fiddler:engram_ablation(kind='no_compress')"),
    "no_gate": (ENGRAM, "fiddler:engram_ablation(kind='no_gate')"),
    "no_conv": (ENGRAM, "fiddler:engram_ablation(kind='no_conv')"),
    "orders_2": (ENGRAM, "fiddler:engram_shape(max_order=2)"),
    "heads_2": (ENGRAM, "fiddler:engram_shape(heads=2)"),
    "capacity_one": (ENGRAM, "fiddler:engram_ablation(kind='capacity_one')"),
}, match={"dense_matched": ("engram",)})
