"""benchmarks/README.md from results/*.json: one table and one plot per benchmark."""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from benchmarks.common import RESULTS  # noqa: E402

HERE = Path(__file__).parent


def bar_plot(name: str, values: dict[str, float], ylabel: str) -> str:
    fig, ax = plt.subplots(figsize=(6, 3))
    ax.bar(list(values), list(values.values()), color="#4878a8")
    ax.set_ylabel(ylabel)
    ax.set_title(name)
    ax.tick_params(axis="x", labelrotation=20)
    fig.tight_layout()
    path = RESULTS / f"{name}.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path.relative_to(HERE).as_posix()


def table(values: dict, head: tuple[str, str]) -> str:
    lines = [f"| {head[0]} | {head[1]} |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in values.items()]
    return "\n".join(lines)


def section(result: dict) -> str:
    name, m = result["benchmark"], result["machine"]
    metric = next(k for k in ("rows_per_s", "tokens_per_s") if k in result)
    plot = bar_plot(name, result[metric], metric.replace("_", " "))
    ratios = {k: v for k, v in result.items() if k.startswith(("speedup", "share"))}
    machine = f"{m['cpu_cores']} cores, {m['ram_gib']} GiB, GPU: {m['gpu'] or 'none'}, " + ", ".join(
        f"{p} {v}" for p, v in m["versions"].items()
    )
    return "\n\n".join([
        f"## {name}",
        f"Measured {result['date']} on {machine}. Parameters: `{json.dumps(result['params'])}`.",
        table(result[metric], ("what", metric)),
        "Ratios (same run): " + ", ".join(f"{k} = {v}" for k, v in ratios.items()),
        f"![{name}]({plot})",
    ])


def write_readme() -> Path:
    results = [json.loads(p.read_text()) for p in sorted(RESULTS.glob("*.json"))]
    intro = (HERE / "INTRO.md").read_text()
    path = HERE / "README.md"
    path.write_text(intro + "\n\n" + "\n\n".join(section(r) for r in results) + "\n")
    return path
