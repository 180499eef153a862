"""Ray Data stages: curate (filter, tag, caption, rebalance) and precompute (teacher embeddings, latents)."""
