"""Start `qwen3vl-serve` as a child process and wait until its models are ready (demo, tests,
benchmarks); stop it with SIGTERM like an operator would. It runs the command as an operator
does (`python -m qwen3vl.cli.serve`), so that what is tested is what is deployed."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

from .processes import ModelProcess, model_processes, process_table


PROGRESS_S = 10.0


def free_ports(n: int) -> list[int]:
    socks = []
    for _ in range(n):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        socks.append(s)
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


class Server:
    """A running server: `.http_url`, `.grpc_url`, `.metrics_url`; a context manager."""

    def __init__(self, checkpoint: str | Path, log_path: str | Path, role: str = "aggregated",
                 models: tuple[str, ...] = ("ensemble",), ready_timeout_s: float = 600, extra: list[str] = (),
                 env: dict[str, str] | None = None, progress: Callable[[str], None] | None = None):
        self.checkpoint, self.log_path, self.role = Path(checkpoint), Path(log_path), role
        self.models, self.ready_timeout_s, self.extra = models, ready_timeout_s, list(extra)
        self.env = {**os.environ, **(env or {})}
        self.http_port, self.grpc_port, self.metrics_port = free_ports(3)
        self.http_url = f"127.0.0.1:{self.http_port}"
        self.grpc_url = f"127.0.0.1:{self.grpc_port}"
        self.metrics_url = f"http://127.0.0.1:{self.metrics_port}/metrics"
        self.proc: subprocess.Popen | None = None
        self.progress = progress  # told every PROGRESS_S while the server loads (the demo, tools)

    def start(self, append: bool = False) -> "Server":
        if self.alive():
            raise RuntimeError(f"server on {self.grpc_url} is already running")
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self.log = open(self.log_path, "ab" if append else "wb")
        cmd = [sys.executable, "-m", "qwen3vl.cli.serve", "--checkpoint", str(self.checkpoint), "--role", self.role,
               "--http-port", str(self.http_port), "--grpc-port", str(self.grpc_port),
               "--metrics-port", str(self.metrics_port), *self.extra]
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, env=self.env)
        self.wait_ready()
        return self

    def wait_ready(self) -> None:
        import tritonclient.http as httpclient

        start = time.monotonic()
        deadline, said = start + self.ready_timeout_s, 0.0
        while time.monotonic() < deadline:
            if self.progress and (waited := time.monotonic() - start) - said >= PROGRESS_S:
                said = waited
                self.progress(f"waiting for the server to load the models: {waited:.0f} s"
                              + (f" (last: {line})" if (line := self.last_model_line()) else ""))
            if self.proc.poll() is not None:
                raise RuntimeError(f"tritonserver exited with {self.proc.returncode}; log:\n{self.tail()}")
            # A fresh, closed client each poll: an open keep-alive connection would hold up the
            # server's shutdown until its exit timeout.
            client = httpclient.InferenceServerClient(self.http_url)
            try:
                if client.is_server_ready() and all(client.is_model_ready(m) for m in self.models):
                    return
            except Exception:  # not listening yet
                pass
            finally:
                client.close()
            time.sleep(0.5)
        self.stop()
        raise TimeoutError(f"server not ready within {self.ready_timeout_s} s; log:\n{self.tail()}")

    def last_model_line(self) -> str:
        """The log's last line from the models themselves (loading shards, KV blocks), not Triton's."""
        try:
            lines = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return ""
        ours = [ln for ln in lines if ln.strip() and not re.match(r"[IWE]\d{4} |[+|]|qwen3vl-serve:", ln)]
        return ours[-1].strip() if ours else ""

    def tail(self, n: int = 60) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    def restart(self) -> "Server":
        """Stop and start again on the same ports (fault tests: an encoder that comes back)."""
        self.stop()
        return self.start(append=True)

    def kill(self) -> None:
        """SIGKILL tritonserver (a crash, not a shutdown); its launcher then exits too."""
        if self.proc is None or self.proc.poll() is not None:
            return
        subprocess.run(["pkill", "-KILL", "-P", str(self.proc.pid)], check=False)
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()

    def tritonserver_pid(self) -> int | None:
        """The launcher's tritonserver child, while it runs."""
        if not self.alive():
            return None
        return next((pid for pid, (ppid, name, _) in process_table().items()
                     if ppid == self.proc.pid and name == "tritonserver"), None)

    def model_processes(self) -> list[ModelProcess]:
        """Its tritonserver's model processes (one per model instance), while it runs."""
        pid = self.tritonserver_pid()
        return model_processes(pid) if pid else []

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, timeout_s: float = 60) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:  # a server that does not stop: kill it, not just us
                subprocess.run(["pkill", "-KILL", "-P", str(self.proc.pid)], check=False)
                self.proc.kill()
                self.proc.wait()
        self.log.close()
        return self.proc.returncode

    def __enter__(self):
        return self if self.alive() else self.start()

    def __exit__(self, *exc):
        self.stop()
