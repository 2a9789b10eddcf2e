"""benchmarks/README.md from results/*.json: per benchmark, where and how it ran, then its own
tables and plots (each benchmark module's `render(result) -> str`, built from the helpers here)."""

from __future__ import annotations

import importlib
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from benchmarks.common import RESULTS  # noqa: E402

HERE = Path(__file__).parent


def table(rows: list[dict], columns: list[str]) -> str:
    """A markdown table: one line per row, `columns` in order ('-' where a row has no value)."""
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(str(r.get(c, "-") if r.get(c) is not None else "-") for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def save_figure(fig: plt.Figure, folder: Path, name: str) -> str:
    """Write <folder>/<name>.png beside the results; the markdown that shows it from the README there."""
    fig.tight_layout()
    fig.savefig(folder / f"{name}.png", dpi=100)
    plt.close(fig)
    return f"![{name}]({_link(folder)}{name}.png)"


def _link(folder: Path) -> str:
    return "results/" if folder == RESULTS else ""  # the full README sits above results/; a smoke one inside


def bar_plot(folder: Path, name: str, values: dict[str, float], ylabel: str) -> str:
    fig, ax = plt.subplots(figsize=(6, 3))
    ax.bar(list(values), list(values.values()), color="#4878a8")
    ax.set_ylabel(ylabel)
    ax.set_title(name)
    ax.tick_params(axis="x", labelrotation=20)
    return save_figure(fig, folder, name)


def section(result: dict, folder: Path) -> str:
    name, m = result["benchmark"], result["machine"]
    machine = f"{m['cpu_cores']} cores, {m['ram_gib']} GiB, GPU: {m['gpu'] or 'none'}, " + ", ".join(
        f"{p} {v}" for p, v in m["versions"].items()
    )
    body = importlib.import_module(f"benchmarks.{name}").render(result, folder)
    return "\n\n".join([
        f"## {name}",
        f"Measured {result['date']} on {machine}. Parameters: `{json.dumps(result['params'])}`.",
        body,
    ])


def write_readme(folder: Path = RESULTS) -> Path:
    """The README of the results in `folder`: benchmarks/README.md for results/, results/smoke/README.md for smoke runs."""
    results = [json.loads(p.read_text()) for p in sorted(folder.glob("*.json"))]
    intro = (HERE / "INTRO.md").read_text()
    path = HERE / "README.md" if folder == RESULTS else folder / "README.md"
    path.write_text(intro + "\n\n" + "\n\n".join(section(r, folder) for r in results) + "\n")
    return path
