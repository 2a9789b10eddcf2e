"""The study's report, built from its cells only (so it can be rebuilt at any time): the paper's layout.

    Splits              every task's training and test questions, and how they were chosen
    Table 1             rows = decomposer / solver, columns = task metrics; the paper's figure beside ours
    Cross-domain        each task's S_D-R decomposer and S_E-A solver on the other tasks
    Iterative S_D-R     per round: set yield, score, decomposition cost (`rounds` > 1)
    Cost                per 1,000 questions: decomposition $, solving $, tokens and model calls per question;
                        static (two_stage) vs dynamic (self_ask)
    Cells               every cell: built or reused in this submission, seconds, key
"""

from __future__ import annotations

import io
import json

from dnc_ray.infra import console, storage
from dnc_ray.llm.configs import ReferenceModel
from dnc_ray.study import paper
from dnc_ray.study.cells import Built
from dnc_ray.study.config import StudyConfig, StudySplit, StudyTask
from dnc_ray.study.plan import CROSS_ROWS, TABLE_ROWS, VARIANTS, StudyPlan, round_variant
from dnc_ray.tasks import get_task, load_rows

PLOT = "cost_vs_score.png"
SHORT = {  # plot labels
    "direct-teacher": "teacher (single stage)", "direct-base": "base student (single stage)",
    "teacher-teacher": "teacher / teacher", "base-teacher": "base student / teacher",
    "teacher-base": "teacher / base student", "sdt-teacher": "S_D-T / teacher", "sdr-teacher": "S_D-R / teacher",
    "teacher-set": "teacher / S_E-T", "teacher-sea": "teacher / S_E-A", "self-ask": "self-ask (dynamic)",
}


# ---------------------------------------------------------------- figures from cells


def metrics_of(task: StudyTask) -> list[str]:
    return list(get_task(task.task_config("test")).metrics)


def primary_metric(task: StudyTask) -> str:
    metrics = metrics_of(task)
    wanted = paper.METRIC.get(task.name if task.name != "records" else task.metric)
    return wanted if wanted in metrics else metrics[0]


def score(b: Built | None, metric: str) -> float | None:
    if b is None or not b.ok or not b.summary:
        return None
    return b.summary["report"]["scores"].get(metric)


def status(b: Built | None) -> str:
    if b is None:
        return "-"
    if b.error and b.error.startswith("skipped"):
        return "skipped"
    if b.error and not b.summary:
        return "failed"
    return ""


def costs(b: Built) -> dict:
    """Per 1,000 questions: $ per stage at the config's prices now, tokens and calls per question."""
    r = b.summary["report"]
    n = max(r["rows"], 1)
    prices = b.meta.get("prices", {})
    out = {}
    for stage in ("decompose", "solve"):
        u = r["usage"][stage]
        p = prices.get(stage, {"input_per_1k": 0.0, "output_per_1k": 0.0})
        usd = (u["prompt_tokens"] * p["input_per_1k"] + u["completion_tokens"] * p["output_per_1k"]) / 1000
        out[f"{stage}_usd_per_1k"] = round(1000 * usd / n, 4)
        out[f"{stage}_tokens_per_q"] = round((u["prompt_tokens"] + u["completion_tokens"]) / n, 1)
    out["total_usd_per_1k"] = round(out["decompose_usd_per_1k"] + out["solve_usd_per_1k"], 4)
    out["tokens_per_q"] = r["tokens_per_question"]
    out["calls_per_q"] = r["calls_per_question"]
    out["questions"] = r["rows"]
    return out


def describe_split(task: StudyTask, split: StudySplit) -> str:
    parts = [f"{task.name} split `{split.split}`" + (f" of {task.path}" if task.path else "")]
    if split.holdout:
        h = split.holdout
        side = "== 0" if h.part == "test" else "!= 0"
        parts.append(f"hold-out part {h.part}: rows whose sha256({h.by}) mod {h.folds} {side}")
    if split.offset or split.limit:
        end = f"{split.offset + split.limit - 1}" if split.limit else "end"
        parts.append(f"rows {split.offset}-{end} of those")
    return "; ".join(parts)


def splits(cfg: StudyConfig) -> list[dict]:
    out = []
    for task in cfg.tasks:
        for side in ("train", "test"):
            split = getattr(task, side)
            out.append({"task": task.key, "side": side, "questions": len(load_rows(task.task_config(side))),
                        "samples": cfg.samples_of(task) if side == "train" else 1,
                        "how": describe_split(task, split)})
    return out


# ---------------------------------------------------------------- the report


def build_report(cfg: StudyConfig, plan: StudyPlan, results: dict[str, Built], wall_s: float) -> tuple[str, dict]:
    tasks = cfg.tasks
    cols = [(t, m) for t in tasks for m in metrics_of(t)]
    data = {"source_of_paper_figures": paper.SOURCE, "paper_models": paper.MODELS, "models": models(cfg),
            "splits": splits(cfg), "table1": [], "cross_domain": [], "rounds": [], "cost": [], "cells": [],
            "wall_s": round(wall_s, 1)}

    md = ["# Divide-or-Conquer study", "",
          f"Ours: {data['models']}.",
          f"The paper ({paper.SOURCE}): {paper.MODELS}. **The models differ**: the paper's figures "
          "(in brackets) show the shape to expect (which rows beat which), not values to match.", ""]

    md += ["## Splits", "", "| task | questions for | questions | samples each | how they are chosen |",
           "|---|---|---|---|---|"]
    md += [f"| {s['task']} | {'training (teacher run, sets)' if s['side'] == 'train' else 'test (every row below)'} | "
           f"{s['questions']} | {s['samples']} | {s['how']} |" for s in data["splits"]]
    md += ["", "A hold-out part is fixed by the rows' ids (or passages), not by their order: the same questions "
           "on every machine and in every copy of the file (Bamboogle has no training split).", ""]

    head = " | ".join(f"{t.key} {m.upper()}" for t, m in cols)
    md += ["## Table 1: decomposer / solver on each task's test questions", "",
           f"| decomposer / solver | {head} |", "|---" * (len(cols) + 1) + "|"]
    for row in TABLE_ROWS:
        cells, entry = [], {"row": row.id, "title": row.title, "scores": {}}
        for t, m in cols:
            b = results.get(f"{t.key}/eval/{row.id}")
            ours = score(b, m)
            ref = paper.table1(row.id, t.name) if m == primary_metric(t) else None
            entry["scores"][f"{t.key}.{m}"] = {"ours": ours, "paper": ref, "status": status(b) or "ok"}
            cells.append(_cell_text(ours, ref, b))
        data["table1"].append(entry)
        md.append(f"| {row.title} | " + " | ".join(cells) + " |")
    md += ["", "The student rows use the base student trained on the task's own training questions; the self-ask "
           "row runs the teacher in both roles (where the teacher decomposer is the reference, its solver asks).", ""]

    if cfg.cross_domain and len(tasks) > 1:
        md += ["## Cross-domain: students trained on one task, evaluated on another", "",
               "| student | trained on | evaluated on | score | same row, trained in-domain | teacher / teacher |",
               "|---|---|---|---|---|---|"]
        for row_id in CROSS_ROWS:
            for source in tasks:
                for target in tasks:
                    if source.key == target.key:
                        continue
                    m = primary_metric(target)
                    b = results.get(f"{target.key}/eval/{row_id}@{source.key}")
                    ours, ref = score(b, m), paper.CROSS.get((row_id, source.name, target.name))
                    same = score(results.get(f"{target.key}/eval/{row_id}"), m)
                    teacher_cell = results.get(f"{target.key}/eval/teacher-teacher")
                    teacher = score(teacher_cell, m)
                    data["cross_domain"].append({"row": row_id, "trained_on": source.key, "evaluated_on": target.key,
                                                 "metric": m, "ours": ours, "paper": ref, "in_domain": same,
                                                 "teacher": teacher})
                    md.append(f"| {SHORT[row_id]} | {source.key} | {target.key} ({m.upper()}) | "
                              f"{_cell_text(ours, ref, b)} | {_num(same)} | "
                              f"{_cell_text(teacher, paper.table1('teacher-teacher', target.name), teacher_cell)} |")
        md += ["", "The paper: distilled decomposers transfer (S_D-R from GSM8K scores 51.05 on DROP, from DROP "
               "63.15 on GSM8K), distilled solvers collapse (7.98, 11.30).", ""]

    if any(cfg.rounds_of(t) > 1 for t in tasks):
        md += ["## Iterative S_D-R (beyond the paper)", "",
               "Round k trains a decomposer (from the base student) on the teacher's correct decompositions plus "
               "those of earlier rounds' students that led to correct teacher answers on the training questions.", "",
               "| task | round | set: kept / total (yield) | S_D-R / teacher score | decomposition $ / 1k q | "
               "decomposition tokens / q |", "|---|---|---|---|---|---|"]
        for t in tasks:
            for k in range(1, cfg.rounds_of(t) + 1):
                s = results.get(f"{t.key}/set/{round_variant(k)}")
                b = results.get(f"{t.key}/eval/{'sdr-teacher' if k == 1 else f'sdr-round{k}-teacher'}")
                kept = total = None
                if s is not None and s.summary:
                    kept = sum(y["kept"] for y in s.summary["yield"].values())
                    total = sum(y["total"] for y in s.summary["yield"].values())
                c = costs(b) if b is not None and b.summary else {}
                m = primary_metric(t)
                data["rounds"].append({"task": t.key, "round": k, "kept": kept, "total": total,
                                       "score": score(b, m), "metric": m, **c})
                share = f"{kept} / {total} ({100 * kept / total:.0f}%)" if total else "-"
                md.append(f"| {t.key} | {k} | {share} | {m.upper()} {_num(score(b, m))} | "
                          f"{_usd(c.get('decompose_usd_per_1k'))} | {_num(c.get('decompose_tokens_per_q'))} |")
        md.append("")

    md += ["## Cost per 1,000 test questions", "",
           "Tokens x each model's `price` in the config (the reference decomposer is free); tokens and model "
           "calls per question. Paper (GSM8K test, GPT-3.5 prices): decomposition $0.0986 and solving $0.4776 per "
           "1,000 questions for teacher / teacher, $0.0076 and $0.4549 for S_D-R / teacher (13x cheaper "
           "decomposition).", "",
           "| task | decomposer / solver | strategy | decomposition $ | solving $ | total $ | tokens / q | calls / q | "
           "paper: decomposition / solving $ |", "|---|---|---|---|---|---|---|---|---|"]
    for t in tasks:
        for row in TABLE_ROWS:
            b = results.get(f"{t.key}/eval/{row.id}")
            if b is None or not b.summary:
                continue
            c, ref = costs(b), paper.cost_per_1k(row.id, t.name)
            data["cost"].append({"task": t.key, "row": row.id, "strategy": row.strategy, **c, "paper_usd_per_1k": ref})
            md.append(f"| {t.key} | {row.title} | {row.strategy} | {_usd(c['decompose_usd_per_1k'])} | "
                      f"{_usd(c['solve_usd_per_1k'])} | {_usd(c['total_usd_per_1k'])} | {c['tokens_per_q']:.0f} | "
                      f"{c['calls_per_q']:.2f} | "
                      + (f"{_usd(ref['decompose'])} / {_usd(ref['solve'])} |" if ref else "- |"))
    md += ["", "Static (two_stage) vs dynamic (self_ask), the teacher in both roles:", "",
           "| task | two_stage tokens / q | self_ask tokens / q | ratio | paper: tokens over the test set (ratio) |",
           "|---|---|---|---|---|"]
    for t in tasks:
        static, dynamic = (results.get(f"{t.key}/eval/{r}") for r in ("teacher-teacher", "self-ask"))
        if not (static and static.summary and dynamic and dynamic.summary):
            continue
        s, d = static.summary["report"]["tokens_per_question"], dynamic.summary["report"]["tokens_per_question"]
        ref = paper.STATIC_DYNAMIC.get(t.name)
        ref_text = (f"{ref['two_stage'][0] // 1000}K vs {ref['self_ask'][0] // 1000}K "
                    f"({ref['self_ask'][0] / ref['two_stage'][0]:.1f}x)") if ref else "-"
        note = " (decomposer: the reference, no tokens)" if isinstance(cfg.teacher_of(t).decomposer, ReferenceModel) else ""
        md.append(f"| {t.key}{note} | {s:.0f} | {d:.0f} | {d / s:.2f}x | {ref_text} |" if s
                  else f"| {t.key}{note} | 0 | {d:.0f} | - | {ref_text} |")
    md.append("")

    md += [f"![cost vs score]({PLOT})", "", "## Cells", "",
           f"Wall time of this submission: {wall_s:.0f} s. Seconds: how long the cell took when it was built.", "",
           "| cell | kind | key | this submission | seconds | result |", "|---|---|---|---|---|---|"]
    for name, b in results.items():
        state = "reused" if b.reused else (status(b) or "built")
        if b.error and state == "built":
            state = "built, unusable"
        data["cells"].append({"name": name, "kind": b.kind, "key": b.key, "folder": b.folder, "state": state,
                              "seconds": b.seconds, "error": b.error, "result": _result(b)})
        md.append(f"| {name} | {b.kind} | {b.key[:12] or '-'} | {state} | {b.seconds:.1f} | "
                  f"{(b.error or _result(b)).replace('|', '/')} |")
    data["complete"] = all(b.ok for b in results.values())
    return "\n".join(md) + "\n", data


def models(cfg: StudyConfig) -> str:
    def name(m):
        return getattr(m, "model", None) or "reference (GSM8K socratic sub-questions)"

    parts = [f"teacher decomposer {name(cfg.teacher.decomposer)}, solver {name(cfg.teacher.solver)}"]
    for t in cfg.tasks:
        if t.teacher.decomposer or t.teacher.solver:
            teacher = cfg.teacher_of(t)
            parts.append(f"on {t.key}: decomposer {name(teacher.decomposer)}, solver {name(teacher.solver)}")
    parts.append(f"students trained from {cfg.student.model}")
    return "; ".join(parts)


def _result(b: Built) -> str:
    if not b.summary:
        return ""
    if b.kind == "generate":
        r = b.summary["report"]
        scores = " ".join(f"{k.upper()} {v:.1f}" for k, v in r["scores"].items())
        return f"{r['rows']} rows, {r['errors']} failed{', ' + scores if scores else ''}"
    if b.kind == "distill":
        kept = sum(y["kept"] for y in b.summary["yield"].values())
        total = sum(y["total"] for y in b.summary["yield"].values())
        return f"{kept} of {total} rows kept"
    t = b.summary["train"]
    return f"{t.get('steps')} steps, final loss {t.get('final_loss', float('nan')):.3f}"


def _num(x) -> str:
    return "-" if x is None else f"{x:.1f}"


def _usd(x) -> str:
    return "-" if x is None else f"{x:.4f}"


def _cell_text(ours, ref, b) -> str:
    text = status(b) or _num(ours)
    return f"{text} ({ref})" if ref is not None else text


# ---------------------------------------------------------------- the plot


def plot_points(cfg: StudyConfig, results: dict[str, Built]) -> dict[str, dict]:
    """Per task: the Table 1 rows as (label, x, y); x is $ per 1,000 questions, or tokens per question
    when every price is 0."""
    out = {}
    for t in cfg.tasks:
        rows = [(row, results.get(f"{t.key}/eval/{row.id}")) for row in TABLE_ROWS]
        rows += [(None, results.get(f"{t.key}/eval/sdr-round{k}-teacher")) for k in range(2, cfg.rounds_of(t) + 1)]
        rows = [(row, b) for row, b in rows if b is not None and b.ok and b.summary]
        priced = any(costs(b)["total_usd_per_1k"] > 0 for _, b in rows)
        m = primary_metric(t)
        points = [(SHORT[row.id] if row else b.meta["title"],
                   costs(b)["total_usd_per_1k"] if priced else b.summary["report"]["tokens_per_question"],
                   b.summary["report"]["scores"][m]) for row, b in rows]
        out[t.key] = {"points": points, "x_label": "$ per 1,000 questions" if priced else
                      "tokens per question (every price is 0)", "y_label": f"{m.upper()} (%)"}
    return out


def spread(wanted: list[float], gap: float, lo: float = 0.0, hi: float = 1.0) -> list[float]:
    """Positions as close to `wanted` as possible, each at least `gap` from the next, within [lo, hi]."""
    order = sorted(range(len(wanted)), key=lambda i: wanted[i])
    pos = [min(max(wanted[i], lo), hi) for i in order]
    for i in range(1, len(pos)):
        pos[i] = max(pos[i], pos[i - 1] + gap)
    if pos and pos[-1] > hi:
        pos[-1] = hi
        for i in range(len(pos) - 2, -1, -1):
            pos[i] = min(pos[i], pos[i + 1] - gap)
    if pos and pos[0] < lo:  # more labels than fit: even spacing over the whole height
        step = (hi - lo) / max(len(pos) - 1, 1)
        pos = [lo + i * step for i in range(len(pos))]
    out = [0.0] * len(wanted)
    for rank, i in enumerate(order):
        out[i] = pos[rank]
    return out


LABEL_PT = 8


def cost_vs_score_figure(panels: dict[str, dict]):
    """One panel per task; every label sits in a column right of its panel, spaced so that none overlap,
    with a line to its point (points may coincide; labels never do)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n_max = max((len(p["points"]) for p in panels.values()), default=1)
    panel_h = max(2.8, 0.26 * n_max + 0.9)
    fig, axes = plt.subplots(len(panels), 1, figsize=(9, panel_h * len(panels)), squeeze=False)
    fig.subplots_adjust(left=0.09, right=0.56, top=1 - 0.45 / (panel_h * len(panels)),
                        bottom=0.5 / (panel_h * len(panels)), hspace=0.55)
    for ax, (task, panel) in zip(axes[:, 0], panels.items(), strict=True):
        points = sorted(panel["points"], key=lambda p: (p[2], -p[1]))  # equal scores: the costlier point's label lowest
        xs, ys = [p[1] for p in points] or [0], [p[2] for p in points] or [0]
        x_pad = (max(xs) - min(xs)) * 0.08 or 1.0
        ax.set_xlim(min(xs) - x_pad, max(xs) + x_pad)
        ax.set_ylim(min(min(ys) - 5, 0), max(max(ys) + 5, 100))
        ax.set_title(task)
        ax.set_xlabel(panel["x_label"])
        ax.set_ylabel(panel["y_label"])
        ax.grid(alpha=0.3)
        fig.canvas.draw()
        height_in = ax.get_position().height * fig.get_size_inches()[1]
        gap = 1.45 * LABEL_PT / 72 / height_in  # one label's height, in axes fraction
        to_axes = ax.transAxes.inverted()
        wanted = [to_axes.transform(ax.transData.transform((x, y)))[1] for _, x, y in points]
        for (label, x, y), ty in zip(points, spread(wanted, gap), strict=True):
            ax.scatter([x], [y], s=30, zorder=3)
            ax.annotate(label, xy=(x, y), xycoords="data", xytext=(1.04, ty), textcoords="axes fraction",
                        fontsize=LABEL_PT, va="center", ha="left", annotation_clip=False,
                        arrowprops={"arrowstyle": "-", "lw": 0.5, "color": "0.5", "shrinkA": 0, "shrinkB": 3})
    return fig


def png(fig) -> bytes:
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    plt.close(fig)
    return buffer.getvalue()


def write_report(cfg: StudyConfig, plan: StudyPlan, results: dict[str, Built], wall_s: float) -> dict:
    out = cfg.output.rstrip("/")
    text, data = build_report(cfg, plan, results, wall_s)
    data["config"] = cfg.model_dump(mode="json")
    storage.write_text(storage.join(out, "report.md"), text)
    storage.write_bytes(storage.join(out, PLOT), png(cost_vs_score_figure(plot_points(cfg, results))))
    storage.write_text(storage.join(out, "report.json"), json.dumps(data, indent=2))  # last: complete when present
    console.say(text)
    return data


__all__ = ["VARIANTS", "build_report", "cost_vs_score_figure", "spread", "write_report"]
