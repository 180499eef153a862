"""Storage by URI on local disk and on a real moto S3 server; publishes are atomic."""

from __future__ import annotations

import json
import threading

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from fewstep import storage


@pytest.fixture(params=["local", "s3"])
def root(request, tmp_path):
    if request.param == "local":
        return str(tmp_path / "store"), None
    options = request.getfixturevalue("s3_options")
    bucket = request.getfixturevalue("s3_bucket")
    return f"{bucket}/store", options


def test_bytes_and_json_round_trip(root):
    base, options = root
    storage.write_bytes_atomic(storage.join(base, "a", "b.bin"), b"hello", options)
    assert storage.read_bytes(storage.join(base, "a", "b.bin"), options) == b"hello"
    storage.write_json_atomic(storage.join(base, "m.json"), {"x": [1, 2]}, options)
    assert storage.read_json(storage.join(base, "m.json"), options) == {"x": [1, 2]}
    assert storage.exists(storage.join(base, "m.json"), options)
    assert not storage.exists(storage.join(base, "nope.json"), options)
    files = storage.list_files(base, ".json", options)
    assert [f.rsplit("/", 1)[-1] for f in files] == ["m.json"]
    assert storage.sha256_of(storage.join(base, "a", "b.bin"), options) == (
        "2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824")


def test_pyarrow_filesystem_reads_what_fsspec_wrote(root):
    base, options = root
    table = pa.table({"id": ["a", "b"], "v": [1, 2]})
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    uri = storage.join(base, "t", "part-0.parquet")
    storage.write_bytes_atomic(uri, sink.getvalue().to_pybytes(), options)
    fs, path = storage.pyarrow_filesystem(uri, options)
    assert pq.read_table(path, filesystem=fs).equals(table)


def test_upload_file_atomic(root, tmp_path):
    base, options = root
    local = tmp_path / "big.bin"
    local.write_bytes(b"x" * 3_000_000)
    uri = storage.join(base, "up", "big.bin")
    storage.upload_file_atomic(local, uri, options)
    assert storage.size_of(uri, options) == 3_000_000
    assert storage.list_files(storage.join(base, "up"), options=options) == [uri]


def test_reader_never_sees_half_written_manifest(root):
    """A reader polling during repeated publishes sees only complete JSON documents."""
    base, options = root
    uri = storage.join(base, "manifest.json")
    payloads = [{"version": i, "shards": ["x" * 2000] * 50} for i in range(15)]
    storage.write_json_atomic(uri, payloads[0], options)
    seen_errors: list[str] = []
    seen_versions: set[int] = set()
    done = threading.Event()

    def reader():
        while not done.is_set():
            try:
                document = json.loads(storage.read_bytes(uri, options))
            except FileNotFoundError:
                seen_errors.append("missing")
                continue
            except json.JSONDecodeError as exc:
                seen_errors.append(f"partial: {exc}")
                continue
            except Exception as exc:  # noqa: BLE001 - any failure to read is a finding
                seen_errors.append(f"{type(exc).__name__}: {exc}")
                continue
            assert document["shards"] == payloads[0]["shards"]
            seen_versions.add(document["version"])

    thread = threading.Thread(target=reader)
    thread.start()
    try:
        for payload in payloads[1:]:
            storage.write_json_atomic(uri, payload, options)
    finally:
        done.set()
        thread.join()
    assert seen_errors == []
    assert storage.read_json(uri, options)["version"] == 14
    # No temporary files are left behind.
    assert all(".tmp-" not in f for f in storage.list_files(base, options=options))


def _pipeline_dir(folder, version: str, extra: str | None = None):
    (folder / "transformer").mkdir(parents=True)
    (folder / "model_index.json").write_text(json.dumps({"version": version}))
    (folder / "transformer" / "weights.bin").write_text(version)
    if extra:
        (folder / extra).write_text(version)
    return folder


def test_publish_dir_replaces_a_model_directory_whole(root, tmp_path):
    base, options = root
    target = storage.join(base, "run", "final")
    storage.publish_dir(_pipeline_dir(tmp_path / "v1", "v1", extra="stale.txt"), target, options)
    storage.publish_dir(_pipeline_dir(tmp_path / "v2", "v2"), target, options)
    names = sorted(f.removeprefix(target).lstrip("/") for f in storage.list_files(target, options=options))
    assert names == ["model_index.json", "transformer/weights.bin"]  # v1's extra file is gone
    assert storage.read_json(storage.join(target, "model_index.json"), options) == {"version": "v2"}
    assert storage.read_bytes(storage.join(target, "transformer", "weights.bin"), options) == b"v2"


def test_a_failed_publish_never_leaves_a_loadable_mix(root, tmp_path):
    """A publish that fails part-way leaves either the old model whole (local: the swap never
    happened) or no model_index.json (S3: it is removed first and written last), never a
    directory a loader would take for a complete model with some old and some new parts."""
    base, options = root
    target = storage.join(base, "run", "final")
    storage.publish_dir(_pipeline_dir(tmp_path / "v1", "v1"), target, options)
    broken = _pipeline_dir(tmp_path / "v2", "v2")
    (broken / "transformer" / "missing.bin").symlink_to(tmp_path / "nowhere")  # unreadable mid-upload
    with pytest.raises(OSError):
        storage.publish_dir(broken, target, options)
    index = storage.join(target, "model_index.json")
    if storage.is_s3(target):
        assert not storage.exists(index, options)
    else:
        assert storage.read_json(index, options) == {"version": "v1"}
        assert storage.read_bytes(storage.join(target, "transformer", "weights.bin"), options) == b"v1"
        assert [p.name for p in (tmp_path / "store" / "run").iterdir()] == ["final"]  # no staging left


def test_a_store_that_cannot_be_reached_is_one_clear_error(s3_options, s3_bucket, tmp_path):
    """s3fs answers "does not exist" for an endpoint it cannot reach; a stage must say which it is."""
    import socket

    with socket.socket() as sock:  # a port where nothing listens
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    nowhere = storage.StorageOptions(endpoint_url=f"http://127.0.0.1:{port}", access_key_id="a",
                                     secret_access_key="b")
    with pytest.raises(storage.StorageError, match=r"--input: cannot reach s3://bucket/data .*EndpointConnectionError"):
        storage.check_reachable("s3://bucket/data", nowhere, "--input")
    assert storage.check_reachable(s3_bucket, s3_options) is True
    assert storage.check_reachable(f"{s3_bucket}/nothing-here", s3_options) is False
    storage.check_output_dir(f"{s3_bucket}/new/folder", s3_options)  # prefixes need not exist
    with pytest.raises(storage.StorageError, match="bucket s3://missing-bucket-x does not exist"):
        storage.check_output_dir("s3://missing-bucket-x/out", s3_options)
    storage.check_output_dir(str(tmp_path / "a" / "b"))
    (tmp_path / "f").write_text("x")
    with pytest.raises(storage.StorageError, match="is a file"):
        storage.check_output_dir(str(tmp_path / "f" / "out"))


def test_normalize_and_join(tmp_path):
    assert storage.normalize(f"file://{tmp_path}") == str(tmp_path)
    assert storage.join("s3://b/k/", "x", "y.json") == "s3://b/k/x/y.json"
    assert storage.is_s3("s3://b") and not storage.is_s3(str(tmp_path))
