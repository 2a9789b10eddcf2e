"""A local model on vLLM's async engine: every call of the actor or replica (rows, turns, Serve requests) goes
into one engine as it comes, and vLLM batches them continuously; the chat template is the model's (the same
token ids as the hf engine), so greedy answers can be compared token for token."""

from __future__ import annotations

import asyncio
import gc
import time
import uuid
from collections.abc import AsyncIterator

from transformers import AutoTokenizer
from vllm import AsyncEngineArgs
from vllm import SamplingParams as VLLMSamplingParams
from vllm.exceptions import VLLMClientError
from vllm.inputs import TokensPrompt
from vllm.lora.request import LoRARequest
from vllm.sampling_params import RequestOutputKind, StructuredOutputsParams
from vllm.v1.engine.async_llm import AsyncLLM

from dnc_ray.llm.configs import VLLMModel
from dnc_ray.llm.engine import Chunk, Completion, Messages, SamplingParams
from dnc_ray.llm.vllm_settings import check_settings, engine_args


class VLLMEngine:
    def __init__(self, cfg: VLLMModel):
        self.name = cfg.model
        path = check_settings(cfg, "model")
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.engine = AsyncLLM.from_engine_args(AsyncEngineArgs(**engine_args(cfg, path)))
        self.lora = LoRARequest("adapter", 1, cfg.lora) if cfg.lora else None

    async def agenerate(self, chats: list[Messages], params: SamplingParams) -> list[Completion]:
        return list(await asyncio.gather(*(self._complete(chat, params) for chat in chats)))

    async def astream(self, chat: Messages, params: SamplingParams) -> AsyncIterator[Chunk]:
        """The answer's new text per engine step; trailing whitespace is held back (the final text is stripped)."""
        started, raw, sent, tokens = time.perf_counter(), "", "", 0
        try:
            async for out in self._outputs(chat, params, RequestOutputKind.DELTA):
                raw += out.outputs[0].text
                tokens += len(out.outputs[0].token_ids)
                visible = raw.strip()
                if len(visible) > len(sent):
                    yield Chunk(visible[len(sent):])
                    sent = visible
        except VLLMClientError as e:  # a request vLLM refuses (e.g. a prompt beyond max_model_len): that chat fails
            yield Chunk("", Completion(text=None, error=f"vllm: {e}"))
            return
        done = _completion(out, raw, tokens, started)
        yield Chunk(done.text[len(sent):], done)

    def shutdown(self) -> None:
        """Stop the engine's processes now (not in AsyncLLM.__del__, which fails at interpreter exit)."""
        self.engine.shutdown()
        self.engine = None
        gc.collect()

    async def _complete(self, chat: Messages, params: SamplingParams) -> Completion:
        started = time.perf_counter()
        try:
            async for out in self._outputs(chat, params, RequestOutputKind.FINAL_ONLY):
                pass
        except VLLMClientError as e:
            return Completion(text=None, error=f"vllm: {e}", latency_s=time.perf_counter() - started)
        return _completion(out, out.outputs[0].text, len(out.outputs[0].token_ids), started)

    def _outputs(self, chat: Messages, params: SamplingParams, kind: RequestOutputKind):
        ids = self.tokenizer.apply_chat_template(chat, add_generation_prompt=True, tokenize=True, return_dict=False)
        return self.engine.generate(TokensPrompt(prompt_token_ids=list(ids)), _sampling(params, kind),
                                    request_id=uuid.uuid4().hex, lora_request=self.lora)


def _completion(out, text: str, tokens: int, started: float) -> Completion:
    return Completion(text=text.strip(), prompt_tokens=len(out.prompt_token_ids), completion_tokens=tokens,
                      latency_s=time.perf_counter() - started)


def _sampling(params: SamplingParams, kind: RequestOutputKind) -> VLLMSamplingParams:
    """Greedy at temperature 0, as the hf engine; stop strings are cut off with what follows them."""
    guided = StructuredOutputsParams(json=params.json_schema) if params.json_schema else None
    return VLLMSamplingParams(
        temperature=params.temperature, max_tokens=params.max_tokens, stop=list(params.stop) or None,
        seed=params.seed, output_kind=kind, structured_outputs=guided,
    )
