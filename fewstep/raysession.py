"""Start an embedded local Ray cluster or join a given one: the only place stages call ray.init."""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
from collections.abc import Iterator

log = logging.getLogger(__name__)


def ray_init(address: str | None = None, num_cpus: int | None = None, quiet: bool = True) -> bool:
    """Make sure Ray is initialised. Returns True if this call started it.

    ``address=None`` starts a private local cluster with its own temp dir, so it never
    attaches to another cluster on the machine. Inside a ``ray job submit`` entrypoint the
    job's cluster is joined (Ray sets ``RAY_ADDRESS`` for it; the CLI passes it in).
    """
    import ray

    if ray.is_initialized():
        return False
    runtime_env = {"env_vars": {"TOKENIZERS_PARALLELISM": "false"}}
    if address:
        check_reachable(address)
        log.info("joining Ray cluster at %s", address)
        try:
            ray.init(address=address, log_to_driver=not quiet, runtime_env=runtime_env)
        except ConnectionError as exc:  # the port answers, but no Ray cluster behind it
            from fewstep.config import ConfigError

            raise ConfigError(f"Ray address {address}: {exc}; start the cluster (`ray start --head`) "
                              "or fix the address (FEWSTEP_RAY_ADDRESS, --ray-address or the config's "
                              "ray_address)") from None
        return True
    cpus = num_cpus or max(4, os.cpu_count() or 1)
    # Short path: Ray's unix sockets live under the temp dir and have a length limit.
    temp_dir = tempfile.mkdtemp(prefix="fsray-", dir="/tmp")
    log.info("starting embedded Ray (%d logical CPUs, temp dir %s)", cpus, temp_dir)
    ray.init(
        address="local",
        num_cpus=cpus,
        include_dashboard=False,
        _temp_dir=temp_dir,
        log_to_driver=not quiet,
        configure_logging=True,
        logging_level=logging.WARNING,
        runtime_env=runtime_env,
    )
    return True


def check_reachable(address: str, timeout_s: float = 5.0) -> None:
    """A ``host:port`` (or ``ray://host:port``) Ray address must answer; otherwise ``ray.init``
    keeps retrying for minutes before it fails. ``auto`` and addresses without a port pass."""
    import socket

    from fewstep.config import ConfigError

    host, sep, port = address.split("://", 1)[-1].rstrip("/").rpartition(":")
    if address == "auto" or not sep or not port.isdigit():
        return
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s).close()
    except OSError as exc:
        raise ConfigError(f"Ray address {address}: nothing answers at {host}:{port} ({exc}); start the "
                          "cluster (`ray start --head`) or fix the address (FEWSTEP_RAY_ADDRESS, "
                          "--ray-address or the config's ray_address)") from None


@contextlib.contextmanager
def ray_session(address: str | None = None, num_cpus: int | None = None) -> Iterator[None]:
    """Context manager: shuts Ray down on exit only if it started it."""
    import ray

    started = ray_init(address, num_cpus)
    try:
        yield
    finally:
        if started:
            ray.shutdown()
