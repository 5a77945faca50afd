"""A loopback TCP proxy for fault tests: forwards to a target port and, once, cuts the
connection after a number of bytes went from the server to the client (optionally calling
back first, e.g. to kill the server at that moment). Later connections pass through."""

from __future__ import annotations

import socket
import threading
from typing import Callable

from qwen3vl.launch.server import free_ports


class CuttingProxy:
    def __init__(self, target_port: int, cut_after_bytes: int | None = None,
                 on_cut: Callable[[], None] | None = None):
        self.target_port, self.cut_after_bytes, self.on_cut = target_port, cut_after_bytes, on_cut
        self.port = free_ports(1)[0]
        self.url = f"127.0.0.1:{self.port}"
        self.cuts = 0
        self.lock = threading.Lock()
        self.listener = socket.create_server(("127.0.0.1", self.port))
        self.listener.settimeout(0.2)
        self.running = True
        self.thread = threading.Thread(target=self._accept, daemon=True)
        self.thread.start()

    def arm(self, cut_after_bytes: int, on_cut: Callable[[], None] | None = None) -> None:
        """Cut the next connection that carries this many bytes to the client."""
        with self.lock:
            self.cut_after_bytes, self.on_cut = cut_after_bytes, on_cut

    def _accept(self) -> None:
        while self.running:
            try:
                client, _ = self.listener.accept()
            except socket.timeout:
                continue
            except OSError:
                return
            try:
                server = socket.create_connection(("127.0.0.1", self.target_port), timeout=5)
            except OSError:
                client.close()
                continue
            server.settimeout(None)
            state = {"down": 0, "closed": False}
            threading.Thread(target=self._pipe, args=(client, server, None), daemon=True).start()
            threading.Thread(target=self._pipe, args=(server, client, state), daemon=True).start()

    def _pipe(self, src: socket.socket, dst: socket.socket, state: dict | None) -> None:
        try:
            while data := src.recv(16384):
                if state is not None:
                    with self.lock:
                        limit = self.cut_after_bytes
                        cut = limit is not None and state["down"] + len(data) >= limit
                        if cut:
                            self.cut_after_bytes, on_cut = None, self.on_cut
                            self.cuts += 1
                    if cut:
                        # Deliver exactly up to the limit (complete chunks arrive), then cut.
                        dst.sendall(data[:limit - state["down"]])
                        if on_cut:
                            on_cut()
                        break
                    state["down"] += len(data)
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                s.close()

    def close(self) -> None:
        self.running = False
        self.listener.close()
