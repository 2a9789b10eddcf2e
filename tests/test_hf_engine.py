"""HFEngine (batched, left-padded chat generation) and model references, on tiny and real models."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

from dnc_ray.llm.configs import HFModel
from dnc_ray.llm.dtype import DeviceCaps, device_caps, resolve_dtype
from dnc_ray.llm.engine import Completion, SamplingParams
from dnc_ray.llm.hf import HFEngine
from dnc_ray.llm.models import SMOLLM2, TINY_RANDOM, ModelRefError, resolve_model

CHATS = [
    [{"role": "user", "content": "Hi"}],
    [{"role": "user", "content": "What is the capital of France? Tell me in one long sentence, please."}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Count to three."}],
]
MAX_TOKENS = 12


def _engine(model: str, batch_size: int = 8, dtype: str = "float32") -> HFEngine:
    """fp32 by default here: these tests compare outputs exactly (batched vs alone, recorded outputs)."""
    return HFEngine(HFModel(engine="hf", model=model, batch_size=batch_size, dtype=dtype))


def _prompt_length(tokenizer, chat) -> int:
    text = tokenizer.apply_chat_template(chat, add_generation_prompt=True, tokenize=False)
    return len(tokenizer(text, add_special_tokens=False)["input_ids"])


@pytest.fixture(scope="module")
def untied_dir() -> str:
    """The bundled tiny model's folder (untied embeddings: greedy decoding gives distinct gibberish)."""
    return resolve_model(TINY_RANDOM)


@pytest.fixture(scope="module")
def engine(untied_dir) -> HFEngine:
    return _engine(untied_dir)


@pytest.fixture(scope="module")
def unstopped(engine) -> list[Completion]:
    return engine.generate(CHATS, SamplingParams(max_tokens=MAX_TOKENS))


# --- the bundled tiny random model -------------------------------------------------------------


def test_bundled_tiny_batch_in_order_with_prompt_token_counts():
    engine = _engine(TINY_RANDOM)
    assert engine.name == TINY_RANDOM
    out = engine.generate(CHATS, SamplingParams(max_tokens=4))
    assert len(out) == 3 and all(isinstance(c, Completion) and c.error is None for c in out)
    assert [c.prompt_tokens for c in out] == [_prompt_length(engine.tokenizer, chat) for chat in CHATS]
    assert all(0 < c.completion_tokens <= 4 and isinstance(c.text, str) for c in out)


# --- batched generation -----------------------------------------------------------------------


def test_batch_returns_one_completion_per_chat_in_order(engine, unstopped):
    assert len(unstopped) == len(CHATS)
    assert all(c.error is None and c.text for c in unstopped)
    lengths = [_prompt_length(engine.tokenizer, chat) for chat in CHATS]
    assert len(set(lengths)) == 3, "the chats must differ in length for left padding to matter"
    assert [c.prompt_tokens for c in unstopped] == lengths
    assert all(0 < c.completion_tokens <= MAX_TOKENS for c in unstopped)
    assert len({c.text for c in unstopped}) == 3, "distinct prompts should give distinct gibberish"


def test_batched_greedy_equals_each_chat_alone(engine, unstopped):
    for chat, batched in zip(CHATS, unstopped, strict=True):
        [alone] = engine.generate([chat], SamplingParams(max_tokens=MAX_TOKENS))
        assert (alone.text, alone.prompt_tokens, alone.completion_tokens) == (
            batched.text,
            batched.prompt_tokens,
            batched.completion_tokens,
        )


def test_batch_size_smaller_than_the_chats(untied_dir, unstopped):
    small = _engine(untied_dir, batch_size=2)
    out = small.generate(CHATS, SamplingParams(max_tokens=MAX_TOKENS))
    assert [(c.text, c.prompt_tokens, c.completion_tokens) for c in out] == [
        (c.text, c.prompt_tokens, c.completion_tokens) for c in unstopped
    ]


def _stop_word(text: str) -> str:
    """A word of the greedy output, past its start, whose first occurrence is where it stands."""
    words = text.split()
    for i, word in enumerate(words[1:], 1):
        if len(word) >= 3 and text.index(word) == text.index(" ".join(words[i:])):
            return word
    pytest.fail(f"no usable stop word in {text!r}")


def test_stop_strings_cut_the_text(engine, unstopped):
    text = unstopped[1].text
    word = _stop_word(text)
    stopped = engine.generate(CHATS, SamplingParams(max_tokens=MAX_TOKENS, stop=(word, "never-generated")))
    assert stopped[1].text == text[: text.index(word)].strip()
    assert stopped[1].completion_tokens < unstopped[1].completion_tokens
    # the other chats run on; their texts are cut only if they contain the word too
    for before, after in zip(unstopped[::2], stopped[::2], strict=True):
        assert after.text == (before.text[: before.text.index(word)].strip() if word in before.text else before.text)
    # in the batch, the stopped chat is padded while the others run on: padding is not counted
    [alone] = engine.generate([CHATS[1]], SamplingParams(max_tokens=MAX_TOKENS, stop=(word,)))
    assert (alone.text, alone.completion_tokens) == (stopped[1].text, stopped[1].completion_tokens)


def test_stop_padding_not_counted_when_pad_differs_from_eos(untied_dir, engine, unstopped, tmp_path):
    """A tokenizer whose pad token is not its eos token (many hub models)."""
    model_dir = tmp_path / "pad"
    LlamaForCausalLM.from_pretrained(untied_dir).save_pretrained(model_dir)
    tokenizer = AutoTokenizer.from_pretrained(untied_dir)
    tokenizer.pad_token = "<|endoftext|>"
    tokenizer.save_pretrained(model_dir)
    padded = _engine(str(model_dir))
    assert padded.tokenizer.pad_token_id != padded.tokenizer.eos_token_id

    params = SamplingParams(max_tokens=MAX_TOKENS, stop=(_stop_word(unstopped[1].text),))
    stopped = padded.generate(CHATS, params)
    [alone] = padded.generate([CHATS[1]], params)
    assert stopped[1].completion_tokens == alone.completion_tokens < MAX_TOKENS
    # same weights, other pad token: the pad only fills masked positions, so the same outputs
    same = engine.generate(CHATS, params)
    assert [(c.text, c.prompt_tokens, c.completion_tokens) for c in stopped] == [
        (c.text, c.prompt_tokens, c.completion_tokens) for c in same
    ]


def test_sampling_with_temperature(engine, unstopped):
    params = SamplingParams(temperature=1.0, max_tokens=MAX_TOKENS, seed=7)
    first = engine.generate(CHATS, params)
    again = engine.generate(CHATS, params)
    assert all(c.error is None and isinstance(c.text, str) and 0 < c.completion_tokens <= MAX_TOKENS for c in first)
    assert [c.text for c in first] == [c.text for c in again], "a seed makes sampling repeatable"
    other = engine.generate(CHATS, SamplingParams(temperature=1.0, max_tokens=MAX_TOKENS, seed=8))
    assert [c.text for c in other] != [c.text for c in first]
    assert [c.text for c in first] != [c.text for c in unstopped], "sampling should leave the greedy path"


# --- model references -------------------------------------------------------------------------


def test_resolve_local_directory(untied_dir):
    assert resolve_model(untied_dir) == untied_dir
    assert Path(resolve_model(TINY_RANDOM)).is_dir()
    assert resolve_model("HuggingFaceTB/SmolLM2-135M-Instruct") == "HuggingFaceTB/SmolLM2-135M-Instruct"


@pytest.mark.parametrize("kind", ["no-config", "missing", "not-a-name"])
def test_bad_references_raise(kind, tmp_path):
    if kind == "no-config":
        (tmp_path / "weights").mkdir()
        ref = str(tmp_path / "weights")
    elif kind == "missing":
        ref = str(tmp_path / "nowhere")
    else:
        ref = "no-such-model"
    with pytest.raises(ModelRefError) as error:
        resolve_model(ref)
    assert repr(ref) in str(error.value)


def test_engine_reports_bad_reference(tmp_path):
    with pytest.raises(ModelRefError, match="no such directory"):
        _engine(str(tmp_path / "nowhere"))


# --- the bundled SmolLM2-135M-Instruct (real weights) ------------------------------------------


@pytest.fixture(scope="module")
def smollm2() -> HFEngine:
    return _engine(SMOLLM2)


def test_smollm2_answers_easy_arithmetic(smollm2):
    chat = [{"role": "user", "content": "What is 2 + 3? Reply with just the number."}]
    [out] = smollm2.generate([chat], SamplingParams(max_tokens=8))
    assert out.error is None and "5" in out.text, out.text
    assert out.prompt_tokens == _prompt_length(smollm2.tokenizer, chat)
    assert out.completion_tokens <= 8


def test_smollm2_cache_is_a_plain_transformers_folder(smollm2):
    folder = Path(resolve_model(SMOLLM2))
    config = json.loads((folder / "config.json").read_text())
    assert "quantization_config" not in config
    assert (folder / "model.safetensors").exists() and not list(folder.glob("*.gguf"))
    model = AutoModelForCausalLM.from_pretrained(folder)
    assert not getattr(model, "is_quantized", False) and getattr(model, "hf_quantizer", None) is None
    name = "model.embed_tokens.weight"
    assert torch.equal(model.state_dict()[name], smollm2.model.state_dict()[name])


def test_resolve_a_folder_in_storage_copies_it_once(tmp_path, monkeypatch):
    """s3:// / gs:// work the same way through pyarrow filesystems; file:// runs here."""
    source = resolve_model(TINY_RANDOM)
    monkeypatch.setenv("DNC_CACHE", str(tmp_path / "cache"))
    local = resolve_model(f"file://{source}")
    assert local.startswith(str(tmp_path / "cache")) and (Path(local) / "config.json").exists()
    assert resolve_model(f"file://{source}") == local
    engine = _engine(f"file://{source}")
    assert engine.generate(CHATS[:1], SamplingParams(max_tokens=2))[0].error is None
    with pytest.raises(ModelRefError, match="cannot copy|no config.json"):
        resolve_model(f"file://{tmp_path}/missing-model")


# --- dtype: auto --------------------------------------------------------------------------------


@pytest.mark.parametrize(("requested", "device", "caps", "expected"), [
    ("auto", "cpu", DeviceCaps(cuda_bf16=False, cpu_bf16=True), "bfloat16"),   # AVX512-BF16 / AMX CPU
    ("auto", "cpu", DeviceCaps(cuda_bf16=False, cpu_bf16=False), "float32"),   # a CPU that would emulate bf16
    ("auto", "cuda", DeviceCaps(cuda_bf16=True, cpu_bf16=False), "bfloat16"),
    ("auto", "cuda:1", DeviceCaps(cuda_bf16=False, cpu_bf16=True), "float32"),  # a GPU without bf16
    ("float32", "cpu", DeviceCaps(cuda_bf16=True, cpu_bf16=True), "float32"),
    ("bfloat16", "cuda", DeviceCaps(cuda_bf16=True, cpu_bf16=False), "bfloat16"),
])
def test_dtype_resolution_by_device_capabilities(requested, device, caps, expected):
    assert resolve_dtype(requested, device, caps) == expected


def test_explicit_bf16_on_a_cpu_that_emulates_it_warns():
    with pytest.warns(UserWarning, match="no native bf16"):
        assert resolve_dtype("bfloat16", "cpu", DeviceCaps(cuda_bf16=False, cpu_bf16=False)) == "bfloat16"


def test_auto_dtype_on_this_machine_generates():
    """The default (auto) loads bf16 where this CPU has AVX512-BF16 or AMX (the CI machine does)."""
    engine = HFEngine(HFModel(engine="hf", model=SMOLLM2))
    expected = "bfloat16" if device_caps().cpu_bf16 else "float32"
    assert engine.dtype == expected and next(engine.model.parameters()).dtype == getattr(torch, expected)
    out = engine.generate(CHATS, SamplingParams(max_tokens=MAX_TOKENS))
    assert all(c.error is None and 0 < c.completion_tokens <= MAX_TOKENS and c.text for c in out)
