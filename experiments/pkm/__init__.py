"""Product-key memories (Lample 2019; Memory Layers at Scale, Berges 2024) at CPU scale:
``python -m experiments.pkm --out runs/pkm``.

Dense vs PKM vs Memory+ replacing layer 2's FFN (128² slots, 4 heads, top-8), memory size 256² and 512²,
one head, top-32, Memory+ on two layers reading one shared value table, and a dense model whose
FFN width gives the largest 128² memory model's forward FLOPs per token (modules.md §4(c):
memory beats a dense model at equal active compute; swilu (Memory+) vs plain (PKM))."""

from experiments.grid import Grid

GRID = Grid("pkm", {
    "dense": (),
    "dense_matched": (),
    "pkm": ("fiddler:pkm(n_keys=128)",),
    "memory_plus": ("fiddler:memory_plus(n_keys=128)",),
    "pkm_256": ("fiddler:pkm(n_keys=256)",),
    "pkm_512": ("fiddler:pkm(n_keys=512)",),
    "pkm_heads1": ("fiddler:pkm(n_keys=128, heads=1)",),
    "pkm_k32": ("fiddler:pkm(n_keys=128, k=32)",),
    "memory_plus_2layers": ("fiddler:memory_plus(n_keys=128, layers=(1, 3), shared_values=True)",),
}, match={"dense_matched": ("pkm", "memory_plus")})
