"""The precompute stage."""
