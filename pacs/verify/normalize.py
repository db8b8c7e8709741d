"""Stage 2 of the verifier: normalize an extracted answer string and split it into a small answer tree.

Pure string work (no sympy). Normalization removes what never changes the value (``\\left``, ``\\!``, ``\\dfrac``,
``\\displaystyle``, dollar signs, units and trailing prose), records percent and degree marks, and repairs loose
LaTeX (``\\frac13``, ``\\sqrt3``). The tree tells the comparison stage how to compare:

* ``Choice``: a multiple-choice letter, ``(B)``;
* ``Text``: a word answer, ``\\text{Evelyn}``;
* ``Expr``: one LaTeX expression, equation or inequality, with percent / degree flags;
* ``Seq``: a bracketed or bare comma list: tuples and intervals are ordered (brackets matter), sets ``\\{..\\}`` and
  bare lists are unordered;
* ``Union``: intervals or sets joined by ``\\cup``;
* ``Matrix``: rows of cells from ``pmatrix``/``bmatrix``/``array``.

Ambiguous inputs (``1,234`` as a number or a list, ``1,5`` as a decimal comma) give several trees; the answer
matches when any reading of the gold matches any reading of the response.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from fractions import Fraction
from typing import Union as TUnion

__all__ = [
    "Choice", "Text", "Expr", "Seq", "Union", "Matrix", "Time", "Node",
    "parse_answer", "parse_normalized", "normalize", "quick_equal",
]


@dataclass(frozen=True)
class Choice:
    letter: str


@dataclass(frozen=True)
class Text:
    value: str


@dataclass(frozen=True)
class Expr:
    latex: str
    percent: bool = False
    degree: bool = False


@dataclass(frozen=True)
class Seq:
    open: str  # "(", "[", "{" or "" for a bare list
    close: str
    items: tuple

    @property
    def unordered(self) -> bool:
        return self.open in ("{", "")


@dataclass(frozen=True)
class Union:
    parts: tuple


@dataclass(frozen=True)
class Matrix:
    rows: tuple
    latex: str = ""


@dataclass(frozen=True)
class Time:
    hours: int
    minutes: int


Node = TUnion[Choice, Text, Expr, Seq, Union, Matrix, Time]

_SPACING = re.compile(
    r"\\(?:left|right)\.|\\(?:left|right|bigl|bigr|Bigl|Bigr|biggl|biggr|Biggl|Biggr|big|Big|bigg|Bigg)(?![a-zA-Z])"
    r"|\\(?:displaystyle|textstyle|scriptstyle|limits|nolimits|mathstrut)(?![a-zA-Z])"
    r"|\\(?:tiny|scriptsize|footnotesize|small|normalsize|large|Large|LARGE|huge|Huge|scriptscriptstyle)(?![a-zA-Z])"
    r"|(?<!\\)\\[,;: ]|\\q?quad|~|\\hfill|\\phantom\{[^{}]*\}"
)
_TEXT_CMDS = re.compile(r"\\(?:mbox|textbf|textit|textnormal|textrm|mathrm|mathbf|mathit|mathsf|operatorname|texttt|hbox|boldsymbol|bm|pmb|mathbfit)\s*\{")
_UNIT_WORDS = (
    "cm|mm|km|m|meters?|metres?|kilometers?|centimeters?|inches|inch|in|ft|feet|foot|yards?|yd|miles?|mi|mph|"
    "kg|g|grams?|kilograms?|lbs?|pounds?|ounces?|oz|tons?|s|sec|seconds?|min|minutes?|hr|hrs|hours?|days?|weeks?|"
    "months?|years?|dollars?|cents?|units?|sq|square|cubic|liters?|litres?|l|ml|mL|gallons?|degrees?|people|"
    "students?|apples?|points?|ways?|times|percent|percentage|pct|cups?|pages?|books?|boxes|marbles?|coins?"
)
_TRAILING_UNIT = re.compile(rf"(?<=[\d}})\s])\s*(?:\\text\{{\s*)?(?:{_UNIT_WORDS})(?:\s*\^\s*\{{?[23]\}}?|[²³])?\}}?\s*$")
_TRIG = re.compile(r"\\(?:sin|cos|tan|cot|sec|csc)")
_CHOICE_RE = re.compile(
    r"^(?:\\text\{)?\(?\s*([A-Ea-e])\s*\)?\}?(?:\s*[.:]?\s*$|\s*\)\s*.*$|[.:]\s+.*$|\s+[A-Z][a-z]+(?:\s+\S+){0,3}$)"
)
_CHOICE_PAREN_RE = re.compile(r"^\(\s*([A-Ea-e])\s*\)")


def _strip_math_delims(s: str) -> str:
    s = s.strip()
    for left, right in (("$$", "$$"), ("\\[", "\\]"), ("\\(", "\\)"), ("$", "$")):
        if s.startswith(left) and s.endswith(right) and len(s) >= len(left) + len(right):
            s = s[len(left) : len(s) - len(right)].strip()
    return re.sub(r"(?<!\\)\$", " ", s).strip()


def _fix_loose_args(s: str) -> str:
    """``\\frac13`` -> ``\\frac{1}{3}``, ``\\frac3{3}`` -> ``\\frac{3}{3}``, ``\\sqrt3`` -> ``\\sqrt{3}``."""
    s = re.sub(r"\\frac\s*(\d)\s*(\d)", r"\\frac{\1}{\2}", s)
    s = re.sub(r"\\frac\s*(\d)\s*\{", r"\\frac{\1}{", s)
    s = re.sub(r"\\frac\s*\{([^{}]*)\}\s*([\da-zA-Z])", r"\\frac{\1}{\2}", s)
    s = re.sub(r"\\frac\s*([a-zA-Z])\s*([\da-zA-Z])", r"\\frac{\1}{\2}", s)
    s = re.sub(r"\\sqrt\s*(\d+|[a-zA-Z])(?![a-zA-Z{])", r"\\sqrt{\1}", s)
    return s


def _repeating_decimal(m: re.Match) -> str:
    """``0.1\\overline{6}`` -> ``\\frac{1}{6}``."""
    sign, whole, fixed, period = m.groups()
    value = Fraction(int(whole or 0)) + (Fraction(int(fixed), 10 ** len(fixed)) if fixed else 0)
    value += Fraction(int(period), (10 ** len(period) - 1) * 10 ** len(fixed))
    return f"{sign}\\frac{{{value.numerator}}}{{{value.denominator}}}"


def normalize(s: str) -> str:
    """Canonical LaTeX for an answer string: styling, spacing and delimiters removed; units and prose kept."""
    s = _repair_escapes(s)
    s = _strip_math_delims(s.strip().strip("*").strip())
    if "matrix" not in s and "array" not in s:
        s = re.sub(r"(?<!\\)\\\\(?=[a-zA-Z])", r"\\", s)
    s = s.replace("\\$", "").replace("\\%", "%").replace("％", "%").replace('\\"', "").replace('"', "")
    s = re.sub(r"\\[dtc]frac", r"\\frac", s)
    s = re.sub(r"\\(?:text)?color\s*\{[^{}]*\}", "", s)  # ``\\color{red}{5}``
    # the imaginary unit and Euler's number set upright (``3\\mathrm{i}``) are symbols, not trailing units
    s = re.sub(r"\\(?:mathrm|text|textrm|textit|mathit|operatorname)\s*\{\s*([ei])\s*\}", r" \1", s)
    s = _TEXT_CMDS.sub(lambda _: "\\text{", s)
    s = re.sub(r"(\d),\s*\\!\s*(?=\d{3})", r"\1,", s)
    s = re.sub(r"(?<!\\)\\!", "", s)
    s = re.sub(r"\\text\{\s*\}", "", s)
    s = _SPACING.sub(" ", s)
    s = re.sub(r"(\d)\{,\}(\d)", r"\1,\2", s)
    s = re.sub(r"\\(?:degree|circ)(?![a-zA-Z])", "°", s)
    s = re.sub(r"\^\s*\{?\s*°\s*\}?|°", "°", s)
    s = re.sub(r"\\(?:lt)(?![a-zA-Z])", "<", s)
    s = re.sub(r"\\(?:gt)(?![a-zA-Z])", ">", s)
    s = re.sub(r"\\leq?(?:slant)?(?![a-zA-Z])|<=|≤", r"\\le ", s)
    s = re.sub(r"\\geq?(?:slant)?(?![a-zA-Z])|>=|≥", r"\\ge ", s)
    s = re.sub(r"\\neq?(?![a-zA-Z])|!=|≠", r"\\ne ", s)
    s = re.sub(r"\\infinity|∞|\\text\{\s*infinity\s*\}|^infinity$", r"\\infty", s)
    s = re.sub(r"\\langle(?![a-zA-Z])|⟨", "(", s)  # a vector ``\\langle 1, 2 \\rangle`` is the tuple ``(1, 2)``
    s = re.sub(r"\\rangle(?![a-zA-Z])|⟩", ")", s)
    s = s.replace("−", "-").replace("×", "\\times ").replace("·", "\\cdot ").replace("π", "\\pi ")
    s = _fix_loose_args(s)
    s = re.sub(r"\^\s*\{?\s*(?:\\text\{\s*)?(?:st|nd|rd|th)\s*\}?\s*\}?|\\(?:text|mathrm)\{(?:st|nd|rd|th)\}", "", s)
    s = re.sub(r"(-?)(\d*)\.(\d*)\\overline\{(\d+)\}", _repeating_decimal, s)
    s = re.sub(r"\\mathbb\{R\}|\\R(?![a-zA-Z])", r"(-\\infty, \\infty)", s)
    s = re.sub(r"\\varnothing|\\empty(?:set)?(?![a-zA-Z])|^\\\{\s*\\\}$", r"\\emptyset", s)
    s = re.sub(r"^(-?)(\d+)\s+(\d+)\s*/\s*(\d+)$", r"\1\2\\frac{\3}{\4}", s)
    s = re.sub(r"\s+", " ", s).strip()
    s = re.sub(r"(?<!\\)\\$", "", s).strip()  # a stray trailing backslash: ``185\``
    s = re.sub(r"[\s.,;:]+$", "", s)
    return s


def _repair_escapes(s: str) -> str:
    """LaTeX written in a non-raw string literal: ``"\frac"`` arrives as a form feed + ``rac``; put the backslash
    back (control characters only: a tab stays whitespace, so ``"\text{13}"`` is not repaired)."""
    if not re.search(r"[\x07\x08\x0b\x0c]", s):
        return s
    return s.replace("\x07", "\\a").replace("\x08", "\\b").replace("\x0b", "\\v").replace("\x0c", "\\f")


def _split_top(s: str, seps: tuple[str, ...]) -> list[str]:
    """Split on separators outside of any (), [], {} nesting."""
    parts, depth, start, i = [], 0, 0, 0
    while i < len(s):
        ch = s[i]
        if ch == "\\" and s[i : i + 2] in ("\\{", "\\}"):
            depth += 1 if s[i + 1] == "{" else -1
            i += 2
            continue
        if ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
        elif depth == 0:
            for sep in seps:
                if s.startswith(sep, i) and not (sep[-1].isalpha() and s[i + len(sep) : i + len(sep) + 1].isalpha()):
                    parts.append(s[start:i])
                    start = i + len(sep)
                    i = start - 1
                    break
        i += 1
    parts.append(s[start:])
    return parts


def _enclosing(s: str) -> tuple[str, str, str] | None:
    """(open, inner, close) when one bracket pair encloses the whole string."""
    pairs = {"(": ")", "[": "]"}
    if s.startswith("\\{") and s.endswith("\\}"):
        open_, close, inner = "{", "}", s[2:-2]
    elif s[:1] in ("(", "[") and s[-1:] in (")", "]"):
        open_, close, inner = s[0], s[-1], s[1:-1]
    else:
        return None
    depth = 0
    for ch in inner.replace("\\{", "(").replace("\\}", ")"):
        depth += ch in "([{"
        depth -= ch in ")]}"
        if depth < 0:
            return None
    if depth != 0 or (open_ in pairs and close not in pairs.values()):
        return None
    return open_, inner, close


def _strip_units_and_flags(s: str) -> tuple[str, bool, bool]:
    """Remove trailing units / prose; return (expression, percent, degree)."""
    percent = degree = False
    s = re.sub(r"^\\text\{\s*(-?\d[\d.,]*)\s+([A-Za-z][^{}]*)\}$", r"\1 \\text{ \2}", s.strip())  # ``\\text{20 meters}``
    for _ in range(3):
        s = s.strip()
        new = re.sub(r"\s*(?:%|\\text\{\s*%\s*\}|\bpercent(?:age)?\b|\bpct\b)\s*$", "", s)
        if new != s:
            percent, s = True, new
            continue
        if s.endswith("°") and not _TRIG.search(s):
            degree, s = True, s[:-1]
            continue
        new = _TRAILING_UNIT.sub("", s)
        if new != s and new.strip() and new.count("{") == new.count("}"):  # not half of ``\\text{ per year}``
            s = new
            continue
        new = re.sub(r"(?<=\S)\s*\\text\{[^{}]*\}\s*(?:\^\s*\{?[23]\}?)?$", "", s)
        if new != s and new.strip() and not re.fullmatch(r"\\text\{[^{}]*\}", s):
            s = new
            continue
        break
    s = re.sub(r"\\text\{\s*([\d.,]+)\s*\}", r"\1", s)
    return s.strip(), percent, degree


def _as_text(s: str) -> Text | None:
    """A word answer (``\\text{Evelyn}``, ``yes``) as lower-case text; None for anything mathematical."""
    inner = re.sub(r"\\text\{([^{}]*)\}", r"\1", s).strip()
    if re.fullmatch(r"[A-Za-z][A-Za-z' \-]*[A-Za-z]", inner) and (len(inner) > 3 or " " in inner or s != inner):
        return Text(re.sub(r"\s+", " ", inner.lower()))
    return None


def _thousands_readings(s: str) -> list[str]:
    """``7,425,000`` and ``1 000`` as plain integers; a lone ``1,5`` / ``1000,99`` also as a decimal comma."""
    if re.fullmatch(r"-?0,\d+", s):
        return [s.replace(",", "."), s]
    if re.fullmatch(r"-?\d{1,3}(?:,\d{3})+(?:\.\d+)?", s):
        return [s.replace(",", ""), s]
    if re.fullmatch(r"-?\d{1,3}(?: \d{3})+(?:\.\d+)?", s):
        return [s.replace(" ", "")]
    if re.fullmatch(r"-?\d+,\d+", s):
        return [s, s.replace(",", ".")]
    return [s]


def _expand_pm(s: str) -> list[str]:
    if "\\pm" not in s and "±" not in s:
        return [s]
    first = re.sub(r"\\pm|±", "+", s, count=1)
    second = re.sub(r"\\pm|±", "-", s, count=1)
    return _expand_pm(first) + _expand_pm(second)


_LHS = r"(?:[a-zA-Z](?:_\{?\w+\}?)?(?:\([a-zA-Z]\))?|\\[a-zA-Z]+|\([a-zA-Z, ]+\))"


def _strip_lhs(s: str, equations: bool = True) -> str:
    """``x \\in [1, 2]`` -> ``[1, 2]``; with ``equations``, also ``x = 3`` or ``(x, y) = (1, 2)`` -> the right side."""
    ops = r"=|\\in(?![a-zA-Z])" if equations else r"\\in(?![a-zA-Z])"
    m = re.match(rf"^\s*{_LHS}\s*(?:{ops})\s*(.+)$", s)
    return m.group(1) if m and "=" not in m.group(1) else s


def _matrix(s: str) -> Matrix | None:
    m = re.fullmatch(
        r"[(\[]?\s*\\begin\{([pbvBV]?matrix|array)\}(?:\{[^{}]*\})?((?:(?!\\begin\{).)*?)\\end\{\1\}\s*[)\]]?",
        s,
        re.DOTALL,
    )
    if not m:
        return None
    body = m.group(2).strip()
    rows = [r for r in re.split(r"\\\\", body) if r.strip() and not r.strip().startswith("\\hline")]
    cells = tuple(tuple(_node(c.strip()) for c in row.split("&")) for row in rows)
    return Matrix(cells, "\\begin{pmatrix}" + " \\\\ ".join(" & ".join(c.strip() for c in row.split("&")) for row in rows) + "\\end{pmatrix}")


_TIME_RE = re.compile(r"(\d{1,2}):(\d{2})(?::\d{2})?\s*(am|pm|a\.m\.?|p\.m\.?)?", re.IGNORECASE)


def _time(s: str) -> Time | None:
    """A clock time ``20:34`` / ``8:34 pm`` (never a ratio)."""
    m = _TIME_RE.fullmatch(re.sub(r"\\text\{\s*([^{}]*)\}", r"\1", s).strip())
    if not m:
        return None
    hours, minutes = int(m.group(1)), int(m.group(2))
    suffix = (m.group(3) or "").lower().replace(".", "")
    if suffix == "pm" and hours < 12:
        hours += 12
    elif suffix == "am" and hours == 12:
        hours = 0
    return Time(hours, minutes) if hours < 25 and minutes < 60 else None


def _node(s: str, depth: int = 0) -> Node:
    """The answer tree of one normalized string (first reading only; see parse_answer for alternatives)."""
    return parse_normalized(s, depth)[0]


def parse_normalized(s: str, depth: int = 0) -> list[Node]:
    s = s.strip()
    if depth > 6:
        return [Expr(s)]
    mat = _matrix(s)
    if mat is not None:
        return [mat]
    time = _time(s)
    if time is not None:
        return [time]
    choice = _CHOICE_RE.match(s) or _CHOICE_PAREN_RE.match(s)
    if choice and len(s) < 60 and (s.startswith("(") or choice.group(1).isupper()):
        return [Choice(choice.group(1).upper())]
    s = _strip_lhs(s, equations=False)
    builder = re.fullmatch(r"\\\{\s*[a-zA-Z]\s*(?:\||\\mid|:)\s*(.+)\\\}", s)
    if builder:
        s = builder.group(1).strip()
    joined = re.sub(r"\\text\{\s*(or|and)\s*\}|\s+(?:or|and)\s+|(?<=[\d)])\s*(?:or|and)\s*(?=[A-Z(])", ";", s)
    groups = _split_top(joined, (";",))
    s = joined.replace(";", ",") if len(groups) == 1 or not all("=" in g and "," in g for g in groups) else joined
    groups = _split_top(s, (";",))
    if len(groups) > 1 and all("=" in g and "," in g for g in groups):
        return [Seq("", "", tuple(Seq("(", ")", tuple(_node(_strip_lhs(i), depth + 1) for i in _split_top(g, (",",))))
                                  for g in groups))]
    union = _split_top(s, ("\\cup", "∪"))
    if len(union) > 1:
        return [Union(tuple(_node(p, depth + 1) for p in union))]
    if s.startswith("{") and s.endswith("}") and _balanced_group(s):
        return parse_normalized(s[1:-1], depth + 1)
    enclosed = _enclosing(s)
    if enclosed is not None:
        open_, inner, close = enclosed
        items = [i for i in _split_top(inner, (",", ";")) if i.strip()]
        if open_ in "([" and len(items) == 1 and (open_ == "(" or _matrix(inner.strip())):
            return parse_normalized(inner, depth + 1)
        return [Seq(open_, close, tuple(_node(_strip_lhs(i), depth + 1) for i in items))]
    expr, percent, degree = _strip_units_and_flags(s)
    nodes: list[Node] = []
    for reading in _thousands_readings(expr):
        items = [i for i in _split_top(reading, (",", ";")) if i.strip()]
        if len(items) > 1:
            expanded = [e for i in items for e in _expand_pm(_strip_lhs(i.strip()))]
            nodes.append(Seq("", "", tuple(_node(e, depth + 1) for e in expanded)))
            continue
        variants = _expand_pm(reading)
        if len(variants) > 1:
            nodes.append(Seq("", "", tuple(_node(v, depth + 1) for v in variants)))
            continue
        text = _as_text(reading)
        nodes.append(text if text is not None else Expr(_unwrap_text(reading), percent, degree))
    return nodes


def _balanced_group(s: str) -> bool:
    """Whether the braces of ``{...}`` enclose the whole string."""
    depth = 0
    for k, ch in enumerate(s):
        depth += ch == "{" and s[k - 1 : k] != "\\"
        depth -= ch == "}" and s[k - 1 : k] != "\\"
        if depth == 0 and k < len(s) - 1:
            return False
    return depth == 0


def _unwrap_text(s: str) -> str:
    """``\\text{e}`` and ``\\text{13}`` as plain symbols for the parser."""
    return re.sub(r"\\text\{\s*([A-Za-z]|[\d.]+)\s*\}", r"\1", s)


def parse_answer(answer: str) -> list[Node]:
    """All readings of an extracted answer string as answer trees (usually exactly one)."""
    return parse_normalized(normalize(answer))


_NUM_RE = re.compile(r"-?(?:\d+(?:\.\d*)?|\.\d+)")
_FRAC_RE = re.compile(r"(-?)\\frac\{(-?\d+)\}\{(-?\d+)\}|(-?\d+)\s*/\s*(-?\d+)")


def _plain_number(s: str) -> Fraction | None:
    """An exact value for integer, decimal and simple-fraction literals; None for anything else."""
    s = s.replace(" ", "")
    if _NUM_RE.fullmatch(s):
        return Fraction(s)
    m = _FRAC_RE.fullmatch(s)
    if m:
        sign, a, b = (m.group(1), m.group(2), m.group(3)) if m.group(2) else ("", m.group(4), m.group(5))
        if int(b) != 0:
            value = Fraction(int(a), int(b))
            return -value if sign else value
    return None


def decimal_places(s: str) -> int:
    """Digits after the decimal point of a decimal literal, 0 for anything else."""
    m = re.fullmatch(r"-?\d*\.(\d+)", s.replace(" ", ""))
    return len(m.group(1)) if m else 0


def scaled_values(node: Expr, value) -> list:
    """The values a plain number may stand for: a percent also as its fraction."""
    values = [value]
    if node.percent:
        values.append(value / 100)
    return values


def numbers_close(gold, pred, pred_places: int, gold_exact_decimal: bool) -> bool:
    """Equal within 1e-8 relative, or the response rounds the gold value to its own (>= 2) decimal places."""
    diff = abs(gold - pred)
    if diff <= 1e-8 * max(1, abs(gold)):
        return True
    return pred_places >= 2 and not gold_exact_decimal and diff <= 0.5 * 10 ** (-pred_places) * (1 + 1e-9)


def quick_equal(gold: Node, pred: Node) -> bool | None:
    """Decide simple cases without sympy: identical trees, letters, words and plain numbers; None = undecided."""
    if gold == pred:
        return True
    if isinstance(gold, Time) or isinstance(pred, Time):
        return None if isinstance(gold, Expr) or isinstance(pred, Expr) else False
    if isinstance(gold, Choice) or isinstance(pred, Choice):
        return isinstance(gold, Choice) and isinstance(pred, Choice) and gold.letter == pred.letter
    if isinstance(gold, Text) and isinstance(pred, Text):
        return gold.value == pred.value
    if isinstance(gold, Expr) and isinstance(pred, Expr):
        g, p = _plain_number(gold.latex), _plain_number(pred.latex)
        if g is None or p is None:
            return None
        exact = decimal_places(gold.latex) > 0 or gold.latex.lstrip("-").isdigit()
        places = decimal_places(pred.latex)
        return any(
            numbers_close(gv, pv, places + 2 * k, exact)
            for gv in scaled_values(gold, g)
            for k, pv in enumerate(scaled_values(pred, p))
        )
    return None
