"""The paper's figures, for the report to print beside ours.

Source: Wu, Bai, Zhang, Gu, Vydiswaran, Jaitly, Zhang, "Divide-or-Conquer? Which Part Should You Distill
Your LLM?", Findings of EMNLP 2024 (arXiv 2402.15000): the headline results (teacher GPT-3.5-turbo;
students Vicuna-13B-v1.3; GSM8K exact match, DROP F1, Bamboogle accuracy, in %), the cross-domain
figures, the decomposition and solving cost on GSM8K test, and the static-vs-dynamic token counts.
Copied here so that the project reads nothing outside itself at run time.
"""

from __future__ import annotations

SOURCE = ("Wu et al. 2024, \"Divide-or-Conquer? Which Part Should You Distill Your LLM?\" "
          "(Findings of EMNLP 2024, arXiv 2402.15000)")
MODELS = "teacher GPT-3.5-turbo (decomposer and solver), students Vicuna-13B-v1.3"

# The metric the paper reports per task (the report prints the paper's figure in that column only).
METRIC = {"gsm8k": "em", "drop": "f1", "bamboogle": "acc"}

# Table 1 rows (decomposer / solver) -> task -> score (%).
TABLE1 = {
    "direct-teacher": {"gsm8k": 20.32, "drop": 46.51, "bamboogle": 49.6},
    "direct-base": {"gsm8k": 9.40, "drop": 26.68, "bamboogle": 33.6},
    "teacher-teacher": {"gsm8k": 65.13, "drop": 55.73, "bamboogle": 54.4},
    "base-teacher": {"gsm8k": 62.93, "drop": 47.13, "bamboogle": 48.8},
    "teacher-base": {"gsm8k": 28.13, "drop": 21.29, "bamboogle": 32.8},
    "sdt-teacher": {"gsm8k": 67.02, "drop": 55.19, "bamboogle": 52.0},
    "sdr-teacher": {"gsm8k": 67.78, "drop": 57.97, "bamboogle": 52.0},
    "teacher-set": {"gsm8k": 48.98, "drop": 13.37, "bamboogle": 31.2},
    "teacher-sea": {"gsm8k": 51.55, "drop": 20.34, "bamboogle": 40.8},
    "self-ask": {"gsm8k": 62.92, "bamboogle": 53.6},  # GPT-3.5 in both roles; no DROP figure
}

# Cross-domain: (row, trained on, evaluated on) -> score. The two solver figures (7.98, 11.30) are given in
# the same order as the decomposer ones: trained on GSM8K -> DROP, then trained on DROP -> GSM8K.
CROSS = {
    ("sdr-teacher", "gsm8k", "drop"): 51.05,
    ("sdr-teacher", "drop", "gsm8k"): 63.15,
    ("teacher-sea", "gsm8k", "drop"): 7.98,
    ("teacher-sea", "drop", "gsm8k"): 11.30,
}

# Cost on GSM8K test (1,319 questions), $ at GPT-3.5's price ($0.001 / 1K input, $0.002 / 1K output tokens;
# the 13B student at that price x 13/175).
GSM8K_TEST_QUESTIONS = 1319
COST_GSM8K = {
    "teacher-teacher": {"decompose": 0.13, "solve": 0.63},
    "sdr-teacher": {"decompose": 0.01, "solve": 0.60},
}

# Static (two_stage) vs dynamic (self_ask) with GPT-3.5 in both roles: tokens over the test set and score.
STATIC_DYNAMIC = {
    "gsm8k": {"two_stage": (355_000, 65.13), "self_ask": (824_000, 62.92)},
    "bamboogle": {"two_stage": (15_000, 54.4), "self_ask": (60_000, 53.6)},
}


def table1(row: str, task: str) -> float | None:
    return TABLE1.get(row, {}).get(task)


def cost_per_1k(row: str, task: str) -> dict | None:
    """The paper's decomposition and solving $ per 1,000 questions (GSM8K only)."""
    if task != "gsm8k" or row not in COST_GSM8K:
        return None
    return {stage: round(1000 * usd / GSM8K_TEST_QUESTIONS, 4) for stage, usd in COST_GSM8K[row].items()}
