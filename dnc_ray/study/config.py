"""`dnc study` config: one teacher, one base student, the tasks with their train and test questions."""

from __future__ import annotations

from typing import Annotated, Any, Literal, Union

from pydantic import Discriminator, Field, Tag, ValidationError, model_validator

from dnc_ray.config import (
    FailedRows,
    RayConfig,
    Strict,
    StudentDecomposer,
    StudentTraining,
    VLLMStudentDecomposer,
    engine_or_hf,
)
from dnc_ray.llm.configs import HFModel, ModelConfig, OpenAIModel, ReferenceModel, VLLMModel
from dnc_ray.llm.models import SMOLLM2
from dnc_ray.tasks import HoldOut, TaskConfig, get_task

SolverModel = Annotated[Union[OpenAIModel, HFModel, VLLMModel], Field(discriminator="engine")]


class StudyTeacher(Strict):
    """The teacher: its decomposer (any engine; `reference` on GSM8K test only) and its solver."""

    decomposer: ModelConfig
    solver: SolverModel


class TeacherOverride(Strict):
    """A task's own teacher models (e.g. GSM8K's reference decomposer); unset halves are the study's."""

    decomposer: ModelConfig | None = None
    solver: SolverModel | None = None


class StudentDecoding(StudentDecomposer):
    """How a student (base or trained) runs as an `hf` model (the default engine); the study fills in `model`."""


class VLLMStudentDecoding(VLLMStudentDecomposer):
    """How a student runs on vLLM (`engine: vllm`); the study fills in `model`."""


class DecomposerDecoding(StudentDecoding):
    max_tokens: int = Field(128, gt=0)


class VLLMDecomposerDecoding(VLLMStudentDecoding):
    max_tokens: int = Field(128, gt=0)


def _student_engine(hf: type, vllm: type):
    return Annotated[Union[Annotated[hf, Tag("hf")], Annotated[vllm, Tag("vllm")]], Discriminator(engine_or_hf)]


class StudyStudent(Strict):
    """The base student: what every student is trained from, and how students decode as decomposer and solver."""

    model: str = Field(SMOLLM2, description="model reference of the base student")
    training: StudentTraining = Field(StudentTraining(), description="TrainConfig fields of every student "
                                      "(train_set, variant, output and model are filled in by the study)")
    decomposer: _student_engine(DecomposerDecoding, VLLMDecomposerDecoding) = Field(
        DecomposerDecoding(), description="a student as decomposer (engine hf, the default, or vllm)")
    solver: _student_engine(StudentDecoding, VLLMStudentDecoding) = Field(
        StudentDecoding(), description="a student as solver (engine hf, the default, or vllm)")


class StudySplit(Strict):
    """Which questions of the task's file: a split, an optional fixed hash hold-out, then offset and limit."""

    split: str = "test"
    holdout: HoldOut | None = None
    offset: int = Field(0, ge=0)
    limit: int | None = Field(None, gt=0)


class StudyTask(Strict):
    """One task of the study: its training questions (the teacher run, distillation) and its test questions."""

    name: str = Field(description="a task of dnc_ray.tasks.TASKS, or records")
    label: str | None = Field(None, pattern=r"^[a-z0-9_-]+$", description="its name in cells and the report "
                              "(default: name); needed to tell two records tasks apart")
    path: str | None = None
    fields: dict[str, str] | None = None
    metric: str | None = None
    train: StudySplit
    test: StudySplit
    teacher: TeacherOverride = TeacherOverride()
    num_samples: int | None = Field(None, gt=0, description="teacher decompositions per training question "
                                    "(default: the study's)")
    rounds: int | None = Field(None, ge=1, le=5, description="S_D-R rounds (default: the study's)")
    max_subquestions: int | None = Field(None, gt=0, description="default: the task's (2 on Bamboogle, 3 elsewhere)")
    training: dict[str, Any] = Field({}, description="TrainConfig fields for this task's students, over the "
                                     "study's student.training (the paper: 3 epochs on DROP, 5 elsewhere)")

    @property
    def key(self) -> str:
        return self.label or self.name

    def task_config(self, side: Literal["train", "test"]) -> TaskConfig:
        split = getattr(self, side)
        return TaskConfig(name=self.name, path=self.path, fields=self.fields, metric=self.metric,
                          **split.model_dump(exclude_none=True))

    @model_validator(mode="after")
    def _splits_load(self) -> "StudyTask":
        for side in ("train", "test"):
            try:
                self.task_config(side)
            except ValidationError as e:
                raise ValueError(f"{side}: " + "; ".join(err["msg"] for err in e.errors())) from None
        try:
            StudentTraining.model_validate(self.training)
        except ValidationError as e:
            raise ValueError("training: " + "; ".join(f"{'.'.join(map(str, err['loc']))}: {err['msg']}"
                                                      for err in e.errors())) from None
        return self


class StudyConfig(Strict):
    """The paper's study: per task, the teacher run, the four training sets, four students, the Table 1 rows,
    the self-ask baseline; across tasks, the cross-domain evaluations; optional S_D-R rounds."""

    output: str = Field(description="folder or URI: cells/ (one folder per cell), report.md, report.json, "
                        "cost_vs_score.png")
    teacher: StudyTeacher
    student: StudyStudent = StudyStudent()
    tasks: list[StudyTask] = Field(min_length=1)
    num_samples: int = Field(1, gt=0, description="teacher decompositions per training question")
    sample_temperature: float | None = Field(None, gt=0, description="the teacher decomposer's temperature in "
                                             "the teacher runs when num_samples > 1 (evaluations keep its own); "
                                             "null: its own")
    rounds: int = Field(1, ge=1, le=5, description="S_D-R rounds: round k trains on the teacher's correct "
                        "decompositions plus those of earlier rounds' students that led to correct teacher answers")
    cross_domain: bool = Field(True, description="every task's S_D-R decomposer and S_E-A solver on every other task")
    max_turns: int = Field(8, gt=0, description="self_ask: decomposer turns per question")
    max_failed_rows: FailedRows = Field(0, description="failed rows a generation cell may have: more fail a "
                                        "teacher run (nothing is distilled from it) or make the study exit 3")
    max_parallel_cells: int | None = Field(None, gt=0, description="cells running at once; default: one per CPU "
                                           "of the cluster, and no more than its CPUs and GPUs hold (each "
                                           "cell reserves what its config names)")
    progress_interval_s: float = Field(10.0, gt=0)
    ray: RayConfig = RayConfig()

    def teacher_of(self, task: StudyTask) -> StudyTeacher:
        return StudyTeacher(decomposer=task.teacher.decomposer or self.teacher.decomposer,
                            solver=task.teacher.solver or self.teacher.solver)

    def samples_of(self, task: StudyTask) -> int:
        return task.num_samples or self.num_samples

    def rounds_of(self, task: StudyTask) -> int:
        return task.rounds or self.rounds

    def max_subquestions_of(self, task: StudyTask) -> int:
        return task.max_subquestions or get_task(task.task_config("test")).rules.max_subquestions

    def training_of(self, task: StudyTask) -> StudentTraining:
        return StudentTraining.model_validate(self.student.training.model_dump() | task.training)

    @model_validator(mode="after")
    def _tasks_can_run(self) -> "StudyConfig":
        labels = [t.key for t in self.tasks]
        if len(set(labels)) != len(labels):
            raise ValueError(f"two tasks share the label {next(x for x in labels if labels.count(x) > 1)!r}: "
                             "give each a distinct `label`")
        for task in self.tasks:
            teacher = self.teacher_of(task)
            if isinstance(teacher.decomposer, ReferenceModel):
                if task.name != "gsm8k" or task.train.split != "test" or task.test.split != "test":
                    raise ValueError(f"task {task.key}: the reference decomposer has sub-questions for GSM8K "
                                     "split test only: hold questions out of it with offset/limit or holdout")
                if self.samples_of(task) > 1:
                    raise ValueError(f"task {task.key}: num_samples > 1 needs a sampling teacher decomposer; "
                                     "the reference decomposer gives one decomposition per question")
            elif self.samples_of(task) > 1 and teacher.decomposer.temperature == 0 and not self.sample_temperature:
                raise ValueError(f"task {task.key}: num_samples > 1 needs a sampling teacher decomposer "
                                 "(temperature > 0, or set sample_temperature)")
        return self
