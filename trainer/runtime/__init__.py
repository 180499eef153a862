"""Training runtime: one loop on Ray Train + DeepSpeed (or a single local process)."""
