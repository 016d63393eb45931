"""Training jobs: Byzer-LLM's ``sft``, ``pretrain`` and ``merge_lora``, and job handling.

The specs come from :mod:`llmesh.training` (Byzer-LLM's parameters, checked before anything is
sent). Each method here is an operation (see :mod:`llmesh.sdk.ops`), shared by ``ByzerLLM``
and ``AsyncByzerLLM``; the job watches are the transports' streams.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import AsyncIterator, Callable, Iterator, Mapping, Sequence
from typing import Any

from llmesh import training, training_watch
from llmesh.common.errors import DeadlineExceeded, InvalidArgument, Unavailable
from llmesh.common.job_rules import is_final, kind_name, state_name, validate_spec
from llmesh.route_cache import CONTROL_CALL_TIMEOUT_S
from llmesh.sdk.ops import ControlCall, Sleep, Steps, WatchJob, operation, steps
from llmesh.sdk.transport import AsyncTransport, SyncTransport
from llmesh.v1 import control_plane_service_pb2 as cp
from llmesh.v1 import trainer_service_pb2 as tr

log = logging.getLogger(__name__)

#: Attempts of CreateTrainingJob on UNAVAILABLE / DEADLINE_EXCEEDED (same request_id each time).
CREATE_JOB_ATTEMPTS = 4


class TrainingMixin:
    """Training-job methods; needs the client's ``transport`` and ``aio_transport``."""

    transport: SyncTransport
    aio_transport: AsyncTransport

    @operation
    def create_training_job(
        self, spec: tr.TrainingJobSpec, *, request_id: str | None = None
    ) -> Steps[tr.TrainingJob]:
        """Submit a training job as it is (the building blocks of :meth:`sft` and friends).

        A lost reply or an unreachable control plane is retried with the same ``request_id``,
        so a retry never starts a second job.

        Args:
            spec: what to train; checked with :func:`llmesh.common.job_rules.validate_spec` first.
            request_id: idempotency key; a new UUID when None. A second call with the same
                key returns the first call's job.

        Returns:
            The job, QUEUED (or further along when ``request_id`` was used before).
        """
        validate_spec(spec)
        request = cp.CreateTrainingJobRequest(spec=spec, request_id=request_id or str(uuid.uuid4()))
        delay = 0.2
        for attempt in range(1, CREATE_JOB_ATTEMPTS + 1):
            try:
                response = yield ControlCall("CreateTrainingJob", request, CONTROL_CALL_TIMEOUT_S)
                return response.job
            except (Unavailable, DeadlineExceeded):
                # Safe to repeat: the request_id makes the control plane answer with the job
                # the first attempt created, if it got that far.
                if attempt == CREATE_JOB_ATTEMPTS:
                    raise
                yield Sleep(delay)
                delay = min(delay * 2, 2.0)
        raise AssertionError("unreachable")  # pragma: no cover - the loop returns or raises

    @operation
    def get_training_job(self, job_id: str) -> Steps[tr.TrainingJob]:
        """The training job with its state, latest progress and artifact.

        Args:
            job_id: the id :meth:`sft` (or ``llmesh jobs``) gave.

        Raises:
            NotFound: no such job.
        """
        if not job_id:
            raise InvalidArgument("get_training_job needs a job id (see list_training_jobs)")
        response = yield ControlCall(
            "GetTrainingJob", cp.GetTrainingJobRequest(id=job_id), CONTROL_CALL_TIMEOUT_S
        )
        return response.job

    @operation
    def list_training_jobs(
        self, states: Sequence[str | int] | str | None = None
    ) -> Steps[list[tr.TrainingJob]]:
        """Training jobs, newest first.

        Args:
            states: only jobs in these states, by name (``"running"``, ``"SUCCEEDED"``) or
                ``TrainingJobState`` value; None for all.
        """
        request = cp.ListTrainingJobsRequest(states=training_watch.parse_states(states))
        response = yield ControlCall("ListTrainingJobs", request, CONTROL_CALL_TIMEOUT_S)
        return list(response.jobs)

    @operation
    def cancel_training_job(self, job_id: str) -> Steps[tr.TrainingJob]:
        """Ask for a job to stop; its ranks are stopped and it ends CANCELLED.

        Cancelling a job that already ended changes nothing and is not an error.

        Returns:
            The job after the cancel was recorded (``cancel_requested`` set).

        Raises:
            NotFound: no such job.
        """
        if not job_id:
            raise InvalidArgument("cancel_training_job needs a job id (see list_training_jobs)")
        response = yield ControlCall(
            "CancelTrainingJob", cp.CancelTrainingJobRequest(id=job_id), CONTROL_CALL_TIMEOUT_S
        )
        return response.job

    def watch_training_job(
        self, job_id: str, after_sequence: int = 0, *, timeout: float | None = None
    ) -> Iterator[tuple[tr.TrainingJob, tr.TrainingJobEvent | None]]:
        """Follow a job: yields ``(job, event)`` until the job is final and its log is read.

        ``job`` is the job as it is after ``event`` (progress, state and artifact applied);
        ``event`` is None for a message that only carries the job (the first one, for
        instance). A dropped stream (control plane restart) is resumed after the last event
        seen, so no event is lost or repeated. Closing the iterator ends the watch; the job
        keeps running.

        Args:
            job_id: the job.
            after_sequence: skip events up to this sequence number (0: the whole history).
            timeout: give up after this many seconds (the job keeps running).

        Raises:
            NotFound: no such job.
            DeadlineExceeded: ``timeout`` passed before the job ended.
        """
        return self.transport.watch_training_job(job_id, after_sequence, timeout=timeout)

    def async_watch_training_job(
        self, job_id: str, after_sequence: int = 0, *, timeout: float | None = None
    ) -> AsyncIterator[tuple[tr.TrainingJob, tr.TrainingJobEvent | None]]:
        """:meth:`watch_training_job` as a grpc.aio stream on the running event loop.

        Same items, resume and timeout rules; leaving the ``async for`` ends the stream.
        """
        return self.aio_transport.watch_training_job(job_id, after_sequence, timeout=timeout)

    @operation
    def wait_training_job(
        self,
        job_id: str,
        *,
        timeout: float | None = None,
        on_event: Callable[[tr.TrainingJob, tr.TrainingJobEvent | None], None] | None = None,
    ) -> Steps[tr.TrainingJob]:
        """Wait until a job ends and return it; raise if it did not succeed.

        Args:
            job_id: the job.
            timeout: give up after this many seconds (the job keeps running).
            on_event: called with every ``(job, event)`` of :meth:`watch_training_job`.

        Raises:
            TrainingJobFailed: the job ended FAILED or CANCELLED (``exc.job.reason`` says why).
            DeadlineExceeded: ``timeout`` passed first.
        """
        job: tr.TrainingJob | None = yield WatchJob(job_id, timeout, on_event)
        if (
            job is None
            or not is_final(job.state)
            or (job.state == tr.TRAINING_JOB_STATE_SUCCEEDED and not job.artifact.path)
        ):
            job = yield from steps(self.get_training_job)(job_id)  # the record is the last word
        if job.state != tr.TRAINING_JOB_STATE_SUCCEEDED:
            raise training.TrainingJobFailed(job)
        return job

    def _submit(
        self,
        spec: tr.TrainingJobSpec,
        *,
        name: str,
        detached: bool,
        request_id: str | None,
        timeout: float | None,
    ) -> Steps[tr.TrainingJob]:
        job = yield from steps(self.create_training_job)(spec, request_id=request_id)
        log.info(
            "training job %s (%s%s) is %s",
            job.id,
            kind_name(job.spec.kind),
            f", {name}" if name else "",
            state_name(job.state),
        )
        if detached:
            return job
        return (yield from steps(self.wait_training_job)(job.id, timeout=timeout))

    @operation
    def sft(
        self,
        sft_name: str,
        local_data_dir_path: str,
        local_model_path: str,
        local_stage_path: str = "",
        pretrained_model_type: str = "custom/auto",
        num_cpus: float = 0,
        num_gpus: float = 0,
        detached: bool = True,
        json_config: str | Mapping[str, Any] = "{}",
        model_params: Mapping[str, Any] | None = None,
        *,
        num_ranks: int = 0,
        method: str | None = None,
        template: str | None = None,
        resume: bool | None = None,
        request_id: str | None = None,
        timeout: float | None = None,
    ) -> Steps[tr.TrainingJob]:
        """Fine-tune a model on a trainer worker (Byzer-LLM's ``sft``).

        Paths are on the trainer worker's file system.

        Args:
            sft_name: a name for this run, used in log lines (the job id is the handle).
            local_data_dir_path: ``data.jsonl`` (alpaca rows, or chat rows with ``messages``)
                or a directory holding it.
            local_model_path: the base model directory (HuggingFace layout).
            local_stage_path: where the adapter / model and checkpoints go; empty lets the
                worker choose (its jobs directory / job id).
            pretrained_model_type: Byzer-LLM's model family; accepted and not needed.
            num_cpus: CPUs the job reserves (0: one per rank).
            num_gpus: GPUs the job reserves.
            detached: return the QUEUED job at once (True, Byzer-LLM's default) or wait until
                it ends and return it.
            json_config: a DeepSpeed config as JSON text (or a dict); training keys in it
                (``num_train_epochs``, ``lora_rank``, ...) count as ``model_params``, which win.
            model_params: Byzer-LLM typed keys (``sft.int.num_train_epochs``,
                ``sft.float.learning_rate``, ``sft.int.lora_rank``, ``sft.str.finetuning_type``)
                or plain names (``max_steps``, ``lora_r``, ``target_modules``, ``method``).
            num_ranks: ranks under the DeepSpeed launcher (0: one).
            method: ``"lora"`` (default) or ``"full"``.
            template: ``"auto"`` (default), ``"alpaca"`` or ``"chat"``.
            resume: resume from a checkpoint in ``local_stage_path`` (default true).
            request_id: idempotency key for the create call; a new UUID when None.
            timeout: with ``detached=False``, how long to wait, in seconds.

        Returns:
            The ``TrainingJob`` (protobuf): QUEUED when detached, SUCCEEDED otherwise, with
            ``artifact.path`` the adapter (LoRA) or model (full) directory.

        Raises:
            InvalidArgument: an unknown ``model_params`` key or a bad value, before anything
                is sent.
            TrainingJobFailed: not detached and the job FAILED or was CANCELLED.
        """
        del pretrained_model_type  # Byzer-LLM picked a training module by it; one runner here
        spec = training.sft_spec(
            local_data_dir_path=local_data_dir_path,
            local_model_path=local_model_path,
            local_stage_path=local_stage_path,
            num_cpus=num_cpus,
            num_gpus=num_gpus,
            json_config=json_config,
            model_params=model_params,
            num_ranks=num_ranks,
            method=method,
            template=template,
            resume=resume,
        )
        return (
            yield from self._submit(
                spec, name=sft_name, detached=detached, request_id=request_id, timeout=timeout
            )
        )

    @operation
    def pretrain(
        self,
        name: str,
        local_data_dir_path: str,
        local_model_path: str,
        local_stage_path: str = "",
        pretrained_model_type: str = "custom/auto",
        num_cpus: float = 0,
        num_gpus: float = 0,
        detached: bool = True,
        json_config: str | Mapping[str, Any] = "{}",
        model_params: Mapping[str, Any] | None = None,
        *,
        num_ranks: int | None = None,
        resume: bool | None = None,
        request_id: str | None = None,
        timeout: float | None = None,
    ) -> Steps[tr.TrainingJob]:
        """Train a causal LM from its config on raw text (Byzer-LLM's ``pretrain``).

        Args:
            name: a name for this run, used in log lines.
            local_data_dir_path: a .txt file, a directory of them, or jsonl rows with ``text``.
            local_model_path: a directory with ``config.json`` and the tokenizer; the model is
                built from that config with fresh weights.
            local_stage_path: output directory; empty lets the worker choose.
            pretrained_model_type: Byzer-LLM's model family; accepted and not needed.
            num_cpus: CPUs the job reserves (0: one per rank).
            num_gpus: GPUs the job reserves.
            detached: return at once (True) or wait until the job ends.
            json_config: the DeepSpeed config (JSON text or a dict).
            model_params: ``pretrain.<type>.<name>`` keys (Byzer-LLM's ``sfft.`` prefix too:
                ``sfft.int.max_length``, ``sfft.int.epoches``, ``sfft.int.steps_per_epoch``,
                ``sfft.str.tokenizer_path``) or plain names.
            num_ranks: ranks under the DeepSpeed launcher; None: one per whole GPU, at least 1.
            resume: resume from a checkpoint in ``local_stage_path`` (default true).
            request_id: idempotency key for the create call; a new UUID when None.
            timeout: with ``detached=False``, how long to wait, in seconds.

        Returns:
            The ``TrainingJob``; when it SUCCEEDED, ``artifact.path`` is the model directory.

        Raises:
            InvalidArgument: an unknown key or a bad value.
            TrainingJobFailed: not detached and the job FAILED or was CANCELLED.
        """
        del pretrained_model_type
        spec = training.pretrain_spec(
            local_data_dir_path=local_data_dir_path,
            local_model_path=local_model_path,
            local_stage_path=local_stage_path,
            num_cpus=num_cpus,
            num_gpus=num_gpus,
            json_config=json_config,
            model_params=model_params,
            num_ranks=num_ranks,
            resume=resume,
        )
        return (
            yield from self._submit(
                spec, name=name, detached=detached, request_id=request_id, timeout=timeout
            )
        )

    @operation
    def merge_lora(
        self,
        name: str,
        local_model_path: str,
        local_adpator_model_path: str,
        local_target_path: str,
        *,
        request_id: str | None = None,
        timeout: float | None = None,
    ) -> Steps[str]:
        """Merge a LoRA adapter into its base model and wait (Byzer-LLM's ``merge_lora``).

        Args:
            name: a name for this run, used in log lines.
            local_model_path: the base model directory.
            local_adpator_model_path: the adapter directory (Byzer-LLM's spelling).
            local_target_path: where the merged model goes; empty lets the worker choose.
            request_id: idempotency key for the create call; a new UUID when None.
            timeout: how long to wait, in seconds.

        Returns:
            The merged model's directory, the job's artifact: ``<local_target_path>/model``
            (the target directory also holds the job's event log), or under the worker's jobs
            directory when ``local_target_path`` was empty. Byzer-LLM returned
            ``local_target_path`` itself.

        Raises:
            TrainingJobFailed: the merge FAILED or was CANCELLED.
        """
        spec = training.merge_lora_spec(
            local_model_path=local_model_path,
            local_adapter_path=local_adpator_model_path,
            local_target_path=local_target_path,
        )
        job = yield from self._submit(
            spec, name=name, detached=False, request_id=request_id, timeout=timeout
        )
        return job.artifact.path

    @operation
    def raw_sft(
        self, train_params: Mapping[str, Any], sys_conf: Mapping[str, Any] | None = None
    ) -> Steps[tr.TrainingJob]:
        """Byzer-LLM's ``raw_sft``: :meth:`sft` from Byzer's ``train_params`` keys.

        ``name``, ``data_dir``, ``localModelDir``, ``localPathPrefix``, ``config`` and
        ``detached`` (``"true"``; default false) are read; every other key (``sft.int.*``, ...)
        is a model parameter. ``sys_conf`` gives ``num_cpus`` and ``num_gpus``.
        """
        params = dict(train_params)
        conf = dict(sys_conf or {})
        return (
            yield from steps(self.sft)(
                str(params.pop("name", "")),
                _required(params, "data_dir", "raw_sft"),
                _required(params, "localModelDir", "raw_sft"),
                str(params.pop("localPathPrefix", "")),
                str(params.pop("pretrainedModelType", "")),
                float(conf.get("num_cpus", 0)),
                float(conf.get("num_gpus", 0)),
                detached=str(params.pop("detached", "false")).lower() == "true",
                json_config=params.pop("config", "{}"),
                model_params=params,
            )
        )

    @operation
    def raw_pretrain(
        self, train_params: Mapping[str, Any], sys_conf: Mapping[str, Any] | None = None
    ) -> Steps[tr.TrainingJob]:
        """Byzer-LLM's ``raw_pretrain``: :meth:`pretrain` from Byzer's ``train_params`` keys.

        ``name``, ``localDataDir``, ``localModelDir``, ``localPathPrefix``,
        ``deepspeedConfig`` and ``detached`` are read; other keys (``sfft.int.*``, ...) are
        model parameters. ``sys_conf`` gives ``num_cpus`` and ``num_gpus``.
        """
        params = dict(train_params)
        conf = dict(sys_conf or {})
        return (
            yield from steps(self.pretrain)(
                str(params.pop("name", "")),
                _required(params, "localDataDir", "raw_pretrain"),
                _required(params, "localModelDir", "raw_pretrain"),
                str(params.pop("localPathPrefix", "")),
                str(params.pop("pretrainedModelType", "")),
                float(conf.get("num_cpus", 0)),
                float(conf.get("num_gpus", 0)),
                detached=str(params.pop("detached", "false")).lower() == "true",
                json_config=params.pop("deepspeedConfig", "{}"),
                model_params=params,
            )
        )

    @operation
    def raw_merge_lora(
        self, train_params: Mapping[str, Any], sys_conf: Mapping[str, Any] | None = None
    ) -> Steps[str]:
        """Byzer-LLM's ``raw_merge_lora``: ``modelNameOrPath``, ``adapterNameOrPath``, ``savePath``.

        Returns:
            The merged model's directory (Byzer-LLM returned None).
        """
        del sys_conf  # Byzer-LLM ignored it too
        params = dict(train_params)
        unknown = sorted(set(params) - {"name", "modelNameOrPath", "adapterNameOrPath", "savePath"})
        if unknown:
            raise InvalidArgument(
                f"raw_merge_lora does not know {unknown[0]!r}; it reads name, modelNameOrPath, "
                "adapterNameOrPath and savePath"
            )
        return (
            yield from steps(self.merge_lora)(
                str(params.get("name", "")),
                _required(params, "modelNameOrPath", "raw_merge_lora"),
                _required(params, "adapterNameOrPath", "raw_merge_lora"),
                str(params.get("savePath", "")),
            )
        )


def _required(params: dict[str, Any], key: str, method: str) -> str:
    """Pop a key Byzer-LLM's raw_* methods need, with a clear error when it is missing."""
    value = params.pop(key, None)
    if not value:
        raise InvalidArgument(f"{method} needs train_params[{key!r}]")
    return str(value)
