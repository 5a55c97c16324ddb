"""rlino: outcome-reward post-training of language models, GRPO and filtered iterative SFT side by side."""

import logging

__version__ = "0.1.0"


class _DropKnownNoise(logging.Filter):
    """Drop one logger's records that start with any of the given texts."""

    def __init__(self, *starts: str) -> None:
        super().__init__()
        self.starts = starts

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(self.starts)


# torchao (the 8-bit optimiser of `optim.optimizer: adamw8bit`) is imported by transformers on
# every model load once it is installed; on a CPU machine its import logs a warning for each
# CUDA-only kernel it cannot load, and torch one for each enum it registers. Noise on every run.
logging.getLogger("torchao").addFilter(_DropKnownNoise("Failed to load"))
logging.getLogger("torch.utils._pytree").addFilter(_DropKnownNoise("<enum "))
