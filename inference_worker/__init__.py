"""llmesh inference_worker."""
