"""Reading from a real S3 server (moto) on loopback, including transient failures."""

import http.client
import logging
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import moto.server as moto_server  # test extras: missing, the suite fails rather than skipping
import numpy as np
import pytest
import s3fs  # noqa: F401
import torch

from ports import free_port
from sfd_train.data_pipeline.errors import StorageError
from sfd_train.data_pipeline.manifest import read_manifest
from sfd_train.data_pipeline.reader import CompositeLatentLoader
from sfd_train.data_pipeline.storage import PartlyFailed, RetryPolicy, is_transient
from sfd_train.data_pipeline.testing import collect, tiny_synthetic

BUCKET = "sfd-test"


class FlakyProxy(ThreadingHTTPServer):
    """An HTTP proxy in front of the S3 server that fails the next ``fail`` ranged GETs of shards.

    ``mode="503"`` answers like an overloaded S3 (ServiceUnavailable); ``mode="drop"``
    drops the connection half-way through the response body.
    """

    daemon_threads = True

    def __init__(self, upstream_port: int):
        self.upstream_port = upstream_port
        self.fail = 0
        self.mode = "503"
        self.failed = 0
        self.shard_gets = 0
        self.lock = threading.Lock()
        super().__init__(("127.0.0.1", 0), _ProxyHandler)

    def take_failure(self) -> bool:
        with self.lock:
            self.shard_gets += 1
            if self.fail > 0:
                self.fail -= 1
                self.failed += 1
                return True
            return False


class _ProxyHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def _forward(self):
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        failing = self.command == "GET" and ".tar" in self.path and "Range" in self.headers and self.server.take_failure()
        if failing and self.server.mode == "503":
            payload = b"<?xml version='1.0'?><Error><Code>ServiceUnavailable</Code><Message>try later</Message></Error>"
            self.send_response(503)
            self.send_header("Content-Type", "application/xml")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)
            return
        conn = http.client.HTTPConnection("127.0.0.1", self.server.upstream_port, timeout=60)
        conn.request(self.command, self.path, body=body or None, headers={k: v for k, v in self.headers.items()})
        resp = conn.getresponse()
        data = resp.read()
        self.send_response(resp.status)
        for k, v in resp.getheaders():
            if k.lower() not in ("transfer-encoding", "connection", "content-length", "server", "date"):
                self.send_header(k, v)
        self.send_header("Content-Length", str(len(data)) if self.command != "HEAD" else resp.getheader("Content-Length", "0"))
        self.end_headers()
        if failing:  # mode "drop": the connection dies half-way through the body
            self.wfile.write(data[: len(data) // 2])
            self.wfile.flush()
            self.close_connection = True
            self.connection.shutdown(socket.SHUT_RDWR)
        elif self.command != "HEAD":
            self.wfile.write(data)
        conn.close()

    do_GET = do_HEAD = do_PUT = do_POST = do_DELETE = _forward


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """A moto S3 server with a dataset uploaded, and a flaky proxy in front of it."""
    mp = pytest.MonkeyPatch()
    for key, value in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}.items():
        mp.setenv(key, value)
    mp.delenv("AWS_PROFILE", raising=False)
    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # moto's request log
    port = free_port()
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    proxy = FlakyProxy(port)
    threading.Thread(target=proxy.serve_forever, daemon=True).start()
    local = str(tmp_path_factory.mktemp("s3") / "ds")
    tiny_synthetic(local, num_samples=260, shard_size=64)
    import s3fs

    fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": f"http://127.0.0.1:{port}"}, skip_instance_cache=True)
    fs.mkdir(BUCKET)
    fs.put(local + "/", f"{BUCKET}/ds/", recursive=True)
    yield {"local": local, "url": f"s3://{BUCKET}/ds", "direct": f"http://127.0.0.1:{port}",
           "proxy": f"http://127.0.0.1:{proxy.server_address[1]}", "flaky": proxy}
    proxy.shutdown()
    server.stop()
    mp.undo()


def options(endpoint, own_retries_only=False):
    opts = {"client_kwargs": {"endpoint_url": endpoint}}
    if own_retries_only:
        # Switch off botocore's retries so that every failure reaches ours (s3fs's own
        # retries are switched off by the ``own_retries`` fixture).
        opts.update(config_kwargs={"retries": {"total_max_attempts": 1, "mode": "standard"}})
    return opts


@pytest.fixture
def own_retries(monkeypatch):
    import s3fs

    monkeypatch.setattr(s3fs.S3FileSystem, "retries", 1)  # a class attribute, not an option


def make(path, workers=0, storage_options=None, **kw):
    return CompositeLatentLoader(path, global_batch_size=32, micro_batch_size=16, rank=1, world_size=2, seed=3,
                                 num_workers=workers, storage_options=storage_options, **kw)


def same(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for k in x:
            assert torch.equal(x[k], y[k]), k


def test_manifest_from_s3(s3):
    m = read_manifest(s3["url"], options(s3["direct"]))
    assert m == read_manifest(s3["local"])


@pytest.mark.parametrize("workers,direct", [(0, True), (0, False), pytest.param(2, True, marks=pytest.mark.slow)])
def test_s3_batches_equal_local_batches(s3, workers, direct):
    steps = 20  # more than one epoch (8 optimizer steps per epoch)
    expected = collect(make(s3["local"]), steps)
    loader = make(s3["url"], workers=workers, storage_options=options(s3["direct"]), direct_s3=direct)
    same(expected, collect(loader, steps))
    state = loader.state_dict()
    loader.close()
    resumed = make(s3["url"], workers=workers, storage_options=options(s3["direct"]))
    resumed.load_state_dict(state)
    local = make(s3["local"])
    local.load_state_dict(state)
    same(collect(local, 3), collect(resumed, 3))


@pytest.mark.parametrize("direct", [True, False], ids=["direct", "s3fs"])
@pytest.mark.parametrize("mode", ["503", "drop"])
def test_transient_failures_are_retried(s3, mode, direct, own_retries):
    proxy = s3["flaky"]
    expected = collect(make(s3["local"]), 6)
    loader = make(s3["url"], storage_options=options(s3["proxy"], own_retries_only=True),
                  retry=RetryPolicy(attempts=5, initial_delay=0.01), direct_s3=direct)
    assert (loader.storage.direct is not None) == direct
    proxy.mode, proxy.failed, proxy.fail = mode, 0, 8
    got = collect(loader, 6)
    same(expected, got)
    assert proxy.failed == 8
    assert loader.storage.retries == 8  # each failure went through our retry path


@pytest.mark.parametrize("direct", [True, False], ids=["direct", "s3fs"])
def test_persistent_failure_gives_up_with_a_clear_error(s3, own_retries, direct):
    proxy = s3["flaky"]
    loader = make(s3["url"], storage_options=options(s3["proxy"], own_retries_only=True),
                  retry=RetryPolicy(attempts=3, initial_delay=0.01), direct_s3=direct)
    proxy.mode, proxy.failed, proxy.fail = "503", 0, 10**6
    try:
        with pytest.raises(StorageError, match="still failing after 3 attempts"):
            next(loader)
    finally:
        proxy.fail = 0
    assert proxy.failed >= 3


def test_botocore_retries_absorb_a_short_outage_on_the_s3fs_path(s3):
    # Through s3fs with default client settings, botocore retries 5xx itself; ours sees nothing.
    proxy = s3["flaky"]
    expected = collect(make(s3["local"]), 2)
    loader = make(s3["url"], storage_options=options(s3["proxy"]), direct_s3=False)
    proxy.mode, proxy.failed, proxy.fail = "503", 0, 1
    same(expected, collect(loader, 2))
    assert proxy.failed == 1 and loader.storage.retries == 0


def test_missing_object_is_not_retried(s3):
    import s3fs

    fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": s3["direct"]}, skip_instance_cache=True)
    fs.copy(f"{BUCKET}/ds", f"{BUCKET}/gone", recursive=True)
    loader = make(f"s3://{BUCKET}/gone", storage_options=options(s3["direct"]), retry=RetryPolicy(attempts=5, initial_delay=1.0))
    for name in fs.ls(f"{BUCKET}/gone"):
        if name.endswith(".tar"):
            fs.rm(name)
    with pytest.raises((StorageError, FileNotFoundError)):
        next(loader)
    assert loader.storage.retries == 0


def test_one_retry_loop_for_calls_and_batches():
    policy = RetryPolicy(attempts=4, initial_delay=0.0)
    calls, counted = [], []

    def flaky_call():
        calls.append(len(calls))
        if len(calls) < 3:
            raise ConnectionResetError()
        return "ok"

    assert policy.run(flaky_call, "call", on_retry=counted.append) == "ok"
    assert len(calls) == 3 and counted == [1, 1]  # repeated whole

    asked, todo = [], [0, 1, 2, 3]

    def flaky_batch():  # half of what is asked fails each time
        nonlocal todo
        asked.append(list(todo))
        todo = todo[: len(todo) // 2]
        if todo:
            raise PartlyFailed([TimeoutError()] * len(todo), f"{len(todo)} part(s) failed")
        return "done"

    counted.clear()
    assert policy.run(flaky_batch, "batch", on_retry=counted.append) == "done"
    assert asked == [[0, 1, 2, 3], [0, 1], [0]] and counted == [2, 1]  # only the failed parts again

    def always(err):
        calls.append(err)
        raise err

    calls.clear()
    with pytest.raises(StorageError, match="batch: still failing after 4 attempts: 1 part"):
        policy.run(lambda: always(PartlyFailed([ConnectionResetError()], "1 part failed")), "batch")
    assert len(calls) == 4
    calls.clear()
    with pytest.raises(PermissionError):  # not transient: no second try
        policy.run(lambda: always(PermissionError("denied")), "call")
    assert len(calls) == 1


def test_is_transient_classification():
    from botocore.exceptions import ClientError, EndpointConnectionError

    def client_error(code, status):
        return ClientError({"Error": {"Code": code, "Message": "x"}, "ResponseMetadata": {"HTTPStatusCode": status}}, "GetObject")

    def wrapped(err):
        try:
            raise OSError(5, "translated") from err
        except OSError as e:
            return e

    assert is_transient(wrapped(client_error("ServiceUnavailable", 503)))
    assert is_transient(client_error("SlowDown", 503))
    assert is_transient(client_error("Throttling", 400))
    assert is_transient(client_error("InternalError", 500))
    assert is_transient(EndpointConnectionError(endpoint_url="http://x"))
    assert is_transient(ConnectionResetError())
    assert not is_transient(wrapped(client_error("AccessDenied", 403)))
    assert not is_transient(client_error("NoSuchKey", 404))
    assert not is_transient(FileNotFoundError("x"))
    assert not is_transient(ValueError("x"))
    policy = RetryPolicy(initial_delay=0.1, max_delay=1.0)
    delays = np.array([[policy.delay(k) for k in range(8)] for _ in range(200)])
    assert (delays >= 0).all() and (delays[:, 0] <= 0.1).all() and (delays <= 1.0).all()
    assert delays[:, 0].mean() < delays[:, 3].mean()  # grows with the attempt (full jitter)
