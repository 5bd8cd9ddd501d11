#!/usr/bin/env bash
# NP processes started by MPI (Open MPI mpirun, MPICH/Intel MPI mpiexec).
#
#   launchers/mpirun.sh configs/demo.yaml [section.key=value ...]
#   NP=16 HOSTFILE=hosts PPN=8 launchers/mpirun.sh configs/demo.yaml
#
# MPI only starts the processes. lora_dist.launch.init_distributed() reads the rank from
# OMPI_COMM_WORLD_* (Open MPI) or PMI_RANK/PMI_SIZE/MPI_LOCALRANKID (MPICH, Intel MPI);
# then rank 0 picks MASTER_ADDR (its address) and a free MASTER_PORT and broadcasts them
# with mpi4py (pip install mpi4py), and torch.distributed runs over TCP as usual.
# Export MASTER_ADDR/MASTER_PORT to every rank to choose them yourself (Open MPI: -x NAME).
#
# Knobs (environment variables):
#   NP                total processes; default 2
#   HOSTFILE          hosts file (Open MPI: "node1 slots=8"; MPICH: "node1:8"); default: this host
#   PPN               processes per node; default: let MPI decide
#   MPIEXEC           launcher binary; default mpiexec
#   OMP_NUM_THREADS   CPU threads per process; default 1
set -euo pipefail

NP="${NP:-2}"
MPIEXEC="${MPIEXEC:-mpiexec}"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"

mpi_args=(-n "${NP}")
if "${MPIEXEC}" --version 2>&1 | grep -qi "open mpi\|open-rte\|openrte"; then
  # Open MPI does not forward the environment by default: pass what the ranks need.
  mpi_args+=(-x OMP_NUM_THREADS -x PATH -x LD_LIBRARY_PATH)
  for name in MASTER_ADDR MASTER_PORT PYTHONPATH VIRTUAL_ENV; do
    if [[ -n "${!name:-}" ]]; then mpi_args+=(-x "${name}"); fi
  done
  if [[ -n "${HOSTFILE:-}" ]]; then mpi_args+=(--hostfile "${HOSTFILE}"); fi
  if [[ -n "${PPN:-}" ]]; then mpi_args+=(--map-by "ppr:${PPN}:node"); fi
else
  # MPICH / Intel MPI (Hydra) forward the whole environment.
  if [[ -n "${HOSTFILE:-}" ]]; then mpi_args+=(-f "${HOSTFILE}"); fi
  if [[ -n "${PPN:-}" ]]; then mpi_args+=(-ppn "${PPN}"); fi
fi

exec "${MPIEXEC}" "${mpi_args[@]}" lora-dist train "$@"
