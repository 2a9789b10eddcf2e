"""Training rows -> token ids through the student's chat template, fed to the workers by Ray Data.

A row is `id, task, variant, prompt (chat messages), target`. The prompt is rendered with the
generation prompt; the target follows with whatever the template closes an assistant turn with
(SmolLM2: `<|im_end|>` and a newline). The loss is on target tokens only: labels are -100 on the
prompt.

Truncation: the prompt is kept whole and the target is cut at `max_length` tokens; a row whose
prompt alone fills `max_length` is dropped (nothing left to learn). Both counts are printed.

Batches: PadBatch right-pads each micro-batch to its longest row; PackBatch (packing: true) puts the
rows end to end in one sequence with no padding, position ids restarting at every row (Transformers'
DataCollatorWithFlattening), from which Transformers builds a mask that keeps attention within each row.

Evaluation: `eval_fraction` holds out a share of the question ids (every row of an id on one side: an
S_D-R set holds several decompositions per question); `eval_prompts` picks the fixed handful of prompts
whose greedy generations give the parse rate.
"""

from __future__ import annotations

import functools
import random
import re

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import ray
import torch
from ray.data.collate_fn import NumpyBatchCollateFn
from torch.nn.utils.rnn import pad_sequence
from transformers import AutoTokenizer, DataCollatorWithFlattening, PreTrainedTokenizerBase

from dnc_ray.infra import storage
from dnc_ray.llm.engine import Messages
from dnc_ray.llm.models import resolve_model
from dnc_ray.method.prompts import DECOMPOSE_INSTRUCTION
from dnc_ray.tasks import TASKS
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
    empty = [i for i, t in zip(table["id"], table["target"], strict=True) if not (t or "").strip()]
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
        for prompt, target in zip(batch["prompt"].to_pylist(), batch["target"].to_pylist(), strict=True)
    ]
    kept = [e for e in encoded if e is not None]
    return pa.table(
        {
            "input_ids": pa.array([e[0] for e in kept], _TOKENS),
            "labels": pa.array([e[1] for e in kept], _TOKENS),
            "truncated": pa.array([e[2] for e in kept], pa.bool_()),
        }
    )


def read_rows(uri: str, columns: list[str]) -> dict[str, list]:
    """Columns of every row of the set (a file or a folder of Parquet files), as lists."""
    fs, path = storage.filesystem(uri)
    return pq.read_table(path, columns=columns, filesystem=fs).to_pydict()


def held_out_ids(ids: list[str], fraction: float, seed: int) -> list[str]:
    """The question ids held out for evaluation: `fraction` of the distinct ids (at least one), drawn with `seed`."""
    distinct = sorted(set(ids))
    count = max(1, round(fraction * len(distinct)))
    if count >= len(distinct):
        raise TrainSetError(f"eval_fraction {fraction} of {len(distinct)} question id(s) leaves none to train on")
    return sorted(random.Random(seed).sample(distinct, count))


def select_ids(batch: pa.Table, ids: list[str], keep: bool) -> pa.Table:
    """Ray Data map_batches: the rows whose id is in `ids` (keep) or not in it."""
    inside = pc.is_in(batch["id"], value_set=pa.array(ids, batch.schema.field("id").type))
    return batch.filter(inside if keep else pc.invert(inside))


def tokenized_dataset(
    uri: str, model: str, max_length: int, seed: int, ids: list[str] | None = None, keep: bool = False
) -> tuple[ray.data.Dataset, dict]:
    """The set tokenized, shuffled and materialized in the object store, and its row counts.

    `ids`: only the rows with these ids (keep) or all but them. Workers read the dataset as it is
    (PadBatch or PackBatch take input_ids and labels): no further Ray Data task needs a CPU while the
    training workers hold theirs.
    """
    ds = ray.data.read_parquet(storage.absolute(uri)).select_columns(["id", "prompt", "target"])
    if ids is not None:
        ds = ds.map_batches(select_ids, fn_kwargs={"ids": ids, "keep": keep}, batch_format="pyarrow")
    ds = (
        ds.map_batches(tokenize_batch, fn_kwargs={"model": model, "max_length": max_length}, batch_format="pyarrow")
        .random_shuffle(seed=seed)
        .materialize()
    )
    used = ds.count()
    counts = {"used": used, "truncated": int(ds.sum("truncated") or 0) if used else 0}
    return ds, counts


_MAX_SUBQUESTIONS = re.compile(re.escape(DECOMPOSE_INSTRUCTION).replace(re.escape("{max_subquestions}"), r"(\d+)"))


def eval_prompts(rows: dict[str, list], count: int) -> list[dict]:
    """The first `count` distinct prompts by id, each with the most sub-questions its reply may hold to parse.

    The cap is read from the decomposition instruction in the prompt (the set was built with it), else the
    task's default (2 on Bamboogle, 3 elsewhere).
    """
    prompts, seen = [], set()
    for _, task, prompt in sorted(zip(rows["id"], rows["task"], rows["prompt"], strict=True), key=lambda r: str(r[0])):
        key = repr(prompt)
        if key in seen or len(prompts) == count:
            continue
        seen.add(key)
        match = _MAX_SUBQUESTIONS.search(prompt[-1]["content"])
        cap = int(match.group(1)) if match else (TASKS[task].rules.max_subquestions if task in TASKS else 3)
        prompts.append({"messages": prompt, "max_subquestions": cap})
    return prompts


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


class PackBatch(NumpyBatchCollateFn):
    """Ray Data collate_fn, padding-free: the rows end to end in one [1, total] sequence (no attention_mask).

    Position ids restart at 0 on every row; Transformers finds the row boundaries from them and keeps
    attention within each row (a block-diagonal causal mask with sdpa or eager, variable-length kernels
    with flash attention). The first label of every row is -100, so no row learns from the one before;
    the model must run with use_cache off, or the mask is built without the boundaries.
    """

    def __init__(self):
        self.flatten = DataCollatorWithFlattening(return_position_ids=True, separator_id=IGNORE)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
        rows = [{"input_ids": ids, "labels": labels} for ids, labels in zip(batch["input_ids"], batch["labels"], strict=True)]
        return self.flatten(rows, return_tensors="pt")


def collate_fn(packing: bool, pad_id: int) -> NumpyBatchCollateFn:
    return PackBatch() if packing else PadBatch(pad_id)
