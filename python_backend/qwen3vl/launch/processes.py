"""A tritonserver's model processes (its Python-backend stubs, one per model instance): finding
them, and ending those of a server that has died.

Triton's stub (2.51) notices its server's death itself (`kill(parent, 0)` every 300 ms) and tears
itself down, but the teardown deadlocks when the server dies in the middle of an IPC: a model
thread asking `is_cancelled()` leaves the stub's message thread waiting for a reply that never
comes while it holds the lock the teardown needs; an `execute()` returning leaves the main thread
waiting for the server's acknowledgement while it holds the GIL, which the teardown (and any
Python thread of the model) needs. Such a process lives on, parented to init, with its memory
(its GPU memory on a GPU), its shared-memory region with the dead server and the transfer
regions it made; SIGTERM does not end it (the stub ignores it). So `qwen3vl-serve` ends them
itself once tritonserver has exited: `end_model_processes`.
"""

from __future__ import annotations

import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path

from ..contract import SHM_REGION_PREFIX

STUB = "triton_python_backend_stub"
SHM_DIR = "/dev/shm"
TRITON_REGION_PREFIX = "triton_python_backend_shm_region_"  # the region Triton makes for each stub
GRACE_S = 2.0  # a dead server's model process gets this long to exit by itself


def process_table() -> dict[int, tuple[int, str, str]]:
    """Every process: pid -> (parent pid, name, state), from /proc."""
    table = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:
            continue
        name, rest = text[text.index("(") + 1:text.rindex(")")], text[text.rindex(")") + 2:].split()
        table[int(stat.parent.name)] = (int(rest[1]), name, rest[0])
    return table


@dataclass(frozen=True)
class ModelProcess:
    """One stub, from its command line: `stub model.py REGION SIZE GROWTH SERVER_PID ...`."""
    pid: int
    model: str       # the model.py it runs
    region: str      # its shared-memory region with the server
    server_pid: int  # the tritonserver that started it

    def alive(self) -> bool:
        """Still this stub (not a reused pid), and not a zombie."""
        try:
            argv = Path(f"/proc/{self.pid}/cmdline").read_bytes().split(b"\0")
            state = Path(f"/proc/{self.pid}/stat").read_text().rpartition(")")[2].split()[0]
        except (OSError, IndexError):
            return False
        return state != "Z" and len(argv) > 2 and argv[2].decode(errors="replace") == self.region

    def regions(self) -> list[str]:
        """Its names in /dev/shm: its region with the server, the transfer regions it made."""
        own = f"{SHM_REGION_PREFIX}{self.pid}-"
        try:
            names = os.listdir(SHM_DIR)
        except OSError:
            return []
        return [n for n in names if n == self.region or n.startswith(own)]


def model_processes(server_pid: int) -> list[ModelProcess]:
    """The stubs tritonserver `server_pid` started, running or left behind by it."""
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            argv = [a.decode(errors="replace") for a in cmdline.read_bytes().split(b"\0")]
        except OSError:
            continue
        if len(argv) > 5 and argv[0].endswith("/" + STUB) and argv[5] == str(server_pid):
            region = argv[2].removeprefix("/")
            if region.startswith(TRITON_REGION_PREFIX) and "/" not in region:
                found.append(ModelProcess(int(cmdline.parent.name), argv[1], region, server_pid))
    return found


def end_model_processes(server_pid: int, grace_s: float = GRACE_S) -> list[ModelProcess]:
    """After tritonserver `server_pid` has exited: give its model processes `grace_s` to exit,
    SIGKILL those still there, and unlink every shared-memory region of theirs. Those that had
    to be killed."""
    processes = model_processes(server_pid)
    deadline = time.monotonic() + grace_s
    while any(p.alive() for p in processes) and time.monotonic() < deadline:
        time.sleep(0.1)
    killed = [p for p in processes if p.alive()]
    for p in killed:
        try:
            os.kill(p.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + 5
    while any(p.alive() for p in killed) and time.monotonic() < deadline:
        time.sleep(0.05)
    for p in processes:
        for name in p.regions():
            try:
                os.unlink(os.path.join(SHM_DIR, name))
            except FileNotFoundError:
                pass
    return killed
