"""Teacher recipes: where a teacher run starts (tiny preset or a pipeline dir)."""
