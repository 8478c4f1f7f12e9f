from pmem.core.runtime import reexec_with_tuned_malloc

reexec_with_tuned_malloc()

from experiments.adapters import main  # noqa: E402

main()
