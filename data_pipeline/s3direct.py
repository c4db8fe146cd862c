"""Ranged GETs of S3 objects straight into the reader's buffer.

Reading through s3fs/aiobotocore costs three passes over every byte in Python
(aiohttp's chunk list, ``bytes.join``, the copy into our buffer); on a small
machine that, not the network, limits throughput. Here each range is one GET of a
presigned URL (signed by s3fs's own client, so endpoint, region, credentials and
addressing style are exactly s3fs's) on a keep-alive ``http.client`` connection,
received with ``readinto`` directly into the destination -- one pass, with the GIL
released while the socket is read. Requests run concurrently on a small thread pool.

Errors are raised, not retried: :class:`~sfd_train.data_pipeline.storage.Storage`
retries the transient ones. Credentials live only in the signed URLs, in memory.
"""

from __future__ import annotations

import concurrent.futures as cf
import http.client
import os
import threading
import time
import urllib.parse
from typing import Any, Sequence

# Presigned URLs are valid for an hour and re-signed after half of that.
_URL_LIFETIME_S = 3600
_URL_REFRESH_S = 1800


class HTTPStatusError(OSError):
    """A non-success HTTP status; ``status`` lets the retry logic classify it."""

    def __init__(self, status: int, url: str, body: bytes):
        self.status = status
        super().__init__(f"HTTP {status} for {url.split('?', 1)[0]}: {body[:200]!r}")


def usable(storage_options: dict[str, Any]) -> bool:
    """Whether the direct path can serve these s3fs options (else everything goes through s3fs)."""
    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy")):
        return False  # http.client does not go through proxies; aiohttp does
    return not storage_options.get("requester_pays") and not storage_options.get("version_aware")


class DirectS3:
    """Concurrent ranged GETs on S3 objects, each received into a caller-given buffer.

    Args:
        fs: the ``s3fs.S3FileSystem`` whose client signs the URLs.
        threads: concurrent requests.
        timeout: socket timeout in seconds.
    """

    def __init__(self, fs: Any, threads: int = 8, timeout: float = 60.0):
        self.fs = fs
        self.timeout = timeout
        self._urls: dict[str, tuple[str, float]] = {}
        self._idle: dict[tuple[str, str], list[http.client.HTTPConnection]] = {}
        self._lock = threading.Lock()
        self._pool = cf.ThreadPoolExecutor(threads, thread_name_prefix="sfd-s3")
        fs.connect()

    def _url(self, path: str) -> str:
        now = time.monotonic()
        cached = self._urls.get(path)
        if cached is not None and now - cached[1] < _URL_REFRESH_S:
            return cached[0]
        from fsspec.asyn import sync  # noqa: PLC0415

        bucket, _, key = path.partition("/")
        url = sync(self.fs.loop, self.fs.s3.generate_presigned_url, "get_object",
                   Params={"Bucket": bucket, "Key": key}, ExpiresIn=_URL_LIFETIME_S)
        self._urls[path] = (url, now)
        return url

    def _connection(self, scheme: str, netloc: str) -> http.client.HTTPConnection:
        with self._lock:
            idle = self._idle.get((scheme, netloc))
            if idle:
                return idle.pop()
        cls = http.client.HTTPSConnection if scheme == "https" else http.client.HTTPConnection
        return cls(netloc, timeout=self.timeout)

    def _give_back(self, scheme: str, netloc: str, conn: http.client.HTTPConnection) -> None:
        with self._lock:
            self._idle.setdefault((scheme, netloc), []).append(conn)

    def get(self, path: str, start: int, stop: int, dest: memoryview) -> int:
        """GETs bytes ``[start, stop)`` of ``bucket/key`` into ``dest``; returns the bytes received.

        Fewer bytes than asked only where the object ends first.
        """
        url = self._url(path)
        u = urllib.parse.urlsplit(url)
        conn = self._connection(u.scheme, u.netloc)
        try:
            conn.request("GET", f"{u.path}?{u.query}" if u.query else u.path, headers={"Range": f"bytes={start}-{stop - 1}"})
            resp = conn.getresponse()
            if resp.status == 206 or (resp.status == 200 and start == 0):
                want = min(stop - start, resp.length if resp.length is not None else stop - start)
                got = 0
                while got < want:
                    n = resp.readinto(dest[got:want])
                    if not n:
                        raise http.client.IncompleteRead(b"", want - got)
                    got += n
                if resp.length:  # a 200 answer may carry more than we asked for
                    resp.read()
            else:
                body = resp.read()
                if resp.status == 416:  # the range starts at or after the end: a truncated object
                    got = 0
                elif resp.status == 404:
                    raise FileNotFoundError(f"s3://{path}: no such object")
                elif resp.status == 403 and b"expired" in body.lower():
                    self._urls.pop(path, None)
                    raise HTTPStatusError(503, url, body)  # re-sign and try again
                else:
                    raise HTTPStatusError(resp.status, url, body)
        except BaseException:
            conn.close()
            raise
        self._give_back(u.scheme, u.netloc, conn)
        return got

    def get_many(self, requests: Sequence[tuple[str, int, int, memoryview]]) -> list[int | BaseException]:
        """Runs :meth:`get` for each request concurrently; each result is a byte count or the exception."""
        futures = [self._pool.submit(self.get, *r) for r in requests]
        out: list[int | BaseException] = []
        for fut in futures:
            try:
                out.append(fut.result())
            except Exception as err:  # noqa: BLE001 - handed to the caller's retry logic
                out.append(err)
        return out

    def close(self) -> None:
        self._pool.shutdown(wait=False)
        with self._lock:
            for conns in self._idle.values():
                for conn in conns:
                    conn.close()
            self._idle.clear()
