"""Stage 3 of the verifier: LaTeX answers into sympy objects, with size guards, and equality of two sympy values.

Parsing uses latex2sympy2_extended (an ANTLR LaTeX grammar producing sympy objects, unevaluated where it matters),
on strings already normalized by ``normalize.py``. Every sympy object is checked for size (power towers, huge
factorials) before anything evaluates it (`TooLarge`). Two scalars are equal exactly, or numerically (within 1e-8
relative; a decimal response may round an exact gold to its own 2+ places), else symbolically:
``expand(a - b) == 0``, else agreement at random points, else ``simplify``. This module imports sympy: it runs
inside the verifier's worker processes.
"""

from __future__ import annotations

import math
import random
import re

import sympy
from latex2sympy2_extended import latex2sympy
from latex2sympy2_extended.latex2sympy2 import ConversionConfig

from .normalize import numbers_close

__all__ = ["TooLarge", "exprs_equal", "numeric", "structures_equal", "to_sympy"]

MAX_LATEX_CHARS = 600
MAX_NESTING = 40
MAX_LOG10 = 5000.0  # numbers beyond 10**5000 are never evaluated
MAX_FACTORIAL = 2000
RANDOM_POINTS = 4

_CONVERSION = ConversionConfig(interpret_as_mixed_fractions=True, lowercase_symbols=False)
_I = sympy.Symbol("i")


class TooLarge(Exception):
    """An expression whose evaluation could not finish in reasonable time or memory."""


def _log10_bound(expr: sympy.Basic) -> float:
    """An upper bound on log10 of the largest magnitude the numeric subtree can produce (inf when unbounded)."""
    if expr.is_Integer or expr.is_Rational or expr.is_Float:
        value = abs(expr)
        return math.log10(float(value)) if 0 < value < sympy.Float("1e300") else (0.0 if value == 0 else 300.0)
    if isinstance(expr, sympy.Pow):
        base, exp = expr.args
        base_log = _log10_bound(base)
        exp_log = _log10_bound(exp)
        if exp_log > 6:
            return math.inf if base_log > 0 else 0.0
        exp_value = numeric(exp) if not exp.free_symbols else None
        scale = exp_value.real if exp_value is not None else 10**exp_log
        return max(base_log * scale, 0.0) + 1
    if isinstance(expr, (sympy.factorial, sympy.gamma)):
        n_log = _log10_bound(expr.args[0])
        return math.inf if n_log > math.log10(MAX_FACTORIAL) else 10**n_log * n_log
    if not expr.args:
        return 0.0
    logs = [_log10_bound(a) for a in expr.args]
    return sum(max(v, 0.0) for v in logs) if isinstance(expr, sympy.Mul) else max(logs) + 1


def _guard(expr):
    for node in sympy.preorder_traversal(expr) if isinstance(expr, sympy.Basic) else ():
        if isinstance(node, (sympy.Pow, sympy.factorial, sympy.gamma)) and _log10_bound(node) > MAX_LOG10:
            raise TooLarge(str(node)[:40])
    return expr


def to_sympy(latex: str, degrees: bool):
    if len(latex) > MAX_LATEX_CHARS:
        raise TooLarge("answer too long")
    depth = deepest = 0
    for ch in latex:  # the grammar is slow on deep nesting (``((((...``); no real answer nests this deep
        depth += (ch in "([{") - (ch in ")]}")
        deepest = max(deepest, depth)
    if deepest > MAX_NESTING:
        raise TooLarge("nested too deep")
    latex = re.sub(r"(\d(?:\.\d+)?)[eE]([+-]?\d+)(?![\w])", r"\1\\times 10^{\2}", latex)
    latex = latex.replace("°", "^{\\circ}")
    expr = latex2sympy(latex, convert_degrees=degrees, conversion_config=_CONVERSION)
    _guard(expr)
    if isinstance(expr, sympy.Basic) and not isinstance(expr, (sympy.Set, sympy.Tuple)):
        expr = expr.doit()
    if isinstance(expr, sympy.Basic) and _I in expr.free_symbols:
        expr = expr.subs(_I, sympy.I)
    return expr


def numeric(expr) -> complex | None:
    try:
        value = complex(sympy.N(expr, 30))
    except (TypeError, ValueError, OverflowError, ZeroDivisionError, AttributeError):
        return None
    return None if any(map(math.isnan, (value.real, value.imag))) else value


def _values_close(gold, pred, places: int, gold_exact: bool) -> bool:
    if gold == pred:
        return True
    if gold in (sympy.oo, -sympy.oo, sympy.zoo) or pred in (sympy.oo, -sympy.oo, sympy.zoo):
        return False
    if gold.is_Rational and pred.is_Rational:
        return numbers_close(gold, pred, places, gold_exact)
    g, p = numeric(gold), numeric(pred)
    if g is None or p is None:
        return False
    if abs(g.imag) > 1e-12 * max(1, abs(g)) or abs(p.imag) > 1e-12 * max(1, abs(p)):
        return abs(g - p) <= 1e-8 * max(1, abs(g))
    return numbers_close(g.real, p.real, places, gold_exact)


def _random_points_equal(a, b) -> bool | None:
    """Compare two expressions at random points: True/False when decided, None when no point evaluated."""
    symbols = sorted(a.free_symbols | b.free_symbols, key=str)
    rng = random.Random(0)
    checked = 0
    for _ in range(RANDOM_POINTS * 2):
        point = {s: sympy.Rational(rng.randint(11, 97), rng.randint(7, 31)) for s in symbols}
        va, vb = numeric(a.subs(point)), numeric(b.subs(point))
        if va is None or vb is None or not all(map(math.isfinite, (va.real, va.imag, vb.real, vb.imag))):
            continue
        if abs(va - vb) > 1e-7 * max(1, abs(va)):
            return False
        checked += 1
        if checked >= RANDOM_POINTS:
            return True
    return None


def exprs_equal(a, b, places: int = 0, gold_exact: bool = True) -> bool:
    """Equality of two sympy scalars: exact, numeric, then symbolic."""
    if isinstance(a, (sympy.MatrixBase, sympy.Tuple, sympy.Set)) or isinstance(b, (sympy.MatrixBase, sympy.Tuple, sympy.Set)):
        return structures_equal(a, b)
    if not isinstance(a, sympy.Expr) or not isinstance(b, sympy.Expr):
        return a == b
    if not a.free_symbols and not b.free_symbols:
        return _values_close(a, b, places, gold_exact)
    if a == b:
        return True
    try:
        if sympy.expand(a - b) == 0:
            return True
    except (TypeError, ValueError, AttributeError):
        pass
    decided = _random_points_equal(a, b)
    if decided is not None:
        return decided
    try:
        return sympy.simplify(a - b) == 0
    except (TypeError, ValueError, AttributeError, NotImplementedError):
        return False


def structures_equal(a, b) -> bool:
    if isinstance(a, sympy.MatrixBase) and isinstance(b, sympy.MatrixBase):
        return a.shape == b.shape and all(exprs_equal(x, y) for x, y in zip(a, b))
    if isinstance(a, sympy.Set) and isinstance(b, sympy.Set):
        try:
            return bool(a == b or (a.symmetric_difference(b)).is_empty)
        except (TypeError, ValueError):
            return False
    return a == b
