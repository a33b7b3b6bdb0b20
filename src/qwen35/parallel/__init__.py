"""Tensor and expert parallelism on torch.distributed.

- `context.py`  TensorParallel: rank, size, the collectives the layers call
- `linear.py`   row-parallel linear, vocabulary-parallel embedding and head
- `experts.py`  routed experts spread over the ranks (expert parallelism)
- `shard.py`    which slice of each checkpoint tensor a rank reads (the planner's rules)
- `shm.py`      all-reduce through shared memory for CPU ranks on one host (gloo otherwise)
- `group.py`    the worker processes: start (torch.multiprocessing or torchrun), watch, stop
- `worker.py`   a worker rank's loop; `runner.py` rank 0's runner that broadcasts each step
"""

from qwen35.parallel.context import SINGLE, TensorParallel

__all__ = ["SINGLE", "TensorParallel"]
