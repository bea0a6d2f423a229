"""Answer extraction over a table of real-looking responses, and the scoring contract."""

from __future__ import annotations

import pytest

from vopd_bench.errors import SampleError
from vopd_bench.samples import Sample
from vopd_bench.scoring import (
    Score,
    extract_letter,
    extract_number,
    extract_yesno,
    normalize_short,
    score,
    score_with,
    strip_reasoning,
)

OPTIONS = ("red", "blue", "green", "yellow")

# (response, expected letter) with the four OPTIONS above. None = parse failure.
MCQ_TABLE: list[tuple[str, str | None]] = [
    # bare letters in every common dress
    ("B", "B"),
    ("(B)", "B"),
    ("B.", "B"),
    ("B)", "B"),
    ("[C]", "C"),
    ("**B**", "B"),
    ("  D  \n", "D"),
    ("b", "B"),
    ("(c)", "C"),
    # answer phrases
    ("Answer: B", "B"),
    ("answer: a", "A"),
    ("**Answer:** C", "C"),
    ("The answer is (C).", "C"),
    ("The answer is A", "A"),
    ("The best answer is: D", "D"),
    ("The correct option is C", "C"),
    ("Final answer: (D)", "D"),
    ("Option A is wrong; the answer is B", "B"),
    ("Options: (A) red (B) blue. Answer: B", "B"),
    ("The answer is B, not A", "B"),
    ("答案是（B）", "B"),
    ("\\boxed{C}", "C"),
    # a leading label followed by text
    ("C. red", "C"),
    ("A: red", "A"),
    ("B - blue", "B"),
    ("(D) yellow", "D"),
    ("B\n\nThe car on the left is blue.", "B"),
    ("B, I think.", "B"),
    # looser statements
    ("I think it's C because the car is green.", "C"),
    ("It is B", "B"),
    ("I'd go with C", "C"),
    ("Looking at the sign, it is clearly (A).", "A"),
    ("Therefore, B.", "B"),
    ("It's B here.", "B"),  # a connective with its punctuation
    # typographic quotes read as ASCII ones
    ("‘B’", "B"),
    ("It’s C, I think.", "C"),
    # the option's text alone
    ("red", "A"),
    ("Red.", "A"),
    ("The answer is green.", "C"),
    # never guessed
    ("A lot of red", None),
    ("A red car", None),
    ("I", None),
    ("I think so", None),
    ("I'm not sure.", None),
    ("A or B", None),
    ("(A) or (B)", None),
    ("(A) or (B) probably", None),  # the bracket makes (B) a label, whatever word follows
    ("(A)X or B", "A"),  # text glued to the bracket: " or B" does not follow the letter
    ("B and D", None),
    ("The answer is A. Wait, the answer is B.", None),
    ("option A is red, option B is blue", None),
    ("A. red\nB. blue", None),
    ("dark red", None),
    ("The car is not red", None),
    ("", None),
    # letters beyond the options are not answers
    ("E", None),
    ("The answer is E.", None),
    ("e", None),
]


@pytest.mark.parametrize(("response", "expected"), MCQ_TABLE)
def test_extract_letter_table(response: str, expected: str | None) -> None:
    assert extract_letter(response, len(OPTIONS), OPTIONS) == expected


def test_table_is_large_and_covers_failures() -> None:
    assert len(MCQ_TABLE) >= 40
    assert sum(exp is None for _, exp in MCQ_TABLE) >= 10


def test_letters_beyond_two_options_are_invalid() -> None:
    # V* relative-position questions have two options: C is not an answer there.
    assert extract_letter("C", 2) is None
    assert extract_letter("The answer is (C).", 2) is None
    assert extract_letter("(B)", 2) == "B"
    assert extract_letter("B", 0) is None and extract_letter("A", 0) is None
    # a one-option question: its one letter, stated in a sentence, is in range
    assert extract_letter("The answer is A", 1) == "A"


def test_option_text_needs_an_unambiguous_option() -> None:
    assert extract_letter("red", 3, ("red", "Red", "blue")) is None
    assert extract_letter("blue", 3, ("red", "Red", "blue")) == "C"
    # The text of an option listed beyond n_options does not count.
    assert extract_letter("yellow", 3, OPTIONS) is None
    # Without options, text cannot be mapped to a letter.
    assert extract_letter("red", 4) is None


THINK_TABLE: list[tuple[str, str]] = [
    ("<think>A or B? The sign is red.</think>The answer is B", "The answer is B"),
    ("<think>first</think> C <think>second</think>", "C"),
    # the template opened the block: the response starts mid-thought
    ("hmm, maybe A...</think> C", "C"),
    ("a</think>b</think> D", "D"),
    # generation stopped while thinking: no answer came
    ("<think>B is likely, but", ""),
    ("<THINK>upper-case tags</THINK>D", "D"),
    ("reasoning here <answer>D</answer>", "D"),
    ("<answer>A</answer> then <answer>B</answer>", "B"),
    ("<think>x</think><answer> C (truncated", "C (truncated"),
    ("", ""),
]


@pytest.mark.parametrize(("response", "expected"), THINK_TABLE)
def test_strip_reasoning(response: str, expected: str) -> None:
    assert strip_reasoning(response) == expected


def test_letters_inside_reasoning_are_ignored() -> None:
    assert extract_letter("<think>The answer is A... no.</think>The answer is C.", 4) == "C"
    assert extract_letter("<think>The answer is A", 4) is None
    assert strip_reasoning(None) == ""


YESNO_TABLE: list[tuple[str, str | None]] = [
    ("Yes", "yes"),
    ("Yes.", "yes"),
    ("no", "no"),
    ("NO", "no"),
    ("**No**", "no"),
    ("Yes, there is a dog on the sofa.", "yes"),
    ("No. The image shows only cats.", "no"),
    ("Answer: yes", "yes"),
    ("The answer is no.", "no"),
    ("I can see it clearly, so yes", "yes"),
    ("There is no dog in the image.", "no"),
    ("<think>yes? no?</think>No", "no"),
    ("<answer>Yes</answer>", "yes"),
    ("Yes or no", None),
    ("yes and no", None),
    ("There is a dog.", None),
    ("Nope", None),
    ("None of them", None),
    ("Not sure", None),
    ("It says yes on one sign and no on the other. Hard to tell.", None),
    ("", None),
]


@pytest.mark.parametrize(("response", "expected"), YESNO_TABLE)
def test_extract_yesno(response: str, expected: str | None) -> None:
    assert extract_yesno(response) == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("The Cat.", "cat"),
        ("  an   apple ", "apple"),
        ("Red!", "red"),
        ("two", "2"),
        ("Twenty-one", "21"),
        ("thirty two", "32"),
        ("twenty one cars", "21 cars"),  # the words after a compound number are kept
        ("twenty one two", "21 2"),  # a compound takes one unit, not two
        ("twenty zero", "20 0"),  # only units 1-9 join a tens word
        ("twenty ten", "20 10"),
        ("twenty", "20"),
        ("3.50", "3.5"),
        ("3.0", "3"),
        ("1,000 people", "1000 people"),
        ("STOP sign", "stop sign"),
        ("", ""),
    ],
)
def test_normalize_short(text: str, expected: str) -> None:
    assert normalize_short(text) == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [("There are 3 cars.", 3.0), ("three", 3.0), ("1,000", 1000.0), ("-2.5", -2.5), ("**7**", 7.0),
     ("3 or 4", None), ("no number here", None), ("", None)],
)
def test_extract_number(text: str, expected: float | None) -> None:
    assert extract_number(text) == expected


def _mcq(answer: str = "B", options: tuple[str, ...] = OPTIONS) -> Sample:
    return Sample(id="q", image="unused.png", question="What colour is the car?", options=options, answer=answer)


def test_score_mcq() -> None:
    assert score(_mcq("B"), "The answer is (B).") == Score("B", True, False)
    assert score(_mcq("B"), "C") == Score("C", False, False)
    assert score(_mcq("(B)"), "b") == Score("B", True, False)  # a bracketed reference letter
    assert score(_mcq("B"), "A lot of blue") == Score(None, False, True)
    assert score(_mcq("A"), "red") == Score("A", True, False)


def test_score_mcq_with_options_in_the_question() -> None:
    # CV-Bench / MMStar put the options in the question: any letter is readable, text is not.
    s = Sample(id="q", image="x.png", question="Which is closer? (A) box (B) cup (E) pen", answer="E")
    assert score(s, "(E)") == Score("E", True, False)
    assert score(s, "pen") == Score(None, False, True)
    x = Sample(id="q", image="x.png", question="Pick one of (A)..(X).", answer="X")
    assert score(x, "X") == Score("X", True, False)  # the 24th letter is as valid as the first


def test_score_yesno_short_number() -> None:
    yn = Sample(id="y", image="x.png", question="Is there a dog?", answer="Yes", answer_type="yesno")
    assert score(yn, "Yes, on the left.") == Score("yes", True, False)
    assert score(yn, "No.") == Score("no", False, False)
    assert score(yn, "Maybe.") == Score(None, False, True)

    short = Sample(id="s", image="x.png", question="What does the sign say?", answer="Stop", answer_type="short")
    assert score(short, "STOP.") == Score("stop", True, False)
    assert score(short, "The answer is stop") == Score("stop", True, False)
    assert score(short, "Go") == Score("go", False, False)
    assert score(short, "<think>it says stop</think>") == Score(None, False, True)

    num = Sample(id="n", image="x.png", question="How many cars?", answer="3", answer_type="number")
    assert score(num, "There are three cars.") == Score("3", True, False)
    assert score(num, "4") == Score("4", False, False)
    assert score(num, "3 or 4") == Score(None, False, True)


def test_unscorable_samples_raise_sample_error() -> None:
    with pytest.raises(SampleError, match=r"^sample has no reference answer to score against$"):
        score(_mcq(answer=""), "B")
    with pytest.raises(SampleError, match="not a number"):
        score(Sample(id="n", image="x.png", question="?", answer="many", answer_type="number"), "3")
    with pytest.raises(SampleError, match="unknown answer type"):
        score(Sample(id="n", image="x.png", question="?", answer="x", answer_type="essay"), "x")  # type: ignore[arg-type]


def test_score_with_uses_the_benchmark_scorer_on_stripped_text() -> None:
    seen: list[str] = []

    def exact(sample: Sample, text: str) -> tuple[str | None, bool]:
        seen.append(text)
        return (text or None), text == sample.answer

    s = _mcq("B")
    assert score_with(exact, s, "<think>A?</think>B") == Score("B", True, False)
    assert seen == ["B"]
    assert score_with(None, s, "(B)") == Score("B", True, False)


def test_score_with_never_counts_a_parse_failure_as_correct() -> None:
    def sloppy(sample: Sample, text: str) -> tuple[str | None, bool]:
        return None, True  # a buggy scorer claiming success without a parse

    assert score_with(sloppy, _mcq(), "whatever") == Score(None, False, True)


# (answer type, reference answer, response) -> (parsed, correct), each verdict written by hand. Several rows are
# traps a plausible bug falls into: reading the first capital anywhere, comparing unnormalised text, matching a
# number by its digits, dropping a minus sign, treating "no" inside a word as an answer.
VERDICTS: list[tuple[str, str, str, str | None, bool]] = [
    ("mcq", "A", "A lot of blue", None, False),  # the first-capital fallback would read A and score it right
    ("mcq", "A", "I think it is A", "A", True),
    ("mcq", "B", "(b)", "B", True),
    ("mcq", "[B]", "B", "B", True),  # the reference's own brackets
    ("mcq", "b.", "The answer is B", "B", True),
    ("mcq", "C", "The answer is B, not C", "B", False),
    ("mcq", "C", "green", "C", True),  # the option's text
    ("mcq", "C", "Green car", None, False),
    ("mcq", "D", "E", None, False),  # a letter beyond the options
    ("mcq", "A", "A or B", None, False),
    ("mcq", "A", "<think>A</think>", None, False),  # reasoning is never the answer
    ("yesno", "Yes", "yes", "yes", True),
    ("yesno", "Yes.", "YES!", "yes", True),
    ("yesno", "no", "Nothing is there", None, False),  # "no" as part of a word
    ("yesno", "no", "No, nothing.", "no", True),
    ("yesno", "yes", "Yes or no", None, False),
    ("yesno", "yes", "No", "no", False),
    ("short", "Stop sign", "the STOP sign.", "stop sign", True),
    ("short", "cat", "Answer:", None, False),  # a lead-in with nothing after it
    ("short", "red", "The answer is red", "red", True),
    ("short", "red", "dark red", "dark red", False),  # no substring matching
    ("short", "21", "twenty-one", "21", True),
    ("short", "red", "", None, False),
    ("number", "3", "three", "3", True),
    ("number", "3.0", "3", "3", True),
    ("number", "-2", "2", "2", False),  # a dropped minus sign
    ("number", "2", "-2", "-2", False),
    ("number", "1000", "1,000", "1000", True),
    ("number", "1000000", "1000001", "1000001", False),  # a relative tolerance must stay tiny
    ("number", "1000000", "1000000.0005", "1000000.0005", True),  # 5e-10 relative: within 1e-9
    ("number", "1000000000", "1000000001", "1000000001", True),  # exactly 1e-9 relative: the bound is inclusive
    ("number", "0.5", "0.5000000015", "0.5000000015", False),  # below 1 the tolerance is 1e-9 absolute
    ("number", "0.5", "0.50", "0.5", True),
    ("number", "3", "3 or 4", None, False),
    ("number", "3", "no number", None, False),
]


@pytest.mark.parametrize(("answer_type", "answer", "response", "parsed", "correct"), VERDICTS)
def test_score_verdicts(answer_type: str, answer: str, response: str, parsed: str | None, correct: bool) -> None:
    s = Sample(id="p", image="x.png", question="?", options=OPTIONS if answer_type == "mcq" else (),
               answer=answer, answer_type=answer_type)  # type: ignore[arg-type]
    assert score(s, response) == Score(parsed, correct, parsed is None)
