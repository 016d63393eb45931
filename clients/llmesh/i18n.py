"""The command line's texts in English and Chinese, and which language is active.

``llmesh`` and ``llmesh bench`` speak Chinese when ``$LANG`` names a Chinese locale (as Byzer-LLM's
``byzerllm`` command does), English otherwise. The client subcommands' texts live in the tables
below; the server, demo and benchmark subcommands pair their texts inline with :func:`t`. This
module imports no other part of the command line, so every subcommand module can import it.
"""

from __future__ import annotations

import os

from llmesh.infer_params import ACCEPTED_FORMS

# Every user-facing string in one table per language; MESSAGES holds the active one.
MESSAGES_EN: dict[str, str] = {
    "desc": "llmesh: serve LLMs on a gRPC mesh (Byzer-LLM compatible)",
    "help_control_plane": "control plane address host:port "
    "(default: $LLMESH_CONTROL_PLANE or 127.0.0.1:50051)",
    "help_token": "bearer token sent on every call (default: $LLMESH_TOKEN); "
    "needed when the mesh runs with --auth. Other users on this machine can read a command "
    "line (ps), so prefer LLMESH_TOKEN",
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
    "help_token": "每次调用携带的访问令牌（默认：$LLMESH_TOKEN）；网格以 --auth 运行时需要。"
    "本机其他用户能看到命令行（ps），请优先使用 LLMESH_TOKEN",
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
    """``"zh"`` when ``lang`` (default: ``$LANG``) names a Chinese locale, else ``"en"``.

    Args:
        lang: a locale such as ``zh_CN.UTF-8``; None reads ``$LANG``.
    """
    value = os.environ.get("LANG", "en") if lang is None else lang
    return "zh" if value.split(".")[0].lower().startswith("zh") else "en"


def set_language(lang: str | None = None) -> str:
    """Switch the CLI's texts to ``lang`` (a locale such as ``zh_CN.UTF-8``; default $LANG).

    Args:
        lang: a locale such as ``zh_CN.UTF-8``; None reads ``$LANG``.

    Returns:
        The language chosen, ``"en"`` or ``"zh"``.
    """
    chosen = cli_language(lang)
    MESSAGES.clear()
    MESSAGES.update(LOCALES[chosen])
    return chosen


#: The active texts (see :func:`set_language`).
MESSAGES: dict[str, str] = dict(LOCALES[cli_language()])


def chinese() -> bool:
    """Whether the command line speaks Chinese now (``$LANG``, or :func:`set_language`)."""
    return MESSAGES.get("desc") == MESSAGES_ZH["desc"]


def t(en: str, zh: str) -> str:
    """The text for the active language.

    Args:
        en: the English text.
        zh: the same text in Chinese.

    Returns:
        ``zh`` while the command line speaks Chinese, else ``en``.
    """
    return zh if chinese() else en
