"""Run one training iteration (one or more ranks) and save what a test compares: run by
tests/test_distributed.py as `python dist_probe.py OUT CONFIG_JSON`, alone or under torchrun.

Saves, from rank 0: the gradient each optimiser step saw (captured by an optimiser pre-hook,
after the ranks' gradients were summed), the gathered rewards and the metrics row.
"""

from __future__ import annotations

import json
import sys

import torch

from rlino.config import load_config
from rlino.distributed import init_world
from rlino.setup import build, make_optimizer
from rlino.step import step
from rlino.update import flat_grad


def main(out: str, overrides: str) -> None:
    config = load_config(None, json.loads(overrides))
    world = init_world(config.model.device, config.dist.strategy)
    torch.manual_seed(config.seed)
    setup = build(config, world=world)
    optimizer = make_optimizer(setup)
    grads: list[torch.Tensor] = []
    optimizer.register_step_pre_hook(lambda *_: grads.append(flat_grad(setup.policy.model)))
    result = step(setup, 0, optimizer)
    if world.is_main:
        torch.save(
            {
                "grads": grads,
                "rewards": result.scored.rewards,
                "texts": result.scored.texts,
                "metrics": {k: v for k, v in result.metrics.items() if isinstance(v, float)},
                "world": world.size,
            },
            out,
        )


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
