"""llmesh control_plane."""
