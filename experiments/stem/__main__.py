from experiments import grid
from experiments.stem import GRID

grid.main(GRID)
