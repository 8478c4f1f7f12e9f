from pmem.core.runtime import reexec_with_tuned_malloc

reexec_with_tuned_malloc()

from experiments import grid  # noqa: E402
from experiments.move import GRID  # noqa: E402

grid.main(GRID)
