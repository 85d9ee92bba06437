"""A small HTTP proxy in front of the S3 server that injects the faults object stores really have:
``503 SlowDown`` answers and connections reset in the middle of a request.

Each request is read whole (headers, and a body by Content-Length), then, by the current plan, either
answered 503 SlowDown, cut (the client socket closed with RST before any answer), or forwarded to the
server on a fresh connection and its answer relayed (Content-Length or chunked bodies; none for HEAD).
"""

from __future__ import annotations

import socket
import socketserver
import struct
import threading
from dataclasses import dataclass

_SLOWDOWN = (
    b"HTTP/1.1 503 Slow Down\r\nContent-Type: application/xml\r\nContent-Length: %d\r\nConnection: keep-alive\r\n\r\n"
)
_SLOWDOWN_BODY = (
    b'<?xml version="1.0" encoding="UTF-8"?><Error><Code>SlowDown</Code>'
    b"<Message>Please reduce your request rate.</Message></Error>"
)


@dataclass
class Plan:
    """Fault every ``every``-th request (0: none) with ``kind``; ``first`` faults the next N requests;
    ``only``: only requests whose request line holds these bytes count (e.g. ``b"/journal/"``)."""

    every: int = 0
    kind: str = "503"  # "503" | "reset" | "mixed" (alternating)
    first: int = 0
    only: bytes = b""


class FaultProxy:
    def __init__(self, upstream_port: int) -> None:
        self.upstream = ("127.0.0.1", upstream_port)
        self.plan = Plan()
        self.requests = 0
        self.faults = {"503": 0, "reset": 0}
        self._lock = threading.Lock()
        proxy = self

        class Handler(socketserver.BaseRequestHandler):
            def handle(self) -> None:
                proxy._serve(self.request)

        class Server(socketserver.ThreadingTCPServer):
            daemon_threads = True
            allow_reuse_address = True

        self._server = Server(("127.0.0.1", 0), Handler)
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def _decide(self, req: bytes) -> str | None:
        with self._lock:
            if self.plan.only and self.plan.only not in req.split(b"\r\n", 1)[0]:
                return None
            self.requests += 1
            n = self.requests
            plan = self.plan
            if plan.first > 0:
                plan.first -= 1
                kind = plan.kind
            elif plan.every and n % plan.every == 0:
                kind = plan.kind
            else:
                return None
            if kind == "mixed":
                kind = "503" if n % 2 else "reset"
            self.faults[kind] += 1
            return kind

    def _serve(self, client: socket.socket) -> None:
        buf = b""
        try:
            while True:
                req, buf = _read_message(client, buf, request=True)
                if req is None:
                    return
                fault = self._decide(req)
                if fault == "503":
                    client.sendall(_SLOWDOWN % len(_SLOWDOWN_BODY) + _SLOWDOWN_BODY)
                    continue
                if fault == "reset":
                    client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                    client.close()  # RST: "connection reset by peer" on the client
                    return
                method = req.split(b" ", 1)[0]
                with socket.create_connection(self.upstream, timeout=30) as up:
                    up.sendall(req)
                    resp, _ = _read_message(up, b"", request=False, head=method == b"HEAD")
                if resp is None:
                    return
                client.sendall(resp)
        except OSError:
            return


def _read_message(sock: socket.socket, buf: bytes, request: bool, head: bool = False) -> tuple[bytes | None, bytes]:
    """One HTTP message from ``sock`` (``buf``: bytes already read). Returns (message, leftover)."""
    while b"\r\n\r\n" not in buf:
        data = sock.recv(65536)
        if not data:
            return None, b""
        buf += data
    end = buf.index(b"\r\n\r\n") + 4
    header, rest = buf[:end], buf[end:]
    lines = header.decode("latin-1").split("\r\n")
    fields = {k.strip().lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines[1:] if ln)}
    status = 0 if request else int(lines[0].split(" ")[1])
    if request and fields.get("expect", "").lower() == "100-continue":
        sock.sendall(b"HTTP/1.1 100 Continue\r\n\r\n")  # the client sends the body only after this
        kept = [ln for ln in lines if not ln.lower().startswith("expect:")]
        header = "\r\n".join(kept).encode("latin-1")
    if not request and 100 <= status < 200:  # an interim answer: the real one follows
        return _read_message(sock, rest, request, head)
    if head or status in (204, 304):
        return header, rest
    if fields.get("transfer-encoding", "").lower() == "chunked":
        body = b""
        while True:
            while b"\r\n" not in rest:
                data = sock.recv(65536)
                if not data:
                    return None, b""
                rest += data
            size_line, _, rest = rest.partition(b"\r\n")
            size = int(size_line.split(b";")[0], 16)
            while len(rest) < size + 2:
                data = sock.recv(65536)
                if not data:
                    return None, b""
                rest += data
            body += size_line + b"\r\n" + rest[: size + 2]
            rest = rest[size + 2 :]
            if size == 0:
                return header + body, rest
    length = int(fields.get("content-length", "0"))
    while len(rest) < length:
        data = sock.recv(1 << 20)
        if not data:
            return None, b""
        rest += data
    return header + rest[:length], rest[length:]
