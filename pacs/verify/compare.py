"""Stage 4 of the verifier: compare answer trees.

Answer trees come from ``normalize.py``; their expressions become sympy objects in ``parse.py``. Comparison, in
order of cost:

1. structure: lists, sets, intervals, unions and matrices are compared item by item (sets and bare lists
   unordered, tuples and intervals ordered, interval brackets must agree);
2. numbers: exact or within 1e-8 relative; a decimal response may round an exact gold to its own 2+ places;
   percents also as fractions, degrees also in radians, ``i`` is the imaginary unit;
3. equations and inequalities: ``x = 3`` vs ``3`` compares the right side, two equations match when ``lhs - rhs``
   differ by a non-zero constant factor, two inequalities by a positive one;
4. symbolic expressions: ``expand(a - b) == 0``, else agreement at random points, else ``simplify``.

Every sympy object is checked for size (power towers, huge factorials) before anything evaluates it.
This module does the heavy work and runs inside the verifier's worker processes.
"""

from __future__ import annotations

import math
import random
import re

import sympy

from .normalize import (
    Expr,
    Matrix,
    Node,
    Seq,
    Text,
    Time,
    Union,
    decimal_places,
    parse_normalized,
    quick_equal,
)
from .parse import (
    RANDOM_POINTS,
    TooLarge,
    exprs_equal,
    numeric,
    structures_equal,
    to_sympy,
)

__all__ = ["nodes_equal", "trees_equal"]

_REL_SPLIT = re.compile(r"\\le |\\ge |\\ne |<|>|\\approx|=")


def _sides(latex: str) -> tuple[list[str], list[str]]:
    """Split ``a = b \\le c`` into sides and the relation symbols between them (top level only)."""
    sides, ops, depth, start, i = [], [], 0, 0, 0
    while i < len(latex):
        ch = latex[i]
        if ch in "({[":
            depth += 1
        elif ch in ")}]":
            depth -= 1
        elif depth == 0:
            m = _REL_SPLIT.match(latex, i)
            if m:
                sides.append(latex[start:i])
                ops.append(m.group(0).strip())
                start = i = m.end()
                continue
        i += 1
    sides.append(latex[start:])
    return [s.strip() for s in sides], ops


def _simple_lhs(side: str) -> bool:
    """A side that names the answer rather than computing it: ``x``, ``f(2)``, ``a_{n}``, ``|AB|``, ``(p, q)``,
    ``\\frac{NO}{BO}``, ``V_1 : V_2``; not ``2x + z`` or ``7``."""
    if re.fullmatch(r"\(\s*[a-zA-Z](?:\s*,\s*[a-zA-Z])+\s*\)", side.strip()):
        return True
    named = re.sub(r"_\{[^{}]*\}|_\w|\([^()]*\)|\^\{?[\w']\}?|'", "", side.strip())
    return bool(named) and bool(re.fullmatch(r"(?:\\[a-zA-Z]+|[a-zA-Z{}|:, ])+", named))


def _scalar_value(node: Expr, latex: str):
    degrees = node.degree or bool(re.search(r"\\(?:sin|cos|tan|cot|sec|csc)", latex) and "°" in latex)
    return to_sympy(latex, degrees=degrees)


def _alternatives(node: Expr, value) -> list:
    values = [value]
    if node.percent:
        values.append(value / 100)
    if node.degree:
        values.append(value * sympy.pi / 180)
    return values


def _scalar_equal(gold: Expr, pred: Expr, gold_latex: str, pred_latex: str) -> bool:
    g = _scalar_value(gold, gold_latex)
    p = _scalar_value(pred, pred_latex)
    places = decimal_places(pred_latex)
    gold_exact = decimal_places(gold_latex) > 0 or gold_latex.strip().lstrip("-").isdigit()
    return any(
        exprs_equal(gv, pv, places + 2 * k, gold_exact)
        for gv in _alternatives(gold, g)
        for k, pv in enumerate(_alternatives(pred, p))
    )


def _relation_expr(sides: list[str], ops: list[str]):
    """``lhs - rhs`` and its relation for a single (in)equality, oriented so that ``>`` becomes ``<``."""
    lhs, rhs, op = sides[0], sides[-1], ops[-1]
    diff = to_sympy(lhs, False) - to_sympy(rhs, False)
    if op in (">", "\\ge"):
        return -diff, {">": "<", "\\ge": "\\le"}[op]
    return diff, op


def _relations_equal(g_sides, g_ops, p_sides, p_ops) -> bool:
    g_kinds = {"\\approx" if o == "\\approx" else ("=" if o == "=" else "ineq") for o in g_ops}
    if "ineq" in g_kinds:
        if len(g_ops) != len(p_ops):
            return False
        if len(g_ops) > 1:
            return _chain_equal(g_sides, g_ops, p_sides, p_ops)
        g, g_op = _relation_expr(g_sides, g_ops)
        p, p_op = _relation_expr(p_sides, p_ops)
        if g_op != p_op:
            return False
        return _proportional(g, p, positive=g_op in ("<", "\\le"))
    if len(g_sides) == 2 and len(p_sides) >= 2 and _simple_lhs(g_sides[0]) and g_sides[0] == p_sides[0]:
        return exprs_equal(to_sympy(g_sides[1], False), to_sympy(p_sides[-1], False))
    g, _ = _relation_expr([g_sides[0], g_sides[-1]], ["="])
    p, _ = _relation_expr([p_sides[0], p_sides[-1]], ["="])
    return _proportional(g, p, positive=False)


def _chain_equal(g_sides, g_ops, p_sides, p_ops) -> bool:
    flip = {"<": ">", ">": "<", "\\le": "\\ge", "\\ge": "\\le", "\\ne": "\\ne"}
    if g_ops != p_ops:
        p_sides, p_ops = p_sides[::-1], [flip.get(o, o) for o in reversed(p_ops)]
    if g_ops != p_ops:
        return False
    return all(exprs_equal(to_sympy(a, False), to_sympy(b, False)) for a, b in zip(g_sides, p_sides))


def _proportional(g, p, positive: bool) -> bool:
    """g == c * p for a constant c != 0 (c > 0 when positive), decided by expansion or random points."""
    if g == 0 or p == 0:
        return g == p
    try:
        ratio = sympy.cancel(sympy.together(g / p))
    except (TypeError, ValueError, ZeroDivisionError):
        return False
    if ratio.free_symbols:
        symbols = sorted(g.free_symbols | p.free_symbols, key=str)
        rng = random.Random(1)
        values = []
        for _ in range(RANDOM_POINTS):
            point = {s: sympy.Rational(rng.randint(11, 97), rng.randint(7, 31)) for s in symbols}
            value = numeric(ratio.subs(point))
            if value is None:
                return False
            values.append(value)
        if any(abs(v - values[0]) > 1e-8 * max(1, abs(values[0])) for v in values):
            return False
        ratio_value = values[0]
    else:
        ratio_value = numeric(ratio)
    if ratio_value is None or abs(ratio_value) < 1e-12 or abs(ratio_value.imag) > 1e-12:
        return False
    return ratio_value.real > 0 or not positive


def _side_equal(gold: Expr, pred: Expr, gold_side: str | None, pred_side: str | None) -> bool:
    """Compare one side of an equation with the other answer, re-reading the side as an answer tree."""
    g_nodes = parse_normalized(gold_side) if gold_side is not None else [gold]
    p_nodes = parse_normalized(pred_side) if pred_side is not None else [pred]
    for g in g_nodes:
        for p in p_nodes:
            if isinstance(g, Expr) and isinstance(p, Expr):
                if _scalar_equal(gold, pred, g.latex, p.latex):
                    return True
            elif nodes_equal(g, p):
                return True
    return False


def _cut_approx(sides: list[str], ops: list[str]) -> tuple[list[str], list[str]]:
    """``x = 1/3 \\approx 0.33`` keeps the exact part; ``x \\approx 11`` keeps the value."""
    if "\\approx" not in ops:
        return sides, ops
    cut = ops.index("\\approx")
    return (sides[: cut + 1], ops[:cut]) if cut > 0 else (sides[1:], ops[1:])


def _expr_equal(gold: Expr, pred: Expr) -> bool:
    g_sides, g_ops = _cut_approx(*_sides(gold.latex))
    p_sides, p_ops = _cut_approx(*_sides(pred.latex))
    g_eq = bool(g_ops) and set(g_ops) == {"="}
    p_eq = bool(p_ops) and set(p_ops) == {"="}
    if g_ops and p_ops:
        if g_eq != p_eq:
            return False
        return _relations_equal(g_sides, g_ops, p_sides, p_ops)
    if g_ops:
        if not g_eq or not _simple_lhs(g_sides[-2]):
            return False
        return _side_equal(gold, pred, g_sides[-1], None)
    if p_ops:
        if not p_eq:
            return False
        return _side_equal(gold, pred, None, p_sides[-1])
    return _scalar_equal(gold, pred, gold.latex, pred.latex)


def _interval_from_relation(node: Expr) -> Seq | None:
    """``-2 \\le x \\le 7`` -> ``[-2, 7]``; ``x < 3`` -> ``(-\\infty, 3)``."""
    sides, ops = _sides(node.latex)
    if not ops or any(o not in ("<", ">", "\\le", "\\ge") for o in ops) or len(ops) > 2:
        return None
    if len(ops) == 2 and len(set(o in ("<", "\\le") for o in ops)) == 1:
        if ops[0] in (">", "\\ge"):
            sides, ops = sides[::-1], [{">": "<", "\\ge": "\\le"}[o] for o in reversed(ops)]
        if not _simple_lhs(sides[1]):
            return None
        return Seq("(" if ops[0] == "<" else "[", ")" if ops[1] == "<" else "]", (Expr(sides[0]), Expr(sides[2])))
    if len(ops) == 1:
        lhs, op, rhs = sides[0], ops[0], sides[1]
        if not _simple_lhs(lhs):
            lhs, rhs, op = rhs, lhs, {"<": ">", ">": "<", "\\le": "\\ge", "\\ge": "\\le"}[op]
        if not _simple_lhs(lhs):
            return None
        if op in ("<", "\\le"):
            return Seq("(", ")" if op == "<" else "]", (Expr("-\\infty"), Expr(rhs)))
        return Seq("(" if op == ">" else "[", ")", (Expr(rhs), Expr("\\infty")))
    return None


_RELATIONS = {"<": sympy.Lt, ">": sympy.Gt, "\\le": sympy.Le, "\\ge": sympy.Ge, "\\ne": sympy.Ne}


def _relation_set(node: Expr) -> sympy.Set | None:
    """The real solution set of an inequality (chain) in one variable, e.g. ``1 \\le |z| \\le 2``."""
    sides, ops = _sides(node.latex)
    if not ops or any(o not in _RELATIONS for o in ops):
        return None
    exprs = [to_sympy(side, False) for side in sides]
    free = set().union(*(e.free_symbols for e in exprs))
    if len(free) != 1:
        return None
    (x,) = free
    real = sympy.Symbol(x.name, real=True)
    rels = [_RELATIONS[o](a.subs(x, real), b.subs(x, real)) for o, a, b in zip(ops, exprs, exprs[1:])]
    return sympy.Intersection(*(sympy.solveset(r, real, sympy.S.Reals) for r in rels))


def _node_set(node: Node) -> sympy.Set | None:
    """A sympy set for an interval, a union of intervals or a braced set; None for anything else."""
    if isinstance(node, Union):
        parts = [_node_set(p) for p in node.parts]
        return None if any(p is None for p in parts) else sympy.Union(*parts)
    if isinstance(node, Seq) and node.open == "{":
        return sympy.FiniteSet(*(to_sympy(i.latex, False) for i in node.items if isinstance(i, Expr)))
    if isinstance(node, Seq) and node.open in "([" and len(node.items) == 2 and all(isinstance(i, Expr) for i in node.items):
        lo, hi = (to_sympy(i.latex, False) for i in node.items)
        return sympy.Interval(lo, hi, node.open == "(", node.close == ")")
    return None


def _relation_matches_set(relation: Expr, other: Node) -> bool:
    interval = _interval_from_relation(relation)
    if interval is not None and nodes_equal(interval, other):
        return True
    solved, target = _relation_set(relation), _node_set(other)
    return solved is not None and target is not None and structures_equal(solved, target)


def _unordered_equal(gold: tuple, pred: tuple) -> bool:
    """Set equality: every gold item has an equal response item and vice versa (repeats do not count)."""
    matched = [False] * len(pred)
    for g in gold:
        hits = [k for k, p in enumerate(pred) if nodes_equal(g, p)]
        if not hits:
            return False
        for k in hits:
            matched[k] = True
    return all(matched)


def _seq_equal(gold: Seq, pred: Seq) -> bool:
    if gold.unordered and pred.unordered:
        return _unordered_equal(gold.items, pred.items)
    if len(gold.items) != len(pred.items):
        return False
    if gold.open and pred.open and (gold.open, gold.close) != (pred.open, pred.close):
        return False
    if {gold.open, pred.open} & {"{"}:
        return False
    return all(nodes_equal(g, p) for g, p in zip(gold.items, pred.items))


def _as_vector(node: Node) -> tuple | None:
    if isinstance(node, Matrix) and (len(node.rows) == 1 or all(len(r) == 1 for r in node.rows)):
        return tuple(c for r in node.rows for c in r)
    if isinstance(node, Seq) and node.open in ("(", "["):
        return node.items
    return None


def _union_parts(node: Node) -> tuple:
    return node.parts if isinstance(node, Union) else (node,)


def _equation_rhs(node: Expr) -> list[Node] | None:
    """The readings of the value side of ``name = value`` (``(p, q) = (3, 2)`` -> ``(3, 2)``), else None."""
    sides, ops = _cut_approx(*_sides(node.latex))
    if not ops or set(ops) != {"="} or not _simple_lhs(sides[-2]):
        return None
    return parse_normalized(sides[-1])


def _time_as_expr(node: Time) -> Expr:
    return Expr(f"{node.hours}:{node.minutes:02d}")


def nodes_equal(gold: Node, pred: Node) -> bool:
    """Whether the response tree means the same answer as the gold tree."""
    if isinstance(gold, Time) != isinstance(pred, Time) and isinstance(gold, Expr) != isinstance(pred, Expr):
        time = gold if isinstance(gold, Time) else pred
        other = pred if time is gold else gold
        if math.gcd(time.hours, time.minutes) != 1 and ":" not in other.latex:
            return False  # ``20:34``, ``12:00``: a clock time (a ratio would be in lowest terms), never ``10/17``
        gold, pred = (_time_as_expr(n) if isinstance(n, Time) else n for n in (gold, pred))  # ``7:32`` may be a ratio
    quick = quick_equal(gold, pred)
    if quick is not None:
        return quick
    if isinstance(gold, Expr) != isinstance(pred, Expr):
        rhs = _equation_rhs(gold if isinstance(gold, Expr) else pred)
        if rhs is not None:
            return any(nodes_equal(r, pred) if isinstance(gold, Expr) else nodes_equal(gold, r) for r in rhs)
    if isinstance(gold, Text) or isinstance(pred, Text):
        g = gold.value if isinstance(gold, Text) else getattr(gold, "latex", None)
        p = pred.value if isinstance(pred, Text) else getattr(pred, "latex", None)
        return g is not None and p is not None and re.sub(r"\W", "", g.lower()) == re.sub(r"\W", "", p.lower())
    if isinstance(gold, Expr) and isinstance(pred, Expr):
        return _expr_equal(gold, pred)
    if isinstance(gold, Matrix) and isinstance(pred, Expr) or isinstance(gold, Expr) and isinstance(pred, Matrix):
        g = to_sympy(gold.latex, False)
        p = to_sympy(pred.latex, False)
        return isinstance(g, sympy.MatrixBase) and isinstance(p, sympy.MatrixBase) and structures_equal(g, p)
    if isinstance(gold, Matrix) and isinstance(pred, Matrix):
        return [len(r) for r in gold.rows] == [len(r) for r in pred.rows] and all(
            nodes_equal(g, p) for gr, pr in zip(gold.rows, pred.rows) for g, p in zip(gr, pr)
        )
    g_vec, p_vec = _as_vector(gold), _as_vector(pred)
    if (isinstance(gold, Matrix) or isinstance(pred, Matrix)) and g_vec is not None and p_vec is not None:
        return len(g_vec) == len(p_vec) and all(nodes_equal(g, p) for g, p in zip(g_vec, p_vec))
    if isinstance(gold, Expr) and isinstance(pred, (Seq, Union)):
        return _relation_matches_set(gold, pred)
    if isinstance(pred, Expr) and isinstance(gold, (Seq, Union)):
        if _relation_matches_set(pred, gold):
            return True
        return isinstance(gold, Seq) and gold.unordered and len(gold.items) == 1 and nodes_equal(gold.items[0], pred)
    if isinstance(gold, Seq) and isinstance(pred, Seq):
        return _seq_equal(gold, pred)
    if isinstance(gold, Union) or isinstance(pred, Union):
        return _unordered_equal(_union_parts(gold), _union_parts(pred))
    return False


def trees_equal(golds: list[Node], preds: list[Node]) -> bool:
    """True when some reading of the gold equals some reading of the response."""
    for gold in golds:
        for pred in preds:
            try:
                if nodes_equal(gold, pred):
                    return True
            except TooLarge:
                continue
            except Exception:  # latex2sympy and sympy raise many exception types on malformed input
                continue
    return False
