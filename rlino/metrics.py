"""Sampling-based accuracy estimators: pass@k and mean@k from n samples per problem, c correct.

pass@k is the probability that at least one of k samples is correct. Estimating it by the fraction
of problems solved within the first k samples wastes the other n - k samples and is noisy; the
unbiased estimator of Chen et al. 2021 ("Evaluating Large Language Models Trained on Code") averages
over all size-k subsets of the n samples:

    pass@k = 1 - C(n - c, k) / C(n, k) = 1 - prod_{i = n - c + 1}^{n} (1 - k / i)

The product form avoids the huge binomial coefficients. mean@k is the expected fraction correct
among k samples, whose unbiased estimate is c / n for every k (reported beside pass@k so that "the
model got better at sampling the right answer" and "the model covers more problems" stay apart).
"""

from __future__ import annotations

import math


def _check(n: int, c: int, k: int) -> None:
    if not 0 <= c <= n:
        raise ValueError(f"need 0 <= c <= n, got n={n}, c={c}")
    if not 1 <= k <= n:
        raise ValueError(f"need 1 <= k <= n, got n={n}, k={k}")


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from `n` samples of which `c` are correct (1 <= k <= n)."""
    _check(n, c, k)
    if n - c < k:  # every size-k subset holds a correct sample
        return 1.0
    return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))


def mean_at_k(n: int, c: int, k: int = 1) -> float:
    """Unbiased mean@k (expected accuracy of k samples) from `n` samples, `c` correct: c / n.

    The value does not depend on k; `k` is only checked (1 <= k <= n) so calls read like pass@k.
    """
    _check(n, c, k)
    return c / n
