"""Stage 1 of the verifier: find the final answer inside a model response or a gold string.

Pure string work (no sympy), so it runs in the calling process. The order of preference for a response is:

1. the last ``\\boxed{...}`` / ``\\fbox{...}`` (several boxes closing the response are joined with commas);
2. an explicit phrase: "final answer is", "the answer is", "Answer:";
3. the whole response when it is short and reads like an answer (``7,425,000``, ``28 percent``, ``x+1``);
4. the last LaTeX math span (``$...$``, ``$$...$$``, ``\\(...\\)``, ``\\[...\\]``);
5. optionally the last number in the text.

A gold answer goes through the same steps, except that a short gold is taken whole whatever it contains.
"""

from __future__ import annotations

import re

__all__ = ["extract_answer", "extract_choice", "extract_gold", "find_boxed"]

# Answers longer than this are not meaningful final answers; the extractor truncates its view of them.
MAX_ANSWER_CHARS = 2000
SHORT_RESPONSE_CHARS = 80
SHORT_GOLD_CHARS = 300
MAX_JOINED_BOXES = 20

_BOX_RE = re.compile(r"\\{1,2}(?:boxed|fbox)\s*")
_PHRASE_RE = re.compile(
    r"(?:final\s+answer\s*(?:is|:)|the\s+answer\s+is|(?:correct\s+)?(?:choice|option)\s+is|answer\s+is\s*:?|answer\s*:|\*\*final\s+answer\*\*|^\s*####"
    r"|r[ée]ponse\s*(?:est|:)|答案\s*(?:是|为|[:：])|最终答案\s*(?:是|为)?)\s*[:：]?",
    re.IGNORECASE | re.MULTILINE,
)
_NUMBER_RE = re.compile(
    r"-?\\[dt]?frac\{\d+\}\{\d+\}"
    r"|(?<![A-Za-z0-9_.,:])\d{1,2}:\d{2}(?:\s*(?:[ap]\.m\.|[ap]m\b|[AP]\.M\.|[AP]M\b))?(?![\d:])"
    r"|(?<![A-Za-z0-9_.,])-?(?:\d{1,3}(?:(?:,|\{,\})\d{3})+(?:\.\d+)?|\d+,\d+|\d+ \d+/\d+(?![\d/])|\d+(?:\.\d+)?(?:\s*/\s*\d+)?|\.\d+)(?:\s*(?:\\?%|percent))?(?![\d])"
)
_NON_ASCII_WORD_RE = re.compile(r"[^\W\d_A-Za-z]")
# Inline math that spans lines is not math (``Answer $ \n 9 \n $``): its numbers are not answers either.
_BROKEN_INLINE_RE = re.compile(
    r"(?<![$\\])\$(?!\$)[^$\n]{0,300}\n[^$]{0,300}(?<![$\\])\$(?!\$)"
    r"|\\\((?:(?!\\\))[^\n]){0,300}\n(?:(?!\\\))[\s\S]){0,300}\\\)"
)  # bounded, so that a response full of unclosed ``\(`` stays linear
_WORD_RE = re.compile(r"(?<![\\a-zA-Z])[a-zA-Z']{2,}")
# one word after an answer phrase that is not itself an answer ("the answer is below", "... is wrong")
_NOT_ANSWER_WORDS = {
    "below", "above", "follows", "following", "wrong", "unclear", "clear", "obvious", "simple", "straightforward",
    "therefore", "thus", "hence", "so", "as", "this", "that", "then", "given", "shown", "boxed", "not", "still",
    "actually", "probably", "likely", "indeed",
}
_END_MARKERS = re.compile(r"<\|im_end\|>|<\|im_start\|>|<\|endoftext\|>|<\|eot_id\|>")
_ANSWERISH_WORDS = {
    "percent", "percentage", "pct", "degrees", "degree", "units", "unit", "meters", "miles", "inches", "feet",
    "dollars", "cents", "hours", "minutes", "seconds", "days", "years", "square", "cubic", "infinity",
    "true", "false", "none", "undefined",
}


def _closing_braces(text: str) -> dict[int, int]:
    """Index of the matching ``}`` for every ``{`` that is closed, in one pass (escaped braces skipped)."""
    closing: dict[int, int] = {}
    stack: list[int] = []
    i = 0
    while i < len(text):
        ch = text[i]
        if ch == "\\":
            i += 2
            continue
        if ch == "{":
            stack.append(i)
        elif ch == "}" and stack:
            closing[stack.pop()] = i
        i += 1
    return closing


def _boxes(text: str) -> list[tuple[int, int, int, int]]:
    """Every ``\\boxed{...}`` as (content start, content end, start, end); an unclosed box runs to the end."""
    found = []
    closing: dict[int, int] | None = None
    for m in _BOX_RE.finditer(text):
        pos = m.end()
        if pos < len(text) and text[pos] == "{":
            closing = _closing_braces(text) if closing is None else closing
            end = closing.get(pos)
            if end is None:
                found.append((pos + 1, len(text), m.start(), len(text)))
            else:
                found.append((pos + 1, end, m.start(), end + 1))
        elif pos < len(text) and m.group(0).endswith(" "):
            word = re.match(r"[^\s$]+", text[pos:])
            if word:
                found.append((pos, pos + word.end(), m.start(), pos + word.end()))
    return found


def _joinable(between: str) -> bool:
    """Text between two boxes that still lists one answer: punctuation, spacing, rules such as ``++++``,
    "and"/"or" (plus a few words)."""
    plain = re.sub(r"\\text\{([^{}]*)\}", r" \1 ", between)
    plain = re.sub(r"(?<![\\\w])[a-zA-Z](?:_\{?\w{1,3}\}?)?\s*=", " ", plain)  # labels: ``\) and \( y_2 =``
    plain = re.sub(r"\\q?quad|\\[()\[\]]|\\[,;! ]|[$,;.&]|([+|~*-])\1{2,}", " ", plain)
    if re.search(r"[\d=\\{}]", plain):
        return False
    words = plain.split()
    return not words or (len(words) <= 5 and bool({"and", "or"} & set(words)))


def find_boxed(text: str) -> str | None:
    """The final boxed answer; boxes separated only by punctuation or "and" are joined with commas."""
    boxes = _boxes(text)
    if not boxes:
        return None
    parts = [text[boxes[-1][0] : boxes[-1][1]]]
    for prev, nxt in zip(reversed(boxes[:-1]), reversed(boxes[1:])):
        if prev[3] > nxt[2] or len(parts) >= MAX_JOINED_BOXES or not _joinable(text[prev[3] : nxt[2]]):
            break
        parts.append(text[prev[0] : prev[1]])
    return ", ".join(reversed(parts))


def _iter_spans(text: str) -> list[tuple[int, int, str]]:
    """LaTeX math spans as (start, end, content) in order; inline ``$...$`` and ``\\(...\\)`` stay on one line."""
    spans: list[tuple[int, int, str]] = []
    # a span's content never holds another opener, so an unclosed ``\[`` or ``\(`` costs linear time, not quadratic
    for pattern in (r"\$\$(.+?)\$\$", r"\\\[((?:(?!\\\[|\\\]).)+)\\\]"):
        for m in re.finditer(pattern, text, re.DOTALL):
            spans.append((m.start(), m.end(), m.group(1)))
    masked = re.sub(r"\$\$.+?\$\$", lambda m: " " * len(m.group(0)), text, flags=re.DOTALL)
    for m in re.finditer(r"(?<!\\)\$((?:[^$\n\\]|\\.)+?)(?<!\\)\$", masked):
        spans.append((m.start(), m.end(), m.group(1)))
    for m in re.finditer(r"\\\(((?:(?!\\\(|\\\)).)+)\\\)", text):
        spans.append((m.start(), m.end(), m.group(1)))
    return sorted(spans)


def _math_spans(text: str) -> list[str]:
    return [content for _, _, content in _iter_spans(text)]


def _answer_in_sentence(sentence: str) -> str | None:
    """The answer inside a sentence such as "The largest $n$ is 34": the sentence itself when it reads like an
    answer, else what follows its last "is"/"=", else its last math span or number."""
    sentence = sentence.strip()
    if _reads_like_answer(sentence):
        return sentence
    choice = re.match(r"\(([A-E])\)|([A-E])(?=[.:)]?(?:\s|$))", sentence)
    if choice:
        return choice.group(0)
    word = re.fullmatch(r"(?:\\text\{)?([A-Za-z][A-Za-z'-]*)\}?", sentence)
    if word and word.group(1).lower() not in _NOT_ANSWER_WORDS:  # a one-word answer: "The answer is Tuesday."
        return sentence
    after = re.split(r"\b(?:is|are|equals|be)\b", sentence)[-1].strip()
    if after != sentence and after and _reads_like_answer(after):
        return after
    return _first_span_or_number(sentence) or None


def _phrase_answer(text: str) -> tuple[str, int] | None:
    """The answer after the last "final answer is" style phrase, and where the phrase starts."""
    matches = list(_PHRASE_RE.finditer(text))
    if not matches:
        return None
    tail = re.split(r"I hope it is correct", text[matches[-1].end() :].lstrip(" *:\t\n"), maxsplit=1)[0]
    boxed = find_boxed(tail)
    if boxed is not None:
        return boxed, matches[-1].start()
    spans = _math_spans(tail)
    if spans and tail.startswith(("$", "\\(", "\\[")):
        return spans[0], matches[-1].start()
    line = tail.split("\n", 1)[0]
    sentence = re.split(r"(?<!\\)\.(?:\s|$)|。", line, maxsplit=1)[0]
    found = _answer_in_sentence(sentence)
    return (found, matches[-1].start()) if found else None


def _reads_like_answer(text: str) -> bool:
    """A short text with no prose (unit and percent words allowed), e.g. ``7,425,000``, ``28 pct``, ``x+1``."""
    if len(text) > SHORT_GOLD_CHARS or "\n" in text.strip() or _NON_ASCII_WORD_RE.search(text):
        return False
    stripped = re.sub(r"\\(?:text|mbox|mathrm|textbf|textnormal)\{[^{}]*\}|\$[^$]*\$", " ", text)
    stripped = re.sub(r"\\(?:begin|end)\{[a-zA-Z*]*\}", " ", stripped)
    words = [w.lower().strip("'") for w in _WORD_RE.findall(stripped)]
    prose = [w for w in words if w not in _ANSWERISH_WORDS]
    if len(text) > SHORT_RESPONSE_CHARS:
        return not words and bool(re.search(r"\\begin\{", text))  # a bare matrix / array
    return not prose or (len(prose) == 1 and len(prose[0]) <= 3 and len(words) == 1)


def _last_span_or_number(text: str) -> str | None:
    """Whichever comes last: the last math span or the last number outside math spans."""
    spans = list(_iter_spans(text))
    masked = _BROKEN_INLINE_RE.sub(lambda m: " " * len(m.group(0)), text)
    for start, end, _ in spans:
        masked = masked[:start] + " " * (end - start) + masked[end:]
    numbers = list(_NUMBER_RE.finditer(masked))
    if numbers and (not spans or numbers[-1].start() > spans[-1][0]):
        return numbers[-1].group(0)
    if not spans:
        return None
    content = spans[-1][2].strip()
    if _is_prose(content):  # ``$? just about 1$``: a stray pair of dollar signs around prose
        inner = list(_NUMBER_RE.finditer(content))
        return inner[-1].group(0) if inner else None
    return content


def _first_span_or_number(text: str) -> str | None:
    """Whichever comes first: the first math span or the first number outside math spans (the answer right after
    an answer phrase: "Réponse: il paiera 220 $ en 12 mois" is 220)."""
    spans = list(_iter_spans(text))
    masked = text
    for start, end, _ in spans:
        masked = masked[:start] + " " * (end - start) + masked[end:]
    number = _NUMBER_RE.search(masked)
    if number and (not spans or number.start() < spans[0][0]):
        return number.group(0)
    return spans[0][2].strip() if spans else None


def _is_prose(text: str) -> bool:
    """Text with two or more plain words (outside ``\\text{}`` and commands) or with non-ASCII letters."""
    if _NON_ASCII_WORD_RE.search(text):
        return True
    stripped = re.sub(r"\\(?:text\w*|mbox|math\w*|operatorname|begin|end)\s*\{[^{}]*\}", " ", text)
    words = [w for w in re.findall(r"(?<![\\a-zA-Z])[a-zA-Z]{3,}", stripped) if w.lower() not in _ANSWERISH_WORDS]
    return len(words) >= 2


def extract_answer(response: str, *, last_number: bool = True) -> str | None:
    """The final answer of a model response as a string, or None when the response has none.

    >>> extract_answer("so the area is $\\\\boxed{\\\\frac{1}{2}}$.")
    '\\\\frac{1}{2}'
    >>> extract_answer("The final answer is 42. I hope it is correct.")
    '42'
    """
    if not isinstance(response, str) or not response.strip():
        return None
    text = _END_MARKERS.split(response[-20 * MAX_ANSWER_CHARS :])[0] or response[-20 * MAX_ANSWER_CHARS :]
    boxes = _boxes(text)
    phrase = _phrase_answer(text)
    if phrase is not None and (not boxes or phrase[1] > boxes[-1][3]):
        return phrase[0].strip()[:MAX_ANSWER_CHARS]
    boxed = find_boxed(text)
    if boxed is not None and boxed.strip():
        return boxed.strip()[:MAX_ANSWER_CHARS]
    if _reads_like_answer(text):
        return text.strip()
    if last_number:
        found = _last_span_or_number(text)
    else:
        spans = _math_spans(text)
        found = spans[-1] if spans else None
    return found.strip()[:MAX_ANSWER_CHARS] if found else None


_LETTER_RE = re.compile(r"(?<![^\s(*])\(?([A-E])\)?(?=[\s).,:;!?*]|$)")
_LEADING_LETTER_RE = re.compile(r"\s*(?:\*\*)?\(?([A-E])\)?(?:\*\*)?(?=[\s.:)。，,;]|[^\x00-\x7f]|$)")


def extract_choice(response: str) -> str | None:
    """The multiple-choice letter a response picks, for a gold that is a letter: a response that opens with a
    letter ("D. it can't be A or B", "B。不是 A"), else the first letter after the last answer phrase ("the answer
    is for sure D, not A"), else the last standalone capital A-E."""
    if not isinstance(response, str) or not response.strip():
        return None
    text = _END_MARKERS.split(response[-20 * MAX_ANSWER_CHARS :])[0]
    lead = _LEADING_LETTER_RE.match(text)
    if lead:
        return lead.group(1)
    phrases = list(_PHRASE_RE.finditer(text))
    if phrases:
        after = _LETTER_RE.search(text[phrases[-1].end() :].split("\n\n", 1)[0])
        if after:
            return after.group(1)
    letters = list(_LETTER_RE.finditer(text))
    return letters[-1].group(1) if letters else None


def extract_gold(gold: str) -> str | None:
    """The reference answer: its box or phrase when present, otherwise the whole (short) gold string."""
    if not isinstance(gold, str) or not gold.strip():
        return None
    boxed = find_boxed(gold)
    if boxed is not None and boxed.strip():
        return boxed.strip()[:MAX_ANSWER_CHARS]
    if _PHRASE_RE.search(gold):
        phrase = _phrase_answer(gold)
        if phrase is not None and phrase[0].strip():
            return phrase[0].strip()[:MAX_ANSWER_CHARS]
    if len(gold) <= SHORT_GOLD_CHARS:
        return gold.strip()
    return extract_answer(gold)
