"""Rule-based answer extraction and scoring.

The rules recognise the ways models actually state an answer ("B", "(B)", "Answer: B", "The best answer is: D",
"C. red", the option's text, "Yes, there is…") and nothing more. A response they cannot read is a parse
failure: it is scored wrong and counted as such, never guessed. In particular there is no "first capital letter
anywhere" fallback (the authors' judge has one; it reads "A lot of red" as option A and the pronoun "I" as
option I).

MCQ rules run in tiers, most explicit first; the first tier that finds any letter decides. If that tier finds
two different letters ("A or B", "the answer is A… no, the answer is B"), the response is a parse failure.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from vopd_bench.errors import SampleError
from vopd_bench.samples import LETTERS, Sample

SpecScorer = Callable[[Sample, str], tuple[str | None, bool]]


@dataclass(frozen=True)
class Score:
    parsed: str | None  # what the rules read from the response; None = parse failure
    correct: bool
    parse_failed: bool


# ---------------------------------------------------------------------------------------------------------------
# Reasoning blocks and answer spans

_THINK_BLOCK = re.compile(r"<think>.*?</think>", re.IGNORECASE | re.DOTALL)
_THINK_OPEN = re.compile(r"<think>", re.IGNORECASE)
_THINK_CLOSE = re.compile(r"</think>", re.IGNORECASE)
_ANSWER_TAG = re.compile(r"<answer>(.*?)(?:</answer>|$)", re.IGNORECASE | re.DOTALL)
_BOXED = re.compile(r"\\boxed\{([^{}]*)\}")


def strip_reasoning(text: str | None) -> str:
    """Drop `<think>…</think>` reasoning and keep the `<answer>…</answer>` content when there is one.

    - Closed blocks are removed wherever they are.
    - A stray `</think>` (the chat template opened the block, so the response starts mid-thought) means the
      answer is what follows the last one.
    - A `<think>` that never closes means generation stopped while thinking: only what came before it remains
      (nothing, when the response opens with it), so the caller sees no answer rather than half a thought.
    """
    if not text:
        return ""
    text = _THINK_BLOCK.sub(" ", text)
    closes = list(_THINK_CLOSE.finditer(text))
    if closes:
        text = text[closes[-1].end():]
    opened = _THINK_OPEN.search(text)
    if opened:
        text = text[: opened.start()]
    tags = _ANSWER_TAG.findall(text)
    if tags:
        # The last tag is the final answer; an unclosed one (truncated output) still holds what was said.
        text = tags[-1]
    return text.strip()


def _answer_text(response: str | None) -> str:
    """The part of a response that states the answer, with formatting noise removed."""
    text = strip_reasoning(response)
    boxed = _BOXED.findall(text)
    if boxed:
        text = boxed[-1]
    # NFKC folds full-width letters and brackets (Chinese-language outputs) into ASCII.
    text = unicodedata.normalize("NFKC", text).replace("’", "'").replace("‘", "'")
    text = re.sub(r"\*+|`+|__", "", text)  # markdown emphasis and code marks
    return text.strip()


# ---------------------------------------------------------------------------------------------------------------
# Option letters

_UPPER = r"[\(\[]?([A-Z])(?![A-Za-z0-9'])"
# Words that may follow a stated letter: "C because…", "B is correct". A lower-case word that is not one of these
# means the capital was an ordinary word ("A lot of red", "I think").
_CONNECTIVES = frozenset(
    "because since as is was which given seems appears looks would should will so hence here".split()
)
# "A or B", "(A)/(C)", "B and D": a second letter stated as an alternative.
_ALTERNATIVE = re.compile(r"\s*(?:,|/|&|\bor\b|\band\b|\bvs\.?)\s*(?:option\s+)?[\(\[]?([A-Z])(?![A-Za-z0-9'])")

_WHOLE_LETTER = re.compile(r"""^[\s"'\[\(]*([A-Za-z])[\s"'\]\).:,;!]*$""")
_ANSWER_LABEL = re.compile(r"^(?i:(?:the\s+)?(?:final\s+|best\s+|correct\s+)?answer\s*[:=]\s*)")
_STRONG = [
    re.compile(r"(?i:\b(?:final\s+|best\s+|correct\s+|right\s+)?answer\s*(?:is|would\s+be|should\s+be|will\s+be|"
               r"=|:)?\s*:?\s*(?:option\s+|choice\s+)?)" + _UPPER),
    re.compile(r"(?i:\b(?:correct|right|best)\s+(?:option|choice)\s*(?:is|would\s+be|:)?\s*:?\s*)" + _UPPER),
    re.compile(r"答案\s*(?:是|为|:)?\s*(?:选项\s*)?" + _UPPER),
]
_LEADING = re.compile(r"^" + _UPPER)
_WEAK = [
    re.compile(r"(?i:\b(?:option|choice)\s*)" + _UPPER),
    re.compile(r"(?i:\b(?:it's|it\s+is|that's|that\s+is|(?:i\s+(?:would\s+|will\s+)?)?(?:choose|pick|select|"
               r"go\s+with))\s+(?:option\s+|choice\s+)?)" + _UPPER),
]
_BRACKETED = re.compile(r"[\(\[]([A-Z])[\)\]]")
_LINE_LEADING = re.compile(r"(?m)^\s*([A-Z])[.):](?=\s|$)")
_TRAILING = re.compile(r"(?:^|[\s,:;])[\(\[]?([A-Z])[\)\]]?[.!]?\s*$")


def _stands_as_letter(rest: str) -> bool:
    """Whether a capital followed by `rest` reads as an option letter rather than a word ("A lot", "I think")."""
    if not rest or not rest[0].isspace():
        # A bracket or punctuation right after it ("B)", "C.", "D:") marks a label; a letter or apostrophe was
        # already refused by the pattern's look-ahead.
        return True
    word = rest.split(None, 1)[0] if rest.strip() else ""
    return not word or not word[0].isalpha() or word[0].isupper() or word.lower().strip(".,;:!") in _CONNECTIVES


def _claims(text: str, m: re.Match[str], *, strict_follow: bool) -> set[str]:
    """The letters asserted by one regex match: its own (if the text after it fits), plus any alternative."""
    letter, rest = m.group(1), text[m.end(1):]
    after = rest.lstrip(")]")
    alt = _ALTERNATIVE.match(after)
    # a closing bracket after the second letter marks it a label too: "(A) or (B) probably" names two letters
    if alt and _stands_as_letter(after[alt.end():]):
        return {letter, alt.group(1)}
    if not strict_follow or _stands_as_letter(rest):
        return {letter}
    return set()


def _tier(text: str, patterns: Sequence[re.Pattern[str]], *, strict_follow: bool = True) -> set[str]:
    found: set[str] = set()
    for p in patterns:
        for m in p.finditer(text):
            found |= _claims(text, m, strict_follow=strict_follow)
    return found


def extract_letter(text: str | None, n_options: int, options: Sequence[str] | None = None) -> str | None:
    """The option letter a response chooses, or None when it states none (or several) of A..`n_options`.

    Lower-case letters count only when they are the whole answer ("b", "Answer: (b)"), since in prose they are
    words. When `options` are given, a response that is exactly one option's text (after normalisation) selects
    that option.
    """
    valid = LETTERS[: max(0, min(n_options, len(LETTERS)))]
    if not valid:
        return None
    t = _answer_text(text)
    if not t:
        return None

    whole = _WHOLE_LETTER.match(_ANSWER_LABEL.sub("", t))
    if whole:
        letter = whole.group(1).upper()
        return letter if letter in valid else None

    # Explicit tiers: an out-of-range letter stated there is still the model's answer, so it fails the parse.
    # A response that opens with a letter label is read together with other lines that do: "A. red\nB. blue"
    # restates the options rather than answering.
    for claims in (_tier(t, _STRONG), _tier(t, [_LEADING, _LINE_LEADING])):
        if claims:
            return claims.pop() if len(claims) == 1 and claims <= set(valid) else None

    # Looser tiers: only letters in range count, since a stray "(E)" or "option F" may be about something else.
    for claims in (
        _tier(t, _WEAK),
        _tier(t, [_BRACKETED], strict_follow=False),
        _tier(t, [_TRAILING], strict_follow=False),
    ):
        claims &= set(valid)
        if claims:
            return claims.pop() if len(claims) == 1 else None

    if options:
        return _match_option_text(t, options[: len(valid)])
    return None


_ANSWER_LEAD = re.compile(
    r"^(?i:(?:the\s+)?(?:final\s+|best\s+|correct\s+)?answer\s*(?:is|:|=)?\s*:?\s*|it's\s+|it\s+is\s+|"
    r"this\s+is\s+|that's\s+|that\s+is\s+|they\s+are\s+|there\s+(?:is|are)\s+)"
)


def _strip_lead(text: str) -> str:
    return _ANSWER_LEAD.sub("", text.strip(), count=1)


def _match_option_text(text: str, options: Sequence[str]) -> str | None:
    said = normalize_short(_strip_lead(text))
    if not said:
        return None
    hits = [i for i, o in enumerate(options) if normalize_short(o) == said]
    return LETTERS[hits[0]] if len(hits) == 1 else None


# ---------------------------------------------------------------------------------------------------------------
# Yes / no

_YN = r"(yes|no)"
_YN_LEADING = re.compile(r"^\W*" + _YN + r"\b", re.IGNORECASE)
_YN_LEADING_PAIR = re.compile(r"^\W*(?:yes|no)\s*(?:or|and|/)\s*(?:yes|no)\b", re.IGNORECASE)
_YN_ANSWER = re.compile(r"\banswer\s*(?:is|:)?\s*:?\s*" + _YN + r"\b", re.IGNORECASE)
_YN_TRAILING = re.compile(r"\b" + _YN + r"\W*$", re.IGNORECASE)
_YN_ANY = re.compile(r"\b" + _YN + r"\b", re.IGNORECASE)


def extract_yesno(text: str | None) -> str | None:
    """"yes" or "no" as the response states it; None when it says neither or both."""
    t = _ANSWER_LABEL.sub("", _answer_text(text))
    if not t or _YN_LEADING_PAIR.match(t):
        return None
    for pattern in (_YN_LEADING, _YN_ANSWER, _YN_TRAILING, _YN_ANY):
        said = {m.group(1).lower() for m in pattern.finditer(t)}
        if said:
            return said.pop() if len(said) == 1 else None
    return None


# ---------------------------------------------------------------------------------------------------------------
# Short answers and numbers

_UNITS = "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen " \
         "seventeen eighteen nineteen twenty".split()
_TENS = {"thirty": 30, "forty": 40, "fifty": 50, "sixty": 60, "seventy": 70, "eighty": 80, "ninety": 90}
_NUMBER_WORDS = {w: i for i, w in enumerate(_UNITS)} | _TENS
_ARTICLES = frozenset({"a", "an", "the"})
_TOKEN = re.compile(r"-?\d+(?:\.\d+)?|[^\W_]+")
_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")


def _canonical_number(token: str) -> str:
    v = float(token)
    return str(int(v)) if v.is_integer() else repr(v)


def normalize_short(text: str | None) -> str:
    """Lower-case, no punctuation, no articles, single spaces; number words up to ninety-nine become digits
    and numbers are written canonically ("3.50" -> "3.5", "1,000" -> "1000")."""
    if not text:
        return ""
    t = unicodedata.normalize("NFKC", text).lower()
    t = re.sub(r"(?<=\d),(?=\d{3}(?!\d))", "", t)
    tokens: list[str] = []
    after_tens = False  # the previous token was a tens word: "twenty one" / "twenty-one" is one number
    for tok in _TOKEN.findall(t):
        word = tok
        if _NUMBER.fullmatch(tok):
            tok = _canonical_number(tok)
        elif tok in _NUMBER_WORDS:
            n = _NUMBER_WORDS[tok]
            if after_tens and 0 < n < 10:
                tokens[-1] = str(int(tokens[-1]) + n)
                after_tens = False
                continue
            tok = str(n)
        after_tens = word in _TENS or word == "twenty"
        if tok in _ARTICLES:
            continue
        tokens.append(tok)
    return " ".join(tokens)


def extract_number(text: str | None) -> float | None:
    """The one number a response states (digits or simple number words); None when it states none or several."""
    t = normalize_short(_strip_lead(_answer_text(text)))
    values = {float(tok) for tok in t.split() if _NUMBER.fullmatch(tok)}
    return values.pop() if len(values) == 1 else None


# ---------------------------------------------------------------------------------------------------------------
# Scoring


def score(sample: Sample, response: str | None) -> Score:
    """Score one response against the sample's answer with the rules for its answer type.

    Raises SampleError when the sample itself cannot be scored (no reference answer, an unknown answer type, a
    "number" answer that is not a number).
    """
    if sample.answer is None or not str(sample.answer).strip():
        raise SampleError("sample has no reference answer to score against")
    gt = str(sample.answer).strip()
    kind = sample.answer_type
    parsed: str | None
    if kind == "mcq":
        # Options written into the question text (CV-Bench, MMStar) leave `options` empty: any letter is valid.
        n = len(sample.options) or len(LETTERS)
        parsed = extract_letter(response, n, sample.options or None)
        correct = parsed is not None and parsed == gt.strip("()[] .").upper()
    elif kind == "yesno":
        parsed = extract_yesno(response)
        correct = parsed is not None and parsed == normalize_short(gt)
    elif kind == "number":
        want = extract_number(gt)
        if want is None:
            raise SampleError(f"reference answer {gt!r} is not a number")
        got = extract_number(response)
        parsed = None if got is None else _canonical_number(repr(got))
        correct = got is not None and abs(got - want) <= 1e-9 * max(1.0, abs(want))
    elif kind == "short":
        parsed = normalize_short(_strip_lead(_answer_text(response))) or None
        correct = parsed is not None and parsed == normalize_short(_strip_lead(gt))
    else:
        raise SampleError(f"unknown answer type {kind!r} (expected mcq, yesno, short or number)")
    return Score(parsed, bool(correct), parsed is None)


def score_with(scorer: SpecScorer | None, sample: Sample, response: str | None) -> Score:
    """One call for the runner: the benchmark's own scorer when it has one, else the rules for the answer type.

    A benchmark scorer receives the response with reasoning already stripped. Whatever it returns, an answer it
    could not parse (None) is a parse failure and never correct.
    """
    if scorer is None:
        return score(sample, response)
    parsed, correct = scorer(sample, strip_reasoning(response))
    return Score(parsed, bool(correct) and parsed is not None, parsed is None)
