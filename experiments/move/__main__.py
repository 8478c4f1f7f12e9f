from experiments import grid
from experiments.move import GRID

grid.main(GRID)
