"""Answer metrics: GSM8K exact match, official DROP EM/F1 and Bamboogle containment accuracy."""

from __future__ import annotations

import re
import string
from decimal import Decimal, InvalidOperation

import numpy as np

_PUNCTUATION = frozenset(string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the)\b", re.UNICODE)

# ---------------------------------------------------------------- GSM8K

_THOUSANDS_COMMA = re.compile(r"(?<=\d),(?=\d)")
_NUMBER = re.compile(r"-?(?:\d+(?:\.\d+)?|\.\d+)")


def _first_number(text: str) -> Decimal | None:
    """First number in ``text`` after dropping "$" and thousands commas, or None."""
    cleaned = _THOUSANDS_COMMA.sub("", text.replace("$", ""))
    match = _NUMBER.search(cleaned)
    return Decimal(match.group()) if match else None


def _gold_number(text: str) -> Decimal | None:
    try:
        return Decimal(_THOUSANDS_COMMA.sub("", text.strip()))
    except InvalidOperation:
        return None


def gsm8k_em(prediction: str, answers: list[list[str]]) -> float:
    """1.0 when the prediction's first number equals a gold number exactly (decimal compare)."""
    predicted = _first_number(prediction)
    if predicted is None:
        return 0.0
    golds = (_gold_number(span) for answer in answers for span in answer)
    return float(any(gold is not None and gold == predicted for gold in golds))


# ---------------------------------------------------------------- DROP
# Official DROP evaluation (get_metrics and helpers), re-written from
# allenai/allennlp-reading-comprehension, allennlp_rc/eval/drop_eval.py
# (DROP, Dua et al. 2019, NAACL; Apache-2.0).


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _remove_punc(token: str) -> str:
    if _is_number(token):
        return token
    return "".join(ch for ch in token if ch not in _PUNCTUATION)


def _normalize_number(token: str) -> str:
    return str(float(token)) if _is_number(token) else token


def _white_space_fix(text: str) -> str:
    return " ".join(text.split())


def _normalize_drop_token(token: str) -> str:
    lowered = token.lower()
    return _white_space_fix(_ARTICLES.sub(" ", _normalize_number(_remove_punc(lowered))))


def _normalize_drop_span(text: str) -> str:
    """Per token (split on space and hyphen): lower, strip punctuation, numbers, articles."""
    parts = (_normalize_drop_token(token) for token in re.split(" |-", text))
    return " ".join(part for part in parts if part.strip()).strip()


def _answer_to_bags(spans: list[str]) -> tuple[list[str], list[set[str]]]:
    normalized = [_normalize_drop_span(span) for span in spans]
    return normalized, [set(span.split()) for span in normalized]


def _bag_f1(predicted: set[str], gold: set[str]) -> float:
    overlap = len(gold & predicted)
    precision = overlap / len(predicted) if predicted else 1.0
    recall = overlap / len(gold) if gold else 1.0
    if precision == 0.0 and recall == 0.0:
        return 0.0
    return 2 * precision * recall / (precision + recall)


def _numbers_match_if_present(gold: set[str], predicted: set[str]) -> bool:
    """False only when the gold bag has numbers and the predicted bag shares none of them."""
    gold_numbers = {word for word in gold if _is_number(word)}
    predicted_numbers = {word for word in predicted if _is_number(word)}
    return not gold_numbers or bool(gold_numbers & predicted_numbers)


def _align_bags(predicted: list[set[str]], gold: list[set[str]]) -> np.ndarray:
    """Best 1-1 gold/predicted alignment; one F1 per slot of max(len(gold), len(predicted))."""
    from scipy.optimize import linear_sum_assignment  # here: a third of the import time of every worker scoring rows

    scores = np.zeros([len(gold), len(predicted)])
    for gold_index, gold_bag in enumerate(gold):
        for pred_index, pred_bag in enumerate(predicted):
            if _numbers_match_if_present(gold_bag, pred_bag):
                scores[gold_index, pred_index] = _bag_f1(pred_bag, gold_bag)
    rows, columns = linear_sum_assignment(-scores)
    aligned = np.zeros([max(len(gold), len(predicted))])
    for row, column in zip(rows, columns, strict=True):
        aligned[row] = max(aligned[row], scores[row, column])
    return aligned


def _drop_get_metrics(predicted: list[str], gold: list[str]) -> tuple[float, float]:
    predicted_spans, predicted_bags = _answer_to_bags(predicted)
    gold_spans, gold_bags = _answer_to_bags(gold)
    same_spans = set(predicted_spans) == set(gold_spans) and len(predicted_spans) == len(gold_spans)
    f1 = np.round(np.mean(_align_bags(predicted_bags, gold_bags)), 2)
    return float(same_spans), float(f1)


def drop_em_f1(prediction: str, answers: list[list[str]]) -> tuple[float, float]:
    """Official DROP (EM, F1) of a one-span prediction, each maximised over the gold answers."""
    best_em, best_f1 = 0.0, 0.0
    for gold in answers:
        if not gold or not gold[0].strip():  # the official script skips empty gold answers
            continue
        em, f1 = _drop_get_metrics([prediction], gold)
        best_em, best_f1 = max(best_em, em), max(best_f1, f1)
    return best_em, best_f1


# ---------------------------------------------------------------- Bamboogle


def _normalize_squad(text: str) -> str:
    """SQuAD normalisation: lower, strip punctuation, drop articles, collapse whitespace."""
    no_punc = "".join(ch for ch in text.lower() if ch not in _PUNCTUATION)
    return _white_space_fix(_ARTICLES.sub(" ", no_punc))


def _contains(prediction: str, gold: list[str]) -> bool:
    spans = [_normalize_squad(span) for span in gold]
    return bool(spans) and all(span and span in prediction for span in spans)


def bamboogle_acc(prediction: str, answers: list[list[str]]) -> float:
    """1.0 when every span of some gold answer is contained in the prediction (both normalised)."""
    normalized = _normalize_squad(prediction)
    return float(any(_contains(normalized, gold) for gold in answers))
