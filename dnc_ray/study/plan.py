"""The study's cells, from its config: per task the teacher run, the four training sets, the students,
the paper's Table 1 rows and the self-ask baseline; across tasks the cross-domain rows; S_D-R rounds.

    <task>/teacher              two_stage, teacher decomposer + solver, on the task's training questions
    <task>/set/<variant>        sd-t, sd-r, se-t, se-a from <task>/teacher
    <task>/student/<variant>    a student trained on it (decomposers: sd-*, solvers: se-*)
    <task>/eval/<row>           a Table 1 row on the task's test questions
    <task>/eval/<row>@<other>   cross-domain: <other>'s S_D-R decomposer / S_E-A solver on <task>
    <task>/round<k>/run         round k-1's S_D-R student decomposes the training questions, the teacher solves
    <task>/set/sd-r-round<k>    the teacher's correct decompositions + those of rounds 2..k's runs
    <task>/student/sd-r-round<k>, <task>/eval/sdr-round<k>-teacher
"""

from __future__ import annotations

from dataclasses import dataclass

from dnc_ray.config import GenerateConfig, TrainConfig, failed_rows_allowed
from dnc_ray.llm.configs import ReferenceModel
from dnc_ray.method import STRATEGIES
from dnc_ray.stages.run_record import run_identity
from dnc_ray.study.cells import Built, Cell, Job
from dnc_ray.study.config import StudyConfig, StudyTask

VARIANTS = ("sd-t", "sd-r", "se-t", "se-a")
DECOMPOSER_VARIANTS = ("sd-t", "sd-r")


@dataclass(frozen=True)
class Row:
    """A row of the paper's Table 1: who decomposes and who solves ("teacher", "base" or a variant)."""

    id: str
    title: str
    strategy: str
    decomposer: str | None
    solver: str


TABLE_ROWS = (
    Row("direct-teacher", "single-stage teacher", "direct", None, "teacher"),
    Row("direct-base", "single-stage base student", "direct", None, "base"),
    Row("teacher-teacher", "teacher / teacher", "two_stage", "teacher", "teacher"),
    Row("base-teacher", "base student / teacher", "two_stage", "base", "teacher"),
    Row("teacher-base", "teacher / base student", "two_stage", "teacher", "base"),
    Row("sdt-teacher", "S_D-T / teacher", "two_stage", "sd-t", "teacher"),
    Row("sdr-teacher", "S_D-R / teacher", "two_stage", "sd-r", "teacher"),
    Row("teacher-set", "teacher / S_E-T", "two_stage", "teacher", "se-t"),
    Row("teacher-sea", "teacher / S_E-A", "two_stage", "teacher", "se-a"),
    Row("self-ask", "self-ask teacher (dynamic)", "self_ask", "teacher", "teacher"),
)
ROWS_BY_ID = {r.id: r for r in TABLE_ROWS}
CROSS_ROWS = ("sdr-teacher", "teacher-sea")  # the paper's generalisation table: a distilled decomposer, a distilled solver


def student_cell(task: str, variant: str) -> str:
    return f"{task}/student/{variant}"


def round_variant(k: int) -> str:
    return "sd-r" if k == 1 else f"sd-r-round{k}"


# ---------------------------------------------------------------- cell settings (what a key is made of)


def generate_settings(gen: GenerateConfig, cell_of_model: dict[str, str]) -> dict:
    """The run's identity (task, strategy, models: engine, model, base_url, temperature, max_tokens; samples,
    sub-question cap, turns) plus the question limit; a student is named by its cell, not by its folder."""
    identity = run_identity(gen)
    identity["task"]["limit"] = gen.task.limit
    for role in ("decomposer", "solver"):
        model = identity.get(role)
        if model and model.get("model") in cell_of_model:
            model["model"] = f"cell:{cell_of_model[model['model']]}"
    return identity


TRAIN_RUNTIME = {"train_set", "output", "cpus_per_worker", "checkpoint_every_steps", "keep_checkpoints",
                 "log_every_steps", "max_failures", "resume_from", "tensorboard", "wandb", "ray"}


def train_settings(cfg: TrainConfig) -> dict:
    return cfg.model_dump(mode="json", exclude=TRAIN_RUNTIME)


def generate_demand(gen: GenerateConfig) -> dict[str, float]:
    """What the run's MethodStage pool reserves: `actors` actors, each the sum of its models' CPUs and GPUs."""
    models = [m for role in STRATEGIES[gen.strategy].roles
              if (m := getattr(gen, role)) is not None and not isinstance(m, ReferenceModel)]
    actors = max((m.actors for m in models), default=0)
    return {"CPU": actors * sum(m.num_cpus for m in models),
            "GPU": actors * sum(getattr(m, "num_gpus", 0.0) for m in models)}


def train_demand(cfg: TrainConfig) -> dict[str, float]:
    return {"CPU": cfg.num_workers * cfg.cpus_per_worker, "GPU": float(cfg.num_workers) if cfg.use_gpu else 0.0}


# ---------------------------------------------------------------- the cells


class StudyPlan:
    def __init__(self, cfg: StudyConfig):
        self.cfg = cfg
        self.tasks = {t.key: t for t in cfg.tasks}

    # models by role
    def teacher(self, task: StudyTask, role: str):
        teacher = self.cfg.teacher_of(task)
        return teacher.decomposer if role == "decomposer" else teacher.solver

    def student_model(self, role: str, model: str) -> dict:
        decoding = self.cfg.student.decomposer if role == "decomposer" else self.cfg.student.solver
        return decoding.model_dump() | {"model": model}

    def generate(self, task: StudyTask, side: str, strategy: str, decomposer, solver, samples: int = 1) -> GenerateConfig:
        return GenerateConfig(
            task=task.task_config(side), strategy=strategy, output="", decomposer=decomposer, solver=solver,
            num_samples=samples, max_subquestions=self.cfg.max_subquestions_of(task), max_turns=self.cfg.max_turns,
            max_failed_rows=self.cfg.max_failed_rows, progress_interval_s=self.cfg.progress_interval_s, ray=self.cfg.ray,
        )

    def cells(self) -> list[Cell]:
        cells = []
        for task in self.cfg.tasks:
            cells += self.training_cells(task)
        for task in self.cfg.tasks:
            cells += [self.eval_cell(task, row, task) for row in TABLE_ROWS]
            for k in range(2, self.cfg.rounds_of(task) + 1):
                cells += self.round_cells(task, k)
            if self.cfg.cross_domain:
                for other in self.cfg.tasks:
                    if other.key != task.key:
                        cells += [self.eval_cell(task, ROWS_BY_ID[r], other) for r in CROSS_ROWS]
        return cells

    def training_cells(self, task: StudyTask) -> list[Cell]:
        t = task.key
        decomposer, samples = self.teacher(task, "decomposer"), self.cfg.samples_of(task)
        if samples > 1 and self.cfg.sample_temperature:
            decomposer = decomposer.model_copy(update={"temperature": self.cfg.sample_temperature})
        gen = self.generate(task, "train", "two_stage", decomposer, self.teacher(task, "solver"), samples)
        cells = [self.generate_cell(f"{t}/teacher", gen, {}, {"task": t, "role": "teacher-run", "feeds": True})]
        for variant in VARIANTS:
            cells.append(self.distill_cell(task, variant, [f"{t}/teacher"]))
            cells.append(self.train_cell(task, variant))
        return cells

    def round_cells(self, task: StudyTask, k: int) -> list[Cell]:
        """Round k: round k-1's S_D-R student decomposes the training questions and the teacher solves them;
        the set adds the decompositions that led to correct answers (of this and earlier rounds) to the teacher's."""
        t = task.key
        previous = student_cell(t, round_variant(k - 1))
        decoding = self.cfg.student.decomposer
        samples = self.cfg.samples_of(task) if decoding.temperature > 0 else 1
        run = f"{t}/round{k}/run"

        def make_run(inputs: dict[str, Built]) -> Job:
            model = f"{inputs[previous].folder}/model"
            gen = self.generate(task, "train", "two_stage", self.student_model("decomposer", model),
                                self.teacher(task, "solver"), samples)
            return self.generate_job(gen, {model: previous})

        variant = round_variant(k)
        runs = [f"{t}/teacher"] + [f"{t}/round{j}/run" for j in range(2, k + 1)]
        return [
            Cell(run, "generate", (previous,), make_run, {"task": t, "role": "round-run", "round": k, "feeds": True}),
            self.distill_cell(task, variant, runs, base_variant="sd-r"),
            self.train_cell(task, variant, base_variant="sd-r"),
            self.eval_cell(task, Row(f"sdr-round{k}-teacher", f"S_D-R round {k} / teacher", "two_stage", variant,
                                     "teacher"), task, round_k=k),
        ]

    def generate_cell(self, name: str, gen: GenerateConfig, cell_of_model: dict[str, str], meta: dict) -> Cell:
        return Cell(name, "generate", (), lambda inputs: self.generate_job(gen, cell_of_model), meta)

    def generate_job(self, gen: GenerateConfig, cell_of_model: dict[str, str]) -> Job:
        return Job(generate_settings(gen, cell_of_model),
                   lambda folder: {"config": gen.model_copy(update={"output": folder}).model_dump(mode="json")},
                   generate_demand(gen))

    def distill_cell(self, task: StudyTask, variant: str, runs: list[str], base_variant: str | None = None) -> Cell:
        base = base_variant or variant

        def make(inputs: dict[str, Built]) -> Job:
            folders = [inputs[r].folder for r in runs]
            return Job({"variant": base}, lambda folder: {"runs": folders, "variant": base, "output": folder})

        return Cell(f"{task.key}/set/{variant}", "distill", tuple(runs), make,
                    {"task": task.key, "role": "set", "variant": variant})

    def train_cell(self, task: StudyTask, variant: str, base_variant: str | None = None) -> Cell:
        base = base_variant or variant
        set_cell = f"{task.key}/set/{variant}"
        training = self.cfg.training_of(task)

        def make(inputs: dict[str, Built]) -> Job:
            def config(folder: str) -> TrainConfig:
                fields = training.model_dump() | {"model": self.cfg.student.model, "variant": base,
                                                  "train_set": inputs[set_cell].folder, "output": folder}
                return TrainConfig.model_validate(fields | {"ray": self.cfg.ray.model_dump()})

            probe = config("")
            return Job(train_settings(probe), lambda folder: {"config": config(folder).model_dump(mode="json")},
                       train_demand(probe))

        return Cell(student_cell(task.key, variant), "train", (set_cell,), make,
                    {"task": task.key, "role": "student", "variant": variant})

    def eval_cell(self, task: StudyTask, row: Row, trained_on: StudyTask, round_k: int | None = None) -> Cell:
        """`row` on `task`'s test questions, the students being those trained on `trained_on`."""
        t, source = task.key, trained_on.key
        students = {role: student_cell(source, v) for role, v in (("decomposer", row.decomposer), ("solver", row.solver))
                    if v not in (None, "teacher", "base")}

        def model_of(role: str, who: str | None, inputs: dict[str, Built]):
            if who is None:
                return None
            if who == "teacher":
                model = self.teacher(task, role)
                if role == "decomposer" and row.strategy == "self_ask" and isinstance(model, ReferenceModel):
                    return self.teacher(task, "solver")  # the reference cannot ask follow-ups: the teacher's solver does
                return model
            if who == "base":
                return self.student_model(role, self.cfg.student.model)
            return self.student_model(role, f"{inputs[students[role]].folder}/model")

        def make(inputs: dict[str, Built]) -> Job:
            gen = self.generate(task, "test", row.strategy, model_of("decomposer", row.decomposer, inputs),
                                model_of("solver", row.solver, inputs))
            names = {f"{inputs[c].folder}/model": c for c in students.values()}
            return self.generate_job(gen, names)

        name = f"{t}/eval/{row.id}" + ("" if source == t else f"@{source}")
        meta = {"task": t, "role": "eval", "row": row.id, "title": row.title, "strategy": row.strategy,
                "trained_on": source, "round": round_k or (1 if row.id == "sdr-teacher" else None),
                "prices": {"decompose": self.price(task, row, "decomposer"), "solve": self.price(task, row, "solver")}}
        return Cell(name, "generate", tuple(dict.fromkeys(students.values())), make, meta)

    def price(self, task: StudyTask, row: Row, role: str) -> dict:
        """$ per 1K tokens of the model in `role` (the report prices tokens with the config as it is now)."""
        who = row.decomposer if role == "decomposer" else row.solver
        if who is None:
            return {"input_per_1k": 0.0, "output_per_1k": 0.0}
        if who == "teacher":
            model = self.teacher(task, role)
            if isinstance(model, ReferenceModel):
                model = self.teacher(task, "solver") if row.strategy == "self_ask" else None
        else:
            model = self.cfg.student.decomposer if role == "decomposer" else self.cfg.student.solver
        price = getattr(model, "price", None)
        return price.model_dump() if price else {"input_per_1k": 0.0, "output_per_1k": 0.0}

    # ---------------------------------------------------------------- judging a built cell

    def assess(self, cell: Cell, summary: dict) -> tuple[bool, str | None]:
        if cell.kind == "generate":
            report = summary["report"]
            errors, rows = report["errors"], report["rows"]
            allowed = failed_rows_allowed(self.cfg.max_failed_rows, rows)
            if cell.meta.get("feeds") and errors > allowed:
                return False, (f"{errors} of {rows} rows failed, more than max_failed_rows "
                               f"({self.cfg.max_failed_rows}) allows: nothing is distilled from it")
            return errors == 0, None
        if cell.kind == "distill":
            kept = sum(y["kept"] for y in summary["yield"].values())
            return True, None if kept else "the training set is empty (no row kept)"
        return True, None
