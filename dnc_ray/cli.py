"""`dnc`: the command line. Each subcommand takes a YAML config (see jobs/configs/)."""

from __future__ import annotations

import argparse
import functools
import sys

from dnc_ray.config import VARIANTS, GenerateConfig, PipelineConfig, ServeConfig, TrainConfig, load_config
from dnc_ray.infra import console, storage
from dnc_ray.infra.errors import BudgetReached, ConfigError, RowsFailed
from dnc_ray.infra.lease import LeaseError
from dnc_ray.llm.models import ModelRefError
from dnc_ray.tasks import TaskError
from dnc_ray.train import TrainSetError

USER_ERRORS = (ConfigError, TaskError, TrainSetError, ModelRefError, FileNotFoundError, LeaseError)


def cmd_generate(args: argparse.Namespace) -> None:
    from dnc_ray.stages.generate import check_failed_rows, run_generate

    cfg = load_config(args.config, GenerateConfig)
    console.logs_under(storage.join(cfg.output, "logs"))
    check_failed_rows(cfg, run_generate(cfg))


def cmd_train(args: argparse.Namespace) -> None:
    from dnc_ray.train.recipe import run_train

    cfg = load_config(args.config, TrainConfig)
    console.logs_under(storage.join(cfg.output, "logs"))
    run_train(cfg)


def cmd_evaluate(args: argparse.Namespace) -> None:
    from dnc_ray.evaluate import evaluate_run, markdown_table

    reports = [evaluate_run(run) for run in args.runs]
    console.say(markdown_table(reports))


def cmd_distill(args: argparse.Namespace) -> None:
    from dnc_ray.distill import build_training_set, yield_table

    report = build_training_set(args.run, args.variant, args.out)
    console.say(yield_table(report))
    console.say(f"training set: {args.out}/train.parquet")


def cmd_pipeline(args: argparse.Namespace) -> None:
    from dnc_ray.pipeline import run_pipeline

    cfg = load_config(args.config, PipelineConfig)
    console.logs_under(storage.join(cfg.output, "logs"))
    run_pipeline(cfg)


def cmd_study(args: argparse.Namespace) -> None:
    from dnc_ray.study.config import StudyConfig
    from dnc_ray.study.run import StudyFailed, plan_study, run_study

    cfg = load_config(args.config, StudyConfig)
    console.logs_under(storage.join(cfg.output, "logs"))
    if args.plan:
        plan_study(cfg)
        return
    try:
        run_study(cfg)
    except StudyFailed as e:  # the report is written; the failed cells are named (their tracebacks are logged)
        console.say(f"dnc study: cells failed: {e}", err=True)
        raise SystemExit(1) from None


def cmd_serve(args: argparse.Namespace) -> None:
    from dnc_ray.serve.app import serve_forever

    cfg = load_config(args.config, ServeConfig)
    console.logs_under(cfg.log_dir)
    serve_forever(cfg)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dnc", description="Divide-or-Conquer on Ray")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--verbose", action="store_true", help="show Ray's, DeepSpeed's and Transformers' logs "
                        f"on the terminal (also {console.VERBOSE_ENV}=1); by default they go to <output>/logs/")
    sub = p.add_subparsers(dest="command", required=True)
    command = functools.partial(sub.add_parser, parents=[common])  # every command takes --verbose
    gen = command("generate", help="run a strategy over a task split with Ray Data")
    gen.add_argument("--config", required=True, help="generation YAML (jobs/configs/*.yaml)")
    gen.set_defaults(fn=cmd_generate)
    tr = command("train", help="fine-tune a student on a distilled set with Ray Train + DeepSpeed")
    tr.add_argument("--config", required=True, help="training YAML (jobs/configs/train-*.yaml)")
    tr.set_defaults(fn=cmd_train)
    ev = command("evaluate", help="score runs; print and write report.md / report.json")
    ev.add_argument("runs", nargs="+", help="run output folders (or s3:// / gs:// URIs)")
    ev.set_defaults(fn=cmd_evaluate)
    dis = command("distill", help="build a training set (sd-t, sd-r, se-t, se-a) from scored runs")
    dis.add_argument("--run", required=True, nargs="+", help="scored teacher run(s)")
    dis.add_argument("--variant", required=True, choices=VARIANTS)
    dis.add_argument("--out", required=True, help="folder (or URI) for train.parquet and yield.json")
    dis.set_defaults(fn=cmd_distill)
    pipe = command("pipeline", help="teacher -> S_D set -> student -> evaluation -> report, in one job")
    pipe.add_argument("--config", required=True, help="pipeline YAML (jobs/configs/quickstart.yaml)")
    pipe.set_defaults(fn=cmd_pipeline)
    study = command("study", help="the paper's study: teacher runs, four sets, students, Table 1, "
                           "cross-domain, cost; cells reused by their inputs")
    study.add_argument("--config", required=True, help="study YAML (jobs/configs/study-*.yaml)")
    study.add_argument("--plan", action="store_true", help="build nothing: list the cells a submission would "
                       "build and those it would reuse")
    study.set_defaults(fn=cmd_study)
    srv = command("serve", help="serve the decomposer -> solver graph over HTTP until Ctrl-C")
    srv.add_argument("--config", required=True, help="serving YAML (jobs/configs/serve.yaml)")
    srv.set_defaults(fn=cmd_serve)
    return p


# Exit codes (README "Exit codes"): 0 done; 1 an unexpected error (a traceback: a bug or an infrastructure
# failure); 2 a user error, one line, stopped before Ray started or anything was written; 3 the run
# finished but more rows failed than `max_failed_rows` allows (every row is written; a re-run retries them);
# 4 `budget_usd` stopped the run (finished rows are written; a run with a higher budget_usd resumes the others).
EXIT_USER_ERROR = 2
EXIT_ROWS_FAILED = 3
EXIT_BUDGET_REACHED = 4


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if not (args.verbose or console.verbose_requested()):
        console.quiet()
    try:
        args.fn(args)
    except USER_ERRORS as e:
        console.say(f"dnc {args.command}: error: {e}", err=True)
        return EXIT_USER_ERROR
    except RowsFailed as e:
        console.say(f"dnc {args.command}: failed rows: {e}", err=True)
        return EXIT_ROWS_FAILED
    except BudgetReached as e:
        console.say(f"dnc {args.command}: budget reached: {e}", err=True)
        return EXIT_BUDGET_REACHED
    return 0


if __name__ == "__main__":
    sys.exit(main())
