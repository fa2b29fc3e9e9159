"""Local folders and s3:// URIs behind one pyarrow filesystem interface.

S3 endpoints (MinIO, moto, AWS) come from AWS_ENDPOINT_URL_S3 or AWS_ENDPOINT_URL; credentials from
the usual AWS environment variables. Never log credentials.
"""
from __future__ import annotations

import os
import re
from pathlib import Path
from urllib.parse import urlparse

import pyarrow.fs as pafs

CHECKPOINT_FILE = "checkpoint.ckpt"  # the Lightning checkpoint inside a checkpoint folder (Ray's)


def s3_endpoint() -> str | None:
    return os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")


def resolve(uri: str) -> tuple[pafs.FileSystem, str]:
    """URI or path -> (filesystem, path inside it). Local paths are made absolute."""
    if uri.startswith("s3://"):
        parsed = urlparse(uri)
        endpoint = s3_endpoint()
        kwargs = {"region": os.environ.get("AWS_DEFAULT_REGION", "us-east-1"),
                  "connect_timeout": 5, "request_timeout": 30,
                  "retry_strategy": pafs.AwsStandardS3RetryStrategy(max_attempts=3)}
        if endpoint:
            u = urlparse(endpoint)
            kwargs.update(endpoint_override=u.netloc or u.path, scheme=u.scheme or "http")
        return pafs.S3FileSystem(**kwargs), f"{parsed.netloc}{parsed.path}".rstrip("/")
    if "://" in uri:
        raise ValueError(f"unsupported URI scheme in {uri!r}: use a local path or s3://")
    return pafs.LocalFileSystem(), str(Path(uri).expanduser().resolve())


def join(base: str, *parts: str) -> str:
    return "/".join([base.rstrip("/"), *parts])


def exists(fs: pafs.FileSystem, path: str) -> bool:
    return fs.get_file_info(path).type != pafs.FileType.NotFound


def write_bytes_atomic(fs: pafs.FileSystem, path: str, data: bytes) -> None:
    """Write so a reader never sees a partial file: temp name then rename (S3 PUT is atomic)."""
    parent = path.rsplit("/", 1)[0]
    fs.create_dir(parent, recursive=True)
    if isinstance(fs, pafs.LocalFileSystem):
        tmp = f"{path}.tmp-{os.getpid()}"
        with fs.open_output_stream(tmp) as f:
            f.write(data)
        fs.move(tmp, path)
    else:
        with fs.open_output_stream(path) as f:
            f.write(data)


def read_bytes(fs: pafs.FileSystem, path: str) -> bytes:
    with fs.open_input_stream(path) as f:
        return f.read()


def first_line(e: BaseException) -> str:
    """pyarrow's S3 errors run over several lines; the first says what failed. Its "key 'K' in bucket
    'B'" becomes s3://B/K, the URI the operator typed."""
    line = (str(e).strip() or type(e).__name__).splitlines()[0]
    return re.sub(r"key '([^']*)' in bucket '([^']*)'", r"s3://\2/\1", line)
