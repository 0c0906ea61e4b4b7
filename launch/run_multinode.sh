#!/usr/bin/env bash
# Multi-node launch over torchrun's c10d rendezvous. Run the same command on every node, with that
# node's NODE_RANK (torchrun passes it on but the c10d rendezvous numbers the nodes itself, sorting
# them by --local-addr, else hostname; torchrun warns so):
#
#   bash launch/run_multinode.sh NNODES NODE_RANK MASTER_ADDR [MASTER_PORT] -- --config CONFIG [a.b=value ...]
#   bash launch/run_multinode.sh NNODES NODE_RANK MASTER_ADDR [MASTER_PORT] [torchrun options ...] \
#       -- --config CONFIG [a.b=value ...]
#
# or set NNODES, NODE_RANK, MASTER_ADDR, MASTER_PORT (and NPROC_PER_NODE, RUN_ID) in the
# environment and pass only the training arguments (and torchrun options before a `--`). Options in
# $TORCHRUN_ARGS (word-split) come first, for schedulers that can only set the environment; options
# on the command line come after them and so win. Without a `--`, every argument after the
# positional ones goes to launch/train.py.
#
# MASTER_ADDR   the host of the rendezvous store (one node's address); MASTER_PORT its port (default
#               29500), which must be free on that host and reachable from every node.
# NPROC_PER_NODE  processes per node (default: the GPUs nvidia-smi lists, else 2).
# RUN_ID        the rendezvous id (default loom); two jobs sharing a store need different ids.
# MAX_RESTARTS  torchrun --max-restarts (default 0). A restart re-runs the rendezvous on every node
#               and restarts all workers, which resume from the newest checkpoint (checkpoint.resume=auto),
#               so it only pays off with checkpoint.save_interval > 0 and a failure that is not
#               deterministic; an explicit --max-restarts option wins.
#
# Hosts whose hostname does not resolve to the interface the nodes share: torchrun decides whether
# this node hosts the c10d store by comparing MASTER_ADDR with the addresses its hostname resolves
# to, and tells every worker to meet at the fully qualified hostname of the node it ranks first.
# Where the hostname resolves elsewhere (127.0.1.1 in /etc/hosts, a management network, a
# container), no node starts the store, or the workers dial an address the other nodes cannot
# reach, and the rendezvous times out. Then pass, on each node:
#   --local-addr ADDR          this node's address on the shared network;
#   --rdzv-conf is_host=1|0    1 on the node at MASTER_ADDR (it hosts the store), 0 elsewhere.
# GLOO_SOCKET_IFNAME / NCCL_SOCKET_IFNAME name the network interface (e.g. eth1) gloo (CPU runs)
# and NCCL (GPU runs) open their connections on; without them each picks one from the hostname or
# the first non-loopback interface, which may not be the one the other nodes can reach.
set -euo pipefail
cd "$(dirname "$0")/.."
positional=()
while [[ $# -gt 0 && "$1" != "--" && "$1" != --* ]]; do positional+=("$1"); shift; done
if [[ ${#positional[@]} -gt 4 ]]; then
  echo "run_multinode.sh: at most 4 positional arguments (NNODES NODE_RANK MASTER_ADDR [MASTER_PORT]," \
    "then torchrun options, --, training arguments), got: ${positional[*]}" >&2
  exit 2
fi

# shellcheck source=launch/torchrun_args.sh
source launch/torchrun_args.sh
split_torchrun_args "$@"

NNODES="${positional[0]:-${NNODES:-}}"
NODE_RANK="${positional[1]:-${NODE_RANK:-}}"
MASTER_ADDR="${positional[2]:-${MASTER_ADDR:-}}"
MASTER_PORT="${positional[3]:-${MASTER_PORT:-29500}}"
for var in NNODES NODE_RANK MASTER_ADDR; do
  if [[ -z "${!var}" ]]; then echo "run_multinode.sh: $var is not set (argument or environment)" >&2; exit 2; fi
done
if [[ -z "${NPROC_PER_NODE:-}" ]]; then
  if command -v nvidia-smi >/dev/null 2>&1; then NPROC_PER_NODE=$(nvidia-smi -L | wc -l); else NPROC_PER_NODE=2; fi
fi

exec torchrun --nnodes "$NNODES" --node-rank "$NODE_RANK" --nproc-per-node "$NPROC_PER_NODE" \
  --rdzv-backend c10d --rdzv-endpoint "$MASTER_ADDR:$MASTER_PORT" --rdzv-id "${RUN_ID:-loom}" \
  "${torchrun_opts[@]}" launch/train.py ${train_args[@]+"${train_args[@]}"}
