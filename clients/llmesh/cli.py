"""The ``llmesh`` command: deploy, undeploy and query models, list the mesh, run the servers.

Training jobs: ``llmesh sft`` / ``pretrain`` / ``merge-lora`` create a job and follow it (progress
bar, log lines, loss curve PNG) unless ``--detach``; ``llmesh jobs`` lists them and ``llmesh job
get|cancel|watch ID`` handles one.

Client subcommands keep the option names of Byzer-LLM's ``byzerllm`` command (``--model``,
``--model_path``, ``--pretrained_model_type``, ``--infer_backend``, ``--num_workers``,
``--gpus_per_worker``, ``--cpus_per_worker``, ``--infer_params``, ``--query``, ``--template``);
``--control_plane`` replaces ``--ray_address``. Server subcommands come from
:mod:`llmesh.cli_servers`.

Exit codes: 0 success, 1 an llmesh error (printed as one ``error: ...`` line), 2 bad usage.
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from google.protobuf import json_format

from llmesh import __version__, cli_servers
from llmesh import bench as bench_command
from llmesh._table import format_table
from llmesh.client import (
    DEFAULT_ROLE_MAPPING,
    EMPTY_ROLE_MAPPING,
    ByzerLLM,
    default_control_plane,
)
from llmesh.common.errors import LLMeshError
from llmesh.common.job_rules import is_final, kind_name, state_name
from llmesh.infer_params import ACCEPTED_FORMS, InferParamsAction
from llmesh.templates import TEMPLATE_NAMES
from llmesh.training import (
    LossCurve,
    ProgressView,
    format_job_row,
    format_progress,
    merge_lora_spec,
    names_by_value,
    split_json_config,
    write_loss_png,
)
from llmesh.v1 import common_pb2
from llmesh.v1 import control_plane_service_pb2 as cp
from llmesh.v1 import trainer_service_pb2 as tr

# Every user-facing string in one table per language; MESSAGES holds the active one.
MESSAGES_EN: dict[str, str] = {
    "desc": "llmesh: serve LLMs on a gRPC mesh (Byzer-LLM compatible)",
    "help_control_plane": "control plane address host:port "
    "(default: $LLMESH_CONTROL_PLANE or 127.0.0.1:50051)",
    "help_deploy": "Deploy a model",
    "help_undeploy": "Undeploy a model",
    "help_query": "Query a deployed model and stream the answer",
    "help_models": "List deployed models and their replicas",
    "help_workers": "List live workers",
    "help_make_test_model": "Write the small local test model into DIR (no downloads)",
    "help_bench": "Benchmark serving: in-process vLLM, the mesh and vllm serve under one load",
    "help_num_workers": "number of replicas to run",
    "help_gpus_per_worker": "GPUs each replica reserves",
    "help_cpus_per_worker": "CPUs each replica reserves",
    "help_model_path": "model directory (HuggingFace layout) as the workers see it",
    "help_pretrained_model_type": "pretrained model type, recorded with the deployment",
    "help_udf_name": "name of the deployed model",
    "help_infer_params": f"engine parameters; each token is {ACCEPTED_FORMS}",
    "help_infer_backend": "inference engine: transformers, vllm, embedding, rerank, or auto "
    "(chosen from the model directory)",
    "help_no_wait": "return once the deployment is recorded, without waiting for READY",
    "help_timeout": "seconds to wait for the replicas to become READY",
    "help_query_model": "name of the deployed model",
    "help_query_text": "the user query / prompt",
    "help_template": "chat template: auto (the model's own), default (User:/Assistant:), empty, "
    "or a Byzer-LLM template (qwen, llama, yi, deepseek_code_chat, ...)",
    "help_max_tokens": "most tokens to generate",
    "help_dir": "directory to write the model into",
    "deploy_success": "Model {0} deployed successfully: {1}/{2} replicas READY",
    "deploy_accepted": "Model {0} deployment accepted; {1} replica(s) loading "
    "(watch with `llmesh models`)",
    "already_deployed": "Model {0} already deployed",
    "undeploy_success": "Model {0} undeployed successfully",
    "not_deployed": "Model {0} is not deployed; nothing to do",
    "no_models": "No models deployed.",
    "no_workers": "No workers registered.",
    "test_model_written": "Test model written to {0}",
    "default_suffix": " (default: %(default)s)",
    # training jobs
    "help_sft": "Fine-tune a model on a trainer worker (LoRA or full) and watch it",
    "help_pretrain": "Pretrain a causal LM from its config.json on raw text and watch it",
    "help_merge_lora": "Merge a LoRA adapter into its base model and wait for it",
    "help_jobs": "List training jobs",
    "help_job": "Show, cancel or watch one training job",
    "help_job_get": "Show a training job",
    "help_job_cancel": "Cancel a training job",
    "help_job_watch": "Follow a training job: progress bar, log lines, and a loss curve PNG "
    "when it ends (exit 0 when it SUCCEEDED, 1 otherwise)",
    "help_job_id": "the job id (see `llmesh jobs`)",
    "help_job_name": "a name for this run, shown in messages",
    "help_train_model_path": "base model directory (HuggingFace layout) on the trainer worker",
    "help_pretrain_model_path": "directory with config.json and the tokenizer, on the trainer "
    "worker (the model is built from that config)",
    "help_data_dir": "data.jsonl (alpaca or chat rows) or a directory holding it, on the "
    "trainer worker",
    "help_pretrain_data_dir": "a .txt file, a directory of them, or jsonl rows with text, on "
    "the trainer worker",
    "help_output_dir": "output directory on the trainer worker (default: the worker's jobs "
    "directory)",
    "help_num_cpus": "CPUs the job reserves (0: one per rank)",
    "help_num_gpus": "GPUs the job reserves",
    "help_num_ranks": "ranks under the DeepSpeed launcher (sft: 1; pretrain: one per GPU)",
    "help_method": "lora (adapters; default) or full (every weight)",
    "help_train_template": "prompt format of the rows: auto, alpaca or chat",
    "help_json_config": "DeepSpeed config as JSON text, or @FILE to read it from a file",
    "help_model_params": "training parameters KEY=VALUE, e.g. max_steps=20 "
    "learning_rate=2e-4 lora_r=8, or Byzer-LLM's sft.int.num_train_epochs=3",
    "help_detach": "return once the job is created instead of watching it",
    "help_loss_png": "where to write the loss curve PNG (default: <job id>-loss.png)",
    "help_adapter_path": "LoRA adapter directory on the trainer worker",
    "help_target_path": "where the merged model goes (default: the worker's jobs directory)",
    "help_job_states": "only jobs in these states",
    "help_json_out": "print the job as JSON",
    "help_base_model": "serve --model_path as a LoRA adapter on the replicas of this "
    "deployed base model",
    "job_created": "Training job {0} created ({1}, {2})",
    "job_detached": "Follow it with: llmesh job watch {0}",
    "job_state": "Job {0}: {1}",
    "job_checkpoint": "Checkpoint at step {0}: {1}",
    "job_succeeded": "Job {0} SUCCEEDED; {1}: {2}",
    "job_ended": "Job {0} {1}: {2}",
    "job_no_reason": "no reason was recorded",
    "job_still_running": "Stopped watching; job {0} keeps running "
    "(stop it with `llmesh job cancel {0}`)",
    "loss_png_written": "Loss curve written to {0}",
    "loss_png_none": "No training steps were reported; no loss curve written",
    "loss_png_failed": "Loss curve not written: {0}",
    "no_jobs": "No training jobs.",
    "cancel_requested": "Cancel of job {0} requested (it was {1}); it stops shortly",
    "cancel_final": "Job {0} already ended {1}; nothing to cancel",
    "bad_model_param": "cannot parse model param {0!r}: expected KEY=VALUE, "
    "e.g. max_steps=20 or sft.float.learning_rate=2e-4",
    "bad_json_config": "--json_config {0!r}: {1}",
}

# Chinese texts, chosen when $LANG starts with "zh" (as Byzer-LLM's ``byzerllm`` command does).
MESSAGES_ZH: dict[str, str] = {
    "desc": "llmesh：在 gRPC 网格上部署和调用大模型（兼容 Byzer-LLM）",
    "help_control_plane": "控制平面地址 host:port"
    "（默认：$LLMESH_CONTROL_PLANE 或 127.0.0.1:50051）",
    "help_deploy": "部署一个模型",
    "help_undeploy": "卸载一个模型",
    "help_query": "向已部署的模型提问，并流式输出回答",
    "help_models": "列出已部署的模型及其副本",
    "help_workers": "列出在线的工作节点",
    "help_make_test_model": "把本地小测试模型写入 DIR（不下载任何东西）",
    "help_bench": "服务性能测试：同一负载下比较进程内 vLLM、网格和 vllm serve",
    "help_num_workers": "要运行的副本数",
    "help_gpus_per_worker": "每个副本占用的 GPU 数",
    "help_cpus_per_worker": "每个副本占用的 CPU 数",
    "help_model_path": "模型目录（HuggingFace 格式），以工作节点上的路径为准",
    "help_pretrained_model_type": "预训练模型类型，随部署一起记录",
    "help_udf_name": "部署后的模型名称",
    "help_infer_params": f"推理引擎参数；每一项的写法：{ACCEPTED_FORMS}",
    "help_infer_backend": "推理后端：transformers、vllm、embedding、rerank，"
    "或 auto（按模型目录自动选择）",
    "help_no_wait": "部署记录下来后立即返回，不等待副本就绪",
    "help_timeout": "等待副本就绪的秒数",
    "help_query_model": "已部署的模型名称",
    "help_query_text": "用户的问题 / 提示词",
    "help_template": "对话模板：auto（模型自带）、default（User:/Assistant:）、empty，"
    "或 Byzer-LLM 模板（qwen、llama、yi、deepseek_code_chat 等）",
    "help_max_tokens": "最多生成的 token 数",
    "help_dir": "写入模型的目录",
    "deploy_success": "模型 {0} 部署成功：{1}/{2} 个副本已就绪",
    "deploy_accepted": "模型 {0} 的部署已受理；{1} 个副本正在加载（可用 `llmesh models` 查看）",
    "already_deployed": "模型 {0} 已经部署过了",
    "undeploy_success": "模型 {0} 卸载成功",
    "not_deployed": "模型 {0} 没有部署，无需操作",
    "no_models": "没有已部署的模型。",
    "no_workers": "没有已注册的工作节点。",
    "test_model_written": "测试模型已写入 {0}",
    "default_suffix": "（默认：%(default)s）",
    # training jobs
    "help_sft": "在训练节点上微调模型（LoRA 或全量），并跟踪进度",
    "help_pretrain": "按 config.json 在原始文本上预训练因果语言模型，并跟踪进度",
    "help_merge_lora": "把 LoRA 适配器合并进基座模型，并等待完成",
    "help_jobs": "列出训练任务",
    "help_job": "查看、取消或跟踪一个训练任务",
    "help_job_get": "显示一个训练任务",
    "help_job_cancel": "取消一个训练任务",
    "help_job_watch": "跟踪训练任务：进度条、日志，结束时输出 loss 曲线 PNG"
    "（成功退出码为 0，否则为 1）",
    "help_job_id": "任务 ID（见 `llmesh jobs`）",
    "help_job_name": "本次运行的名称，显示在提示信息中",
    "help_train_model_path": "基座模型目录（HuggingFace 格式），以训练节点上的路径为准",
    "help_pretrain_model_path": "含 config.json 和分词器的目录，以训练节点上的路径为准"
    "（按该配置新建模型）",
    "help_data_dir": "data.jsonl（alpaca 或对话格式）或包含它的目录，以训练节点上的路径为准",
    "help_pretrain_data_dir": ".txt 文件、.txt 文件目录，或含 text 字段的 jsonl，"
    "以训练节点上的路径为准",
    "help_output_dir": "训练节点上的输出目录（默认：训练节点的任务目录）",
    "help_num_cpus": "任务占用的 CPU 数（0：每个 rank 一个）",
    "help_num_gpus": "任务占用的 GPU 数",
    "help_num_ranks": "DeepSpeed 启动的 rank 数（sft：1；pretrain：每个 GPU 一个）",
    "help_method": "lora（适配器，默认）或 full（全部权重）",
    "help_train_template": "数据行的提示词格式：auto、alpaca 或 chat",
    "help_json_config": "DeepSpeed 配置（JSON 文本），或 @文件 从文件读取",
    "help_model_params": "训练参数 KEY=VALUE，例如 max_steps=20 learning_rate=2e-4 lora_r=8，"
    "或 Byzer-LLM 写法 sft.int.num_train_epochs=3",
    "help_detach": "任务创建后立即返回，不跟踪进度",
    "help_loss_png": "loss 曲线 PNG 的保存路径（默认：<任务 ID>-loss.png）",
    "help_adapter_path": "训练节点上的 LoRA 适配器目录",
    "help_target_path": "合并后模型的保存位置（默认：训练节点的任务目录）",
    "help_job_states": "只列出处于这些状态的任务",
    "help_json_out": "以 JSON 输出任务",
    "help_base_model": "把 --model_path 作为 LoRA 适配器，部署在这个已部署基座模型的副本上",
    "job_created": "训练任务 {0} 已创建（{1}，{2}）",
    "job_detached": "跟踪进度：llmesh job watch {0}",
    "job_state": "任务 {0}：{1}",
    "job_checkpoint": "第 {0} 步的检查点：{1}",
    "job_succeeded": "任务 {0} 成功（SUCCEEDED）；{1}：{2}",
    "job_ended": "任务 {0} {1}：{2}",
    "job_no_reason": "没有记录原因",
    "job_still_running": "已停止跟踪；任务 {0} 仍在运行（用 `llmesh job cancel {0}` 停止）",
    "loss_png_written": "loss 曲线已写入 {0}",
    "loss_png_none": "没有上报任何训练步，未生成 loss 曲线",
    "loss_png_failed": "未生成 loss 曲线：{0}",
    "no_jobs": "没有训练任务。",
    "cancel_requested": "已请求取消任务 {0}（原状态 {1}），稍后停止",
    "cancel_final": "任务 {0} 已经结束（{1}），无需取消",
    "bad_model_param": "无法解析训练参数 {0!r}：应为 KEY=VALUE，"
    "例如 max_steps=20 或 sft.float.learning_rate=2e-4",
    "bad_json_config": "--json_config {0!r}：{1}",
}

LOCALES: dict[str, dict[str, str]] = {"en": MESSAGES_EN, "zh": MESSAGES_ZH}


def cli_language(lang: str | None = None) -> str:
    """``"zh"`` when ``lang`` (default: ``$LANG``) names a Chinese locale, else ``"en"``."""
    value = os.environ.get("LANG", "en") if lang is None else lang
    return "zh" if value.split(".")[0].lower().startswith("zh") else "en"


def set_language(lang: str | None = None) -> str:
    """Switch the CLI's texts to ``lang`` (a locale such as ``zh_CN.UTF-8``; default $LANG).

    Returns:
        The language chosen, ``"en"`` or ``"zh"``.
    """
    chosen = cli_language(lang)
    MESSAGES.clear()
    MESSAGES.update(LOCALES[chosen])
    return chosen


#: The active texts (see :func:`set_language`).
MESSAGES: dict[str, str] = dict(LOCALES[cli_language()])

#: ``query --template`` names and the role mappings they stand for (None: the model's own
#: chat template, applied by the worker).
QUERY_TEMPLATES: dict[str, dict[str, Any] | None] = {
    "auto": None,
    "default": DEFAULT_ROLE_MAPPING,
    "empty": EMPTY_ROLE_MAPPING,
    **{
        name: factory().role_mapping
        for name, factory in TEMPLATE_NAMES.items()
        if name not in ("default", "empty")
    },
}
#: Generation settings that go with a ``query --template`` (e.g. the template's stop token ids).
QUERY_TEMPLATE_CONFIG: dict[str, dict[str, Any]] = {
    name: factory().generation_config for name, factory in TEMPLATE_NAMES.items()
}


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _non_negative_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must not be negative, got {value}")
    return value


def _positive_float(text: str) -> float:
    value = _non_negative_float(text)
    if value == 0:
        raise argparse.ArgumentTypeError("must be greater than 0")
    return value


def _num(value: float) -> str:
    """1.0 -> "1", 0.5 -> "0.5": resource counts read better without a trailing .0."""
    return f"{value:g}"


def _state(state: int) -> str:
    return common_pb2.ReplicaState.Name(state).removeprefix("REPLICA_STATE_")


def _client(args: argparse.Namespace) -> ByzerLLM:
    return ByzerLLM(control_plane=args.control_plane)


def _ready_count(model: cp.Model) -> int:
    return sum(r.state == common_pb2.REPLICA_STATE_READY for r in model.replicas)


# -- subcommands ---------------------------------------------------------------------------


def cmd_deploy(args: argparse.Namespace) -> int:
    """``llmesh deploy``: deploy a model, by default waiting until it is READY."""
    with _client(args) as llm:
        if llm.is_model_exist(args.model):
            print(MESSAGES["already_deployed"].format(args.model))
            return 0
        (
            llm.setup_gpus_per_worker(args.gpus_per_worker)
            .setup_cpus_per_worker(args.cpus_per_worker)
            .setup_num_workers(args.num_workers)
            .setup_infer_backend(args.infer_backend)
        )
        # Only an adapter deployment passes base_model, so plain deploys call as before.
        adapter = {"base_model": args.base_model} if args.base_model else {}
        llm.deploy(
            model_path=args.model_path,
            pretrained_model_type=args.pretrained_model_type,
            udf_name=args.model,
            infer_params=args.infer_params or {},
            wait=not args.no_wait,
            timeout=args.timeout,
            **adapter,
        )
        if args.no_wait:
            print(MESSAGES["deploy_accepted"].format(args.model, args.num_workers))
            return 0
        model = llm.get_model(args.model)
        print(
            MESSAGES["deploy_success"].format(
                args.model, _ready_count(model), model.num_replicas or len(model.replicas)
            )
        )
        for r in sorted(model.replicas, key=lambda r: r.index):
            print(f"  replica {r.index}: {_state(r.state)} on {r.worker_id} ({r.address})")
    return 0


def cmd_undeploy(args: argparse.Namespace) -> int:
    """``llmesh undeploy``: undeploy a model and wait until its replicas unloaded."""
    with _client(args) as llm:
        existed = llm.undeploy(args.model)
    key = "undeploy_success" if existed else "not_deployed"
    print(MESSAGES[key].format(args.model))
    return 0


def cmd_query(args: argparse.Namespace) -> int:
    """``llmesh query``: stream a model's answer to stdout as it arrives."""
    llm_config: dict[str, Any] = dict(QUERY_TEMPLATE_CONFIG.get(args.template, {}))
    if args.max_tokens is not None:
        llm_config["max_tokens"] = args.max_tokens
    role_mapping = QUERY_TEMPLATES[args.template]
    out = sys.stdout
    with _client(args) as llm:
        printed = 0
        stream = llm.stream_chat_oai(
            [{"role": "user", "content": args.query}],
            model=args.model,
            role_mapping=role_mapping,
            llm_config=llm_config,
        )
        try:
            for text, _meta in stream:
                out.write(text[printed:])
                out.flush()
                printed = len(text)
        finally:
            stream.close()  # on Ctrl-C this cancels the request on the worker
            if printed:
                out.write("\n")
                out.flush()
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    """``llmesh models``: a table of deployed models."""
    with _client(args) as llm:
        models = llm.list_models()
    if not models:
        print(MESSAGES["no_models"])
        return 0
    rows = []
    for m in sorted(models, key=lambda m: m.name):
        states = " ".join(
            f"{r.index}:{_state(r.state)}" + (f"({r.reason[:60]})" if r.reason else "")
            for r in sorted(m.replicas, key=lambda r: r.index)
        )
        total = m.num_replicas or len(m.replicas)
        rows.append([m.name, m.backend, f"{_ready_count(m)}/{total}", states or "-", m.model_path])
    print(format_table(["NAME", "BACKEND", "READY", "STATES", "PATH"], rows))
    return 0


def cmd_workers(args: argparse.Namespace) -> int:
    """``llmesh workers``: a table of live workers and what they host."""
    with _client(args) as llm:
        workers = llm.list_workers()
    if not workers:
        print(MESSAGES["no_workers"])
        return 0
    rows = [
        [
            w.id,
            w.address,
            w.kind or "-",
            f"{_num(w.cpus_used)}/{_num(w.cpus)}",
            f"{_num(w.gpus_used)}/{_num(w.gpus)}",
            ", ".join(w.replicas) or "-",
        ]
        for w in sorted(workers, key=lambda w: w.id)
    ]
    print(format_table(["ID", "ADDRESS", "KIND", "CPUS", "GPUS", "REPLICAS"], rows))
    return 0


def cmd_make_test_model(args: argparse.Namespace) -> int:
    """``llmesh make-test-model DIR``: build the small local test model."""
    try:
        from llmesh.testing import make_test_model
    except ImportError as exc:
        raise LLMeshError(f"the test model builder is not available ({exc})") from None
    path = make_test_model(Path(args.dir))
    print(MESSAGES["test_model_written"].format(path))
    return 0


# -- training jobs -------------------------------------------------------------------------


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
    with _client(args) as llm:
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
    with _client(args) as llm:
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
    with _client(args) as llm:
        job = llm.create_training_job(spec)
        return _created(llm, job, args)


def cmd_jobs(args: argparse.Namespace) -> int:
    """``llmesh jobs``: a table of training jobs, newest first."""
    with _client(args) as llm:
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
    with _client(args) as llm:
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
    with _client(args) as llm:
        before = llm.get_training_job(args.job_id)
        if is_final(before.state):
            print(MESSAGES["cancel_final"].format(before.id, _job_state(before.state)))
            return 0
        llm.cancel_training_job(args.job_id)
    print(MESSAGES["cancel_requested"].format(before.id, _job_state(before.state)))
    return 0


def cmd_job_watch(args: argparse.Namespace) -> int:
    """``llmesh job watch ID``: progress until the job ends; exit 0 only if it SUCCEEDED."""
    with _client(args) as llm:
        return watch_job(llm, args.job_id, loss_png=args.loss_png)


def _add_training_commands(
    subparsers: Any,
    common: argparse.ArgumentParser,
    add: Callable[[str, str, Callable[[argparse.Namespace], int]], Any],
) -> None:
    """``sft``, ``pretrain``, ``merge-lora``, ``jobs`` and ``job get|cancel|watch``."""

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
            type=_non_negative_float,
            default=0.0,
            help=MESSAGES["help_num_cpus"] + MESSAGES["default_suffix"],
        )
        sub.add_argument(
            "--num_gpus",
            type=_non_negative_float,
            default=0.0,
            help=MESSAGES["help_num_gpus"] + MESSAGES["default_suffix"],
        )
        sub.add_argument(
            "--num_ranks", type=_positive_int, default=None, help=MESSAGES["help_num_ranks"]
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


# -- parser --------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    """Build the ``llmesh`` argument parser (client and server subcommands)."""
    parser = argparse.ArgumentParser(prog="llmesh", description=MESSAGES["desc"])
    parser.add_argument("--version", action="version", version=f"llmesh {__version__}")
    parser.add_argument(
        "--control_plane", default=default_control_plane(), help=MESSAGES["help_control_plane"]
    )
    # Subcommands accept --control_plane too; SUPPRESS keeps a value given before the
    # subcommand from being overwritten by the subparser's default.
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--control_plane", default=argparse.SUPPRESS, help=MESSAGES["help_control_plane"]
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    subparsers.required = True

    def add(name: str, help_key: str, func: Callable[[argparse.Namespace], int]) -> Any:
        sub = subparsers.add_parser(
            name, parents=[common], help=MESSAGES[help_key], description=MESSAGES[help_key]
        )
        sub.set_defaults(func=func)
        return sub

    deploy = add("deploy", "help_deploy", cmd_deploy)
    deploy.add_argument("--model", required=True, help=MESSAGES["help_udf_name"])
    deploy.add_argument("--model_path", required=True, help=MESSAGES["help_model_path"])
    deploy.add_argument(
        "--pretrained_model_type",
        default="custom/auto",
        help=MESSAGES["help_pretrained_model_type"] + MESSAGES["default_suffix"],
    )
    deploy.add_argument(
        "--infer_backend",
        default="transformers",
        help=MESSAGES["help_infer_backend"] + MESSAGES["default_suffix"],
    )
    deploy.add_argument(
        "--num_workers",
        type=_positive_int,
        default=1,
        help=MESSAGES["help_num_workers"] + MESSAGES["default_suffix"],
    )
    deploy.add_argument(
        "--gpus_per_worker",
        type=_non_negative_float,
        default=0.0,
        help=MESSAGES["help_gpus_per_worker"] + MESSAGES["default_suffix"],
    )
    deploy.add_argument(
        "--cpus_per_worker",
        type=_positive_float,
        default=1.0,
        help=MESSAGES["help_cpus_per_worker"] + MESSAGES["default_suffix"],
    )
    deploy.add_argument(
        "--infer_params",
        nargs="+",
        action=InferParamsAction,
        default={},
        metavar="KEY=VALUE",
        help=MESSAGES["help_infer_params"],
    )
    deploy.add_argument(
        "--no-wait", dest="no_wait", action="store_true", help=MESSAGES["help_no_wait"]
    )
    deploy.add_argument(
        "--timeout",
        type=_positive_float,
        default=300.0,
        help=MESSAGES["help_timeout"] + MESSAGES["default_suffix"],
    )

    deploy.add_argument("--base_model", default=None, help=MESSAGES["help_base_model"])

    undeploy = add("undeploy", "help_undeploy", cmd_undeploy)
    undeploy.add_argument("--model", required=True, help=MESSAGES["help_udf_name"])

    query = add("query", "help_query", cmd_query)
    query.add_argument("--model", required=True, help=MESSAGES["help_query_model"])
    query.add_argument("--query", required=True, help=MESSAGES["help_query_text"])
    query.add_argument(
        "--template",
        default="auto",
        choices=sorted(QUERY_TEMPLATES),
        help=MESSAGES["help_template"] + MESSAGES["default_suffix"],
    )
    query.add_argument(
        "--max_tokens", type=_positive_int, default=None, help=MESSAGES["help_max_tokens"]
    )

    add("models", "help_models", cmd_models)
    add("workers", "help_workers", cmd_workers)
    _add_training_commands(subparsers, common, add)

    make = subparsers.add_parser(
        "make-test-model",
        help=MESSAGES["help_make_test_model"],
        description=MESSAGES["help_make_test_model"],
    )
    make.add_argument("dir", metavar="DIR", help=MESSAGES["help_dir"])
    make.set_defaults(func=cmd_make_test_model)

    bench = subparsers.add_parser(
        "bench", help=MESSAGES["help_bench"], description=MESSAGES["help_bench"]
    )
    bench_command.add_arguments(bench)
    bench.set_defaults(func=bench_command.run)

    cli_servers.add_server_commands(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``llmesh`` command and return its exit code.

    Args:
        argv: the arguments after the program name; None reads ``sys.argv[1:]``.

    Returns:
        0 on success, 1 for an llmesh error, 2 for bad usage (argparse errors, a bad
        ``--infer_params`` token, other invalid values), 130 when interrupted.
    """
    set_language()
    parser = build_parser()
    try:
        args = parser.parse_args(None if argv is None else list(argv))
    except SystemExit as exc:  # argparse exits for --help, --version and usage errors
        code = exc.code
        return code if isinstance(code, int) else (0 if code is None else 2)
    func = getattr(args, "func", None)
    if func is None:
        parser.print_usage(sys.stderr)
        return 2
    try:
        result = func(args)
    except LLMeshError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
