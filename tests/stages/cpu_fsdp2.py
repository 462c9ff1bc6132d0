"""The qat stage's training worker under Accelerate's FSDP2 on CPU, for tests/stages/test_fsdp2.py.

Accelerate enables FSDP only on GPUs (accelerate/state.py: the FSDP branch lists the GPU-like distributed types,
not MULTI_CPU), so this opens that one gate, and the stage's own GPU check, and changes nothing else: the real
Trainer, Accelerate's fsdp2_prepare_model, fully_shard over gloo, sharded checkpoints through
torch.distributed.checkpoint. Run under `torchrun --nproc-per-node 2` with the stage's FSDP2_ENV."""

import sys

import accelerate.state
from accelerate.utils import DistributedType

from reasoning_qat.stages import qat

_init = accelerate.state.PartialState.__init__


def _as_if_gpus(self, *args, **kwargs):
    _init(self, *args, **kwargs)
    if self.distributed_type == DistributedType.MULTI_CPU:
        self.distributed_type = DistributedType.MULTI_GPU  # the FSDP branch of AcceleratorState then applies


accelerate.state.PartialState.__init__ = _as_if_gpus
qat._check_fsdp2_device = lambda q: None

if __name__ == "__main__":
    qat._worker_main(sys.argv[1:])
