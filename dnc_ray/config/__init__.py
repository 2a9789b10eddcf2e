"""Typed configs loaded from YAML, one file per command (generate, train, serve, pipeline; the study's is
study/config.py); a bad config is one clear error naming file, line and field (load.py). Every section is
pydantic with `extra="forbid"`; a model's section is llm/configs.py, a task's tasks.TaskConfig."""

from dnc_ray.config.generate import FailedRows, GenerateConfig, RayConfig, failed_rows_allowed
from dnc_ray.config.load import Strict, load_config
from dnc_ray.config.pipeline import (
    PipelineConfig,
    StudentDecomposer,
    StudentTraining,
    VLLMStudentDecomposer,
    engine_or_hf,
)
from dnc_ray.config.serve import ServeAppConfig, ServeConfig, ServedModel
from dnc_ray.config.train import VARIANTS, TrainConfig

__all__ = ["VARIANTS", "FailedRows", "GenerateConfig", "PipelineConfig", "RayConfig", "ServeAppConfig", "ServeConfig",
           "ServedModel", "Strict", "StudentDecomposer", "StudentTraining", "TrainConfig", "VLLMStudentDecomposer",
           "engine_or_hf", "failed_rows_allowed", "load_config"]
