"""Safe Countdown verification: read the last `<answer>` block, parse it, evaluate it exactly.

The answer must be an arithmetic expression over integers with binary `+ - * /`, parentheses and
spaces, optionally followed by `= N`. It is parsed by a small recursive-descent parser (never
`eval`, never `ast`), evaluated with `fractions.Fraction` so `7 / 2 * 2` is exactly 7, and bounded:
long expressions, deep nesting and long numbers are rejected before any work is done.

Grammar (no unary operators, so `-3`, `+3`, `**` and `//` are all syntax errors):

    expr   := term (("+" | "-") term)*
    term   := factor (("*" | "/") factor)*
    factor := INT | "(" expr ")"
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from fractions import Fraction

MAX_EXPR_CHARS = 200
"""Longest expression (after stripping) that is parsed at all."""
MAX_DEPTH = 20
"""Deepest parenthesis nesting accepted."""
MAX_DIGITS = 6
"""Longest integer literal accepted."""

ANSWER_OPEN = "<answer>"
ANSWER_CLOSE = "</answer>"
_SPACES = " \t"
_OPERATORS = "+-*/"


def extract_answer_block(text: str) -> str | None:
    """The stripped text of the last complete `<answer>...</answer>` block, or None.

    "Last" means the block closed by the last `</answer>`, opened by the nearest `<answer>` before
    it. An opening tag with no closing tag (a truncated completion) is no answer. Linear time.
    """
    if not isinstance(text, str):
        return None
    end = text.rfind(ANSWER_CLOSE)
    if end < 0:
        return None
    start = text.rfind(ANSWER_OPEN, 0, end)
    if start < 0:
        return None
    return text[start + len(ANSWER_OPEN) : end].strip()


@dataclass(frozen=True)
class Parsed:
    """A successfully parsed expression: its exact value and the integer literals it uses."""

    value: Fraction
    numbers: tuple[int, ...]


class _Reject(Exception):
    """Internal: the expression is not in the accepted language (or divides by zero)."""


class _Parser:
    """Recursive descent over a pre-tokenised expression; depth is bounded by MAX_DEPTH."""

    def __init__(self, tokens: list[str | int]) -> None:
        self.tokens = tokens
        self.pos = 0
        self.numbers: list[int] = []

    def peek(self) -> str | int | None:
        return self.tokens[self.pos] if self.pos < len(self.tokens) else None

    def take(self) -> str | int | None:
        token = self.peek()
        self.pos += 1
        return token

    def expr(self, depth: int) -> Fraction:
        value = self.term(depth)
        while self.peek() in ("+", "-"):
            op = self.take()
            right = self.term(depth)
            value = value + right if op == "+" else value - right
        return value

    def term(self, depth: int) -> Fraction:
        value = self.factor(depth)
        while self.peek() in ("*", "/"):
            op = self.take()
            right = self.factor(depth)
            if op == "*":
                value = value * right
            elif right == 0:
                raise _Reject("division by zero")
            else:
                value = value / right
        return value

    def factor(self, depth: int) -> Fraction:
        token = self.take()
        if isinstance(token, int):
            self.numbers.append(token)
            return Fraction(token)
        if token == "(":
            if depth >= MAX_DEPTH:
                raise _Reject("nesting too deep")
            value = self.expr(depth + 1)
            if self.take() != ")":
                raise _Reject("unbalanced parenthesis")
            return value
        raise _Reject(f"unexpected token {token!r}")


def _tokenize(text: str) -> list[str | int]:
    """Split into integers and the six symbols `+ - * / ( )`; anything else rejects."""
    tokens: list[str | int] = []
    i, n = 0, len(text)
    while i < n:
        ch = text[i]
        if ch in _SPACES:
            i += 1
        elif "0" <= ch <= "9":
            j = i
            while j < n and "0" <= text[j] <= "9":
                j += 1
            if j - i > MAX_DIGITS:
                raise _Reject("number too long")
            tokens.append(int(text[i:j]))
            i = j
        elif ch in _OPERATORS or ch in "()":
            tokens.append(ch)
            i += 1
        else:
            raise _Reject(f"character {ch!r} not allowed")
    return tokens


def parse_expression(text: str) -> Parsed | None:
    """Parse and evaluate `text` exactly; None for anything outside the grammar or its bounds."""
    if not isinstance(text, str):
        return None
    text = text.strip()
    if not text or len(text) > MAX_EXPR_CHARS:
        return None
    try:
        parser = _Parser(_tokenize(text))
        value = parser.expr(0)
        if parser.pos != len(parser.tokens):
            return None
    except _Reject:
        return None
    return Parsed(value, tuple(parser.numbers))


def evaluate_expression(text: str) -> Fraction | None:
    """The exact value of an arithmetic expression, or None if it is not a valid one."""
    parsed = parse_expression(text)
    return None if parsed is None else parsed.value


def check_equation(answer: str, numbers: Sequence[int], target: int) -> bool:
    """True when `answer` uses each of `numbers` exactly once and evaluates exactly to `target`.

    `answer` may end in `= N`; that is accepted only when N is the target. Never raises.
    """
    if not isinstance(answer, str) or len(answer) > 2 * MAX_EXPR_CHARS:
        return False
    expression, sep, rhs = answer.partition("=")
    if sep:
        rhs = rhs.strip()
        if not rhs.isascii() or not rhs.isdigit() or len(rhs) > MAX_DIGITS:
            return False
        if int(rhs) != target:
            return False
    parsed = parse_expression(expression)
    if parsed is None:
        return False
    if Counter(parsed.numbers) != Counter(numbers):
        return False
    return parsed.value == target
