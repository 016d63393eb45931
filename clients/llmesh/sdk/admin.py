"""Deploying models and adapters, and the control plane's views of the mesh.

Each method is an operation (see :mod:`llmesh.sdk.ops`), shared by ``ByzerLLM`` and
``AsyncByzerLLM``. The deploy settings come from the ``setup_*`` methods (``sys_conf``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from llmesh.common.errors import InvalidArgument, NotFound
from llmesh.common.job_rules import state_name
from llmesh.route_cache import CONTROL_CALL_TIMEOUT_S
from llmesh.sdk.channels import Router
from llmesh.sdk.ops import ControlCall, Steps, operation, steps
from llmesh.sdk.results import param_str
from llmesh.sdk.settings import Settings
from llmesh.sdk.shapes import normalize_backend
from llmesh.v1 import control_plane_service_pb2 as cp
from llmesh.v1 import trainer_service_pb2 as tr


class AdminMixin(Settings):
    """``deploy``, ``undeploy``, ``deploy_adapter`` and the model / worker views.

    Needs ``get_meta`` (the meta a deploy returns), ``get_training_job`` (``deploy_adapter``)
    and ``router`` (an undeploy forgets the model's routes).
    """

    router: Router
    meta_cache: dict[str, dict[str, Any]]

    @operation
    def deploy(
        self,
        model_path: str,
        pretrained_model_type: str,
        udf_name: str,
        infer_params: Mapping[str, Any] | None = None,
        *,
        wait: bool = True,
        timeout: float = 300.0,
        base_model: str | None = None,
    ) -> Steps[dict[str, Any]]:
        """Deploy a model with the settings from ``setup_*``.

        Replicas come from ``setup_num_workers``, CPUs/GPUs per replica from
        ``setup_cpus_per_worker`` / ``setup_gpus_per_worker``, the engine from
        ``setup_infer_backend`` (default ``transformers``) and ``setup_worker_concurrency``
        becomes infer_params ``max_concurrency``.

        Args:
            model_path: the model directory (HuggingFace layout) as the workers see it.
            pretrained_model_type: Byzer-LLM's model family, e.g. ``"custom/auto"``; recorded.
            udf_name: the name clients use for the model.
            infer_params: engine parameters; non-string values are sent as JSON.
            wait: block until every replica is READY (or one fails).
            timeout: how long to wait, in seconds.
            base_model: deploy ``model_path`` as a LoRA adapter served on the replicas of this
                deployed base model (see :meth:`deploy_adapter`); the replica settings then
                come from the base model.

        Returns:
            The model's meta dict (see :meth:`get_meta`) once READY, as Byzer-LLM returned;
            ``{}`` when ``wait`` is False.
        """
        if not udf_name:
            raise InvalidArgument("deploy needs udf_name, the name clients will use")
        params = {str(k): param_str(v) for k, v in (infer_params or {}).items()}
        concurrency = self.sys_conf.get("workerMaxConcurrency")
        if concurrency is not None and "max_concurrency" not in params:
            params["max_concurrency"] = str(int(concurrency))
        model = cp.Model(
            name=udf_name,
            model_path=model_path,
            backend=normalize_backend(self.sys_conf.get("infer_backend") or "transformers"),
            infer_params=params,
            num_replicas=int(self.sys_conf.get("maxConcurrency", 1)),
            cpus_per_replica=float(self.sys_conf.get("num_cpus", 1)),
            gpus_per_replica=float(self.sys_conf.get("num_gpus", 0)),
            pretrained_model_type=pretrained_model_type,
            base_model=base_model or "",
        )
        yield ControlCall(
            "DeployModel",
            cp.DeployModelRequest(model=model, wait_ready=wait, timeout_seconds=timeout),
            # The server enforces `timeout`; the deadline only guards against a hung server.
            (timeout + 30.0) if wait else CONTROL_CALL_TIMEOUT_S,
        )
        self.meta_cache.pop(udf_name, None)
        if not wait:
            return {}
        return (yield from steps(self.get_meta)(udf_name))

    @operation
    def undeploy(self, udf_name: str, *, wait: bool = True, timeout: float = 60.0) -> Steps[bool]:
        """Undeploy a model; a model that is not deployed is not an error (as in Byzer-LLM).

        Args:
            udf_name: the model name.
            wait: block until every replica has unloaded.
            timeout: how long to wait, in seconds.

        Returns:
            True when the model was deployed, False when there was nothing to undeploy.
        """
        self.meta_cache.pop(udf_name, None)
        try:
            yield ControlCall(
                "UndeployModel",
                cp.UndeployModelRequest(name=udf_name, wait=wait, timeout_seconds=timeout),
                (timeout + 30.0) if wait else CONTROL_CALL_TIMEOUT_S,
            )
        except NotFound:
            return False
        finally:
            self.router.routes.forget(udf_name)
        return True

    @operation
    def is_model_exist(self, udf_name: str) -> Steps[bool]:
        """True when a model with this name is deployed.

        Args:
            udf_name: the model name.

        Raises:
            Unavailable: the control plane cannot be reached (not reported as "absent").
        """
        try:
            yield from steps(self.get_model)(udf_name)
        except NotFound:
            return False
        return True

    @operation
    def get_model(self, name: str) -> Steps[cp.Model]:
        """The deployed model with its replicas.

        Args:
            name: the model name.

        Raises:
            NotFound: no such model.
        """
        response = yield ControlCall(
            "GetModel", cp.GetModelRequest(name=name), CONTROL_CALL_TIMEOUT_S
        )
        return response.model

    @operation
    def list_models(self) -> Steps[list[cp.Model]]:
        """Every deployed model with its replicas, sorted by name."""
        response = yield ControlCall("ListModels", cp.ListModelsRequest(), CONTROL_CALL_TIMEOUT_S)
        return list(response.models)

    @operation
    def list_workers(self) -> Steps[list[cp.Worker]]:
        """Every live worker, sorted by id."""
        response = yield ControlCall("ListWorkers", cp.ListWorkersRequest(), CONTROL_CALL_TIMEOUT_S)
        return list(response.workers)

    @operation
    def deploy_adapter(
        self,
        name: str,
        job_or_path: str | tr.TrainingJob,
        base_model: str,
        *,
        infer_params: Mapping[str, Any] | None = None,
        wait: bool = True,
        timeout: float = 300.0,
    ) -> Steps[dict[str, Any]]:
        """Serve a LoRA adapter on the replicas of a deployed base model.

        Args:
            name: the name clients use for the adapter model.
            job_or_path: a SUCCEEDED LoRA job (its id or the ``TrainingJob``) whose artifact
                is deployed, or an adapter directory path on the workers (anything with a
                ``/`` in it is read as a path).
            base_model: the deployed model whose replicas serve the adapter.
            infer_params: engine parameters for the adapter.
            wait: block until the adapter is READY.
            timeout: how long to wait, in seconds.

        Returns:
            As :meth:`deploy`: the adapter's meta once READY, ``{}`` when ``wait`` is False.

        Raises:
            InvalidArgument: the job did not succeed or did not produce a LoRA adapter.
            NotFound: no job with that id.
        """
        if not base_model:
            raise InvalidArgument("deploy_adapter needs base_model, the deployed model to use")
        if isinstance(job_or_path, tr.TrainingJob):
            path = _adapter_path(job_or_path)
        elif "/" in str(job_or_path) or str(job_or_path).startswith(("~", ".")):
            path = str(job_or_path)
        else:
            try:
                job = yield from steps(self.get_training_job)(str(job_or_path))
            except NotFound:
                raise NotFound(
                    f"no training job {job_or_path!r}; to deploy an adapter directory pass its "
                    "path (with a '/', e.g. ./adapter)"
                ) from None
            path = _adapter_path(job)
        return (
            yield from steps(self.deploy)(
                model_path=path,
                pretrained_model_type="custom/lora",
                udf_name=name,
                infer_params=infer_params,
                wait=wait,
                timeout=timeout,
                base_model=base_model,
            )
        )


def _adapter_path(job: tr.TrainingJob) -> str:
    """The LoRA adapter a finished job produced, or why there is none."""
    if job.state != tr.TRAINING_JOB_STATE_SUCCEEDED:
        raise InvalidArgument(
            f"training job {job.id} is {state_name(job.state)}; only a SUCCEEDED job has an "
            "adapter to deploy"
        )
    if job.artifact.kind != tr.ARTIFACT_KIND_LORA_ADAPTER:
        raise InvalidArgument(
            f"training job {job.id} produced a full model at {job.artifact.path}, not a LoRA "
            "adapter; deploy it with deploy(model_path=...)"
        )
    return job.artifact.path
