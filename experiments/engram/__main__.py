from experiments import grid
from experiments.engram import GRID

grid.main(GRID)
