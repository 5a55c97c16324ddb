"""rlino: outcome-reward post-training of language models, GRPO and filtered iterative SFT side by side."""

__version__ = "0.1.0"
