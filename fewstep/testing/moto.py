"""Run moto's S3 server on 127.0.0.1 as a real subprocess (tests and benchmarks)."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator

from fewstep.storage import StorageOptions


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def moto_server() -> Iterator[StorageOptions]:
    # Run moto from this interpreter: a ``moto_server`` found on PATH (a pyenv shim, another
    # install) can be a different moto whose multipart responses pyarrow rejects.
    port = free_port()
    env = dict(os.environ, AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing",
               AWS_DEFAULT_REGION="us-east-1")
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 20
        while time.time() < deadline:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
                break
            time.sleep(0.1)
        else:
            raise RuntimeError("moto_server did not start")
        yield StorageOptions(endpoint_url=f"http://127.0.0.1:{port}", region="us-east-1",
                             access_key_id="testing", secret_access_key="testing")
    finally:
        proc.terminate()
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(5)


def create_bucket(options: StorageOptions, bucket: str) -> str:
    import boto3

    client = boto3.client("s3", endpoint_url=options.endpoint_url, region_name=options.region,
                          aws_access_key_id=options.access_key_id,
                          aws_secret_access_key=options.secret_access_key)
    existing = {b["Name"] for b in client.list_buckets().get("Buckets", [])}
    if bucket not in existing:
        client.create_bucket(Bucket=bucket)
    return f"s3://{bucket}"
