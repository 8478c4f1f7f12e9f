from experiments import grid
from experiments.pkm import GRID

grid.main(GRID)
