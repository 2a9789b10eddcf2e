"""One interface for every model call (see engine.py); `make_engine` picks the engine a config names."""

from __future__ import annotations

from typing import TYPE_CHECKING

from dnc_ray.llm.engine import Completion, Engine, Messages, SamplingParams

if TYPE_CHECKING:
    from dnc_ray.config import HFModel, OpenAIModel

__all__ = ["Completion", "Engine", "Messages", "SamplingParams", "make_engine"]


def make_engine(cfg: HFModel | OpenAIModel) -> Engine:
    """Build the engine for a model config (imports torch only for local models)."""
    from dnc_ray.config import HFModel

    if isinstance(cfg, HFModel):
        from dnc_ray.llm.hf import HFEngine

        return HFEngine(cfg)
    from dnc_ray.llm.openai import OpenAIEngine

    return OpenAIEngine(cfg)
