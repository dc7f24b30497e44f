"""A Megatron-DeepSpeed-style framework for pretraining GPT and Llama-style models.

Layers, top to bottom (imports point down): training/ -> model/, data/ -> core/ -> dist/ -> config/.
See README.md and docs/ARCHITECTURE.md for the picture.
"""

import time as _time

__version__ = "0.1.0"

# When this process started, as upstream's megatron/training.py _TRAIN_START_TIME (set at import): the entry points
# import megatron first, so --exit-duration-in-mins counts the start-up (launch, imports, groups, engine build).
START_TIME = _time.time()
