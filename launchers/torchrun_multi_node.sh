#!/usr/bin/env bash
# Several nodes, NPROC_PER_NODE processes each: run this same script once on every node.
#
#   # configs/demo.yaml names no model or data: `lora-dist demo` writes tiny ones to runs/demo/
#   # (on a filesystem every node sees)
#   # on every node (node 0 is the rendezvous host; MASTER_ADDR is its address):
#   NNODES=2 NODE_RANK=0 MASTER_ADDR=10.0.0.11 launchers/torchrun_multi_node.sh configs/demo.yaml \
#     model.path=runs/demo/base data.path=runs/demo/data.jsonl
#   NNODES=2 NODE_RANK=1 MASTER_ADDR=10.0.0.11 launchers/torchrun_multi_node.sh configs/demo.yaml \
#     model.path=runs/demo/base data.path=runs/demo/data.jsonl
#
#   # inside a Slurm allocation, one task per node (NODE_RANK defaults to SLURM_NODEID):
#   srun --nodes=2 --ntasks-per-node=1 env NNODES=2 MASTER_ADDR=10.0.0.11 launchers/torchrun_multi_node.sh \
#     configs/demo.yaml model.path=runs/demo/base data.path=runs/demo/data.jsonl
#
# Knobs (environment variables):
#   NNODES            number of nodes (required; defaults to SLURM_NNODES under srun)
#   NODE_RANK         0 on the rendezvous host, 1..NNODES-1 elsewhere (defaults to SLURM_NODEID)
#   MASTER_ADDR       address of node 0 that the other nodes can reach. Not localhost/127.x:
#                     lora_dist refuses a loopback master in a multi-node job.
#   MASTER_PORT       rendezvous port on node 0; default 29500
#   NPROC_PER_NODE    processes per node; default: visible GPUs, or 2 on a CPU-only machine
#   RDZV              c10d (default) or static, see below
#   RDZV_ID           job id shared by all nodes for c10d; default SLURM_JOB_ID or "lora-dist"
#   LOCAL_ADDR        c10d: this node's address the others reach; default MASTER_ADDR on node 0,
#                     elsewhere the address this node reaches MASTER_ADDR from
#
# RDZV=c10d: elastic c10d rendezvous at MASTER_ADDR:MASTER_PORT. Two torchrun defaults
#   break on real clusters, so this script overrides both:
#   - which node hosts the rendezvous store is guessed by comparing hostnames with
#     MASTER_ADDR; when nodes share a hostname (containers, network namespaces) or
#     MASTER_ADDR is an IP, no node hosts it and the rendezvous times out. Fix:
#     --rdzv_conf is_host=1 on node 0 (is_host=0 elsewhere).
#     (tests/cluster/test_cluster_torchrun.py runs this script in two network namespaces that
#     share a hostname: with is_host=1 the 4-rank world forms.) Node ranks are then assigned by
#     the rendezvous: NODE_RANK=0 hosts the store but need not become group rank 0.
#   - the rendezvous numbers the nodes by their addresses, sorted, and the workers' MASTER_ADDR
#     is then group rank 0's address: socket.getfqdn() where --local_addr is not given, which
#     is "localhost" when /etc/hosts maps the hostname to 127.0.0.1 (lora_dist then stops with
#     "master address 'localhost' is loopback"), and which may sort first on any node. Fix:
#     --local_addr on every node, each its own routable address (LOCAL_ADDR).
# RDZV=static: the classic fixed assignment, --node_rank/--master_addr/--master_port. No
#   elasticity, but nothing to guess; the most robust choice under Slurm.
set -euo pipefail

NNODES="${NNODES:-${SLURM_NNODES:-}}"
NODE_RANK="${NODE_RANK:-${SLURM_NODEID:-}}"
MASTER_PORT="${MASTER_PORT:-29500}"
RDZV="${RDZV:-c10d}"
RDZV_ID="${RDZV_ID:-${SLURM_JOB_ID:-lora-dist}}"
if [[ -z "${NNODES}" || -z "${NODE_RANK}" || -z "${MASTER_ADDR:-}" ]]; then
  echo "torchrun_multi_node.sh: set NNODES, NODE_RANK and MASTER_ADDR (node 0's address)" >&2
  exit 2
fi
if [[ -z "${NPROC_PER_NODE:-}" ]]; then
  NPROC_PER_NODE="$(python -c 'import torch; print(torch.cuda.device_count() or 2)')"
fi
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"

case "${RDZV}" in
  c10d)
    rdzv_args=(--rdzv_backend c10d --rdzv_endpoint "${MASTER_ADDR}:${MASTER_PORT}" --rdzv_id "${RDZV_ID}")
    if [[ "${NODE_RANK}" == 0 ]]; then
      rdzv_args+=(--rdzv_conf is_host=1)
      LOCAL_ADDR="${LOCAL_ADDR:-${MASTER_ADDR}}"
    else
      rdzv_args+=(--rdzv_conf is_host=0)
      if [[ -z "${LOCAL_ADDR:-}" ]]; then  # the source address of this node's route to MASTER_ADDR (UDP: no packet)
        LOCAL_ADDR="$(python - "${MASTER_ADDR}" "${MASTER_PORT}" <<'PY'
import socket, sys
host = sys.argv[1].strip("[]")  # an IPv6 address may come bracketed
try:
    found = socket.getaddrinfo(host, int(sys.argv[2]), type=socket.SOCK_DGRAM)
    family, _, _, _, address = sorted(found, key=lambda a: a[0] != socket.AF_INET)[0]  # IPv4 first
    with socket.socket(family, socket.SOCK_DGRAM) as s:
        s.connect(address)
        print(s.getsockname()[0])
except OSError as e:
    sys.exit(f"torchrun_multi_node.sh: no route from this node to MASTER_ADDR={sys.argv[1]} ({e}); "
             "set LOCAL_ADDR to this node's address the others reach")
PY
)"
      fi
    fi
    rdzv_args+=(--local_addr "${LOCAL_ADDR}")
    ;;
  static)
    rdzv_args=(--node_rank "${NODE_RANK}" --master_addr "${MASTER_ADDR}" --master_port "${MASTER_PORT}")
    ;;
  *)
    echo "torchrun_multi_node.sh: RDZV must be c10d or static, not '${RDZV}'" >&2
    exit 2
    ;;
esac

exec torchrun --nnodes "${NNODES}" --nproc_per_node "${NPROC_PER_NODE}" "${rdzv_args[@]}" \
  --no-python lora-dist train "$@"
