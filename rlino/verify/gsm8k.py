"""GSM8K-style numeric answers: find the final answer in a completion, normalise, compare exactly.

Extraction, first rule that applies wins (`find_answer`):
1. the last `<answer>...</answer>` block: authoritative when present (the template asked for it),
   even if it holds no number (then the answer is wrong);
2. the last `\\boxed{...}` whose content holds a number;
3. the first `####` that is followed by a number (markdown headings like `#### Step 1` are skipped);
4. the last "the answer is ..." (also "the final answer is") followed by a number on the same line;
5. otherwise the last number in the text.
Rules 1-4 set `format_ok`. Strict extraction (`find_answer(text, "strict")`, the gsm8k task's
`extraction=strict`) keeps only rules 1-3, the explicit answer markers the prompt templates ask
for, as the paper's verifier does: a ramble (or a loop cut at max_new_tokens) whose last number
happens to equal the answer is not read as an answer. Inside a marker's span the answer is the
first number after the span's last `=` (so `#### 9 * 2 = 18` reads 18, `The answer is 42 apples`
reads 42).

Numbers: `$` and `\\$`, thousands commas (`1,234`), trailing `.` and units, decimals (`18.00` = 18),
simple fractions (`5/2` = 2.5), LaTeX `\\frac{5}{2}` / `\\dfrac` / `\\tfrac` with integer parts (so
`\\boxed{\\frac{5}{2}}` reads 2.5), and signs `-3` / `−3` / `-$3` / `$-3` are understood; values are
`fractions.Fraction`, compared exactly. A part with more than 50 digits is not a number.

Safety: every regex here is linear (no nested quantifiers), every search is bounded in how many
candidates it tries, and only the last `MAX_TEXT_CHARS` characters of a completion are read (the
answer is at the end; completions of 1024 tokens are a few thousand characters).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from fractions import Fraction

from rlino.verify.countdown import extract_answer_block

MAX_TEXT_CHARS = 32_768
"""Only this many trailing characters of a completion are examined."""
MAX_NUMBER_DIGITS = 50
"""An integer, decimal or denominator part longer than this is not a number."""
MAX_SPAN_CHARS = 200
"""How far after a marker (`####`, "the answer is", `\\boxed{`) the answer is looked for."""
MAX_TRIES = 16
"""How many occurrences of one marker are tried before giving up on that marker."""
EXTRACTIONS = ("flexible", "strict")
"""Extraction modes: flexible (rules 1-5, the default) or strict (rules 1-3 only)."""

_NUMBER = re.compile(
    r"(?<![\w.])"  # not inside a word or another number
    r"(?P<sign1>[-−])?(?:\\?\$ ?)?(?P<sign2>[-−])?"  # -3, -$3, $-3, \$3 (not "- 3")
    r"(?P<int>\d+(?:,\d{3}(?!\d))*)"  # 1234 or 1,234 (commas only in groups of three)
    r"(?P<dec>\.\d+)?"  # 18.00, 2.5 (a bare trailing "." is not consumed)
    r"(?: ?/ ?(?P<den>\d+))?"  # 5/2
)
_FRAC = re.compile(r"\\[dt]?frac\{ ?(-?\d+) ?\}\{ ?(\d+) ?\}")
_ANSWER_IS = re.compile(r"the\s{1,3}(?:final\s{1,3})?answer\s{1,3}is", re.IGNORECASE)
_HASHES = re.compile(r"#{4,}")
_DIGITS = "0123456789"
_WINDOW = 4 * MAX_NUMBER_DIGITS  # how far before a digit run a number's sign, $ or commas may start


@dataclass(frozen=True)
class Extraction:
    """What `find_answer` read: the answer's text span, its value, and which rule found it."""

    text: str | None
    """The answer as written (the block's text, the boxed content, the number's text...)."""
    value: Fraction | None
    """The number it denotes, None if no number could be read."""
    format_ok: bool
    """Found by an explicit marker (answer block, boxed, ####, "the answer is")."""
    rule: str
    """Which rule found it: answer_block, boxed, hashes, answer_is, last_number or none."""


def parse_number(text: str) -> Fraction | None:
    """The value of `text` if the whole (stripped) string is one number, else None.

    Accepts what `_NUMBER` accepts plus a trailing `.` (end of sentence): "$1,234.00", "18.",
    "-3", "5/2", "\\frac{5}{2}".
    """
    if not isinstance(text, str) or len(text) > 4 * MAX_NUMBER_DIGITS:
        return None
    text = _FRAC.sub(r"\1/\2", text.strip()).removesuffix(".").strip()
    match = _NUMBER.fullmatch(text)
    return _match_value(match) if match else None


def format_number(value: Fraction) -> str:
    """Canonical text of a number: "18", "-3", "2.5", or "1/3" when it has no finite decimal."""
    if value.denominator == 1:
        return str(value.numerator)
    den, twos, fives = value.denominator, 0, 0
    while den % 2 == 0:
        den, twos = den // 2, twos + 1
    while den % 5 == 0:
        den, fives = den // 5, fives + 1
    if den != 1:
        return f"{value.numerator}/{value.denominator}"
    places = max(twos, fives)
    scaled = abs(value) * 10**places  # an integer, by construction
    digits = str(scaled.numerator).rjust(places + 1, "0")
    sign = "-" if value < 0 else ""
    return f"{sign}{digits[:-places]}.{digits[-places:]}"


def find_answer(text: str, extraction: str = "flexible") -> Extraction:
    """Apply the extraction rules (module docstring) to a completion. Never raises.

    `extraction` "strict" reads only an `<answer>` block, `\\boxed{}` or `####`; any other value
    is flexible (callers validate it, see `EXTRACTIONS`).
    """
    strict = extraction == "strict"
    if not isinstance(text, str):
        return Extraction(None, None, False, "none")
    text = text[-MAX_TEXT_CHARS:]
    block = extract_answer_block(text)
    if block is not None:
        found = _span_number(block)
        value = found[1] if found else None
        return Extraction(block[:MAX_SPAN_CHARS], value, True, "answer_block")
    finders = [("boxed", _from_boxed), ("hashes", _from_hashes)]
    if not strict:
        finders.append(("answer_is", _from_answer_is))
    for rule, finder in finders:
        found = finder(text)
        if found is not None:
            return Extraction(found[0], found[1], True, rule)
    found = None if strict else _last_number(text)
    if found is not None:
        return Extraction(found[0], found[1], False, "last_number")
    return Extraction(None, None, False, "none")


def gold_from_solution(solution: object) -> str | None:
    """The normalised gold answer of a reference: the number after `####`, or a bare number.

    Returns None when the reference has neither (a malformed record).
    """
    if isinstance(solution, bool):
        return None
    if isinstance(solution, int):
        return format_number(Fraction(solution))
    if isinstance(solution, float):
        return format_number(Fraction(repr(solution))) if solution == solution else None
    if not isinstance(solution, str):
        return None
    _, sep, after = solution.rpartition("####")
    if sep:
        found = _span_number(after.lstrip("#").split("\n", 1)[0][:MAX_SPAN_CHARS])
        return format_number(found[1]) if found else None
    value = parse_number(solution)
    return format_number(value) if value is not None else None


def answers_equal(predicted: Fraction | None, gold: str) -> bool:
    """Exact numeric equality of a predicted value and a gold answer string."""
    if predicted is None:
        return False
    gold_value = parse_number(gold)
    return gold_value is not None and predicted == gold_value


def _match_value(match: re.Match[str]) -> Fraction | None:
    """The value of one `_NUMBER` match, None when a part is too long or the denominator is 0."""
    integer = match["int"].replace(",", "")
    decimals = match["dec"] or ""
    den = match["den"]
    if len(integer) > MAX_NUMBER_DIGITS or len(decimals) > MAX_NUMBER_DIGITS + 1:
        return None
    if den is not None and (len(den) > MAX_NUMBER_DIGITS or int(den) == 0):
        return None
    value = Fraction(integer + decimals)
    if den is not None:
        value /= int(den)
    negative = bool(match["sign1"]) != bool(match["sign2"])  # "-$-3" is +3, oddly but consistently
    return -value if negative else value


def _first_number(text: str) -> tuple[str, Fraction] | None:
    """The first valid number in `text` (its matched text and value)."""
    for match in _NUMBER.finditer(text):
        value = _match_value(match)
        if value is not None:
            return match[0].strip(), value
    return None


def _span_number(span: str) -> tuple[str, Fraction] | None:
    """The answer inside a marker's span: the first number after the span's last `=`."""
    span = _FRAC.sub(r"\1/\2", span[: 4 * MAX_SPAN_CHARS].replace("{,}", ","))
    return _first_number(span.rpartition("=")[2])


def _braced(text: str, start: int) -> str | None:
    """The content of the `{...}` opening at `text[start]`, braces balanced, or None."""
    if start >= len(text) or text[start] != "{":
        return None
    depth = 0
    end = min(len(text), start + MAX_SPAN_CHARS)
    for i in range(start, end):
        if text[i] == "{":
            depth += 1
        elif text[i] == "}":
            depth -= 1
            if depth == 0:
                return text[start + 1 : i]
    return None


def _from_boxed(text: str) -> tuple[str, Fraction] | None:
    """The last `\\boxed{...}` (of the last MAX_TRIES) whose content holds a number."""
    pos = len(text)
    for _ in range(MAX_TRIES):
        i = text.rfind("\\boxed", 0, pos)
        if i < 0:
            return None
        content = _braced(text, i + len("\\boxed"))
        found = _span_number(content) if content is not None else None
        if found is not None:
            return content.strip(), found[1]
        pos = i
    return None


def _from_hashes(text: str) -> tuple[str, Fraction] | None:
    """The first `####` (of the first MAX_TRIES) directly followed by a number."""
    for tries, match in enumerate(_HASHES.finditer(text)):
        if tries >= MAX_TRIES:
            return None
        line = text[match.end() : match.end() + MAX_SPAN_CHARS].split("\n", 1)[0]
        stripped = _FRAC.sub(r"\1/\2", line.strip())
        if _NUMBER.match(stripped) is None:
            continue
        found = _span_number(line)
        if found is not None:
            return found
    return None


def _from_answer_is(text: str) -> tuple[str, Fraction] | None:
    """The last "the answer is" (of the last MAX_TRIES) followed by a number on its line."""
    matches = list(_ANSWER_IS.finditer(text))
    for match in reversed(matches[-MAX_TRIES:]):
        line = text[match.end() : match.end() + MAX_SPAN_CHARS].split("\n", 1)[0]
        found = _span_number(line)
        if found is not None:
            return found
    return None


def _last_number(text: str) -> tuple[str, Fraction] | None:
    """The last valid number in `text` (of the last MAX_TRIES digit runs), found from the end.

    Digit runs are located with `str.rfind` (C speed) and `_NUMBER` only runs on a small window
    before each, so text with few or no digits costs almost nothing.
    """
    end = len(text)
    for _ in range(MAX_TRIES):
        last_digit = max(text.rfind(d, 0, end) for d in _DIGITS)
        if last_digit < 0:
            return None
        run_start = len(text[: last_digit + 1].rstrip(_DIGITS))
        low = max(0, run_start - _WINDOW)
        found = None
        for match in _NUMBER.finditer(text, low, last_digit + 1):
            if match.end() == last_digit + 1 and (match.start() > low or low == 0):
                value = _match_value(match)
                found = (match[0].strip(), value) if value is not None else None
        if found is not None:
            return found
        end = run_start
    return None
