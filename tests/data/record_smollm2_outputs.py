"""Record real outputs of the bundled SmolLM2-135M-Instruct, used as fixtures by tests/test_prompts.py.

The JSON next to this script holds what the bundled model (`smollm2-135m-instruct`, CPU, float32,
greedy) actually wrote for the first 8 GSM8K test questions:
- `decompositions`: the decomposition prompt (prompts.decompose_messages), max_tokens=96;
- `solutions`: the solving prompt (prompts.solve_messages) given GSM8K's socratic reference
  sub-questions, max_tokens=160.
The prompt tests parse these recorded outputs, so a parsing regression on real model text fails.
Re-record (a minute or two on CPU) only when the prompts change, then update the expected values
in tests/test_prompts.py by reading the new outputs:

    .venv/bin/python tests/data/record_smollm2_outputs.py
"""

from __future__ import annotations

import datetime
import json
from pathlib import Path

from dnc_ray.llm.configs import HFModel
from dnc_ray.llm.engine import SamplingParams
from dnc_ray.llm.hf import HFEngine
from dnc_ray.method import prompts
from dnc_ray.tasks import TaskConfig, load_rows
from dnc_ray.tasks.gsm8k import reference_subquestions

OUTPUT = Path(__file__).with_name("smollm2_outputs.json")
MODEL = "smollm2-135m-instruct"


def main() -> None:
    engine = HFEngine(HFModel(engine="hf", model=MODEL, batch_size=8))
    rows = load_rows(TaskConfig(name="gsm8k", split="test", limit=8))
    references = reference_subquestions()

    decompose = [prompts.decompose_messages(r["question"], r["context"]) for r in rows]
    decompositions = engine.generate(decompose, SamplingParams(temperature=0.0, max_tokens=96))

    solve = [prompts.solve_messages(r["question"], r["context"], references[r["question"]]) for r in rows]
    solutions = engine.generate(solve, SamplingParams(temperature=0.0, max_tokens=160))

    for c in decompositions + solutions:
        if c.error is not None:
            raise SystemExit(f"generation failed: {c.error}")
    record = {
        "model": MODEL,
        "recorded": datetime.date.today().isoformat(),
        "decompositions": [{"question": r["question"], "output": c.text} for r, c in zip(rows, decompositions, strict=True)],
        "solutions": [
            {"question": r["question"], "gold": r["answers"][0][0], "output": c.text}
            for r, c in zip(rows, solutions, strict=True)
        ],
    }
    OUTPUT.write_text(json.dumps(record, indent=2, ensure_ascii=False) + "\n")
    print(f"wrote {OUTPUT}")


if __name__ == "__main__":
    main()
