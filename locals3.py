"""A local S3 to try, test and benchmark etl.py against: S3Proxy on 127.0.0.1, optionally
behind a proxy that adds a fixed delay to every request and counts them by type.

    python locals3.py --data /tmp/s3 --port 9000                # S3Proxy, key "local", secret "local-secret"
    python locals3.py --data /tmp/s3 --port 9000 --delay-ms 20  # every request 20 ms slower, as S3 is

S3Proxy (Apache-2.0, ``org.gaul:s3proxy``) serves the S3 protocol from a folder and checks
real AWS signatures: a wrong key or secret gets a real 403. Its runnable jar is fetched
from Maven Central once, into ~/.cache/sparkify. It needs Java 17.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import subprocess
import threading
import time
import urllib.request
from collections import Counter
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

S3PROXY_VERSION = "4.1.0"
S3PROXY_URL = (
    f"https://repo1.maven.org/maven2/org/gaul/s3proxy/{S3PROXY_VERSION}/"
    f"s3proxy-{S3PROXY_VERSION}-jar-with-dependencies.jar"
)
CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "sparkify"
ACCESS_KEY, SECRET_KEY = "local", "local-secret"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def s3proxy_jar() -> Path:
    """The S3Proxy jar, downloaded from Maven Central on first use."""
    jar = CACHE / Path(urlsplit(S3PROXY_URL).path).name
    if not jar.is_file():
        CACHE.mkdir(parents=True, exist_ok=True)
        partial = jar.with_suffix(f".part{os.getpid()}")
        with urllib.request.urlopen(S3PROXY_URL, timeout=120) as response, open(partial, "wb") as out:
            while chunk := response.read(1 << 20):
                out.write(chunk)
        partial.replace(jar)
    return jar


@contextmanager
def s3proxy(data: Path, port: int | None = None, access_key: str = ACCESS_KEY, secret_key: str = SECRET_KEY):
    """S3Proxy serving ``data`` on 127.0.0.1; yields its endpoint URL."""
    data.mkdir(parents=True, exist_ok=True)
    port = port or free_port()
    config = data.parent / f"{data.name}.s3proxy.properties"
    config.write_text(
        "\n".join(
            [
                f"s3proxy.endpoint=http://127.0.0.1:{port}",
                "s3proxy.authorization=aws-v2-or-v4",
                f"s3proxy.identity={access_key}",
                f"s3proxy.credential={secret_key}",
                "jclouds.provider=filesystem",
                f"jclouds.filesystem.basedir={data}",
            ]
        )
        + "\n"
    )
    log = data.parent / f"{data.name}.s3proxy.log"
    with open(log, "wb") as output:
        server = subprocess.Popen(
            ["java", "-Xmx512m", "-jar", str(s3proxy_jar()), "--properties", str(config)],
            stdout=output,
            stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + 60
        while True:
            if server.poll() is not None:
                raise RuntimeError(f"S3Proxy exited with {server.returncode}:\n{log.read_text()[-2000:]}")
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=1):
                    break
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"S3Proxy did not listen on {port}:\n{log.read_text()[-2000:]}") from None
                time.sleep(0.2)
        yield f"http://127.0.0.1:{port}"
    finally:
        server.terminate()
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()


def request_kind(method: str, target: str, headers: dict[str, str]) -> str:
    """The S3 operation an HTTP request is: GET, PUT, LIST, INITIATE_MULTIPART, ..."""
    url = urlsplit(target)
    query = parse_qs(url.query, keep_blank_values=True)
    has_key = url.path.strip("/").count("/") >= 1  # /bucket/key (path-style addressing)
    if method == "GET":
        if "uploadId" in query:
            return "LIST_PARTS"
        if "uploads" in query:
            return "LIST_MULTIPART_UPLOADS"
        return "GET" if has_key else "LIST"
    if method == "HEAD":
        return "HEAD" if has_key else "HEAD_BUCKET"
    if method == "PUT":
        if "partNumber" in query:
            return "UPLOAD_PART"
        if "x-amz-copy-source" in headers:
            return "COPY"
        return "PUT" if has_key else "CREATE_BUCKET"
    if method == "POST":
        if "uploads" in query:
            return "INITIATE_MULTIPART"
        if "uploadId" in query:
            return "COMPLETE_MULTIPART"
        if "delete" in query:
            return "DELETE_OBJECTS"
        return "POST"
    if method == "DELETE":
        return "ABORT_MULTIPART" if "uploadId" in query else "DELETE"
    return method


class LatencyProxy:
    """An HTTP/1.1 proxy on 127.0.0.1 in front of an S3 server: each request waits
    ``delay_ms`` before it is forwarded, and is counted by kind (``counts``)."""

    def __init__(self, upstream: str, delay_ms: float = 0.0, port: int | None = None):
        parts = urlsplit(upstream)
        self.upstream = (parts.hostname, parts.port)
        self.delay = delay_ms / 1000
        self.port = port or free_port()
        self.counts: Counter[str] = Counter()
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._started = threading.Event()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def reset(self) -> Counter[str]:
        """The counts so far, and zero from now on."""
        with self._lock:
            counts, self.counts = self.counts, Counter()
        return counts

    def __enter__(self) -> LatencyProxy:
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()
        self._started.wait(10)
        return self

    def __exit__(self, *exc_info) -> None:
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._loop.stop)
        if self._thread is not None:
            self._thread.join(10)

    def _serve(self) -> None:
        self._loop = asyncio.new_event_loop()
        asyncio.set_event_loop(self._loop)  # this thread's loop, for gather() at shutdown
        server = self._loop.run_until_complete(
            asyncio.start_server(self._connection, "127.0.0.1", self.port, backlog=1024)
        )
        self._started.set()
        try:
            self._loop.run_forever()
        finally:
            server.close()
            pending = asyncio.all_tasks(self._loop)
            for task in pending:
                task.cancel()
            if pending:
                self._loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
            self._loop.close()

    async def _connection(self, client_in: asyncio.StreamReader, client_out: asyncio.StreamWriter) -> None:
        upstream_in = upstream_out = None
        try:
            while True:
                head = await client_in.readuntil(b"\r\n\r\n")
                request_line, headers = _parse_head(head)
                method, target, _ = request_line.split(" ", 2)
                if headers.get("expect", "").lower() == "100-continue":
                    # Answer for the server: the body follows at once, and the delay
                    # below stays the only one a request sees.
                    client_out.write(b"HTTP/1.1 100 Continue\r\n\r\n")
                    head = _drop_header(head, b"expect")
                body = await _read_body(client_in, headers)
                with self._lock:
                    self.counts[request_kind(method, target, headers)] += 1
                if self.delay:
                    await asyncio.sleep(self.delay)
                if upstream_out is None:
                    upstream_in, upstream_out = await asyncio.open_connection(*self.upstream)
                upstream_out.write(head + body)
                await upstream_out.drain()
                status_head = await upstream_in.readuntil(b"\r\n\r\n")
                while status_head.split(b" ", 2)[1].startswith(b"1"):  # interim answers
                    client_out.write(status_head)
                    status_head = await upstream_in.readuntil(b"\r\n\r\n")
                status_line, response_headers = _parse_head(status_head)
                status = int(status_line.split(" ", 2)[1])
                no_body = method == "HEAD" or status in (204, 304)
                response_body = b"" if no_body else await _read_body(upstream_in, response_headers, until_close=True)
                client_out.write(status_head + response_body)
                await client_out.drain()
                if "close" in (headers.get("connection", "") + response_headers.get("connection", "")).lower():
                    break
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.LimitOverrunError, asyncio.CancelledError):
            pass
        finally:
            for writer in (client_out, upstream_out):
                if writer is not None:
                    writer.close()


def _parse_head(head: bytes) -> tuple[str, dict[str, str]]:
    lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in lines[1:]:
        if ":" in line:
            name, value = line.split(":", 1)
            headers[name.strip().lower()] = value.strip()
    return lines[0], headers


def _drop_header(head: bytes, name: bytes) -> bytes:
    lines = head.split(b"\r\n")
    return b"\r\n".join(line for line in lines if not line.lower().startswith(name + b":"))


async def _read_body(stream: asyncio.StreamReader, headers: dict[str, str], until_close: bool = False) -> bytes:
    """A message body framed by Content-Length or chunked encoding, kept as framed."""
    if "chunked" in headers.get("transfer-encoding", "").lower():
        framed = bytearray()
        while True:
            size_line = await stream.readuntil(b"\r\n")
            framed += size_line
            size = int(size_line.split(b";")[0], 16)
            if size == 0:
                while (trailer := await stream.readuntil(b"\r\n")) != b"\r\n":
                    framed += trailer
                return bytes(framed + b"\r\n")
            framed += await stream.readexactly(size + 2)
    if "content-length" in headers:
        return await stream.readexactly(int(headers["content-length"]))
    return await stream.read() if until_close else b""


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", required=True, help="folder that holds the buckets")
    parser.add_argument("--port", type=int, default=9000)
    parser.add_argument("--delay-ms", type=float, default=0.0, help="delay added to every request")
    args = parser.parse_args(argv)
    with s3proxy(Path(args.data).resolve(), None if args.delay_ms else args.port) as endpoint:
        if not args.delay_ms:
            print(f"S3 endpoint {endpoint} (key {ACCESS_KEY}, secret {SECRET_KEY}); Ctrl-C stops it", flush=True)
            _wait()
            return
        with LatencyProxy(endpoint, args.delay_ms, args.port) as proxy:
            print(
                f"S3 endpoint {proxy.endpoint}, {args.delay_ms:g} ms per request (key {ACCESS_KEY}, "
                f"secret {SECRET_KEY}); Ctrl-C stops it and prints the requests by kind",
                flush=True,
            )
            try:
                _wait()
            finally:
                for kind, count in sorted(proxy.counts.items()):
                    print(f"{kind:<24}{count:>10,}")


def _wait() -> None:
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
