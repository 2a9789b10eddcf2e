"""One interface for every model call (see engine.py); `make_engine` picks the engine a config names."""

from __future__ import annotations

from typing import TYPE_CHECKING

from dnc_ray.llm.engine import Completion, Engine, Messages, SamplingParams

if TYPE_CHECKING:
    from dnc_ray.llm.configs import HFModel, OpenAIModel, VLLMModel

__all__ = ["Completion", "Engine", "Messages", "SamplingParams", "make_engine"]


def make_engine(cfg: HFModel | OpenAIModel | VLLMModel) -> Engine:
    """Build the engine for a model config (imports torch or vLLM only for local models)."""
    from dnc_ray.llm.configs import HFModel, VLLMModel

    if isinstance(cfg, HFModel):
        from dnc_ray.llm.hf import HFEngine

        return HFEngine(cfg)
    if isinstance(cfg, VLLMModel):
        from dnc_ray.llm.vllm import VLLMEngine

        return VLLMEngine(cfg)
    from dnc_ray.llm.openai import OpenAIEngine

    return OpenAIEngine(cfg)
