"""A `vllm` model config as vLLM's engine arguments, and the checks that refuse a bad one in one line before a
run starts (read from the model's config.json: no vLLM import, no engine start)."""

from __future__ import annotations

import json
from pathlib import Path

from dnc_ray.infra.errors import ConfigError
from dnc_ray.llm.configs import VLLMModel
from dnc_ray.llm.models import resolve_model

GIB = 1 << 30


def engine_args(cfg: VLLMModel, path: str) -> dict:
    """`AsyncEngineArgs` fields for the model at `path` (resolved from cfg.model)."""
    args = {
        "model": path,
        "dtype": cfg.dtype,
        "max_model_len": cfg.max_model_len,
        "max_num_seqs": cfg.max_num_seqs,
        "gpu_memory_utilization": cfg.gpu_memory_utilization,
        "tensor_parallel_size": cfg.tensor_parallel_size,
        "enable_prefix_caching": cfg.enable_prefix_caching,
        "seed": cfg.seed,
        "enforce_eager": cfg.enforce_eager,
        "disable_log_stats": True,
        # llguidance: xgrammar (vLLM's auto choice) fails on the bounded sub-question pattern of a structured decomposition
        "structured_outputs_config": {"backend": "guidance"},
    }
    if cfg.kv_cache_space_gb is not None:
        args["kv_cache_memory_bytes"] = int(cfg.kv_cache_space_gb * GIB)
    if cfg.lora is not None:
        args |= {"enable_lora": True, "max_lora_rank": cfg.max_lora_rank, "max_loras": 1}
    return args


def check_settings(cfg: VLLMModel, role: str) -> str:
    """The model's folder, once its settings fit it: the folder exists (ModelRefError otherwise), max_model_len is
    within the model's, and kv_cache_space_gb holds one sequence of max_model_len tokens."""
    path = resolve_model(cfg.model)
    model_config = _model_config(path)
    longest = model_config.get("max_position_embeddings")
    where = f"{role} (engine vllm, model {cfg.model})"
    if cfg.max_model_len is not None and longest is not None and cfg.max_model_len > longest:
        raise ConfigError(f"{where}: max_model_len {cfg.max_model_len} is beyond the model's {longest} "
                          "(max_position_embeddings): lower it or leave it null")
    if cfg.kv_cache_space_gb is not None and model_config:
        tokens = int(cfg.kv_cache_space_gb * GIB) // kv_bytes_per_token(model_config, cfg.dtype)
        needed = cfg.max_model_len or longest or 0
        if tokens < needed:
            raise ConfigError(f"{where}: kv_cache_space_gb {cfg.kv_cache_space_gb} holds {tokens} tokens of KV cache, "
                              f"fewer than one sequence of max_model_len {needed}: raise it or lower max_model_len")
    if cfg.lora is not None and not (Path(cfg.lora) / "adapter_config.json").exists():
        raise ConfigError(f"{where}: lora {cfg.lora} is not a PEFT adapter folder (no adapter_config.json)")
    return path


def kv_bytes_per_token(model_config: dict, dtype: str) -> int:
    """Keys and values of every layer for one token, in the model's compute dtype."""
    heads = model_config["num_attention_heads"]
    head_dim = model_config.get("head_dim") or model_config["hidden_size"] // heads
    kv_heads = model_config.get("num_key_value_heads", heads)
    width = 4 if dtype == "float32" else 2  # auto: float32 weights are computed in bfloat16 by vLLM
    return 2 * model_config["num_hidden_layers"] * kv_heads * head_dim * width


def _model_config(path: str) -> dict:
    config_file = Path(path) / "config.json"
    if not config_file.exists():  # a hub id: vLLM downloads and checks it where there is network
        return {}
    config = json.loads(config_file.read_text())
    return config.get("text_config", config)
