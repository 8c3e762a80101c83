#!/usr/bin/env bash
# Multi-node ICE-GRT on a SLURM GPU cluster: one process per node, each driving its node's GPUs.
#
#   sbatch scripts/launch_slurm.sh ppo --config configs/vicuna-13b-ppo.yaml mesh.data=8 mesh.fsdp=4 mesh.tensor=2
#
# JAX's multi-controller runtime starts itself: with more than one SLURM task, every trainer calls
# icegrt_jax.sharding.initialize_distributed(), which lets jax.distributed detect the coordinator
# (the first node), the process count and each process's id from SLURM's variables. Every process
# runs the same command on the global mesh; process 0 writes logs and progress, all processes write
# checkpoints (Orbax), and a rerun of the same command resumes from the newest one.
# Plan the mesh first: icegrt plan --config FILE --devices 64 --device-memory 80 (docs/bench_plan.md).
# The shipped configs' batches fit the data-parallel size they divide: 64 GPUs on SFT need e.g.
#   sbatch scripts/launch_slurm.sh sft --config configs/vicuna-13b.yaml mesh.data=8 mesh.fsdp=8 optimizer.grad_accum_steps=2
# training.output_dir must be on a filesystem every node shares (every process writes checkpoints;
# a 13B PPO checkpoint, actor + critic with fp32 Adam moments, is ~312 GB). At the time limit SLURM
# sends SIGTERM 15 minutes early (--signal): the trainer saves a checkpoint after its current step
# and exits 143; resubmitting the same command resumes.
#
#SBATCH --job-name=icegrt
#SBATCH --nodes=8
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=32
#SBATCH --exclusive
#SBATCH --time=48:00:00
#SBATCH --output=%x-%j.out
#SBATCH --signal=TERM@900
set -euo pipefail
# (the job's log is written in the submit directory: SLURM would not create a logs/ directory for it)

cd "${SLURM_SUBMIT_DIR:-$(dirname "$0")/..}"
# shellcheck disable=SC1091
. "${VENV:-.venv}/bin/activate"

# One process per node drives all of its GPUs: jax.distributed's SLURM detection would otherwise
# give each process only the GPU numbered by its local task id (one process per GPU is its default).
JAX_LOCAL_DEVICE_IDS="${JAX_LOCAL_DEVICE_IDS:-$(seq -s, 0 $((${SLURM_GPUS_ON_NODE:-8} - 1)))}"
export JAX_LOCAL_DEVICE_IDS

# Let XLA use most of each GPU's memory for the preallocated pool, and keep NCCL on the fabric.
export XLA_PYTHON_CLIENT_MEM_FRACTION="${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.92}"
export NCCL_DEBUG="${NCCL_DEBUG:-WARN}"
# Without SLURM (or to override detection) set these instead on every process:
#   JAX_COORDINATOR_ADDRESS=host:port JAX_NUM_PROCESSES=N JAX_PROCESS_ID=i

# srun does not inherit --cpus-per-task from sbatch on SLURM 22.05+: the host-side work needs the cores
srun --kill-on-bad-exit=1 --cpus-per-task="${SLURM_CPUS_PER_TASK:-32}" icegrt "$@"
