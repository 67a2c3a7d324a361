"""The optimizer a DeepSpeed run hands to `deepspeed.initialize`.

Always beitdist's own AdamW over the layer-decay groups (`beitdist.optim`), passed as a client
optimizer: the schedule, the groups and the numbers are the same as every other engine's. With
the optimizer state offloaded to the CPU (`offload_optimizer`) it is DeepSpeed's CPU Adam in AdamW
mode over the same groups (JIT-built on first use, ~50 s once per machine): ZeRO-Offload steps on
the host and accepts only that optimizer.
"""

from __future__ import annotations

from typing import Any

import torch

from beitdist.engines.deepspeed.importing import import_deepspeed
from beitdist.optim import OptimConfig, adamw_options, build_adamw, optimizer_groups


def build_optimizer(groups: list[dict[str, Any]], config: OptimConfig, cpu_offload: bool = False) -> torch.optim.Optimizer:
    """torch AdamW over the layer-decay groups, or DeepSpeed's CPU Adam when `cpu_offload`."""
    if not cpu_offload:
        return build_adamw(groups, config)
    import_deepspeed()
    from deepspeed.ops.adam import DeepSpeedCPUAdam

    return DeepSpeedCPUAdam(optimizer_groups(groups), adamw_mode=True, **adamw_options(config))
