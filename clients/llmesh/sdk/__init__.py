"""The SDK behind :class:`llmesh.ByzerLLM` and :class:`llmesh.AsyncByzerLLM`, split by concern.

- :mod:`llmesh.sdk.shapes`: Byzer-LLM's data shapes (``LLMResponse``, ``LLMRequest``, ...).
- :mod:`llmesh.sdk.settings`: per-model settings (:class:`~llmesh.sdk.settings.ModelSettings`)
  and the client-wide ones; :mod:`llmesh.sdk.setup`: the fluent ``setup_*`` methods.
- :mod:`llmesh.sdk.ops`: client operations written once as steps that yield ops.
- :mod:`llmesh.sdk.channels`: channels, replica choice and retries (both transports').
- :mod:`llmesh.sdk.transport`: the sync and the async transport that run the steps; the only
  part that differs between ``ByzerLLM`` and ``AsyncByzerLLM``.
- :mod:`llmesh.sdk.calls`: the Chat calls with their cancel path, and a sync-to-async bridge.
- :mod:`llmesh.sdk.results`: chat-stream accumulation and the shapes of results.
- :mod:`llmesh.sdk.chat` (the chat core), :mod:`llmesh.sdk.structured` (``chat_oai`` with tools
  and response classes), :mod:`llmesh.sdk.prompts` (prompt-function decorators).
- :mod:`llmesh.sdk.inference`: embeddings, rerank, tokenizer, chat template, meta, abort.
- :mod:`llmesh.sdk.admin`: deploy, undeploy, adapters and the mesh views.
- :mod:`llmesh.sdk.training`: training jobs (sft, pretrain, merge_lora, watch).
"""
