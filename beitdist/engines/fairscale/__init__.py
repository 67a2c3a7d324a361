"""fairscale behind the TrainEngine interface (`engine.backend: fairscale`), in one package.

`engine` is the engine (OSS + ShardedDataParallel, or FullyShardedDataParallel on GPUs);
`checkpoints` names its checkpoint files and consolidates them into full weights. Importing this
package does not import fairscale (an optional dependency): `require_fairscale` says what to
install when it is missing, and the modules import fairscale only where they use it.
"""

from __future__ import annotations

import importlib

FAIRSCALE_REQUIREMENT = "fairscale==0.4.13"


def require_fairscale() -> None:
    """Raise EngineUnavailableError (one line: what to install or choose instead) unless fairscale
    can be imported."""
    try:
        importlib.import_module("fairscale")
    except ImportError as err:
        from beitdist.engines import EngineUnavailableError

        raise EngineUnavailableError(
            f"engine.backend: fairscale is selected but fairscale is not installed ({err}); install it with "
            f"`pip install 'beitdist[fairscale]'` ({FAIRSCALE_REQUIREMENT}), or set engine.backend: deepspeed"
        ) from None
