"""Training: rows -> tokens and batches (no Ray), the step arithmetic, bad input refused before any worker
starts, and real Ray Train + DeepSpeed runs on CPU with the tiny random SmolLM2 (ZeRO-2, ZeRO-3, resume,
LoRA, a killed worker, and one run with validation, keep_best, early stopping, packing, gradient
checkpointing, TensorBoard and offline W&B).

The first DeepSpeed run on a machine JIT-builds DeepSpeed's CPU ops (~1-3 min, cached afterwards).
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from dnc_ray.config import TrainConfig, load_config
from dnc_ray.infra.errors import ConfigError
from dnc_ray.llm.configs import HFModel
from dnc_ray.llm.dtype import device_caps, resolve_dtype
from dnc_ray.llm.engine import SamplingParams
from dnc_ray.llm.models import TINY_RANDOM, ModelRefError, resolve_model
from dnc_ray.method.prompts import decompose_messages
from dnc_ray.train import TrainSetError
from dnc_ray.train.data import (
    IGNORE,
    PackBatch,
    PadBatch,
    check_train_set,
    encode,
    eval_prompts,
    held_out_ids,
    tokenize_batch,
)

INSTRUCTION = "Break the question into at most three sub-questions, one per line.\nQuestion: "
QUESTION = "Tom has 3 apples and buys 5 more. How many apples does he have?"
TARGET = "How many apples does Tom have at first?\nHow many apples does he buy?"


def row(i: int, question: str = QUESTION, target: str = TARGET, variant: str = "sd-t") -> dict:
    prompt = [{"role": "user", "content": INSTRUCTION + question}]
    return {"id": f"q{i}", "task": "gsm8k", "variant": variant, "prompt": prompt, "target": target}


def write_set(path: Path, rows: list[dict]) -> Path:
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def repeated_set(tmp_path: Path) -> Path:
    """A dozen copies of one decomposition: the loss must fall fast, and runs compare step by step."""
    return write_set(tmp_path / "train.parquet", [row(i) for i in range(12)])


def train_config(train_set: Path, output: Path, **overrides) -> TrainConfig:
    settings = {
        "train_set": str(train_set),
        "variant": "sd-t",
        "model": TINY_RANDOM,
        "output": str(output),
        "max_length": 128,
        "max_steps": 8,
        "per_worker_batch_size": 2,
        "lr": 7e-3,
        "warmup_ratio": 0.25,  # 2 of 8 steps
        "checkpoint_every_steps": 4,
        "keep_checkpoints": 3,
        "log_every_steps": 2,
        "num_workers": 2,
        "cpus_per_worker": 0.5,
        "max_failures": 1,
    }
    return TrainConfig.model_validate({**settings, **overrides})


def metrics(output: Path) -> list[dict]:
    return [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]


def checkpoint_steps(output: Path) -> list[tuple[int, Path]]:
    """(global step, folder) of every kept checkpoint, in the order written."""
    folders = sorted(f for f in (output / "checkpoints").glob("checkpoint_*") if f.is_dir())
    return [(json.loads((f / "checkpoint" / "trainer_state.json").read_text())["global_step"], f) for f in folders]


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(resolve_model(TINY_RANDOM))


# ---------------------------------------------------------------- rows -> tokens (no Ray)


def test_labels_mask_the_prompt(tokenizer):
    prompt = row(0)["prompt"]
    ids, labels, truncated = encode(tokenizer, prompt, TARGET, max_length=256)
    prompt_ids = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True, return_dict=True)
    n = len(prompt_ids["input_ids"])
    assert ids[:n] == prompt_ids["input_ids"]
    assert labels[:n] == [IGNORE] * n
    assert labels[n:] == ids[n:] and not truncated
    assert tokenizer.decode(ids[n:]) == TARGET + "<|im_end|>\n"  # the template's end of turn is learned


def test_target_cut_at_max_length_and_long_prompt_dropped(tokenizer):
    prompt = row(0)["prompt"]
    full, _, _ = encode(tokenizer, prompt, TARGET, max_length=256)
    n_prompt = full.index(tokenizer.convert_tokens_to_ids("<|im_start|>"), 10) + 3  # "...<|im_start|>assistant\n"
    ids, labels, truncated = encode(tokenizer, prompt, TARGET, max_length=len(full) - 4)
    assert truncated and ids == full[:-4] and labels[-1] == ids[-1]
    assert encode(tokenizer, prompt, TARGET, max_length=n_prompt - 1) is None

    batch = pa.Table.from_pylist([row(0), row(1, question=QUESTION * 40), row(2, target=TARGET * 40)])
    out = tokenize_batch(batch, TINY_RANDOM, max_length=200)
    assert out.num_rows == 2  # the long prompt is dropped
    assert out["truncated"].to_pylist() == [False, True]
    assert max(len(x) for x in out["input_ids"].to_pylist()) == 200


def test_pad_batch(tokenizer):
    batch = PadBatch(pad_id=tokenizer.pad_token_id)(
        {"input_ids": [[5, 6, 7], [8]], "labels": [[IGNORE, 6, 7], [8]]}
    )
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, tokenizer.pad_token_id, tokenizer.pad_token_id]]
    assert batch["labels"].tolist() == [[IGNORE, 6, 7], [8, IGNORE, IGNORE]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]



def test_packing_gives_the_loss_of_padding_without_padded_tokens(tokenizer):
    """The same rows padded and packed: one loss (per-row attention and positions), no padding when packed."""
    rows = [encode(tokenizer, row(i, question=QUESTION * n)["prompt"], TARGET * n, 512)[:2]
            for i, n in enumerate((1, 3, 2))]
    batch = {"input_ids": [ids for ids, _ in rows], "labels": [labels for _, labels in rows]}
    padded, packed = PadBatch(tokenizer.pad_token_id)(batch), PackBatch()(batch)
    lengths = [len(ids) for ids, _ in rows]
    assert packed["input_ids"].shape == (1, sum(lengths)) and "attention_mask" not in packed
    assert packed["position_ids"][0].tolist() == [p for n in lengths for p in range(n)]
    assert padded["input_ids"].numel() - sum(lengths) == 2 * max(lengths) - lengths[0] - lengths[2] > 0

    model = AutoModelForCausalLM.from_pretrained(resolve_model(TINY_RANDOM))
    model.config.use_cache = False  # as the recipe trains: a cache hides the row boundaries from the mask
    with torch.no_grad():
        assert model(**packed).loss.item() == pytest.approx(model(**padded).loss.item(), rel=1e-5)
        crossing = model(input_ids=packed["input_ids"], labels=packed["labels"]).loss.item()  # no position ids
        assert crossing != pytest.approx(model(**padded).loss.item(), rel=1e-5)  # rows attending across rows


def test_steps_from_num_epochs_and_global_batch_size():
    """13 rows, 2 workers: 6 rows each (Ray Data splits equally), 3 micro-batches of 2 per epoch."""
    from dnc_ray.train.recipe import plan_steps

    cfg = train_config(Path("set.parquet"), Path("out"), max_steps=None, num_epochs=2)
    assert plan_steps(cfg, rows=13) == {"steps": 6, "accumulation": 1, "batches_per_pass": 3, "passes": 2}
    # 8 rows a step = 2 workers x 2 rows x 2 micro-batches: 2 epochs of 3 micro-batches are 3 steps
    cfg8 = cfg.model_copy(update={"global_batch_size": 8})
    assert cfg8.accumulation_steps == 2
    assert plan_steps(cfg8, rows=13) == {"steps": 3, "accumulation": 2, "batches_per_pass": 3, "passes": 2}
    assert plan_steps(cfg8.model_copy(update={"num_epochs": 3}), rows=13)["steps"] == 5  # 9 micro-batches: 4.5 steps
    assert plan_steps(cfg.model_copy(update={"max_steps": 5}), rows=13)["steps"] == 5
    with pytest.raises(ValueError, match="global_batch_size 10 is not a multiple of num_workers x per_worker_batch_size"):
        train_config(Path("s"), Path("o"), global_batch_size=10)
    with pytest.raises(ValueError, match="gradient_accumulation_steps 4 disagrees with global_batch_size 8"):
        train_config(Path("s"), Path("o"), global_batch_size=8, gradient_accumulation_steps=4)


def test_eval_fraction_holds_out_whole_questions():
    ids = [f"q{i}" for i in range(20) for _ in range(3)]  # S_D-R: several decompositions per question
    held = held_out_ids(ids, 0.1, seed=0)
    assert len(held) == 2 and set(held) < set(ids) and held == held_out_ids(ids, 0.1, seed=0)
    assert held != held_out_ids(ids, 0.1, seed=1) or held != held_out_ids(ids, 0.1, seed=2)
    assert len(held_out_ids(ids, 0.01, seed=0)) == 1  # at least one question
    with pytest.raises(TrainSetError, match="leaves none to train on"):
        held_out_ids(["q0", "q0"], 0.5, seed=0)


def test_eval_prompts_take_the_cap_from_the_instruction():
    rows = {"id": ["b", "a", "c", "a2"], "task": ["gsm8k", "bamboogle", "gsm8k", "bamboogle"],
            "prompt": [decompose_messages("Q1?", None, 3), decompose_messages("Q2?", None, 2),
                       [{"role": "user", "content": "Own wording: Q3?"}], decompose_messages("Q2?", None, 2)]}
    prompts = eval_prompts(rows, count=3)
    assert [p["max_subquestions"] for p in prompts] == [2, 3, 3]  # by id: a, (a2: the same prompt), b, c
    assert prompts[0]["messages"] == rows["prompt"][1] and prompts[2]["messages"] == rows["prompt"][2]
    assert len(eval_prompts(rows, count=1)) == 1


def test_best_evaluation_and_patience():
    from dnc_ray.train.recipe import best_evaluation, stopped_early

    history = [{"step": 1, "loss": 3.0}, {"step": 2, "eval_loss": 2.0, "eval_parse_rate": 0.5},
               {"step": 4, "eval_loss": 1.5, "eval_parse_rate": 0.5}, {"step": 6, "eval_loss": 1.5, "eval_parse_rate": 0.25},
               {"step": 8, "eval_loss": 1.7, "eval_parse_rate": 0.75}]
    assert best_evaluation(history, "eval_loss", greater=False) == (4, 1.5, 2)  # an equal one is no improvement
    assert best_evaluation(history, "eval_parse_rate", greater=True) == (8, 0.75, 0)
    assert best_evaluation(history[:1], "eval_loss", greater=False) == (None, None, 0)
    cfg = train_config(Path("s"), Path("o"), eval_fraction=0.2, keep_best="eval_loss", patience=2)
    assert stopped_early(cfg, history) and not stopped_early(cfg, history[:4])
    assert not stopped_early(cfg.model_copy(update={"patience": 3}), history)


def test_best_checkpoint_found_in_storage_without_optimizer_state(tmp_path):
    """After a restart the best checkpoint may be only in the output: its model files are copied, not DeepSpeed's."""
    from dnc_ray.train.recipe import find_checkpoint

    for name, step in (("checkpoint_a", 4), ("checkpoint_b", 8)):
        folder = tmp_path / "out" / "checkpoints" / name / "checkpoint"
        (folder / f"global_step{step}").mkdir(parents=True)
        (folder / f"global_step{step}" / "optim_states.pt").write_text("big")
        (folder / "trainer_state.json").write_text(json.dumps({"global_step": step}))
        (folder / "model.safetensors").write_text(f"weights {step}")
    (tmp_path / "work" / "checkpoint-8").mkdir(parents=True)
    assert find_checkpoint(8, str(tmp_path / "work"), str(tmp_path / "out"), str(tmp_path)) == str(tmp_path / "work" / "checkpoint-8")
    found = Path(find_checkpoint(4, str(tmp_path / "work"), str(tmp_path / "out"), str(tmp_path / "scratch")))
    assert sorted(p.name for p in found.iterdir()) == ["model.safetensors", "trainer_state.json"]
    assert (found / "model.safetensors").read_text() == "weights 4"
    with pytest.raises(FileNotFoundError, match="no checkpoint of step 6"):
        find_checkpoint(6, str(tmp_path / "work"), str(tmp_path / "out"), str(tmp_path / "scratch"))


# ---------------------------------------------------------------- bad input: refused before any worker starts


def test_train_set_problems_name_the_file(tmp_path):
    no_target = tmp_path / "no_target.parquet"
    pq.write_table(pa.Table.from_pylist([{k: v for k, v in row(0).items() if k != "target"}]), no_target)
    with pytest.raises(TrainSetError, match=r"no_target\.parquet: missing column\(s\) target"):
        check_train_set(str(no_target), "sd-t")

    empty = write_set(tmp_path / "empty.parquet", [row(0), row(1, target="  ")])
    with pytest.raises(TrainSetError, match=r"empty\.parquet: 1 row\(s\) with an empty target, first id 'q1'"):
        check_train_set(str(empty), "sd-t")

    folder = tmp_path / "folder"
    folder.mkdir()
    write_set(folder / "part-0.parquet", [row(0)])
    write_set(folder / "part-1.parquet", [row(1, variant="se-a")])
    wrong_variant = r"part-1\.parquet: holds variant\(s\) se-a, but the config trains variant sd-t"
    with pytest.raises(TrainSetError, match=wrong_variant):
        check_train_set(str(folder), "sd-t")
    assert check_train_set(str(folder / "part-0.parquet"), "sd-t") == 1

    with pytest.raises(TrainSetError, match="no such file or folder"):
        check_train_set(str(tmp_path / "nowhere"), "sd-t")


@pytest.mark.parametrize(
    "settings, message",
    [
        ("variant: sd-t\ndeepspeed: {precision: bf16}", "deepspeed.precision is now the training config's `dtype`"),
        ("variant: sd-t\ndtype: float16", "line 4, field `dtype`: Input should be 'auto', 'float32' or 'bfloat16'"),
        ("variant: sd-t\ndeepspeed: {zero_stage: 4}", "line 4, field `deepspeed.zero_stage`: Input should be less"),
        ("variant: sd-t\ndeepspeed: {offload_optimizer: true}", "offload_optimizer moves GPU optimizer state to CPU"),
        ("variant: sd-x", "line 3, field `variant`: Input should be 'sd-t', 'sd-r', 'se-t' or 'se-a'"),
        ("variant: sd-t\nkeep_best: eval_loss", "keep_best need(s) an evaluation: set eval_set or eval_fraction"),
        ("variant: sd-t\neval_set: e.parquet\neval_fraction: 0.1", "set either eval_set or eval_fraction, not both"),
        ("variant: se-t\neval_fraction: 0.1\nkeep_best: parse_rate", "keep_best parse_rate needs a decomposer set"),
        ("variant: sd-t\neval_fraction: 0.1\npatience: 3", "patience counts evaluations without a new best"),
        ("variant: sd-t\neval_fraction: 0.1\nexport: best", "export best needs keep_best"),
        ("variant: sd-t\neval_fraction: 0.9", "line 4, field `eval_fraction`: Input should be less than or equal to 0.5"),
        ("variant: sd-t\nepochs: 3", "line 4, field `epochs`: Extra inputs are not permitted"),
    ],
)
def test_bad_config_is_one_clear_error(tmp_path, settings, message):
    path = tmp_path / "train.yaml"
    path.write_text(f"train_set: set.parquet\noutput: out\n{settings}\n")
    with pytest.raises(ConfigError) as error:
        load_config(path, TrainConfig)
    assert "train.yaml" in str(error.value) and message in str(error.value)


def test_bad_input_fails_before_ray_starts(tmp_path, monkeypatch):
    from dnc_ray.train import recipe

    def no_ray(*args):
        raise AssertionError("Ray was started for a run that cannot work")

    monkeypatch.setattr(recipe, "init_ray", no_ray)
    good = repeated_set(tmp_path)
    with pytest.raises(ModelRefError, match="no-such-model"):
        recipe.run_train(train_config(good, tmp_path / "out", model="no-such-model"))
    wrong = write_set(tmp_path / "wrong.parquet", [row(0, variant="sd-r")])
    with pytest.raises(TrainSetError, match="holds variant"):
        recipe.run_train(train_config(wrong, tmp_path / "out"))
    with pytest.raises(ConfigError, match="not a training checkpoint"):
        recipe.run_train(train_config(good, tmp_path / "out", resume_from=str(tmp_path)))
    assert not (tmp_path / "out").exists()


def earlier_checkpoint(folder: Path) -> Path:
    """A checkpoint as an earlier dnc_ray wrote it: the Trainer's arguments carry DeepSpeed's WarmupCosineLR."""
    from transformers import TrainingArguments
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    (folder / "checkpoint").mkdir(parents=True)
    (folder / "checkpoint" / "trainer_state.json").write_text("{}")
    deepspeed = {"zero_optimization": {"stage": 2}, "scheduler": {"type": "WarmupCosineLR", "params": {}}}
    args = TrainingArguments(output_dir=str(folder / "work"), use_cpu=True, deepspeed=deepspeed)
    unset_hf_deepspeed_config()  # TrainingArguments registers its DeepSpeed config for the whole process
    torch.save(args, folder / "checkpoint" / "training_args.bin")
    return folder


def test_a_checkpoint_with_deepspeeds_schedule_is_refused_before_ray_starts(tmp_path, monkeypatch):
    """Its schedule's state does not load into the Trainer's (a KeyError in every worker): one clear error."""
    from dnc_ray.train import recipe

    monkeypatch.setattr(recipe, "init_ray", lambda *args: pytest.fail("Ray was started for a run that cannot work"))
    good = repeated_set(tmp_path)
    old = earlier_checkpoint(tmp_path / "old")
    with pytest.raises(ConfigError, match=f"{old}: written by an earlier dnc_ray with DeepSpeed's WarmupCosineLR"):
        recipe.run_train(train_config(good, tmp_path / "out", resume_from=str(old)))
    # the same config run again continues from the output's own latest checkpoint: checked the same way
    earlier_checkpoint(tmp_path / "out" / "checkpoints" / "checkpoint_2026-11-27_10-00-00.000000")
    with pytest.raises(ConfigError, match="cannot continue: train into a new output"):
        recipe.run_train(train_config(good, tmp_path / "out"))



def test_deepspeed_takes_the_trainers_optimizer_unless_the_optimizer_state_is_offloaded(tmp_path):
    """No optimizer in the DeepSpeed config: the Trainer's AdamW; with offload, DeepSpeed's own (its CPU Adam)."""
    from dnc_ray.train.recipe import deepspeed_config

    plain = train_config(repeated_set(tmp_path), tmp_path / "out")
    offloaded = train_config(repeated_set(tmp_path), tmp_path / "out", use_gpu=True,
                             deepspeed={"zero_stage": 2, "offload_optimizer": True})
    assert "optimizer" not in deepspeed_config(plain, "bfloat16")
    assert deepspeed_config(offloaded, "bfloat16")["optimizer"]["type"] == "AdamW"
    assert deepspeed_config(offloaded, "bfloat16")["zero_optimization"]["offload_optimizer"]["device"] == "cpu"


def test_example_config_loads():
    cfg = load_config(Path(__file__).parents[1] / "jobs/configs/train-smollm2-sdt.yaml", TrainConfig)
    assert cfg.deepspeed.zero_stage == 2 and cfg.num_workers == 2 and not cfg.use_gpu


def test_paper_gpu_config_is_the_papers_setting():
    """Batch 128 (accumulation derived), lr 2e-5, 5 epochs, 8 GPUs, ZeRO-3 bf16, with validation and the best kept."""
    from dnc_ray.train.recipe import plan_steps

    cfg = load_config(Path(__file__).parents[1] / "jobs/configs/train-paper-sdr-gpu.yaml", TrainConfig)
    assert (cfg.global_batch_size, cfg.lr, cfg.num_epochs, cfg.num_workers) == (128, 2e-5, 5, 8)
    assert cfg.accumulation_steps == 4 and cfg.variant == "sd-r" and cfg.use_gpu
    assert (cfg.deepspeed.zero_stage, cfg.dtype) == (3, "bfloat16")
    assert cfg.packing and cfg.gradient_checkpointing and cfg.evaluates and cfg.exports == "best"
    assert plan_steps(cfg, rows=12800)["steps"] == 500  # 100 steps an epoch


@pytest.mark.timeout(120)
@pytest.mark.slow  # a subprocess `dnc`: seconds of imports
def test_cli_reports_a_bad_train_set_in_one_line(tmp_path):
    wrong = write_set(tmp_path / "wrong.parquet", [row(0, variant="se-t")])
    config = tmp_path / "train.yaml"
    config.write_text(f"train_set: {wrong}\nvariant: sd-t\nmodel: {TINY_RANDOM}\noutput: {tmp_path / 'out'}\n")
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    result = subprocess.run(
        [sys.executable, "-m", "dnc_ray.cli", "train", "--config", str(config)],
        capture_output=True, text=True, timeout=100, env=env,
    )
    assert result.returncode == 2, result.stderr
    assert result.stderr.startswith("dnc train: error: train set file ") and "holds variant(s) se-t" in result.stderr
    assert "Traceback" not in result.stderr and not (tmp_path / "out").exists()

# ---------------------------------------------------------------- Ray Train + DeepSpeed on CPU, 2 workers


@pytest.fixture(scope="module")
def zero2(ray_local, tmp_path_factory):
    from dnc_ray.train.recipe import run_train

    tmp = tmp_path_factory.mktemp("zero2")
    cfg = train_config(repeated_set(tmp), tmp / "out")
    return cfg, run_train(cfg)


def assert_trained(cfg: TrainConfig, summary: dict, fall: float = 2.0, restarted: bool = False) -> list[dict]:
    """The run took every step, the loss fell clearly, metrics and a checkpoint every checkpoint_every_steps were
    written (rank 0's peak memory never falls within one process: `restarted` runs had two)."""
    output = Path(cfg.output)
    steps = metrics(output)
    assert [s["step"] for s in steps] == list(range(1, cfg.max_steps + 1))
    assert all({"loss", "learning_rate", "train_tokens_per_second", "train_runtime", "peak_memory_gib"} <= s.keys()
               for s in steps)
    peaks = [s["peak_memory_gib"] for s in steps]
    assert peaks[0] > 0.1 and (restarted or peaks == sorted(peaks))  # a process with torch loaded; a peak never falls
    assert steps[-1]["loss"] < steps[0]["loss"] - fall, [s["loss"] for s in steps]
    assert summary["steps"] == cfg.max_steps and summary["final_loss"] == steps[-1]["loss"]
    assert summary["rows"] == summary["used"] == 12 and summary["dropped"] == summary["truncated"] == 0
    every = cfg.checkpoint_every_steps
    assert [step for step, _ in checkpoint_steps(output)] == list(range(every, cfg.max_steps + 1, every))
    assert summary["checkpoint"] == str(checkpoint_steps(output)[-1][1])
    return steps


@pytest.mark.timeout(900)  # the first DeepSpeed run may JIT-build DeepSpeed's CPU ops
def test_zero2_loss_falls_and_checkpoints_are_written(zero2):
    cfg, summary = zero2
    assert_trained(cfg, summary)


def test_learning_rate_warms_up_then_follows_the_cosine(zero2):
    """The Trainer's schedule: a linear rise from 0 over the warm-up's 2 steps, then a cosine fall towards 0."""
    cfg, _ = zero2
    rates = [s["learning_rate"] for s in metrics(Path(cfg.output))]
    warmup = 2
    for done, rate in enumerate(rates):  # each step logs the rate it used: the schedule after `done` steps
        progress = (done - warmup) / (cfg.max_steps - warmup)
        expected = cfg.lr * done / warmup if done < warmup else cfg.lr * 0.5 * (1 + math.cos(math.pi * progress))
        assert rate == pytest.approx(expected, abs=1e-9), rates


@pytest.mark.timeout(120)
def test_dtype_auto_trains_in_bf16_where_native_and_is_recorded(zero2):
    """The default dtype (auto) resolves as resolve_dtype does for this machine's CPU: bf16 mixed precision with
    native bf16 (AVX512-BF16/AMX), else fp32; DeepSpeed ran in it, and the summary and metrics.jsonl record it."""
    cfg, summary = zero2
    caps = device_caps()
    expected = resolve_dtype("auto", "cpu", caps)
    assert cfg.dtype == "auto" and expected == ("bfloat16" if caps.cpu_bf16 else "float32")
    assert summary["dtype"] == expected
    assert {s["dtype"] for s in metrics(Path(cfg.output))} == {expected}
    # DeepSpeed's bf16 optimizer keeps fp32 master weights in its own checkpoint files; the exported model is bf16
    _, last = checkpoint_steps(Path(cfg.output))[-1]
    optimizer_files = [f.name for f in (last / "checkpoint" / "global_step8").glob("*optim_states.pt")]
    assert len(optimizer_files) == 2 and all(f.startswith("bf16_") == (expected == "bfloat16") for f in optimizer_files)
    assert json.loads((Path(summary["model"]) / "config.json").read_text())["dtype"] == expected


def assert_exported(model_dir: Path, learned: str = "How many") -> None:
    """A plain Transformers folder that loads, differs from the base, and generates (also via HFEngine)."""
    from dnc_ray.llm.hf import HFEngine

    names = {p.name for p in model_dir.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "chat_template.jinja"} <= names
    assert not any(n.startswith("adapter_") for n in names)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    before = AutoModelForCausalLM.from_pretrained(resolve_model(TINY_RANDOM)).state_dict()
    after = model.state_dict()
    assert after.keys() == before.keys()
    assert any(not torch.equal(after[k], before[k]) for k in after)

    engine = HFEngine(HFModel(engine="hf", model=str(model_dir), dtype="float32"))  # exact output: no bf16
    [completion] = engine.generate([row(0)["prompt"]], SamplingParams(max_tokens=24))
    assert completion.error is None and completion.completion_tokens > 0
    assert completion.text.startswith(learned)  # it learned the repeated decomposition


@pytest.mark.timeout(120)
def test_zero2_export_loads_and_generates(zero2):
    cfg, summary = zero2
    assert summary["model"] == f"{cfg.output}/model"
    assert_exported(Path(summary["model"]))


@pytest.mark.timeout(600)
def test_resume_continues_step_count_optimizer_and_schedule(zero2, tmp_path):
    from dnc_ray.train.recipe import run_train

    cfg, _ = zero2
    first = {s["step"]: s for s in metrics(Path(cfg.output))}
    step4 = dict(checkpoint_steps(Path(cfg.output)))[4]
    resumed_cfg = cfg.model_copy(update={"output": str(tmp_path / "resumed"), "resume_from": str(step4)})
    summary = run_train(resumed_cfg)
    resumed = {s["step"]: s for s in metrics(tmp_path / "resumed")}
    assert summary["steps"] == 8 and sorted(resumed) == list(range(1, 9))
    assert [step for step, _ in checkpoint_steps(tmp_path / "resumed")] == [8]  # no step-4 checkpoint: began at 5
    for step in range(5, 9):  # same rows, weights, optimizer state and schedule: the same step
        assert resumed[step]["learning_rate"] == pytest.approx(first[step]["learning_rate"], rel=1e-6)
        assert resumed[step]["loss"] == pytest.approx(first[step]["loss"], rel=1e-3)


@pytest.mark.timeout(600)
def test_lora_exports_a_merged_plain_model(ray_local, tmp_path):
    from dnc_ray.train.recipe import run_train

    # LoRA moves a tiny random model slowly (its tied 49k-token embedding stays frozen): a smaller fall.
    lora = {"r": 16, "alpha": 32, "dropout": 0.0}  # target_modules: all-linear
    cfg = train_config(repeated_set(tmp_path), tmp_path / "out", lora=lora, lr=1e-2)
    summary = run_train(cfg)
    assert_trained(cfg, summary, fall=0.3)
    assert_exported(Path(summary["model"]), learned="")
    merged = AutoModelForCausalLM.from_pretrained(summary["model"]).state_dict()
    base = AutoModelForCausalLM.from_pretrained(resolve_model(TINY_RANDOM)).state_dict()
    linear = [f"self_attn.{m}_proj" for m in "qkvo"] + [f"mlp.{m}_proj" for m in ("gate", "up", "down")]
    assert {k for k in merged if not torch.equal(merged[k], base[k])} == {
        f"model.layers.{i}.{m}.weight" for i in range(2) for m in linear
    }


@pytest.fixture(scope="module")
def validated(ray_local, tmp_path_factory):
    """One run for validation, keep_best, patience, packing, gradient checkpointing, epochs, TensorBoard and W&B.

    Built so that the eval loss falls, then rises: the eval rows' target is not the one trained on, and a
    high learning rate soon makes the model sure of the trained target. Every training row is the same, so
    the run does not depend on the order of the rows.
    """
    from dnc_ray.train.recipe import run_train

    tmp = tmp_path_factory.mktemp("validated")
    eval_set = write_set(tmp / "eval.parquet", [row(100 + i, target="No decomposition") for i in range(4)])
    cfg = train_config(
        repeated_set(tmp), tmp / "out", max_steps=None, num_epochs=6, global_batch_size=8, lr=0.1,
        eval_set=str(eval_set), eval_every_steps=1, eval_generations=2, keep_best="eval_loss", patience=2,
        checkpoint_every_steps=4, keep_checkpoints=1, packing=True, gradient_checkpointing=True,
        wandb={"project": "dnc-tests", "mode": "offline"},
    )
    return cfg, run_train(cfg)


@pytest.mark.timeout(900)
def test_num_epochs_and_global_batch_size_plan_the_run(validated):
    cfg, summary = validated
    # 12 rows, 2 workers: 6 rows each, 3 micro-batches of 2 an epoch; 8 rows a step: accumulation 2;
    # 6 epochs of 3 micro-batches: 9 steps
    assert (summary["planned_steps"], summary["gradient_accumulation_steps"], summary["global_batch_size"]) == (9, 2, 8)
    assert summary["num_epochs"] == 6 and summary["eval_rows"] == 4
    steps = metrics(Path(cfg.output))
    assert [s["epoch"] for s in steps[:3]] == [pytest.approx(2 / 3, abs=1e-3), pytest.approx(4 / 3, abs=1e-3), 2.0]
    assert all(s["padding_share"] == 0.0 for s in steps)  # packed: not a padded token
    assert all(s["train_tokens_per_second"] > 0 and s["peak_memory_gib"] > 0.1 for s in steps)


def test_eval_metrics_in_metrics_jsonl_and_tensorboard(validated):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg, summary = validated
    steps = metrics(Path(cfg.output))
    assert [s["step"] for s in steps] == list(range(1, summary["steps"] + 1))  # one line per step
    assert all({"loss", "eval_loss", "eval_parse_rate", "eval_tokens"} <= s.keys() for s in steps)  # eval every step
    assert all(0 <= s["eval_parse_rate"] <= 1 and s["eval_tokens"] == 16 for s in steps)  # 4 x "No decomposition<|im_end|>\n"
    assert summary["eval_loss"] == steps[-1]["eval_loss"]

    events = EventAccumulator(str(Path(cfg.output) / "tensorboard"))
    events.Reload()
    scalars = {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}
    assert {"train/loss", "train/learning_rate", "train/train_tokens_per_second", "train/peak_memory_gib",
            "train/padding_share", "eval/loss", "eval/parse_rate"} <= scalars.keys()
    assert [(step, pytest.approx(value, rel=1e-5)) for step, value in scalars["eval/loss"]] == \
        [(s["step"], s["eval_loss"]) for s in steps]
    assert [step for step, _ in scalars["train/loss"]] == [s["step"] for s in steps]


def test_keep_best_exports_the_best_checkpoint_and_patience_stops(validated):
    from safetensors.torch import load_file

    cfg, summary = validated
    losses = [s["eval_loss"] for s in metrics(Path(cfg.output))]
    best = losses.index(min(losses)) + 1
    # the run as built: a best evaluation, then two worse ones (patience 2), before the 9 planned steps
    assert summary["best_step"] == best and summary["steps"] == best + 2 < summary["planned_steps"]
    assert summary["best_eval_loss"] == min(losses) and summary["stopped_early"]
    assert (summary["exported"], summary["exported_step"]) == ("best", best)
    # Ray Train keeps the best checkpoint (keep_checkpoints 1) and the latest
    kept = dict(checkpoint_steps(Path(cfg.output)))
    assert sorted(kept) == [best, summary["steps"]]
    exported = load_file(Path(summary["model"]) / "model.safetensors")
    for step, same in ((best, True), (summary["steps"], False)):
        saved = load_file(kept[step] / "checkpoint" / "model.safetensors")
        assert all(torch.equal(exported[k], saved[k]) for k in saved) == same, step
    assert json.loads((Path(summary["model"]) / "config.json").read_text())["use_cache"] is True


def test_wandb_offline_run_is_written(validated):
    cfg, _ = validated
    [run] = (Path(cfg.output) / "wandb").glob("offline-run-*/run-*.wandb")
    assert b"eval/loss" in run.read_bytes() and b"train/loss" in run.read_bytes()


def train_workers() -> list[psutil.Process]:
    """This test session's Ray Train worker processes (children of the Ray it started), idle or running a task
    (their title is `ray::RayTrainWorker`, or `ray::RayTrainWorker.<method>` while a method runs)."""
    workers = []
    for process in psutil.Process().children(recursive=True):
        try:
            if process.cmdline()[:1] and process.cmdline()[0].startswith("ray::RayTrainWorker"):
                workers.append(process)
        except psutil.NoSuchProcess:
            continue
    return workers


@pytest.mark.timeout(900)
def test_zero3_killed_worker_is_restarted_resumes_from_its_checkpoint_and_exports_gathered_weights(ray_local, tmp_path):
    """ZeRO-3 on 2 workers, one killed after the first checkpoint: Ray Train restarts the group, which resumes from
    that checkpoint's shards; the export gathers the whole weights."""
    from dnc_ray.train.recipe import run_train

    output = tmp_path / "out"
    cfg = train_config(repeated_set(tmp_path), output, max_steps=12, checkpoint_every_steps=3, keep_checkpoints=10,
                       deepspeed={"zero_stage": 3})
    killed = {}

    def kill_a_worker_after_the_first_checkpoint():
        try:  # Ray Train writes its snapshot once a checkpoint is registered (a resume starts from it)
            deadline = time.monotonic() + 600
            while not (output / "checkpoints" / "checkpoint_manager_snapshot.json").exists():
                assert time.monotonic() < deadline, "no checkpoint registered within 600 s"
                time.sleep(0.05)
            killed["checkpoints_before"] = len(checkpoint_steps(output))
            victim = train_workers()[-1]
            victim.send_signal(signal.SIGKILL)
            killed["pid"] = victim.pid
        except BaseException as e:  # kept: the test asserts on it
            killed["error"] = e

    killer = threading.Thread(target=kill_a_worker_after_the_first_checkpoint, daemon=True)
    killer.start()
    summary = run_train(cfg)
    killer.join(timeout=60)
    assert not killer.is_alive() and "error" not in killed, killed.get("error")
    assert killed["checkpoints_before"] < 4, "the worker was killed after the run had finished"
    # Restarted from the latest checkpoint: each checkpoint step written once, each step logged once.
    assert_trained(cfg, summary, restarted=True)
    assert_exported(Path(summary["model"]))
