"""The SDK behind :class:`llmesh.ByzerLLM` and :class:`llmesh.AsyncByzerLLM`, split by concern.

- :mod:`llmesh.sdk.shapes`: Byzer-LLM's data shapes (``LLMResponse``, ``LLMRequest``, ...).
- :mod:`llmesh.sdk.settings`: per-model settings (:class:`~llmesh.sdk.settings.ModelSettings`)
  and the fluent ``setup_*`` methods that write them.
- :mod:`llmesh.sdk.results`: chat-stream accumulation and the shapes of results.
- :mod:`llmesh.sdk.ops`: client operations written once as steps, replica routing and retries.
- :mod:`llmesh.sdk.transport`: the sync and async transports that run those steps.
- :mod:`llmesh.sdk.chat`, :mod:`llmesh.sdk.structured`, :mod:`llmesh.sdk.prompts`: chat.
- :mod:`llmesh.sdk.inference`: embeddings, rerank, tokenizer, chat template, meta, abort.
- :mod:`llmesh.sdk.admin`: deploy, undeploy and the mesh views.
- :mod:`llmesh.sdk.training`: training jobs (sft, pretrain, merge_lora, watch).
"""
