"""A local Transformers model: batched, left-padded generation through the model's chat template."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, StoppingCriteriaList
from transformers.generation.streamers import BaseStreamer

from dnc_ray.llm.configs import HFModel
from dnc_ray.llm.dtype import device_caps, resolve_dtype
from dnc_ray.llm.engine import Chunk, Completion, Messages, SamplingParams
from dnc_ray.llm.hf_streaming import stream_batch
from dnc_ray.llm.models import resolve_model


class HFEngine:
    def __init__(self, cfg: HFModel):
        self.name = cfg.model
        self.batch_size = cfg.batch_size
        path = resolve_model(cfg.model)
        self.tokenizer = AutoTokenizer.from_pretrained(path, padding_side="left")
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.dtype = resolve_dtype(cfg.dtype, cfg.device, device_caps())  # the dtype actually used
        self.model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, self.dtype)).to(cfg.device).eval()

    async def agenerate(self, chats: list[Messages], params: SamplingParams) -> list[Completion]:
        """`generate` in a worker thread, so the caller's event loop keeps serving while the model runs."""
        return await asyncio.to_thread(self.generate, chats, params)

    def generate(self, chats: list[Messages], params: SamplingParams) -> list[Completion]:
        out: list[Completion] = []
        for start in range(0, len(chats), self.batch_size):
            out += self._generate_batch(chats[start : start + self.batch_size], params)
        return out

    async def astream(self, chat: Messages, params: SamplingParams) -> AsyncIterator[Chunk]:
        """One chat streamed (a batch of one; Serve's LocalModel streams whole batches)."""
        async for _, chunk in self.astream_batch([chat], params, [threading.Event()]):
            yield chunk

    async def astream_batch(
        self, chats: list[Messages], params: SamplingParams, cancelled: list[threading.Event]
    ) -> AsyncIterator[tuple[int, Chunk]]:
        """(row, chunk) events of one batch as it generates (hf_streaming); a row whose event is set stops early."""
        async for event in stream_batch(self.tokenizer, self._generate_batch, chats, params, cancelled):
            yield event

    @torch.inference_mode()
    def _generate_batch(
        self, chats: list[Messages], params: SamplingParams, streamer: BaseStreamer | None = None,
        stopping: StoppingCriteriaList | None = None,
    ) -> list[Completion]:
        """One padded batch; a streamer sees each step's tokens, extra stopping criteria may end rows early."""
        started = time.perf_counter()
        inputs = self.tokenizer.apply_chat_template(
            chats, add_generation_prompt=True, padding=True, return_tensors="pt", return_dict=True
        ).to(self.model.device)
        if params.seed is not None:
            torch.manual_seed(params.seed)
        sampling = {"do_sample": True, "temperature": params.temperature} if params.temperature > 0 else {"do_sample": False}
        stops = {"stop_strings": list(params.stop), "tokenizer": self.tokenizer} if params.stop else {}
        generated = self.model.generate(
            **inputs,
            max_new_tokens=params.max_tokens,
            pad_token_id=self.tokenizer.pad_token_id,
            top_p=None,
            top_k=None,
            streamer=streamer,
            stopping_criteria=stopping,
            **sampling,
            **stops,
        )[:, inputs["input_ids"].shape[1] :]
        latency = time.perf_counter() - started
        prompt_tokens = inputs["attention_mask"].sum(dim=1).tolist()
        return [
            Completion(
                text=cut_at_stop(self.tokenizer.decode(tokens[:n], skip_special_tokens=True), params.stop),
                prompt_tokens=p,
                completion_tokens=n,
                latency_s=latency,
            )
            for tokens, p in zip(generated, prompt_tokens, strict=True)
            for n in [self._generated_length(tokens, params.stop)]
        ]

    def _generated_length(self, tokens: torch.Tensor, stop: tuple[str, ...]) -> int:
        """Tokens up to and including the first end-of-sequence token (the rest is padding).

        A sequence ended by a stop string has no end-of-sequence token: the batch pads it with
        pad_token_id (which may equal eos_token_id), and that padding is not counted.
        """
        eos, pad = self.tokenizer.eos_token_id, self.tokenizer.pad_token_id
        ends = ((tokens == eos) | (tokens == pad)).nonzero()
        if not len(ends):
            return len(tokens)
        first = int(ends[0])
        if tokens[first] != eos or any(s in self.tokenizer.decode(tokens[:first], skip_special_tokens=True) for s in stop):
            return first
        return first + 1


def cut_at_stop(text: str, stop: tuple[str, ...]) -> str:
    """Drop the stop string and what follows, as OpenAI-compatible servers do."""
    cuts = [text.index(s) for s in stop if s in text]
    return (text[: min(cuts)] if cuts else text).strip()
