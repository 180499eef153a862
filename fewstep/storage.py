"""URI-addressed storage: local paths, ``file://`` and ``s3://`` behind one interface.

Nothing else in fewstep knows which backend a URI uses. Stages ask this module for a
filesystem (fsspec for plain reads and writes, pyarrow for Ray Data and Ray Train) and
for atomic publishes: write to a temporary name, then move into place, so a reader never
sees a half-written file. Manifests are always published last.
"""

from __future__ import annotations

import hashlib
import json
import os
import posixpath
import shutil
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import fsspec
import pyarrow.fs as pafs


@dataclass(frozen=True)
class StorageOptions:
    """S3 connection details; unused for local URIs. Serialisable to Ray workers."""

    endpoint_url: str | None = None
    region: str = "us-east-1"
    access_key_id: str | None = None
    secret_access_key: str | None = None

    def s3fs_kwargs(self) -> dict[str, Any]:
        kwargs: dict[str, Any] = {"client_kwargs": {"region_name": self.region}}
        if self.endpoint_url:
            kwargs["endpoint_url"] = self.endpoint_url
        if self.access_key_id:
            kwargs["key"] = self.access_key_id
            kwargs["secret"] = self.secret_access_key
        # Small-object writes must be visible at once to other readers.
        kwargs["use_listings_cache"] = False
        return kwargs


def is_s3(uri: str) -> bool:
    return str(uri).startswith("s3://")


def normalize(uri: str | os.PathLike) -> str:
    """A canonical URI: ``s3://bucket/key`` or an absolute local path."""
    text = str(uri)
    if is_s3(text):
        return text.rstrip("/")
    if text.startswith("file://"):
        text = urlparse(text).path
    return str(Path(text).expanduser().resolve())


def join(uri: str, *parts: str) -> str:
    uri = normalize(uri)
    if is_s3(uri):
        return posixpath.join(uri, *parts)
    return str(Path(uri).joinpath(*parts))


def _strip(uri: str) -> str:
    """Path as the backend filesystems want it (no scheme)."""
    uri = normalize(uri)
    return uri[len("s3://") :] if is_s3(uri) else uri


def fsspec_filesystem(uri: str, options: StorageOptions | None = None) -> fsspec.AbstractFileSystem:
    options = options or StorageOptions()
    if is_s3(uri):
        import s3fs

        return s3fs.S3FileSystem(**options.s3fs_kwargs())
    return fsspec.filesystem("file")


def resolve(uri: str, options: StorageOptions | None = None) -> tuple[fsspec.AbstractFileSystem, str]:
    """Return ``(fsspec filesystem, backend path)`` for a URI."""
    return fsspec_filesystem(uri, options), _strip(uri)


def pyarrow_filesystem(uri: str, options: StorageOptions | None = None) -> tuple[pafs.FileSystem, str]:
    """Return ``(pyarrow filesystem, backend path)``, e.g. for Ray Data and Ray Train."""
    options = options or StorageOptions()
    if is_s3(uri):
        kwargs: dict[str, Any] = {"region": options.region}
        if options.endpoint_url:
            parsed = urlparse(options.endpoint_url)
            kwargs["endpoint_override"] = parsed.netloc or options.endpoint_url
            kwargs["scheme"] = parsed.scheme or "https"
        if options.access_key_id:
            kwargs["access_key"] = options.access_key_id
            kwargs["secret_key"] = options.secret_access_key
        return pafs.S3FileSystem(**kwargs), _strip(uri)
    return pafs.LocalFileSystem(), _strip(uri)


def exists(uri: str, options: StorageOptions | None = None) -> bool:
    fs, path = resolve(uri, options)
    return bool(fs.exists(path))


class StorageError(OSError):
    """A store that cannot be used as asked; the message names the URI and the fix."""


def check_reachable(uri: str, options: StorageOptions | None = None, what: str = "path") -> bool:
    """Whether ``uri`` exists; a store that cannot be asked at all (no endpoint, no credentials,
    no bucket) is a StorageError naming ``what`` instead of a client library's traceback."""
    try:
        if not is_s3(uri):
            return exists(uri, options)
        fs, path = resolve(uri, options)
        # Not fs.exists: s3fs answers False for an endpoint it cannot reach or missing credentials.
        if "/" in path:
            fs.info(path)
        else:  # a bare bucket
            fs.ls(path)
        return True
    except FileNotFoundError:
        return False
    except Exception as exc:  # botocore's endpoint and credential errors share no base class
        raise StorageError(f"{what}: cannot reach {uri} ({type(exc).__name__}: {exc}); check the "
                           "path, the S3 endpoint and the FEWSTEP_/AWS_ credentials") from None


def check_output_dir(uri: str, options: StorageOptions | None = None, what: str = "output") -> None:
    """Refuse an output folder that cannot be written before any work: a local path that is a
    file, or an S3 bucket that does not exist (S3 creates prefixes, never buckets)."""
    uri = normalize(uri)
    if not is_s3(uri):
        path = Path(uri)
        blocker = next((p for p in (path, *path.parents) if p.exists()), None)
        if blocker is not None and not blocker.is_dir():
            raise StorageError(f"{what}: {blocker} is a file, not a folder; pick another {what}")
        return
    bucket = _strip(uri).split("/", 1)[0]
    if not check_reachable(f"s3://{bucket}", options, what):
        raise StorageError(f"{what}: bucket s3://{bucket} does not exist; create it first "
                           "(S3 folders are made by writing, buckets are not)")


def makedirs(uri: str, options: StorageOptions | None = None) -> None:
    if is_s3(uri):
        return  # S3 has no directories; keys create their prefixes.
    Path(normalize(uri)).mkdir(parents=True, exist_ok=True)


def read_bytes(uri: str, options: StorageOptions | None = None) -> bytes:
    fs, path = resolve(uri, options)
    # One GET for the whole object: a ranged, block-wise read could straddle a re-publish.
    return fs.cat_file(path)


def read_json(uri: str, options: StorageOptions | None = None) -> Any:
    return json.loads(read_bytes(uri, options).decode("utf-8"))


def write_bytes_atomic(uri: str, data: bytes, options: StorageOptions | None = None) -> None:
    """Publish ``data`` at ``uri`` so that readers see either nothing or all of it."""
    fs, path = resolve(uri, options)
    parent = posixpath.dirname(path)
    tmp = posixpath.join(parent, f".tmp-{uuid.uuid4().hex}-{posixpath.basename(path)}")
    if not is_s3(uri):
        Path(parent).mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
        return
    # S3 PUTs are atomic per object; the temporary key plus copy keeps one code path
    # for multi-part uploads, which are only visible once completed.
    with fs.open(tmp, "wb") as handle:
        handle.write(data)
    try:
        fs.copy(tmp, path)
    finally:
        fs.rm(tmp)


def write_json_atomic(uri: str, payload: Any, options: StorageOptions | None = None) -> None:
    text = json.dumps(payload, indent=2, sort_keys=True, default=str) + "\n"
    write_bytes_atomic(uri, text.encode("utf-8"), options)


def upload_file_atomic(local_path: str | os.PathLike, uri: str, options: StorageOptions | None = None) -> None:
    """Copy a local file to ``uri`` atomically."""
    if not is_s3(uri):
        fs, path = resolve(uri, options)
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        tmp = f"{path}.tmp-{uuid.uuid4().hex}"
        with open(local_path, "rb") as src, open(tmp, "wb") as dst:
            while chunk := src.read(1 << 20):
                dst.write(chunk)
            dst.flush()
            os.fsync(dst.fileno())
        os.replace(tmp, path)
        return
    fs, path = resolve(uri, options)
    tmp = posixpath.join(posixpath.dirname(path), f".tmp-{uuid.uuid4().hex}-{posixpath.basename(path)}")
    fs.put_file(str(local_path), tmp)
    try:
        fs.copy(tmp, path)
    finally:
        fs.rm(tmp)


def publish_dir(local: str | os.PathLike, uri: str, options: StorageOptions | None = None,
                markers: tuple[str, ...] = ("model_index.json",)) -> None:
    """Replace the directory at ``uri`` with a local one, so that no reader loads a mix or a part.

    Locally the copy is staged beside the target and swapped in with renames. S3 has no rename, so
    the top-level ``markers`` (a diffusers pipeline loads only when ``model_index.json`` is there)
    are removed first and written last: while the upload runs, or after it fails, the directory
    reads as absent rather than as a half-written or mixed model.
    """
    local = Path(local)
    if not is_s3(uri):
        target = Path(normalize(uri))
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = target.with_name(f".tmp-{target.name}-{uuid.uuid4().hex}")
        try:
            shutil.copytree(local, staging)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        retired = target.with_name(f".tmp-old-{target.name}-{uuid.uuid4().hex}")
        if target.exists():
            os.replace(target, retired)
        os.replace(staging, target)
        shutil.rmtree(retired, ignore_errors=True)
        return
    for name in markers:
        delete(join(uri, name), options)
    delete(uri, options, recursive=True)
    upload_dir(local, uri, options, last=markers)


def upload_dir(local: str | os.PathLike, uri: str, options: StorageOptions | None = None,
               last: tuple[str, ...] = ()) -> None:
    """Upload a local tree to S3, the top-level files named in ``last`` after everything else
    (a reader that waits for them never sees a part of the tree)."""
    local = Path(local)
    fs, path = resolve(uri, options)
    files = sorted(p for p in local.rglob("*") if not p.is_dir())
    tail = [local / name for name in last if (local / name) in files]
    for file in [f for f in files if f not in tail] + tail:
        fs.put_file(str(file), posixpath.join(path.rstrip("/"), file.relative_to(local).as_posix()))


def download_dir(uri: str, local_dir: str | os.PathLike, options: StorageOptions | None = None) -> Path:
    """Copy a directory tree from ``uri`` to a local directory (used for models on S3)."""
    local_dir = Path(local_dir)
    if not is_s3(uri):
        return Path(normalize(uri))
    fs, path = resolve(uri, options)
    local_dir.mkdir(parents=True, exist_ok=True)
    fs.get(path.rstrip("/") + "/", str(local_dir), recursive=True)
    return local_dir


def list_files(uri: str, suffix: str = "", options: StorageOptions | None = None) -> list[str]:
    """Files under ``uri`` (recursive), as full URIs, sorted; temporary files are skipped."""
    fs, path = resolve(uri, options)
    if not fs.exists(path):
        return []
    found = []
    for item in fs.find(path):
        name = posixpath.basename(item)
        if name.startswith(".tmp-") or ".tmp-" in name or not item.endswith(suffix):
            continue
        found.append(f"s3://{item}" if is_s3(uri) else item)
    return sorted(found)


def delete(uri: str, options: StorageOptions | None = None, recursive: bool = False) -> None:
    fs, path = resolve(uri, options)
    if fs.exists(path):
        fs.rm(path, recursive=recursive)


def sha256_of(uri: str, options: StorageOptions | None = None) -> str:
    fs, path = resolve(uri, options)
    digest = hashlib.sha256()
    with fs.open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def object_tag(uri: str, options: StorageOptions | None = None) -> str | None:
    """For ``s3://`` objects, ``etag:<ETag>:<size>`` from the object's metadata (no download); None for
    local files and stores that report no ETag. Equal content uploaded the same way gives equal tags;
    a changed object always gives a new one."""
    if not is_s3(uri):
        return None
    fs, path = resolve(uri, options)
    info = fs.info(path)
    etag = str(info.get("ETag") or info.get("etag") or "").strip('"')
    return f"etag:{etag}:{info.get('size')}" if etag else None


def size_of(uri: str, options: StorageOptions | None = None) -> int:
    fs, path = resolve(uri, options)
    return int(fs.size(path))


def iter_lines(uri: str, options: StorageOptions | None = None) -> Iterator[bytes]:
    fs, path = resolve(uri, options)
    with fs.open(path, "rb") as handle:
        yield from handle
