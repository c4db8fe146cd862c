"""Byte-range reads from a local folder or any fsspec URL, with retries.

The reader asks for a list of ``(file, start, stop)`` ranges and gets them copied
into one buffer. Locally that is one ``preadv`` per range straight into the
buffer; through fsspec (``s3://`` with s3fs, ``gs://``, ``http://``, ...) it is
one concurrent batch of ranged GETs (``cat_ranges``). Transient failures
(connection errors, timeouts, HTTP 5xx, throttling) are retried with exponential
backoff and jitter; anything else (missing object, access denied) fails at once.
One loop does all the retrying (:meth:`RetryPolicy.run`): single requests repeat
whole, a batch of ranges repeats only the ranges that failed.

For ``s3://`` the ranged reads take a faster path by default (``s3direct.py``):
presigned GETs on plain keep-alive connections, received straight into the buffer.

Credentials are never handled here: s3fs/botocore read them from the environment
or the user's AWS configuration (``AWS_ACCESS_KEY_ID``, ``AWS_PROFILE``,
``AWS_ENDPOINT_URL_S3``, ``~/.aws/config``), and options given to
:class:`Storage` are passed through without being stored anywhere on disk.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import re
import time
from dataclasses import dataclass
from typing import Any, BinaryIO, Callable, Sequence, TypeVar

from sfd_train.data_pipeline.errors import StorageError

logger = logging.getLogger(__name__)

T = TypeVar("T")

# Error class names of botocore / aiohttp / urllib3 that mean "try again"; matched
# by name so that none of those libraries has to be importable.
_TRANSIENT_NAMES = {
    "EndpointConnectionError",
    "ConnectionClosedError",
    "ReadTimeoutError",
    "ConnectTimeoutError",
    "ConnectTimeout",
    "IncompleteRead",
    "ResponseStreamingError",
    "ServerDisconnectedError",
    "ClientOSError",
    "ClientConnectorError",
    "ClientPayloadError",
    "FSTimeoutError",
    "ProtocolError",
    "ResponseParserError",
}
_TRANSIENT_CODES = {
    "SlowDown",
    "Throttling",
    "ThrottlingException",
    "RequestTimeout",
    "RequestTimeTooSkewed",
    "InternalError",
    "ServiceUnavailable",
    "503",
    "500",
}


def is_transient(exc: BaseException) -> bool:
    """Whether ``exc`` (or an exception it was raised from) is worth retrying."""
    seen = set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, (FileNotFoundError, PermissionError, IsADirectoryError)):
            return False
        if isinstance(e, (ConnectionError, TimeoutError, asyncio.TimeoutError)):
            return True
        if type(e).__name__ in _TRANSIENT_NAMES:
            return True
        response = getattr(e, "response", None)  # botocore ClientError
        if isinstance(response, dict):
            code = str(response.get("Error", {}).get("Code", ""))
            status = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            if code in _TRANSIENT_CODES or status == 429 or (isinstance(status, int) and status >= 500):
                return True
        status = getattr(e, "status", None)  # aiohttp / http errors
        if isinstance(status, int) and (status == 429 or 500 <= status < 600):
            return True
        e = e.__cause__ or e.__context__
    return False


class PartlyFailed(Exception):
    """Some parts of a batched request failed transiently; the next attempt retries only those.

    ``errors`` holds one transient exception per failed part; the first is the cause, so
    :func:`is_transient` says yes.
    """

    def __init__(self, errors: Sequence[BaseException], message: str):
        self.errors = list(errors)
        super().__init__(message)
        self.__cause__ = self.errors[0]


def _describe(err: BaseException) -> str:
    return str(err) if isinstance(err, PartlyFailed) else repr(err)


@dataclass(frozen=True)
class RetryPolicy:
    """Exponential backoff with full jitter: the one retry loop for object storage."""

    attempts: int = 8
    """Tries in all (1 = no retry)."""
    initial_delay: float = 0.1
    """Upper bound of the first wait, seconds."""
    max_delay: float = 10.0
    """Upper bound of any wait, seconds."""

    def delay(self, attempt: int) -> float:
        return random.uniform(0, min(self.max_delay, self.initial_delay * 2**attempt))

    def run(self, fn: Callable[[], T], what: str, on_retry: Callable[[int], None] | None = None) -> T:
        """Calls ``fn`` until it returns, waiting and trying again after a transient error.

        Args:
            fn: one attempt. A batched request that keeps what succeeded raises
                :class:`PartlyFailed` for the rest; the next call retries only those.
            what: names the request in the log and in the final error.
            on_retry: called with the number of failures about to be retried (a
                :class:`PartlyFailed` counts its parts).

        Raises:
            StorageError: still failing transiently after ``attempts`` tries.
            Exception: anything that is not transient, at once and as raised.
        """
        for attempt in range(self.attempts):
            try:
                return fn()
            except Exception as err:  # noqa: BLE001 - classified below
                if not is_transient(err):
                    raise
                if attempt + 1 >= self.attempts:
                    raise StorageError(f"{what}: still failing after {attempt + 1} attempts: {_describe(err)}") from err
                if on_retry is not None:
                    on_retry(len(err.errors) if isinstance(err, PartlyFailed) else 1)
                wait = self.delay(attempt)
                logger.warning("%s: transient error (%s); retry %d in %.2fs", what, _describe(err), attempt + 1, wait)
                time.sleep(wait)
        raise AssertionError("unreachable")


# RFC 3986 scheme followed by '://': what fsspec would take as a protocol.
_URL_SCHEME = re.compile(r"^([a-zA-Z][a-zA-Z0-9+.-]*)://")


def url_scheme(path: str | os.PathLike) -> str | None:
    """The scheme of ``path`` if it is a URL (``s3`` for ``s3://b/x``, also ``file``), else None."""
    match = _URL_SCHEME.match(str(path))
    return match.group(1) if match else None


def is_url(path: str) -> bool:
    """Whether ``path`` names an fsspec URL (``proto://...``) rather than a local path."""
    return url_scheme(path) is not None and not str(path).startswith("file://")


def url_output_error(path: str | os.PathLike) -> str | None:
    """Why ``path`` cannot be where outputs are written, or None when it can.

    Outputs (checkpoints, the run lock, logs, shards, exported weights) are written as POSIX
    files: atomic renames, file locks, appends. A URL there would otherwise become a local
    folder literally named ``s3:`` and the job would report success. ``file://`` is refused
    too, for the same reason.
    """
    if url_scheme(path) is None:
        return None
    return (f"{str(path)!r} is a URL, but outputs must go to a local or shared (mounted) filesystem path, because "
            "checkpoints, the run lock, logs and shards need POSIX files (atomic renames, locks, appends); write to "
            "such a folder and copy the result to the object store afterwards")


class Storage:
    """Files under one root: a local folder or an fsspec URL.

    Args:
        root: folder or URL (``s3://bucket/prefix``).
        storage_options: passed to fsspec's filesystem (e.g. ``{"anon": True}``,
            ``{"client_kwargs": {"endpoint_url": ...}}``).
        retry: the backoff policy for transient errors.
    """

    def __init__(self, root: str, storage_options: dict[str, Any] | None = None, retry: RetryPolicy = RetryPolicy(),
                 direct_s3: bool = True):
        root = str(root)
        if root.startswith("file://"):
            root = root[len("file://") :]
        self.root = root.rstrip("/") if root not in ("/", "") else root
        self.is_local = not is_url(root)
        self.storage_options = dict(storage_options or {})
        self.retry = retry
        self.retries = 0
        """Transient failures retried so far in this process."""
        self.direct_s3 = direct_s3
        self._pid = None
        self._fs = None
        self._direct = None
        self._base = None
        self._fds: dict[str, int] = {}

    # Workers get a copy without open handles; each process opens its own.
    def __getstate__(self):
        state = self.__dict__.copy()
        state.update(_pid=None, _fs=None, _fds={}, _direct=None)
        return state

    def _check_process(self) -> None:
        if self._pid != os.getpid():
            self._pid = os.getpid()
            self._fs = None
            self._fds = {}
            self._direct = None

    @property
    def fs(self):
        """The fsspec filesystem (created lazily, once per process)."""
        self._check_process()
        if self.is_local:
            raise AttributeError("a local Storage has no fsspec filesystem")
        if self._fs is None:
            import fsspec

            options = {"skip_instance_cache": True, **self.storage_options}
            self._fs, self._base = fsspec.core.url_to_fs(self.root, **options)
        return self._fs

    def path(self, name: str) -> str:
        """Full path or URL of ``name`` under the root."""
        return f"{self.root}/{name}" if self.root else name

    def _fs_path(self, name: str) -> str:
        self.fs  # noqa: B018 - creates the filesystem and its base path
        return f"{self._base.rstrip('/')}/{name}"

    def call(self, fn: Callable[[], T], what: str) -> T:
        """Runs ``fn`` under this storage's :class:`RetryPolicy`, counting the retries."""
        return self.retry.run(fn, what, on_retry=self._count_retries)

    def _count_retries(self, failures: int) -> None:
        self.retries += failures

    def exists(self, name: str) -> bool:
        if self.is_local:
            return os.path.exists(self.path(name))
        return self.call(lambda: self.fs.exists(self._fs_path(name)), f"exists {self.path(name)}")

    def read_bytes(self, name: str) -> bytes:
        """The whole content of ``name``."""
        if self.is_local:
            with open(self.path(name), "rb") as f:
                return f.read()
        return self.call(lambda: self.fs.cat_file(self._fs_path(name)), f"read {self.path(name)}")

    def open(self, name: str) -> BinaryIO:
        """``name`` opened for sequential binary reading."""
        if self.is_local:
            return open(self.path(name), "rb")
        return self.call(lambda: self.fs.open(self._fs_path(name), "rb", block_size=16 << 20), f"open {self.path(name)}")

    def sizes(self) -> dict[str, int]:
        """``{file name: size}`` of the files directly under the root (one listing)."""
        if self.is_local:
            with os.scandir(self.root or ".") as it:
                return {e.name: e.stat().st_size for e in it if e.is_file()}

        def _ls():
            return self.fs.ls(self._base, detail=True, refresh=True)

        entries = self.call(_ls, f"list {self.root}")
        return {e["name"].rstrip("/").rsplit("/", 1)[-1]: int(e["size"]) for e in entries if e.get("type") != "directory"}

    def _fd(self, name: str) -> int:
        self._check_process()
        fd = self._fds.get(name)
        if fd is None:
            fd = os.open(self.path(name), os.O_RDONLY)
            self._fds[name] = fd
        return fd

    def will_need(self, ranges: Sequence[tuple[str, int, int]]) -> None:
        """Hints that ``ranges`` will be read soon, so the kernel starts reading them now.

        Only local files; it turns the reader's knowledge of its next batch into
        disk parallelism while the current batch is decoded.
        """
        if not self.is_local or not hasattr(os, "posix_fadvise"):
            return
        for name, start, stop in ranges:
            try:
                os.posix_fadvise(self._fd(name), start, stop - start, os.POSIX_FADV_WILLNEED)
            except OSError:
                return

    def read_into(self, ranges: Sequence[tuple[str, int, int]], buffer: memoryview, offsets: Sequence[int]) -> list[int]:
        """Copies each range ``(name, start, stop)`` into ``buffer[offset:]``.

        Args:
            ranges: byte ranges to read, ``stop`` exclusive.
            buffer: writable destination.
            offsets: where in ``buffer`` each range goes.

        Returns:
            Bytes read per range; fewer than asked only where a file ends early.
        """
        if self.is_local:
            return [self._pread(name, start, stop, buffer[off : off + stop - start]) for (name, start, stop), off in zip(ranges, offsets)]
        return self._read_remote(ranges, buffer, offsets)

    def _pread(self, name: str, start: int, stop: int, dest: memoryview) -> int:
        fd = self._fd(name)
        done = 0
        want = stop - start
        while done < want:
            n = os.preadv(fd, [dest[done:]], start + done)
            if n == 0:
                break
            done += n
        return done

    @property
    def direct(self):
        """The direct ranged-GET reader for ``s3://`` (see ``s3direct.py``), or None."""
        self._check_process()
        if self._direct is None and self.direct_s3 and not self.is_local and self.root.startswith(("s3://", "s3a://")):
            from sfd_train.data_pipeline import s3direct  # noqa: PLC0415

            self._direct = s3direct.DirectS3(self.fs) if s3direct.usable(self.storage_options) else False
        return self._direct or None

    def _fetch(self, ranges, buffer, offsets, pending) -> list[int | BaseException]:
        """One attempt at the ranges ``pending``: bytes read, or the exception, for each."""
        direct = self.direct
        if direct is not None:
            return direct.get_many([
                (self._fs_path(ranges[i][0]), ranges[i][1], ranges[i][2], buffer[offsets[i] : offsets[i] + ranges[i][2] - ranges[i][1]])
                for i in pending
            ])
        paths = [self._fs_path(ranges[i][0]) for i in pending]
        try:
            results = self.fs.cat_ranges(paths, [ranges[i][1] for i in pending], [ranges[i][2] for i in pending], on_error="return")
        except Exception as err:  # noqa: BLE001 - the whole batch failed
            return [err] * len(pending)
        out: list[int | BaseException] = []
        for i, res in zip(pending, results):
            if not isinstance(res, BaseException):
                buffer[offsets[i] : offsets[i] + len(res)] = res
                res = len(res)
            out.append(res)
        return out

    def _read_remote(self, ranges, buffer, offsets) -> list[int]:
        got = [0] * len(ranges)
        pending = list(range(len(ranges)))

        def attempt() -> list[int]:
            nonlocal pending
            failed = []
            for i, res in zip(pending, self._fetch(ranges, buffer, offsets, pending)):
                if not isinstance(res, BaseException):
                    got[i] = res
                elif is_transient(res):
                    failed.append((i, res))
                elif isinstance(res, FileNotFoundError):
                    raise res
                else:
                    raise StorageError(f"reading {self.path(ranges[i][0])} bytes {ranges[i][1]}-{ranges[i][2]}: {res!r}") from res
            pending = [i for i, _ in failed]
            if failed:
                first, err = failed[0]
                raise PartlyFailed([e for _, e in failed], f"{len(failed)} range(s) failed, the first in "
                                                           f"{self.path(ranges[first][0])}: {err!r}")
            return got

        return self.call(attempt, f"reading {len(ranges)} range(s) under {self.root}")

    def close(self) -> None:
        if self._direct:
            self._direct.close()
            self._direct = None
        for fd in self._fds.values():
            try:
                os.close(fd)
            except OSError:
                pass
        self._fds = {}

    def __del__(self):
        if self._pid == os.getpid():
            self.close()
