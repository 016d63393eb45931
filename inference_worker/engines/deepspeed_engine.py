"""The ``deepspeed`` backend: a transformers causal LM wrapped by ``deepspeed.init_inference``.

Everything a request sees — streaming deltas merged for slow consumers, stop strings and ids,
sampling, structured output, abort checked every step — is the transformers engine's decode
loop; only the forward pass goes through DeepSpeed's ``InferenceEngine`` (kernel injection and
CUDA graphs on GPU, the plain module on CPU).

On CPU DeepSpeed needs ``DS_ACCELERATOR=cpu`` before it is first imported; the engine sets it
when the worker has no GPU and refuses to start when DeepSpeed was already imported for another
accelerator in this process.

infer_params: the ``deepspeed`` table in :mod:`llmesh.common.backends`: the transformers
backend's keys plus ``tensor_parallel_size`` (DeepSpeed's ``tp_size``; only 1 today, since one
worker process is one rank and serving a replica from several ranks needs them to decode in
lockstep), ``kernel_inject`` and ``enable_cuda_graph`` (both GPU only, refused at start on CPU).
"""

from __future__ import annotations

import logging
import os
from typing import Any

from llmesh.common.errors import FailedPrecondition, InvalidArgument
from llmesh.inference_worker.engines.base import EngineConfig, ModelMeta
from llmesh.inference_worker.engines.transformers_engine import TransformersEngine

log = logging.getLogger(__name__)


class DeepSpeedEngine(TransformersEngine):
    """A causal LM served through ``deepspeed.init_inference`` (see the module docstring).

    Args:
        config: ``model_path`` is a HuggingFace-layout directory; ``infer_params`` as the
            transformers backend plus ``tensor_parallel_size``, ``kernel_inject`` and
            ``enable_cuda_graph``.
    """

    backend = "deepspeed"

    def __init__(self, config: EngineConfig) -> None:
        super().__init__(config)
        params = self._params
        # The table allows only 1 for now (see the module docstring).
        self._tp_size: int = params.get("tensor_parallel_size", 1)
        self._kernel_inject: bool = params.get("kernel_inject", False)
        self._cuda_graph: bool = params.get("enable_cuda_graph", False)
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
