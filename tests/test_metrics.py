"""Tests for dnc_ray.metrics; DROP expectations are hand-computed with the official algorithm."""

import pytest

from dnc_ray.metrics import bamboogle_acc, drop_em_f1, gsm8k_em

# ---------------------------------------------------------------- GSM8K


@pytest.mark.parametrize(
    ("prediction", "gold", "expected"),
    [
        ("$18.", "18", 1.0),
        ("1,000", "1000", 1.0),
        ("$1,000.", "1000", 1.0),
        ("18.0", "18", 1.0),
        ("18.50", "18.5", 1.0),
        (".5", "0.5", 1.0),
        ("18 dollars", "18", 1.0),
        ("18 dollars and 5 cents", "5", 0.0),
        ("18.5", "18", 0.0),
        ("18", "18.5", 0.0),
        ("-3", "-3", 1.0),
        ("a loss of -3 points", "-3", 1.0),
        ("3", "-3", 0.0),
        ("-3", "3", 0.0),
        ("no idea", "18", 0.0),
        ("", "0", 0.0),
    ],
)
def test_gsm8k_em(prediction: str, gold: str, expected: float) -> None:
    assert gsm8k_em(prediction, [[gold]]) == expected


def test_gsm8k_best_over_golds() -> None:
    assert gsm8k_em("18", [["17"], ["18"]]) == 1.0
    assert gsm8k_em("19", [["17"], ["18"]]) == 0.0


def test_gsm8k_no_answers() -> None:
    assert gsm8k_em("18", []) == 0.0


# ---------------------------------------------------------------- DROP


@pytest.mark.parametrize(
    ("prediction", "gold", "expected"),
    [
        ("Texans", ["Texans"], (1.0, 1.0)),
        ("the Texans.", ["Texans"], (1.0, 1.0)),
        ("Houston Texans", ["Texans"], (0.0, 0.67)),  # p=1/2, r=1 -> 2/3
        ("2.0", ["2"], (1.0, 1.0)),
        ("20-yard", ["20 yard"], (1.0, 1.0)),  # hyphen splits tokens
        ("12 yards", ["13 yards"], (0.0, 0.0)),  # gold number missing -> F1 0
        ("13 yards", ["13"], (0.0, 0.67)),
        ("Chaz Schilens", ["Chaz Schilens", "JaMarcus Russell"], (0.0, 0.5)),
        ("red green blue", ["red green yellow purple"], (0.0, 0.57)),  # 4/7 rounded
    ],
)
def test_drop_single_gold(prediction: str, gold: list[str], expected: tuple[float, float]) -> None:
    assert drop_em_f1(prediction, [gold]) == expected


@pytest.mark.parametrize(
    ("prediction", "expected"),
    [
        ("23 September 1943.", (1.0, 1.0)),  # "1943." parses as a number
        ("September 23, 1943", (0.0, 1.0)),  # same bag, different span string
        ("1943", (0.0, 0.5)),  # p=1, r=1/3
        ("24 September 1942", (0.0, 0.0)),  # no gold number matched
    ],
)
def test_drop_date(prediction: str, expected: tuple[float, float]) -> None:
    assert drop_em_f1(prediction, [["23 September 1943"]]) == expected


def test_drop_max_over_answers() -> None:
    # EM compares normalised span strings, so word order matters; F1 uses bags.
    assert drop_em_f1("Texans Houston", [["Houston Texans"]]) == (0.0, 1.0)
    answers = [["Houston Texans"], ["Texans Houston"]]
    assert drop_em_f1("Texans Houston", answers) == (1.0, 1.0)
    assert drop_em_f1("Houston", [["Houston Texans"], ["Houston", "Dallas"]]) == (0.0, 0.67)


def test_drop_skips_empty_gold() -> None:
    assert drop_em_f1("", [[""]]) == (0.0, 0.0)
    assert drop_em_f1("", []) == (0.0, 0.0)
    assert drop_em_f1("Texans", [[""], ["Texans"]]) == (1.0, 1.0)


# Real DROP dev rows (answer followed by validated_answers), hard-coded from the dataset.
PESO_NOTES = [  # 8b7f7ee7: "Which new peso notes were the highest created by 1944?"
    ["100 Peso note", "500 Pesos note"],
    ["500 Pesos note"],
    ["100", "500"],
    ["500 Pesos note"],
]
TD_PASSERS = [  # 317027fa: "Which two players both completed 1-yard TD pass?"
    ["Brady", "Palmer"],
    ["Tom Brady", "Carson Palmer"],
    ["Tom Brady", "Carson Palmer"],
]
KRIS_BROWN_FGS = [["3"], ["2"], ["3"], ["3"], ["3"], ["3"]]  # ac6ba235
REPLACEMENT_YEAR = [["1943"], ["1943"], ["1943"], ["1943"]]  # 0903294b (date + number)


@pytest.mark.parametrize(
    ("prediction", "answers", "expected"),
    [
        ("500 Pesos note", PESO_NOTES, (1.0, 1.0)),  # matches a validated answer
        ("100 Peso note", PESO_NOTES, (0.0, 0.5)),  # one of two spans of the first gold
        ("100 and 500", PESO_NOTES, (0.0, 0.33)),  # best: 1/3 against ["500 Pesos note"]
        ("Tom Brady and Carson Palmer", TD_PASSERS, (0.0, 0.29)),  # 4/7 over 2 spans
        ("Brady", TD_PASSERS, (0.0, 0.5)),
        ("3", KRIS_BROWN_FGS, (1.0, 1.0)),
        ("3.0", KRIS_BROWN_FGS, (1.0, 1.0)),
        ("2", KRIS_BROWN_FGS, (1.0, 1.0)),  # one annotator said 2
        ("4", KRIS_BROWN_FGS, (0.0, 0.0)),
        ("1943", REPLACEMENT_YEAR, (1.0, 1.0)),
        ("in 1943", REPLACEMENT_YEAR, (0.0, 0.67)),
    ],
)
def test_drop_real_rows(prediction: str, answers: list[list[str]], expected: tuple[float, float]) -> None:
    assert drop_em_f1(prediction, answers) == expected


# ---------------------------------------------------------------- Bamboogle


@pytest.mark.parametrize(
    ("prediction", "gold", "expected"),
    [
        ("Barack Obama", "Barack Obama", 1.0),
        ("It was barack obama, in 2009.", "Barack Obama", 1.0),
        ("Obama", "Barack Obama", 0.0),
        ("The Eiffel Tower!", "eiffel tower", 1.0),
        ("Eiffel Tower", "The Eiffel-Tower", 0.0),  # hyphen is removed, not spaced
        ("the U.S. Navy", "US Navy", 1.0),
        ("anything at all", "", 0.0),
        ("the answer", "The", 0.0),  # gold normalises to empty
    ],
)
def test_bamboogle_acc(prediction: str, gold: str, expected: float) -> None:
    assert bamboogle_acc(prediction, [[gold]]) == expected


def test_bamboogle_best_over_golds() -> None:
    assert bamboogle_acc("Paris, France", [["London"], ["Paris"]]) == 1.0
    assert bamboogle_acc("Berlin", [["London"], ["Paris"]]) == 0.0
    assert bamboogle_acc("Berlin", []) == 0.0
