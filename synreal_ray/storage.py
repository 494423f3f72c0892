"""One storage layer: every path is a URI (local path or s3://bucket/key) resolved to a pyarrow
filesystem. No stage special-cases S3.

S3 endpoint, region and credentials come from the standard AWS variables (AWS_ENDPOINT_URL,
AWS_REGION / AWS_DEFAULT_REGION, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY), so AWS, MinIO,
SeaweedFS and Ceph all work without code changes.

Publishing protocol (used by every stage): outputs are written object by object (each object
whole: a temporary name + rename locally, a single PUT on S3), and a `_SUCCESS` marker is written
last. An output without `_SUCCESS` is incomplete, whatever else it holds, and a re-run clears it.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import posixpath
import uuid
from urllib.parse import urlparse

import pyarrow.fs as pafs

SUCCESS = "_SUCCESS"


def is_s3(uri: str) -> bool:
    return str(uri).startswith("s3://")


@functools.lru_cache(maxsize=8)
def _s3_filesystem(endpoint: str | None, region: str | None) -> pafs.S3FileSystem:
    kwargs: dict = {}
    if endpoint:
        parsed = urlparse(endpoint if "://" in endpoint else f"https://{endpoint}")
        kwargs["endpoint_override"] = parsed.netloc
        kwargs["scheme"] = parsed.scheme
    if region:
        kwargs["region"] = region
    # Keys are read by pyarrow from the environment; passing them explicitly would pin them in
    # this cache even after the variables change.
    return pafs.S3FileSystem(**kwargs)


def resolve(uri: str) -> tuple[pafs.FileSystem, str]:
    """URI -> (pyarrow filesystem, path inside it)."""
    uri = str(uri)
    if is_s3(uri):
        path = uri[len("s3://"):].rstrip("/")
        if not path:
            raise ValueError(f"{uri!r}: an s3:// URI needs a bucket name")
        endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
        return _s3_filesystem(endpoint, region), path
    if "://" in uri:
        raise ValueError(f"{uri!r}: unsupported scheme (use a local path or s3://bucket/prefix)")
    return pafs.LocalFileSystem(), os.path.abspath(uri)


def join(uri: str, *parts: str) -> str:
    uri = str(uri)
    if is_s3(uri):
        return posixpath.join(uri.rstrip("/"), *parts)
    return os.path.join(uri, *parts)


def relpath(uri: str, root: str) -> str:
    """Path of `uri` relative to `root`, with forward slashes."""
    _, p = resolve(uri)
    _, r = resolve(root)
    return posixpath.relpath(p.replace(os.sep, "/"), r.replace(os.sep, "/"))


def _to_uri(root_uri: str, fs_path: str) -> str:
    return f"s3://{fs_path}" if is_s3(root_uri) else fs_path


def exists(uri: str) -> bool:
    fs, path = resolve(uri)
    return fs.get_file_info(path).type != pafs.FileType.NotFound


def is_dir(uri: str) -> bool:
    fs, path = resolve(uri)
    return fs.get_file_info(path).type == pafs.FileType.Directory


def list_files(uri: str, suffix: str | tuple[str, ...] | None = None) -> list[str]:
    """All files under `uri` (recursive), as URIs, sorted. Missing folder -> []."""
    fs, path = resolve(uri)
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.NotFound:
        return []
    if info.type == pafs.FileType.File:
        return [str(uri)]
    sel = pafs.FileSelector(path, recursive=True, allow_not_found=True)
    out = [
        _to_uri(uri, f.path)
        for f in fs.get_file_info(sel)
        if f.type == pafs.FileType.File and (suffix is None or f.path.endswith(suffix))
    ]
    return sorted(out)


def read_bytes(uri: str) -> bytes:
    fs, path = resolve(uri)
    try:
        with fs.open_input_stream(path) as f:
            return f.read()
    except FileNotFoundError as e:
        raise FileNotFoundError(f"{uri}: no such file") from e


def write_bytes(uri: str, data: bytes) -> None:
    """Write one object whole: readers never see a half-written file."""
    fs, path = resolve(uri)
    if is_s3(uri):
        with fs.open_output_stream(path) as f:  # one PUT (or a multipart upload completed at close)
            f.write(data)
        return
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def write_parquet(table, uri: str) -> None:
    """One Parquet object, written whole."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    buf = pa.BufferOutputStream()
    pq.write_table(table, buf)
    write_bytes(uri, buf.getvalue().to_pybytes())


def part_name(ids) -> str:
    """Name of a Parquet part after the ids it holds: a retried Ray task rewrites the same object
    instead of adding a copy of its rows."""
    return "part-" + hashlib.sha1("\n".join(map(str, ids)).encode()).hexdigest()[:16] + ".parquet"


def read_json(uri: str) -> dict:
    return json.loads(read_bytes(uri))


def write_json(uri: str, obj: dict) -> None:
    write_bytes(uri, (json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n").encode())


def delete_dir(uri: str) -> None:
    fs, path = resolve(uri)
    if fs.get_file_info(path).type == pafs.FileType.NotFound:
        return
    fs.delete_dir(path)


def makedirs(uri: str) -> None:
    fs, path = resolve(uri)
    fs.create_dir(path, recursive=True)


def is_complete(uri: str) -> bool:
    """True when the output at `uri` was published (its `_SUCCESS` marker exists)."""
    return exists(join(uri, SUCCESS))


def require_complete(uri: str, what: str) -> None:
    if not is_complete(uri):
        state = "is incomplete (no _SUCCESS marker: the job that wrote it did not finish)" if exists(uri) else "does not exist"
        raise FileNotFoundError(f"{uri}: {what} {state}")
