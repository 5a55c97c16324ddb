"""Test hook: `RLINO_FAULT=POINT:ITERATION` makes the process SIGKILL itself at that point.

`POINT:ITERATION@RANK` kills only that rank of a torchrun job (its `RANK`), the others then
stopped by torchrun.

Only tests/test_resume_faults.py sets it, to land kills exactly where they hurt most; unset, it
does nothing. The points:

- `eval`: iteration N's evaluation is done, its metrics row not yet written (0: the first one);
- `checkpoint`: checkpoint N is half written (the model is, the optimiser state is not);
- `metrics`, `samples`: half of iteration N's append to that file is written (a torn last line).
"""

from __future__ import annotations

import os
import signal
from typing import NoReturn


def armed(point: str, iteration: int) -> bool:
    """Whether `RLINO_FAULT` asks for a kill at `point` of `iteration` (the one place it is read)."""
    wanted = os.environ.get("RLINO_FAULT")
    if wanted is None:
        return False
    spot, _, rank = wanted.partition("@")
    return spot == f"{point}:{iteration}" and (not rank or rank == os.environ.get("RANK", "0"))


def kill() -> NoReturn:
    """SIGKILL this process: no handler, no `finally`, no flush runs, as with `kill -9`."""
    os.kill(os.getpid(), signal.SIGKILL)
    raise AssertionError("unreachable")  # pragma: no cover


def point(point: str, iteration: int) -> None:
    """Kill the process here when `RLINO_FAULT` names this point and iteration."""
    if armed(point, iteration):
        kill()
