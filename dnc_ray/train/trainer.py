"""`StudentTrainer`: the Transformers Trainer of a worker, reading its Ray Data shard as passes of collated
batches, counting padding, evaluating loss per target token over every worker's shard and the parse rate of greedy
generations (decomposer sets)."""

from __future__ import annotations

import resource

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, IterableDataset
from transformers import (
    Trainer,
)
from transformers.trainer_utils import EvalLoopOutput

from dnc_ray.method.prompts import parse_subquestions
from dnc_ray.train.data import (
    IGNORE,
)

EVAL_NEW_TOKENS = 128  # per greedy generation of the parse rate: a few sub-questions of a few dozen tokens


class Passes(IterableDataset):
    """A worker's shard of a Ray dataset read `passes` times in a row, as one stream of collated batches."""

    def __init__(self, shard, passes: int, batch_size: int, collate):
        super().__init__()
        self.shard, self.passes, self.batch_size, self.collate = shard, passes, batch_size, collate

    def __iter__(self):
        for _ in range(self.passes):
            yield from self.shard.iter_torch_batches(batch_size=self.batch_size, collate_fn=self.collate)


class StudentTrainer(Trainer):
    """The Trainer reading Ray Data shards, counting padding, evaluating loss per target token and the parse rate."""

    def __init__(self, *args, plan: dict, **kwargs):
        super().__init__(*args, **kwargs)
        self.plan = plan
        self.seen = torch.zeros(2, dtype=torch.float64)  # tokens in this session's batches on this worker, padding among them

    def get_train_dataloader(self) -> DataLoader:
        return DataLoader(self.train_dataset, batch_size=None)  # the shard yields whole batches

    def get_eval_dataloader(self, eval_dataset=None):
        return self.eval_dataset

    def training_step(self, model, inputs, num_items_in_batch=None):
        ids, mask = inputs["input_ids"], inputs.get("attention_mask")
        self.seen += torch.tensor([ids.numel(), 0 if mask is None else ids.numel() - int(mask.sum())], dtype=torch.float64)
        return super().training_step(model, inputs, num_items_in_batch)

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """Every log: the epoch in passes over the data; a training log also the padding share and peak memory."""
        self.state.epoch = round(self.state.global_step * self.plan["accumulation"] / self.plan["batches_per_pass"], 4)
        if "loss" in logs:
            logs["dtype"] = self.plan["dtype"]  # kept in the checkpoints' log history: a resumed run shows both
            tokens, padding = all_reduce(self.seen.clone(), self.args.device).tolist()  # every rank logs at this step
            logs["padding_share"] = round(padding / tokens, 4) if tokens else 0.0
            logs["peak_memory_gib"] = peak_memory_gib()  # this worker's: rank 0's is the one kept
        super().log(logs, start_time)

    def evaluation_loop(self, dataloader, description, prediction_loss_only=None, ignore_keys=None,
                        metric_key_prefix="eval") -> EvalLoopOutput:
        """Loss per target token over every worker's eval shard, and (decomposer sets) the parse rate."""
        model = self.model_wrapped  # the DeepSpeed engine: a ZeRO-3 forward needs it
        model.eval()
        totals = torch.zeros(3, dtype=torch.float64)  # summed loss, target tokens, rows
        with torch.no_grad():
            for batch in dataloader:
                batch = self._prepare_inputs(batch)
                targets = int((batch["labels"][:, 1:] != IGNORE).sum())  # the loss is their mean
                rows = batch["attention_mask"].shape[0] if "attention_mask" in batch else int((batch["position_ids"] == 0).sum())
                totals += torch.tensor([model(**batch).loss.item() * targets, targets, rows], dtype=torch.float64)
        loss, targets, rows = all_reduce(totals, self.args.device).tolist()
        metrics = {f"{metric_key_prefix}_loss": round(loss / targets, 6), f"{metric_key_prefix}_tokens": int(targets)}
        if self.plan["prompts"]:
            metrics[f"{metric_key_prefix}_parse_rate"] = self.parse_rate()
        return EvalLoopOutput(predictions=None, label_ids=None, metrics=metrics, num_samples=int(rows))

    def parse_rate(self) -> float:
        """Share of greedy replies to the eval prompts that parse into 1..max sub-questions.

        Every worker generates the same prompts (under ZeRO-3 each forward needs all of them; the
        generation synchronises them); rank 0's share is the one every worker returns.
        """
        tokenizer, prompts = self.processing_class, self.plan["prompts"]
        texts = [tokenizer.apply_chat_template(p["messages"], add_generation_prompt=True, tokenize=False) for p in prompts]
        inputs = tokenizer(texts, return_tensors="pt", padding=True, padding_side="left", add_special_tokens=False)
        inputs = inputs.to(self.args.device)
        with torch.no_grad():
            out = self.model.generate(**inputs, max_new_tokens=EVAL_NEW_TOKENS, do_sample=False, use_cache=True,
                                      pad_token_id=tokenizer.pad_token_id)
        replies = tokenizer.batch_decode(out[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
        parsed = sum(1 <= len(parse_subquestions(r)) <= p["max_subquestions"] for r, p in zip(replies, prompts, strict=True))
        share = torch.tensor([parsed / len(prompts)], dtype=torch.float64, device=self.args.device)
        if dist.is_initialized():
            dist.broadcast(share, src=0)
        return round(share.item(), 4)


def all_reduce(values: torch.Tensor, device) -> torch.Tensor:
    """The sum over every worker (gloo on CPU, NCCL on GPU)."""
    if not dist.is_initialized():
        return values
    values = values.to(device)
    dist.all_reduce(values)
    return values.cpu()


def peak_memory_gib() -> float:
    """This worker's peak so far: GPU memory allocated by torch, or the process's resident memory on CPU."""
    if torch.cuda.is_available():
        return round(torch.cuda.max_memory_allocated() / 2**30, 3)
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 3)  # ru_maxrss is in KiB
