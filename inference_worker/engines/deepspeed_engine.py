"""The ``deepspeed`` backend: a transformers causal LM wrapped by ``deepspeed.init_inference``.

Everything a request sees — streaming deltas merged for slow consumers, stop strings and ids,
sampling, structured output, abort checked every step — is the transformers engine's decode
loop; only the forward pass goes through DeepSpeed's ``InferenceEngine`` (kernel injection and
CUDA graphs on GPU, the plain module on CPU).

On CPU DeepSpeed needs ``DS_ACCELERATOR=cpu`` before it is first imported; the engine sets it
when the worker has no GPU and refuses to start when DeepSpeed was already imported for another
accelerator in this process.

infer_params understood: those of the transformers backend, plus

``tensor_parallel_size``
    DeepSpeed's ``tp_size``. One worker process is one rank, so only 1 works today; a larger
    value is refused before anything loads (serving one replica from several ranks needs the
    ranks to decode in lockstep, which the worker does not do yet).
``kernel_inject``
    ``true`` to let DeepSpeed replace layers with its fused inference kernels (GPU only;
    default false).
``enable_cuda_graph``
    ``true`` to capture CUDA graphs (GPU only; default false).
"""

from __future__ import annotations

import logging
import os
from typing import Any

from llmesh.common.errors import FailedPrecondition, InvalidArgument
from llmesh.inference_worker.engines.base import EngineConfig, ModelMeta
from llmesh.inference_worker.engines.transformers_engine import (
    INFER_PARAMS as TRANSFORMERS_PARAMS,
)
from llmesh.inference_worker.engines.transformers_engine import (
    TransformersEngine,
    int_param,
)

log = logging.getLogger(__name__)

INFER_PARAMS = (*TRANSFORMERS_PARAMS, "tensor_parallel_size", "kernel_inject", "enable_cuda_graph")

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"", "0", "false", "no", "off"}


def _bool_param(params: dict[str, str], key: str) -> bool:
    raw = str(params.get(key, "")).strip().lower()
    if raw in _TRUE:
        return True
    if raw in _FALSE:
        return False
    raise InvalidArgument(f"infer_params {key}={params[key]!r} is not a boolean; use true or false")


class DeepSpeedEngine(TransformersEngine):
    """A causal LM served through ``deepspeed.init_inference`` (see the module docstring).

    Args:
        config: ``model_path`` is a HuggingFace-layout directory; ``infer_params`` as the
            transformers backend plus ``tensor_parallel_size``, ``kernel_inject`` and
            ``enable_cuda_graph``.
    """

    backend = "deepspeed"
    infer_params = INFER_PARAMS

    def __init__(self, config: EngineConfig) -> None:
        super().__init__(config)
        params = self._params
        tp = int_param(params, "tensor_parallel_size") or 1
        if tp != 1:
            raise InvalidArgument(
                f"infer_params tensor_parallel_size={tp} is not supported by the deepspeed "
                "backend yet: a worker serves a replica from one process (one rank); use 1, or "
                "backend vllm for tensor parallelism"
            )
        self._tp_size = tp
        self._kernel_inject = _bool_param(params, "kernel_inject")
        self._cuda_graph = _bool_param(params, "enable_cuda_graph")
        self._ds_version = ""

    def _load(self, path: str, device: str) -> None:
        if device == "cpu":
            if self._kernel_inject or self._cuda_graph:
                raise InvalidArgument(
                    "infer_params kernel_inject and enable_cuda_graph need a GPU; this replica "
                    "runs on the CPU, so leave them unset (or deploy with device=cuda)"
                )
            # Read by DeepSpeed at import; a worker without GPUs would otherwise probe for
            # CUDA and fail to import.
            os.environ.setdefault("DS_ACCELERATOR", "cpu")
        import deepspeed
        from deepspeed.accelerator import get_accelerator

        accel = get_accelerator().device_name()
        want = "cpu" if device == "cpu" else "cuda"
        if accel != want:
            raise FailedPrecondition(
                f"DeepSpeed in this worker process was set up for the {accel!r} accelerator but "
                f"model {self.config.model_name} is to run on {device!r}; run the worker with "
                f"DS_ACCELERATOR={want} (one accelerator kind per worker process)"
            )
        super()._load(path, device)
        model = self._model
        try:
            ds = deepspeed.init_inference(
                model,
                tensor_parallel={"tp_size": self._tp_size},
                dtype=next(model.parameters()).dtype,
                replace_with_kernel_inject=self._kernel_inject,
                enable_cuda_graph=self._cuda_graph,
            )
        except (RuntimeError, ValueError, NotImplementedError, AssertionError) as exc:
            self._model = None
            raise FailedPrecondition(
                f"deepspeed.init_inference failed for model {self.config.model_name}: {exc}"
            ) from exc
        # Every forward pass of the decode loop goes through DeepSpeed's engine; the module
        # (ds.module) is the same object, so weights are not copied.
        self._model = ds
        self._ds_version = str(deepspeed.__version__)
        log.info(
            "deepspeed %s inference engine for %s (accelerator %s, tp %d, kernel_inject %s)",
            self._ds_version,
            self.config.model_name,
            accel,
            self._tp_size,
            self._kernel_inject,
        )

    def meta(self) -> ModelMeta:
        """The transformers meta with the DeepSpeed version and settings."""
        meta = super().meta()
        meta.extra.update(
            {
                "deepspeed_version": self._ds_version,
                "tensor_parallel_size": str(self._tp_size),
                "kernel_inject": str(self._kernel_inject).lower(),
            }
        )
        return meta

    @property
    def hf_model(self) -> Any:
        """The transformers module inside DeepSpeed's engine (None before start)."""
        return getattr(self._model, "module", None)
