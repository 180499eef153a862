"""Helpers that start real components for tests and benchmarks (moto S3 server, local Ray)."""
