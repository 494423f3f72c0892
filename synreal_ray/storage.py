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


def list_files(uri: str, suffix: str | tuple[str, ...] | None = None, recursive: bool = True) -> list[str]:
    """All files under `uri` (recursive, or only those directly in it), as URIs, sorted. Missing folder -> []."""
    fs, path = resolve(uri)
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.NotFound:
        return []
    if info.type == pafs.FileType.File:
        return [str(uri)]
    sel = pafs.FileSelector(path, recursive=recursive, allow_not_found=True)
    out = [
        _to_uri(uri, f.path)
        for f in fs.get_file_info(sel)
        if f.type == pafs.FileType.File and (suffix is None or f.path.endswith(suffix))
    ]
    return sorted(out)


def size(uri: str) -> int | None:
    """Size in bytes of the file `uri`; None when there is no such file."""
    fs, path = resolve(uri)
    info = fs.get_file_info(path)
    return info.size if info.type == pafs.FileType.File else None


def list_dirs(uri: str) -> list[str]:
    """Names of the folders directly under `uri`, sorted; hidden ones (`_x`, `.x`) left out. Missing -> []."""
    fs, path = resolve(uri)
    infos = fs.get_file_info(pafs.FileSelector(path, allow_not_found=True))
    return sorted(i.base_name for i in infos if i.type == pafs.FileType.Directory and not is_hidden(i.base_name))


def read_bytes(uri: str) -> bytes:
    fs, path = resolve(uri)
    try:
        with fs.open_input_stream(path) as f:
            return f.read()
    except FileNotFoundError as e:
        raise FileNotFoundError(f"{uri}: no such file") from e


TMP_MARK = ".tmp-"


def is_hidden(name: str) -> bool:
    """Names that readers skip, as Arrow does: `_SUCCESS`, `_manifest/`, `.part.tmp-1a2b` ..."""
    return name.startswith(("_", "."))


def write_bytes(uri: str, data: bytes) -> None:
    """Write one object whole: readers never see a half-written file.

    Locally: a hidden temporary name beside the target (`.NAME.tmp-HEX`, which every reader of this
    project and Arrow skip), fsync, rename, fsync of the folder. On S3: one PUT (or a multipart
    upload completed at close), which is atomic by itself."""
    fs, path = resolve(uri)
    if is_s3(uri):
        with fs.open_output_stream(path) as f:
            f.write(data)
        return
    folder, name = os.path.split(path)
    os.makedirs(folder, exist_ok=True)
    tmp = os.path.join(folder, f".{name}{TMP_MARK}{uuid.uuid4().hex[:8]}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def data_files(uri: str, suffix: str = ".parquet") -> list[str]:
    """The data files of a folder written by a stage, as URIs, sorted: files ending in `suffix`,
    skipping any whose name or folder starts with `_` or `.` (markers, journals, temporaries)."""
    rel = lambda u: relpath(u, uri) if u != str(uri) else posixpath.basename(u)  # noqa: E731
    return [u for u in list_files(uri, suffix) if not any(is_hidden(p) for p in rel(u).split("/"))]


def read_table(uri: str, **kwargs):
    """All data files of a Parquet folder (or one file) as one pyarrow Table: the one reader every
    stage uses, so a temporary or marker file is never read as data. kwargs go to pq.read_table
    (columns=, filters=, schema=)."""
    import pyarrow.parquet as pq

    files = data_files(uri)
    if not files:
        raise FileNotFoundError(f"{uri}: no Parquet files")
    fs, _ = resolve(files[0])
    return pq.read_table([resolve(f)[1] for f in files], filesystem=fs, **kwargs)


def safe_join(root: str, rel: str) -> str:
    """`root` joined with a relative path taken from data (an id, a file's path in a dataset),
    refusing one that is absolute, empty or climbs out with `..`: outputs stay under `root`."""
    rel = str(rel)
    parts = rel.replace("\\", "/").split("/")
    if not rel or rel.startswith("/") or any(p in ("", ".", "..") for p in parts) or ":" in parts[0]:
        raise ValueError(f"{rel!r}: not a plain relative path (absolute, empty, or with '.'/'..' parts); "
                         f"refusing to write it under {root}")
    return join(root, *parts)


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


def listing(uri: str) -> list[tuple[str, int, int]]:
    """(path relative to `uri`, size, modification time in ns) of every file under `uri` (or of
    `uri` itself when it is a file), sorted; [] when it does not exist. On S3 the time is the
    object's LastModified."""
    fs, path = resolve(uri)
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.File:
        return [(posixpath.basename(path), info.size, info.mtime_ns or 0)]
    if info.type == pafs.FileType.NotFound:
        return []
    sel = pafs.FileSelector(path, recursive=True, allow_not_found=True)
    root = path.rstrip("/") + "/"
    return sorted((f.path[len(root):].replace(os.sep, "/"), f.size, f.mtime_ns or 0)
                  for f in fs.get_file_info(sel) if f.type == pafs.FileType.File)


def _refuse_root(uri: str, fs_path: str) -> None:
    # Arrow empties a bucket before it refuses to delete it: never hand it a bare bucket.
    if (is_s3(uri) and "/" not in fs_path.strip("/")) or (not is_s3(uri) and os.path.dirname(fs_path) == fs_path):
        raise ValueError(f"{uri}: refusing to delete a whole bucket or filesystem root")


def delete_file(uri: str) -> None:
    fs, path = resolve(uri)
    try:
        fs.delete_file(path)
    except FileNotFoundError:
        pass


def delete_dir(uri: str) -> None:
    """Delete a folder and everything in it (callers own it: see stage.Stage's guard)."""
    fs, path = resolve(uri)
    _refuse_root(uri, path)
    if fs.get_file_info(path).type == pafs.FileType.NotFound:
        return
    fs.delete_dir(path)


def clear_dir(uri: str, keep: tuple[str, ...] = ()) -> None:
    """Empty a folder, keeping the top-level files named in `keep` (one call per child folder, so
    S3 deletes in batches)."""
    fs, path = resolve(uri)
    _refuse_root(uri, path)
    for info in fs.get_file_info(pafs.FileSelector(path, allow_not_found=True)):
        if info.base_name in keep:
            continue
        if info.type == pafs.FileType.Directory:
            fs.delete_dir(info.path)
        else:
            fs.delete_file(info.path)


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
