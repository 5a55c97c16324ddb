"""Verifiers: pure, deterministic, exception-safe answer checking (never `eval`).

- `countdown`: Countdown equations, parsed by a bounded recursive-descent parser, exact rationals.
- `gsm8k`: GSM8K-style numeric answers: extraction rules, normalisation, exact comparison.
"""

from rlino.verify.countdown import (
    check_equation,
    evaluate_expression,
    extract_answer_block,
    parse_expression,
)
from rlino.verify.gsm8k import (
    answers_equal,
    find_answer,
    format_number,
    gold_from_solution,
    parse_number,
)

__all__ = [
    "answers_equal",
    "check_equation",
    "evaluate_expression",
    "extract_answer_block",
    "find_answer",
    "format_number",
    "gold_from_solution",
    "parse_expression",
    "parse_number",
]
