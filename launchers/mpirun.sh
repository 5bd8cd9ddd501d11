#!/usr/bin/env bash
# NP processes started by MPI (Open MPI mpirun, MPICH/Intel MPI mpiexec).
#
#   launchers/mpirun.sh CONFIG.yaml [section.key=value ...]
#   # configs/demo.yaml names no model or data: `lora-dist demo` writes tiny ones to runs/demo/
#   launchers/mpirun.sh configs/demo.yaml model.path=runs/demo/base data.path=runs/demo/data.jsonl
#   NP=16 HOSTFILE=hosts PPN=8 launchers/mpirun.sh configs/demo.yaml model.path=runs/demo/base data.path=runs/demo/data.jsonl
#
# MPI only starts the processes. lora_dist.launch.init_distributed() reads the rank from
# OMPI_COMM_WORLD_* (Open MPI) or PMI_RANK/PMI_SIZE/MPI_LOCALRANKID (MPICH, Intel MPI);
# then rank 0 picks MASTER_ADDR (its address) and a free MASTER_PORT and broadcasts them
# with mpi4py (pip install mpi4py), and torch.distributed runs over TCP as usual.
# Export MASTER_ADDR/MASTER_PORT to choose them yourself.
#
# Environment: MPICH and Intel MPI (Hydra) pass the whole environment to every rank.
# Open MPI passes only what `-x NAME` names, so under Open MPI (told apart by
# `$MPIEXEC --version`) this script adds `-x NAME` for every variable set here among:
#   PATH LD_LIBRARY_PATH PYTHONPATH VIRTUAL_ENV OMP_NUM_THREADS MASTER_ADDR MASTER_PORT
#   CUDA_VISIBLE_DEVICES CUDA_DEVICE_ORDER PYTORCH_CUDA_ALLOC_CONF GLOO_SOCKET_IFNAME
#   NCCL_* TORCH_NCCL_* TORCH_DISTRIBUTED_DEBUG HF_* TRANSFORMERS_* LORA_DIST_* (the token cache dir...)
#   and MPI_FORWARD's names.
# A forwarded value is the same on every node (CUDA_VISIBLE_DEVICES included).
#
# Knobs (environment variables):
#   NP                total processes; default 2
#   HOSTFILE          hosts file (Open MPI: "node1 slots=8"; MPICH: "node1:8"); default: this host
#   PPN               processes per node; default: let MPI decide
#   MPIEXEC           launcher binary; default mpiexec
#   MPI_FLAVOR        openmpi or mpich (Hydra: MPICH, Intel MPI, MVAPICH); default: detected
#   MPI_FORWARD       more variables for Open MPI to forward, space-separated; a trailing *
#                     matches a prefix (e.g. "UCX_* MY_SETTING")
#   OMP_NUM_THREADS   CPU threads per process; default 1
set -euo pipefail

NP="${NP:-2}"
MPIEXEC="${MPIEXEC:-mpiexec}"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"

if [[ -z "${MPI_FLAVOR:-}" ]]; then
  # Captured first: `--version | grep -q` could end the pipe early and fail under pipefail.
  version="$("${MPIEXEC}" --version 2>&1 || true)"
  case "${version,,}" in
    *"open mpi"* | *open-rte* | *openrte* | *"spectrum mpi"*) MPI_FLAVOR=openmpi ;;
    *) MPI_FLAVOR=mpich ;;
  esac
fi

mpi_args=(-n "${NP}")
case "${MPI_FLAVOR}" in
  openmpi)
    forward=(PATH LD_LIBRARY_PATH PYTHONPATH VIRTUAL_ENV OMP_NUM_THREADS MASTER_ADDR MASTER_PORT
             CUDA_VISIBLE_DEVICES CUDA_DEVICE_ORDER PYTORCH_CUDA_ALLOC_CONF GLOO_SOCKET_IFNAME
             'NCCL_*' 'TORCH_NCCL_*' TORCH_DISTRIBUTED_DEBUG 'HF_*' 'TRANSFORMERS_*' 'LORA_DIST_*')
    read -r -a extra <<<"${MPI_FORWARD:-}"
    forward+=(${extra[@]+"${extra[@]}"})
    # Exported variables only: those are what mpirun itself sees and can forward.
    while IFS= read -r name; do
      for pattern in "${forward[@]}"; do
        # shellcheck disable=SC2053  # the pattern is a glob on purpose
        if [[ "${name}" == ${pattern} ]]; then
          mpi_args+=(-x "${name}")
          break
        fi
      done
    done < <(compgen -e | sort)
    if [[ -n "${HOSTFILE:-}" ]]; then mpi_args+=(--hostfile "${HOSTFILE}"); fi
    if [[ -n "${PPN:-}" ]]; then mpi_args+=(--map-by "ppr:${PPN}:node"); fi
    ;;
  mpich)
    # Hydra (MPICH, Intel MPI, MVAPICH) forwards the whole environment.
    if [[ -n "${HOSTFILE:-}" ]]; then mpi_args+=(-f "${HOSTFILE}"); fi
    if [[ -n "${PPN:-}" ]]; then mpi_args+=(-ppn "${PPN}"); fi
    ;;
  *)
    echo "mpirun.sh: MPI_FLAVOR must be openmpi or mpich, not '${MPI_FLAVOR}'" >&2
    exit 2
    ;;
esac

exec "${MPIEXEC}" "${mpi_args[@]}" lora-dist train "$@"
