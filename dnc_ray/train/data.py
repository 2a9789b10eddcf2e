"""Training rows -> token ids through the student's chat template, fed to the workers by Ray Data.

A row is `id, task, variant, prompt (chat messages), target`. The prompt is rendered with the
generation prompt; the target follows with whatever the template closes an assistant turn with
(SmolLM2: `<|im_end|>` and a newline). The loss is on target tokens only: labels are -100 on the
prompt.

Truncation: the prompt is kept whole and the target is cut at `max_length` tokens; a row whose
prompt alone fills `max_length` is dropped (nothing left to learn). Both counts are printed.
"""

from __future__ import annotations

import functools

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import ray
import torch
from ray.data.collate_fn import NumpyBatchCollateFn
from torch.nn.utils.rnn import pad_sequence
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from dnc_ray.infra import storage
from dnc_ray.llm.engine import Messages
from dnc_ray.llm.models import resolve_model
from dnc_ray.train import TrainSetError

COLUMNS = ("id", "task", "variant", "prompt", "target")
IGNORE = -100  # the label that takes no loss
_TOKENS = pa.list_(pa.int32())


def check_train_set(uri: str, variant: str) -> int:
    """Check every Parquet file of the set (columns, non-empty targets, only `variant`); returns the row count."""
    fs, root = storage.filesystem(uri)
    if not storage.exists(uri):
        raise TrainSetError(f"train set {uri}: no such file or folder")
    files = [root]
    if storage.is_folder(uri):
        files = [f"{root.rstrip('/')}/{name}" for name in storage.list_files(uri, ".parquet")]
        if not files:
            raise TrainSetError(f"train set {uri}: the folder holds no .parquet files")
    return sum(_check_file(fs, path, variant) for path in files)


def _check_file(fs: storage.FileSystem, path: str, variant: str) -> int:
    names = pq.read_schema(path, filesystem=fs).names
    missing = [c for c in COLUMNS if c not in names]
    if missing:
        raise TrainSetError(f"train set file {path}: missing column(s) {', '.join(missing)} (has {', '.join(names)})")
    table = pq.read_table(path, columns=["id", "variant", "target"], filesystem=fs).to_pydict()
    empty = [i for i, t in zip(table["id"], table["target"]) if not (t or "").strip()]
    if empty:
        raise TrainSetError(f"train set file {path}: {len(empty)} row(s) with an empty target, first id {empty[0]!r}")
    others = sorted(set(table["variant"]) - {variant}, key=str)
    if others:
        raise TrainSetError(
            f"train set file {path}: holds variant(s) {', '.join(map(str, others))}, "
            f"but the config trains variant {variant}"
        )
    return len(table["id"])


def encode(tokenizer: PreTrainedTokenizerBase, prompt: Messages, target: str, max_length: int):
    """(input_ids, labels, truncated) of one row, or None when the prompt alone fills max_length."""
    prompt_text = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=False)
    full_text = tokenizer.apply_chat_template([*prompt, {"role": "assistant", "content": target}], tokenize=False)
    if not full_text.startswith(prompt_text):
        raise TrainSetError("the model's chat template renders the prompt differently once a reply follows")
    prompt_ids = tokenizer(prompt_text, add_special_tokens=False)["input_ids"]
    target_ids = tokenizer(full_text[len(prompt_text) :], add_special_tokens=False)["input_ids"]
    room = max_length - len(prompt_ids)
    if room <= 0:
        return None
    target_ids, truncated = target_ids[:room], len(target_ids) > room
    return prompt_ids + target_ids, [IGNORE] * len(prompt_ids) + target_ids, truncated


@functools.lru_cache(maxsize=2)
def load_tokenizer(model: str) -> PreTrainedTokenizerBase:
    return AutoTokenizer.from_pretrained(resolve_model(model))


def tokenize_batch(batch: pa.Table, model: str, max_length: int) -> pa.Table:
    """Ray Data map_batches: prompt/target rows -> input_ids, labels, truncated; dropped rows left out."""
    tokenizer = load_tokenizer(model)
    encoded = [
        encode(tokenizer, prompt, target, max_length)
        for prompt, target in zip(batch["prompt"].to_pylist(), batch["target"].to_pylist())
    ]
    kept = [e for e in encoded if e is not None]
    return pa.table(
        {
            "input_ids": pa.array([e[0] for e in kept], _TOKENS),
            "labels": pa.array([e[1] for e in kept], _TOKENS),
            "truncated": pa.array([e[2] for e in kept], pa.bool_()),
        }
    )


def tokenized_dataset(uri: str, model: str, max_length: int, seed: int) -> tuple[ray.data.Dataset, dict]:
    """The set tokenized, shuffled and materialized in the object store, and its row counts.

    Workers read it as it is (PadBatch takes input_ids and labels): no further Ray Data task
    needs a CPU while the training workers hold theirs.
    """
    ds = (
        ray.data.read_parquet(storage.absolute(uri))
        .select_columns(["prompt", "target"])
        .map_batches(tokenize_batch, fn_kwargs={"model": model, "max_length": max_length}, batch_format="pyarrow")
        .random_shuffle(seed=seed)
        .materialize()
    )
    used = ds.count()
    counts = {"used": used, "truncated": int(ds.sum("truncated") or 0) if used else 0}
    return ds, counts


class PadBatch(NumpyBatchCollateFn):
    """Ray Data collate_fn: right-pad a batch to its longest row (attention_mask 0, labels -100 there)."""

    def __init__(self, pad_id: int):
        self.pad_id = pad_id

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
        ids = [torch.tensor(x, dtype=torch.long) for x in batch["input_ids"]]
        labels = [torch.tensor(x, dtype=torch.long) for x in batch["labels"]]
        return {
            "input_ids": pad_sequence(ids, batch_first=True, padding_value=self.pad_id),
            "labels": pad_sequence(labels, batch_first=True, padding_value=IGNORE),
            "attention_mask": pad_sequence([torch.ones_like(x) for x in ids], batch_first=True),
        }
