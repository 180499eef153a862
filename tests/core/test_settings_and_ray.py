"""Settings come from FEWSTEP_* variables; the Ray helper starts a private cluster."""

from __future__ import annotations

import subprocess
import sys

from fewstep.settings import Settings


def test_settings_from_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("FEWSTEP_S3_ENDPOINT_URL", "http://127.0.0.1:9000")
    monkeypatch.setenv("FEWSTEP_RAY_ADDRESS", "ray://head:10001")
    monkeypatch.setenv("FEWSTEP_DATABASE_URL", "postgresql://u@h/db")
    monkeypatch.chdir(tmp_path)
    settings = Settings()
    assert settings.ray_address == "ray://head:10001"
    assert settings.database_url == "postgresql://u@h/db"
    assert settings.storage_options().endpoint_url == "http://127.0.0.1:9000"


def test_settings_from_dotenv(monkeypatch, tmp_path):
    monkeypatch.delenv("FEWSTEP_RAY_ADDRESS", raising=False)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.chdir(tmp_path)
    (tmp_path / ".env").write_text("FEWSTEP_RUNS_DIR=/data/runs\nFEWSTEP_S3_REGION=eu-west-1\n")
    settings = Settings()
    assert str(settings.runs_dir) == "/data/runs"
    assert settings.s3_region == "eu-west-1"
    assert settings.ray_address is None


def test_embedded_ray_is_private_and_shut_down():
    """ray_session starts its own cluster (own temp dir) and stops only that one."""
    code = (
        "import ray\n"
        "from fewstep.raysession import ray_session\n"
        "with ray_session(num_cpus=2):\n"
        "    ctx = ray.get_runtime_context()\n"
        "    assert ray.cluster_resources()['CPU'] == 2\n"
        "    print('TEMP', ray._private.worker._global_node.get_temp_dir_path())\n"
        "    print('SUM', ray.get(ray.remote(lambda: 1 + 1).remote()))\n"
        "print('UP', ray.is_initialized())\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=180)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "SUM 2" in out.stdout
    assert "UP False" in out.stdout
    temp = [line for line in out.stdout.splitlines() if line.startswith("TEMP")][0]
    assert "/tmp/fsray-" in temp


def test_an_address_where_no_ray_cluster_answers_fails_at_once():
    import socket

    import pytest

    from fewstep.config import ConfigError
    from fewstep.raysession import check_reachable, ray_session

    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    for address in (f"127.0.0.1:{port}", f"ray://127.0.0.1:{port}"):
        with pytest.raises(ConfigError, match=f"nothing answers at 127.0.0.1:{port}.*ray start --head"):
            with ray_session(address):
                pass
    with socket.socket() as server:  # a listening port passes the check
        server.bind(("127.0.0.1", 0))
        server.listen()
        check_reachable(f"127.0.0.1:{server.getsockname()[1]}")
    check_reachable("auto")
