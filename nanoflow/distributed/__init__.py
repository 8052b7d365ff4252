"""Tensor parallelism over torch.distributed (NCCL on CUDA, gloo on CPU), one process per rank.

    LLM(model=..., tensor_parallel_size=4)          # rank 0 here; ranks 1..3 launched as processes
    nanoflow generate --tensor-parallel-size 2 ...  # the same from the CLI
    torchrun --nproc-per-node 4 -m nanoflow.entrypoints.cli bench throughput --tensor-parallel-size 4 ...

Modules: sharding (who holds which heads / columns / vocabulary rows; reading a rank's checkpoint
slices), context (TPContext: the process groups and the collectives the model calls), launch
(rendezvous, launching and stopping workers), runner (rank 0 sends each step, workers follow),
worker (a worker rank's main loop).
"""
