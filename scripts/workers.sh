# Sourced by scripts/test.sh and scripts/test_latest.sh: the pytest-xdist worker count.
# One worker per core, plus one: a multi-process test's worker mostly waits (on its ranks' launch, a store, Slurm)
# and the extra worker uses those gaps. Measured on 2 cores, the whole pinned suite, alternating runs: with inductor's
# cache warm, 3 workers took 0.86x-0.87x the time of 2 (593 s / 680 s, 649 s / 759 s), 4 took 780 s; with it empty
# (CI's machine) 741 s / 729 s, no gain: the compiled-block tests' C++ builds already fill the cores (docs/testing.md).
# LORA_DIST_TEST_WORKERS=N sets it (0: everything in the pytest process).
# nproc without OMP_NUM_THREADS, which it would obey: the cores, not the threads per worker.
TEST_WORKERS=${LORA_DIST_TEST_WORKERS:-$(( $(env -u OMP_NUM_THREADS -u OMP_THREAD_LIMIT nproc) + 1 ))}
