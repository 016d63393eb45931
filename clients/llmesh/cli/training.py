"""Training subcommands: ``sft``, ``pretrain``, ``merge-lora``, ``jobs`` and ``job
get|cancel|watch``.

``sft`` / ``pretrain`` / ``merge-lora`` create a job and follow it (progress bar, log lines, loss
curve PNG) unless ``--detach``; ``jobs`` lists them and ``job get|cancel|watch ID`` handles one.
"""

from __future__ import annotations

import argparse
import datetime
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from google.protobuf import json_format

from llmesh._table import format_table
from llmesh.arg_types import non_negative_float, positive_int
from llmesh.cli.connect import connect
from llmesh.client import ByzerLLM
from llmesh.common.errors import LLMeshError
from llmesh.common.job_rules import is_final, kind_name, state_name
from llmesh.i18n import MESSAGES
from llmesh.training import merge_lora_spec, split_json_config
from llmesh.training_watch import (
    LossCurve,
    ProgressView,
    format_job_row,
    format_progress,
    names_by_value,
    write_loss_png,
)
from llmesh.v1 import trainer_service_pb2 as tr


class ModelParamsAction(argparse.Action):
    """``--model_params KEY=VALUE ...`` into a dict; repeating the option merges."""

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: str | Sequence[Any] | None,
        option_string: str | None = None,
    ) -> None:
        tokens = [values] if isinstance(values, str) else [str(v) for v in values or []]
        merged = dict(getattr(namespace, self.dest, None) or {})
        for token in tokens:
            key, sep, value = token.partition("=")
            if not sep or not key.strip() or any(ch.isspace() for ch in key.strip()):
                raise argparse.ArgumentError(self, MESSAGES["bad_model_param"].format(token))
            merged[key.strip()] = value
        setattr(namespace, self.dest, merged)


def _json_config(text: str) -> str:
    """``--json_config``: JSON text, or ``@FILE`` holding it; checked here for a usage error."""
    source = text
    if text.startswith("@"):
        try:
            source = Path(text[1:]).expanduser().read_text(encoding="utf-8")
        except OSError as exc:
            raise argparse.ArgumentTypeError(
                MESSAGES["bad_json_config"].format(text, exc.strerror or exc)
            ) from None
    try:
        split_json_config(source)
    except LLMeshError as exc:
        raise argparse.ArgumentTypeError(MESSAGES["bad_json_config"].format(text, exc)) from None
    return source


def _job_state(state: int) -> str:
    return state_name(state)


def _artifact_text(job: tr.TrainingJob) -> tuple[str, str]:
    kind = tr.ArtifactKind.Name(job.artifact.kind).removeprefix("ARTIFACT_KIND_").lower()
    return kind.replace("_", " ") or "artifact", job.artifact.path or "-"


def watch_job(
    llm: ByzerLLM,
    job_id: str,
    *,
    loss_png: str | None = None,
    out: Any = None,
    err: Any = None,
) -> int:
    """Follow a job to its end: bar on ``err``, log lines and states on ``out``, loss PNG.

    Args:
        llm: the client to watch through.
        job_id: the job to follow.
        loss_png: where the loss curve goes (default: ``<job id>-loss.png``).
        out: stream for log lines, states and results (default: stdout).
        err: stream for the progress bar and failures (default: stderr).

    Returns:
        0 when the job SUCCEEDED, 1 when it FAILED or was CANCELLED, 130 on Ctrl-C (the job
        keeps running).
    """
    out = sys.stdout if out is None else out
    err = sys.stderr if err is None else err
    view = ProgressView(out, err)
    curve = LossCurve()
    job: tr.TrainingJob | None = None
    shown_state = 0
    try:
        for job, event in llm.watch_training_job(job_id):
            which = event.WhichOneof("event") if event is not None else None
            if which == "progress":
                curve.add(event.progress)
                view.progress(event.progress)
            elif which == "log_line":
                view.message(event.log_line.rstrip("\n"))
            elif which == "checkpoint":
                view.message(
                    MESSAGES["job_checkpoint"].format(event.checkpoint.step, event.checkpoint.path)
                )
            if job.state != shown_state and not is_final(job.state):
                shown_state = job.state
                view.message(MESSAGES["job_state"].format(job.id, _job_state(job.state)))
    except KeyboardInterrupt:
        view.close()
        print(MESSAGES["job_still_running"].format(job_id), file=err)
        return 130
    view.close()
    if job is None or not is_final(job.state) or not job.artifact.path:
        job = llm.get_training_job(job_id)  # the record is the last word
    if curve:
        path = loss_png or f"{job_id}-loss.png"
        try:
            write_loss_png(
                path,
                curve.train.items(),
                curve.eval.items(),
                title=f"{job.id} ({kind_name(job.spec.kind)})",
            )
            print(MESSAGES["loss_png_written"].format(path), file=out)
        except (LLMeshError, OSError) as exc:
            print(MESSAGES["loss_png_failed"].format(exc), file=err)
    elif job.spec.kind != tr.TRAINING_JOB_KIND_MERGE_LORA:
        print(MESSAGES["loss_png_none"], file=err)
    if job.state == tr.TRAINING_JOB_STATE_SUCCEEDED:
        print(MESSAGES["job_succeeded"].format(job.id, *_artifact_text(job)), file=out)
        return 0
    reason = job.reason or MESSAGES["job_no_reason"]
    print(MESSAGES["job_ended"].format(job.id, _job_state(job.state), reason), file=err)
    return 1


def _created(llm: ByzerLLM, job: tr.TrainingJob, args: argparse.Namespace) -> int:
    print(MESSAGES["job_created"].format(job.id, kind_name(job.spec.kind), _job_state(job.state)))
    if args.detach:
        print(MESSAGES["job_detached"].format(job.id))
        return 0
    return watch_job(llm, job.id, loss_png=args.loss_png)


def cmd_sft(args: argparse.Namespace) -> int:
    """``llmesh sft``: create an SFT job, then watch it unless ``--detach``."""
    with connect(args) as llm:
        job = llm.sft(
            args.name,
            args.data_dir,
            args.model_path,
            args.output_dir,
            num_cpus=args.num_cpus,
            num_gpus=args.num_gpus,
            detached=True,
            json_config=args.json_config,
            model_params=args.model_params,
            num_ranks=args.num_ranks or 0,
            method=args.method,
            template=args.template,
        )
        return _created(llm, job, args)


def cmd_pretrain(args: argparse.Namespace) -> int:
    """``llmesh pretrain``: create a PRETRAIN job, then watch it unless ``--detach``."""
    with connect(args) as llm:
        job = llm.pretrain(
            args.name,
            args.data_dir,
            args.model_path,
            args.output_dir,
            num_cpus=args.num_cpus,
            num_gpus=args.num_gpus,
            detached=True,
            json_config=args.json_config,
            model_params=args.model_params,
            num_ranks=args.num_ranks,
        )
        return _created(llm, job, args)


def cmd_merge_lora(args: argparse.Namespace) -> int:
    """``llmesh merge-lora``: create a MERGE_LORA job, then wait for it unless ``--detach``."""
    spec = merge_lora_spec(
        local_model_path=args.model_path,
        local_adapter_path=args.adapter_path,
        local_target_path=args.target_path,
    )
    with connect(args) as llm:
        job = llm.create_training_job(spec)
        return _created(llm, job, args)


def cmd_jobs(args: argparse.Namespace) -> int:
    """``llmesh jobs``: a table of training jobs, newest first."""
    with connect(args) as llm:
        jobs = llm.list_training_jobs(args.state or None)
    if not jobs:
        print(MESSAGES["no_jobs"])
        return 0
    now = time.time()
    rows = [format_job_row(job, now) for job in jobs]
    print(format_table(["ID", "KIND", "STATE", "WORKER", "STEP", "LOSS", "AGE"], rows))
    return 0


def cmd_job_get(args: argparse.Namespace) -> int:
    """``llmesh job get ID``: one job in detail (or as JSON)."""
    with connect(args) as llm:
        job = llm.get_training_job(args.job_id)
    if args.json:
        print(json_format.MessageToJson(job, indent=2))
        return 0
    spec = job.spec
    fields: list[tuple[str, str]] = [
        ("id", job.id),
        ("kind", kind_name(spec.kind)),
        ("state", _job_state(job.state) + (" (cancel requested)" if job.cancel_requested else "")),
        ("reason", job.reason),
        ("worker", job.worker_id),
        ("gpus", ",".join(job.devices)),
        ("progress", format_progress(job.progress) if job.progress.total_steps else ""),
        ("base model", spec.base_model_path),
        ("adapter", spec.adapter_path),
        ("data", spec.data_path),
        ("model config", spec.model_config),
        ("output dir", spec.output_dir),
        (
            "method",
            _method(spec.method) if spec.kind == tr.TRAINING_JOB_KIND_SFT else "",
        ),
        ("ranks", str(spec.num_ranks or 1)),
        (
            "hyperparameters",
            " ".join(f"{k}={v}" for k, v in sorted(spec.hyperparameters.items())),
        ),
        ("artifact", "{1} ({0})".format(*_artifact_text(job)) if job.artifact.path else ""),
        ("created", _timestamp(job, "create_time")),
        ("started", _timestamp(job, "start_time")),
        ("ended", _timestamp(job, "end_time")),
    ]
    shown = [(k, v) for k, v in fields if v]
    width = max(len(k) for k, _ in shown) + 1
    for key, value in shown:
        print(f"{key + ':':<{width}} {value}")
    return 0


def _method(method: int) -> str:
    if method == tr.TRAINING_METHOD_UNSPECIFIED:
        return "lora (default)"
    return tr.TrainingMethod.Name(method).removeprefix("TRAINING_METHOD_").lower()


def _timestamp(job: tr.TrainingJob, field: str) -> str:
    if not job.HasField(field):
        return ""
    ts = getattr(job, field).ToDatetime(tzinfo=datetime.timezone.utc).astimezone()
    return ts.isoformat(timespec="seconds")


def cmd_job_cancel(args: argparse.Namespace) -> int:
    """``llmesh job cancel ID``: ask the job to stop."""
    with connect(args) as llm:
        before = llm.get_training_job(args.job_id)
        if is_final(before.state):
            print(MESSAGES["cancel_final"].format(before.id, _job_state(before.state)))
            return 0
        llm.cancel_training_job(args.job_id)
    print(MESSAGES["cancel_requested"].format(before.id, _job_state(before.state)))
    return 0


def cmd_job_watch(args: argparse.Namespace) -> int:
    """``llmesh job watch ID``: progress until the job ends; exit 0 only if it SUCCEEDED."""
    with connect(args) as llm:
        return watch_job(llm, args.job_id, loss_png=args.loss_png)


def add_training_commands(
    subparsers: Any,
    common: argparse.ArgumentParser,
    add: Callable[[str, str, Callable[[argparse.Namespace], int]], Any],
) -> None:
    """Register ``sft``, ``pretrain``, ``merge-lora``, ``jobs`` and ``job get|cancel|watch``.

    Args:
        subparsers: the ``llmesh`` parser's subcommands (``job`` adds its own actions).
        common: the parent parser holding ``--control_plane``.
        add: adds a subcommand (name, help key in the message table, handler) that takes
            ``--control_plane`` and returns its parser.
    """

    def watch_options(sub: argparse.ArgumentParser) -> None:
        sub.add_argument("--detach", action="store_true", help=MESSAGES["help_detach"])
        sub.add_argument(
            "--loss-png", dest="loss_png", metavar="PATH", help=MESSAGES["help_loss_png"]
        )

    def train_options(sub: argparse.ArgumentParser, *, pretrain: bool) -> None:
        sub.add_argument("--name", default="", help=MESSAGES["help_job_name"])
        sub.add_argument(
            "--model_path",
            required=True,
            help=MESSAGES["help_pretrain_model_path" if pretrain else "help_train_model_path"],
        )
        sub.add_argument(
            "--data_dir",
            required=True,
            help=MESSAGES["help_pretrain_data_dir" if pretrain else "help_data_dir"],
        )
        sub.add_argument("--output_dir", default="", help=MESSAGES["help_output_dir"])
        sub.add_argument(
            "--num_cpus",
            type=non_negative_float,
            default=0.0,
            help=MESSAGES["help_num_cpus"] + MESSAGES["default_suffix"],
        )
        sub.add_argument(
            "--num_gpus",
            type=non_negative_float,
            default=0.0,
            help=MESSAGES["help_num_gpus"] + MESSAGES["default_suffix"],
        )
        sub.add_argument(
            "--num_ranks", type=positive_int, default=None, help=MESSAGES["help_num_ranks"]
        )
        sub.add_argument(
            "--json_config",
            type=_json_config,
            default="{}",
            metavar="JSON|@FILE",
            help=MESSAGES["help_json_config"],
        )
        sub.add_argument(
            "--model_params",
            nargs="+",
            action=ModelParamsAction,
            default={},
            metavar="KEY=VALUE",
            help=MESSAGES["help_model_params"],
        )
        watch_options(sub)

    sft = add("sft", "help_sft", cmd_sft)
    train_options(sft, pretrain=False)
    sft.add_argument(
        "--method", choices=["lora", "full"], default=None, help=MESSAGES["help_method"]
    )
    sft.add_argument(
        "--template",
        choices=["auto", "alpaca", "chat"],
        default=None,
        help=MESSAGES["help_train_template"],
    )

    pretrain = add("pretrain", "help_pretrain", cmd_pretrain)
    train_options(pretrain, pretrain=True)

    merge = add("merge-lora", "help_merge_lora", cmd_merge_lora)
    merge.add_argument("--name", default="", help=MESSAGES["help_job_name"])
    merge.add_argument("--model_path", required=True, help=MESSAGES["help_train_model_path"])
    merge.add_argument("--adapter_path", required=True, help=MESSAGES["help_adapter_path"])
    merge.add_argument("--target_path", default="", help=MESSAGES["help_target_path"])
    watch_options(merge)

    jobs = add("jobs", "help_jobs", cmd_jobs)
    jobs.add_argument(
        "--state",
        nargs="+",
        type=str.lower,
        choices=[name.lower() for name in names_by_value().values()],
        help=MESSAGES["help_job_states"],
    )

    job = subparsers.add_parser(
        "job", parents=[common], help=MESSAGES["help_job"], description=MESSAGES["help_job"]
    )
    actions = job.add_subparsers(dest="job_command", metavar="ACTION")
    actions.required = True
    for name, help_key, func in (
        ("get", "help_job_get", cmd_job_get),
        ("cancel", "help_job_cancel", cmd_job_cancel),
        ("watch", "help_job_watch", cmd_job_watch),
    ):
        sub = actions.add_parser(
            name, parents=[common], help=MESSAGES[help_key], description=MESSAGES[help_key]
        )
        sub.add_argument("job_id", metavar="ID", help=MESSAGES["help_job_id"])
        sub.set_defaults(func=func)
        if name == "get":
            sub.add_argument("--json", action="store_true", help=MESSAGES["help_json_out"])
        if name == "watch":
            sub.add_argument(
                "--loss-png", dest="loss_png", metavar="PATH", help=MESSAGES["help_loss_png"]
            )
