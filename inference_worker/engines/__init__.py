"""llmesh inference_worker/engines."""
