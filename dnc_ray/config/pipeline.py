"""`dnc pipeline`: the whole method in one job: teacher run, training set, student, evaluations."""

from __future__ import annotations

from typing import Annotated, Literal, Union

from pydantic import (
    Discriminator,
    Field,
    Tag,
    model_validator,
)

from dnc_ray.config.generate import FailedRows, RayConfig
from dnc_ray.config.load import Strict
from dnc_ray.config.train import VARIANTS, TrainConfig
from dnc_ray.llm.configs import (
    HFModel,
    ModelConfig,
    OpenAIModel,
    ReferenceModel,
    VLLMModel,
)
from dnc_ray.tasks import TaskConfig, get_task


class StudentTraining(TrainConfig):
    """TrainConfig of the pipeline's student: the pipeline fills in train_set, variant and output."""

    train_set: str | None = None
    variant: Literal[VARIANTS] | None = None
    output: str | None = None


class StudentDecomposer(HFModel):
    """How the trained student decomposes at evaluation (hf, the default engine); the pipeline fills in `model`."""

    engine: Literal["hf"] = "hf"
    model: str | None = None


class VLLMStudentDecomposer(VLLMModel):
    """The student decomposing on vLLM at evaluation; the pipeline fills in `model`."""

    model: str | None = None


def engine_or_hf(value: object) -> str:
    """A student's engine: `hf` unless the config names another."""
    return (value.get("engine") if isinstance(value, dict) else getattr(value, "engine", None)) or "hf"


StudentEngine = Annotated[Union[Annotated[StudentDecomposer, Tag("hf")], Annotated[VLLMStudentDecomposer, Tag("vllm")]],
                          Discriminator(engine_or_hf)]


class PipelineConfig(Strict):
    """Teacher run on train questions -> S_D set -> student decomposer -> evaluation on held-out ones."""

    output: str = Field(description="folder or URI holding every stage's output and the report")
    train_task: TaskConfig = Field(description="the questions the teacher decomposes for distillation")
    eval_task: TaskConfig = Field(description="held-out questions for the evaluation")
    teacher_decomposer: ModelConfig
    teacher_solver: Annotated[Union[OpenAIModel, HFModel, VLLMModel], Field(discriminator="engine")]
    variant: Literal["sd-t", "sd-r"] = "sd-r"
    num_samples: int = Field(1, gt=0, description="teacher decompositions per train question")
    max_subquestions: int | None = Field(
        None,
        gt=0,
        description="None: the task's default (the paper: 2 on Bamboogle, 3 elsewhere), taken from train_task; "
        "the teacher, the student's training prompts and the evaluation all use it",
    )
    student: StudentTraining = StudentTraining()
    student_decomposer: StudentEngine = StudentDecomposer()
    max_failed_rows: FailedRows = Field(0, description="failed rows allowed per generation run (teacher and each "
                                        "evaluation) before `dnc pipeline` exits 3: a count, or a share such as '5%'")
    budget_usd: float | None = Field(None, gt=0, description="spend cap of the whole pipeline (every generation run's "
                                     "rows): a run starts no request past it; `dnc pipeline` then exits 4")
    progress_interval_s: float = Field(10.0, gt=0)
    ray: RayConfig = RayConfig()

    @model_validator(mode="after")
    def _batch_solver_pairs_with_no_student(self) -> "PipelineConfig":
        if getattr(self.teacher_solver, "mode", "online") == "batch":
            raise ValueError("teacher_solver in mode batch: the evaluation runs pair it with the hf student, which a "
                             "batch run cannot hold; a batch-mode teacher_decomposer is fine")
        return self

    @model_validator(mode="after")
    def _max_subquestions_of_the_task(self) -> "PipelineConfig":
        if self.max_subquestions is None:
            self.max_subquestions = get_task(self.train_task).rules.max_subquestions
        return self

    @model_validator(mode="after")
    def _teacher_can_make_the_set(self) -> "PipelineConfig":
        if isinstance(self.teacher_decomposer, ReferenceModel) and (
            self.train_task.name != "gsm8k" or self.eval_task.name != "gsm8k"
        ):
            raise ValueError("the reference decomposer exists for task gsm8k only")
        if self.num_samples > 1 and getattr(self.teacher_decomposer, "temperature", 0) == 0:
            raise ValueError("num_samples > 1 needs a sampling teacher decomposer (temperature > 0)")
        return self
