"""A TCP proxy on loopback that can take an endpoint down and bring it back: the S3 server
behind it keeps its objects, as a real object store does through a network outage."""

from __future__ import annotations

import contextlib
import socket
import threading


class FlakyProxy:
    """Forwards 127.0.0.1:<port> to 127.0.0.1:<target>.

    When a client sends bytes containing `trigger`, that request is dropped unanswered and the
    proxy goes down (listener closed, live connections reset) for `down_for` seconds, or for
    good when `down_for` is None (until `up()`).
    """

    def __init__(self, target_port: int, trigger: bytes | None = None,
                 down_for: float | None = 3.0) -> None:
        self.target_port, self.trigger, self.down_for = target_port, trigger, down_for
        self.triggered = threading.Event()
        self.lock = threading.Lock()
        self.conns: list[socket.socket] = []
        self.listener: socket.socket | None = None
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = int(s.getsockname()[1])
        self.up()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def up(self) -> None:
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(64)
        self.listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()

    def down(self, seconds: float | None) -> None:
        with self.lock:
            if self.listener is not None:
                self.listener.close()
                self.listener = None
            for c in self.conns:
                with contextlib.suppress(OSError):
                    c.shutdown(socket.SHUT_RDWR)
                c.close()
            self.conns.clear()
        if seconds is not None:
            threading.Timer(seconds, self.up).start()

    def close(self) -> None:
        self.down(None)

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return  # the listener was closed: the endpoint is down
            server = socket.create_connection(("127.0.0.1", self.target_port))
            with self.lock:
                self.conns += [client, server]
            threading.Thread(target=self._pipe, args=(client, server, True), daemon=True).start()
            threading.Thread(target=self._pipe, args=(server, client, False), daemon=True).start()

    def _pipe(self, src: socket.socket, dst: socket.socket, from_client: bool) -> None:
        try:
            while data := src.recv(65536):
                if (from_client and self.trigger is not None and self.trigger in data
                        and not self.triggered.is_set()):
                    self.triggered.set()
                    self.down(self.down_for)
                    return
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)
