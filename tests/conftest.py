"""Shared fixtures: real components only (moto's S3 server, a private local Ray cluster)."""

from __future__ import annotations

import os
import uuid

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("DS_ACCELERATOR", "cpu")
# Storage options are passed explicitly everywhere; these only keep boto quiet.
os.environ.setdefault("AWS_ACCESS_KEY_ID", "testing")
os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "testing")
os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")


@pytest.fixture(scope="session")
def s3_options():
    """A real moto S3 server on 127.0.0.1 for the whole session."""
    from fewstep.testing.moto import moto_server

    with moto_server() as options:
        yield options


@pytest.fixture()
def s3_bucket(s3_options):
    """A fresh bucket URI (``s3://...``) on the session's moto server."""
    from fewstep.testing.moto import create_bucket

    return create_bucket(s3_options, f"test-{uuid.uuid4().hex[:12]}")


@pytest.fixture(scope="session")
def ray_cluster():
    """A private local Ray cluster shared by the tests that need one."""
    import ray

    from fewstep.raysession import ray_init

    started = ray_init(num_cpus=4)
    yield
    if started:
        ray.shutdown()
