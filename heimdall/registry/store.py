"""The serving copies of exported models: content-addressed (`<prefix>/<sha256>.onnx`), verified.

On S3 (AWS, MinIO, anything S3-compatible) through boto3: multipart above a threshold, the sha256
in the object's metadata, and after every upload a HEAD (size, recorded hash) and a full read-back
hash. The same content always lands on the same key, so re-running an export is idempotent. A local
folder works the same way for runs without object storage. An object appears whole or not at all
(S3 completes a multipart upload atomically; locally a temp file is renamed).
"""
from __future__ import annotations

import hashlib
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

from heimdall.tracking import redact

MB = 1024 * 1024


class StoreError(RuntimeError):
    """The model store is unreachable, refused a request, or holds different bytes than expected."""


@dataclass
class Stored:
    uri: str
    sha256: str
    size: int
    created: bool  # False: the same content was already there (idempotent re-run)


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(MB), b""):
            h.update(block)
    return h.hexdigest()


def open_store(uri: str, endpoint: str | None = None, multipart_threshold_mb: float = 64,
               multipart_chunk_mb: float = 16) -> "S3Store | LocalStore":
    if uri.startswith("s3://"):
        return S3Store(uri, endpoint, multipart_threshold_mb, multipart_chunk_mb)
    if "://" in uri:
        raise ValueError(f"export.models_uri {uri!r}: use a local folder or s3://bucket/prefix")
    return LocalStore(uri)


class LocalStore:
    def __init__(self, root: str):
        self.root = Path(root).expanduser().resolve()

    def uri_for(self, sha256: str) -> str:
        return str(self.root / f"{sha256}.onnx")

    def check(self) -> None:
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            probe = self.root / f".write-probe-{os.getpid()}"
            probe.write_bytes(b"ok")
            probe.unlink()
        except OSError as e:
            raise StoreError(f"model store {self.root} is not writable: {e}") from None

    def put(self, path: Path, sha256: str) -> Stored:
        target = Path(self.uri_for(sha256))
        size = path.stat().st_size
        created = not (target.exists() and target.stat().st_size == size and file_sha256(target) == sha256)
        if created:
            tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
            shutil.copyfile(path, tmp)
            os.replace(tmp, target)
        self.verify(str(target), sha256, size)
        return Stored(str(target), sha256, size, created)

    def verify(self, uri: str, sha256: str, size: int) -> None:
        p = Path(uri)
        if not p.exists() or p.stat().st_size != size or file_sha256(p) != sha256:
            raise StoreError(f"{uri} does not hold the expected {size} bytes with sha256 {sha256}")

    def fetch(self, uri: str, dest: Path) -> Path:
        shutil.copyfile(uri, dest)
        return dest

    def delete(self, uri: str) -> None:
        Path(uri).unlink(missing_ok=True)


class S3Store:
    def __init__(self, uri: str, endpoint: str | None, threshold_mb: float, chunk_mb: float):
        import boto3
        from boto3.s3.transfer import TransferConfig
        from botocore.config import Config

        parsed = urlparse(uri)
        self.bucket, self.prefix = parsed.netloc, parsed.path.strip("/")
        if not self.bucket:
            raise ValueError(f"export.models_uri {uri!r} names no bucket")
        self.endpoint = endpoint or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        # Seconds, not minutes: an unreachable endpoint must fail the export before anything is written.
        config = Config(connect_timeout=5, read_timeout=30, retries={"max_attempts": 2, "mode": "standard"})
        self.s3 = boto3.client("s3", endpoint_url=self.endpoint, config=config)
        self.transfer = TransferConfig(multipart_threshold=int(threshold_mb * MB), multipart_chunksize=int(chunk_mb * MB))

    def key_for(self, sha256: str) -> str:
        return f"{self.prefix}/{sha256}.onnx" if self.prefix else f"{sha256}.onnx"

    def uri_for(self, sha256: str) -> str:
        return f"s3://{self.bucket}/{self.key_for(sha256)}"

    def _where(self) -> str:
        return f"s3://{self.bucket}" + (f" at {redact(self.endpoint)}" if self.endpoint else "")

    def check(self) -> None:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            self.s3.head_bucket(Bucket=self.bucket)
        except ClientError as e:
            code = e.response.get("Error", {}).get("Code", "")
            what = "does not exist (create it first)" if code in ("404", "NoSuchBucket") else f"refused access ({code})"
            raise StoreError(f"model store {self._where()} {what}") from None
        except BotoCoreError as e:
            raise StoreError(f"model store {self._where()} is unreachable ({type(e).__name__}); check "
                             "export.s3_endpoint / AWS_ENDPOINT_URL_S3 and credentials") from None

    def _head(self, key: str) -> dict | None:
        from botocore.exceptions import ClientError

        try:
            return self.s3.head_object(Bucket=self.bucket, Key=key)
        except ClientError as e:
            if e.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                return None
            raise

    def put(self, path: Path, sha256: str) -> Stored:
        from botocore.exceptions import BotoCoreError, ClientError

        key, size = self.key_for(sha256), path.stat().st_size
        try:
            head = self._head(key)
            created = not (head and head["ContentLength"] == size and head.get("Metadata", {}).get("sha256") == sha256)
            if created:
                self.s3.upload_file(str(path), self.bucket, key, Config=self.transfer,
                                    ExtraArgs={"Metadata": {"sha256": sha256}, "ContentType": "application/octet-stream"})
        except (BotoCoreError, ClientError) as e:
            raise StoreError(f"upload to {self._where()} failed: {redact(e)}") from None
        self.verify(self.uri_for(sha256), sha256, size)
        return Stored(self.uri_for(sha256), sha256, size, created)

    def verify(self, uri: str, sha256: str, size: int) -> None:
        """HEAD (size and recorded hash), then read the object back and hash what S3 holds."""
        from botocore.exceptions import BotoCoreError, ClientError

        key = urlparse(uri).path.lstrip("/")
        try:
            head = self._head(key)
            if head is None or head["ContentLength"] != size or head.get("Metadata", {}).get("sha256") != sha256:
                raise StoreError(f"{uri}: size/sha256 metadata do not match the exported file")
            h = hashlib.sha256()
            for chunk in self.s3.get_object(Bucket=self.bucket, Key=key)["Body"].iter_chunks(MB):
                h.update(chunk)
        except (BotoCoreError, ClientError) as e:
            raise StoreError(f"verifying {uri} failed: {redact(e)}") from None
        if h.hexdigest() != sha256:
            raise StoreError(f"{uri}: content sha256 {h.hexdigest()} is not the exported file's {sha256}")

    def fetch(self, uri: str, dest: Path) -> Path:
        parsed = urlparse(uri)
        self.s3.download_file(parsed.netloc, parsed.path.lstrip("/"), str(dest))
        return dest

    def delete(self, uri: str) -> None:
        parsed = urlparse(uri)
        self.s3.delete_object(Bucket=parsed.netloc, Key=parsed.path.lstrip("/"))
