"""The README's "Use the server", run as written: `make serve` (the Makefile's own command), the
client CLI, curl against Triton and against the OpenAI API, the `openai` SDK, then the
disaggregated pair, all on the demo checkpoint; every answer must be the right one.

Two things differ from a user's terminal, and only these: each port the README names is
replaced by a free one (the tests share the machine), and `.venv/bin/` is a folder of wrappers
that run this interpreter on this checkout (`make test` may run from another environment)."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import LOG_DIR
from qwen3vl.launch.server import free_ports
from qwen3vl.tools.demo import demo_questions

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
PICTURE = ROOT / "client" / "shapes.png"
PORTS = ("8000", "8001", "8002", "9000", "8100", "8101", "8102", "8200", "8201", "8202")
SCRIPTS = {"qwen3vl-serve": "qwen3vl.cli.serve", "qwen3vl-client": "qwen3vl.cli.client",
           "qwen3vl-openai": "qwen3vl.cli.openai_server"}


def walkthrough_steps() -> list[str]:
    """The section's shell blocks, cut into steps: each starts with its comment line."""
    start = README.index("\n## Use the server\n")
    section = README[start:README.index("\n## ", start + 1)]
    steps = []
    for block in re.findall(r"```bash\n(.*?)```", section, re.S):
        steps += [s.strip() for s in re.split(r"\n\n(?=# )", block) if s.strip()]
    return steps


def answers() -> dict[str, str]:
    """Each question the demo asks about its default picture (client/shapes.png) -> the right answer."""
    return {q.text: q.answer for q in demo_questions(7, None)}


@pytest.fixture(scope="module")
def venv(tmp_path_factory) -> Path:
    """A `.venv` whose bin/ runs this interpreter: python, and the console scripts as modules."""
    root = tmp_path_factory.mktemp("venv")
    (root / "bin").mkdir()
    for name, target in [("python", ""), *((n, f"-m {m}") for n, m in SCRIPTS.items())]:
        script = root / "bin" / name
        script.write_text(f'#!/bin/sh\nexec "{sys.executable}" {target} "$@"\n')
        script.chmod(0o755)
    return root


@pytest.fixture(scope="module")
def ports() -> dict[str, str]:
    return dict(zip(PORTS, map(str, free_ports(len(PORTS)))))


def as_here(step: str, venv: Path, ports: dict[str, str]) -> str:
    step = step.replace(".venv/bin/", f"{venv}/bin/")
    return re.sub(r"(?<![\d.])(" + "|".join(PORTS) + r")(?!\d)", lambda m: ports[m.group(1)], step)


class Started:
    """A server step: its process (its own session), until stop()."""

    def __init__(self, cmd: str, http_port: str, log_name: str, also_ready: str | None = None):
        self.http_port, self.also_ready, self.log_path = http_port, also_ready, LOG_DIR / log_name
        LOG_DIR.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(["bash", "-c", cmd], cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                                         start_new_session=True)

    def wait_ready(self, timeout_s: float = 600) -> None:
        urls = [f"http://127.0.0.1:{self.http_port}/v2/health/ready"] + ([self.also_ready] if self.also_ready else [])
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, self.log_path.read_text()[-4000:]
            try:
                if all(urllib.request.urlopen(u, timeout=2).status == 200 for u in urls):
                    return
            except OSError:
                pass
            time.sleep(0.5)
        raise TimeoutError(self.log_path.read_text()[-4000:])

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)  # bash -c ran qwen3vl-serve in its place: it stops the rest
            try:
                self.proc.wait(90)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()


def run_step(step: str, venv: Path, ports: dict[str, str], started: list[Started]) -> None:
    """A server step starts a server and waits until it is ready; any other asks, and its
    output must hold the right answer and what the step's comment says it prints."""
    comment, command = step.split("\n", 1) if step.startswith("#") else ("", step)
    if command.startswith("make serve"):
        made = subprocess.run(["make", "-n", "--no-print-directory", "serve", f"VENV={venv}",
                               *(f"{k}={ports[v]}" for k, v in [("HTTP_PORT", "8000"), ("GRPC_PORT", "8001"),
                                                                ("METRICS_PORT", "8002"), ("OPENAI_PORT", "9000")])],
                              cwd=ROOT, capture_output=True, text=True, check=True).stdout.replace("\\\n", "")
        serve = [line for line in made.splitlines() if "qwen3vl-serve --checkpoint" in line]
        assert len(serve) == 1 and "--checkpoint checkpoints/shapes " in serve[0], made
        started.append(Started(serve[0], ports["8000"], "walkthrough-make-serve.log",
                               also_ready=f"http://127.0.0.1:{ports['9000']}/health"))
        started[-1].wait_ready()
        return
    if "qwen3vl-serve" in command:
        cmd = as_here(command, venv, ports)
        http = re.search(r"--http-port (\d+)", cmd).group(1)
        started.append(Started(cmd, http, f"walkthrough-{len(started)}.log"))
        return
    for server in started:
        server.wait_ready()
    question = [q for q in answers() if q in command]
    assert len(question) == 1, f"no question of the demo picture's in:\n{command}"
    out = subprocess.run(["bash", "-c", as_here(command, venv, ports)], cwd=ROOT, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    assert answers()[question[0]] in out.stdout, (step, out.stdout)
    said = comment.rsplit(": ", 1)[-1]
    assert said in out.stdout or said.strip('"') in out.stdout, (step, said, out.stdout)


def test_the_picture_is_the_demos_default_one():
    scene = demo_questions(7, None)[0].scenes[0]
    assert np.array_equal(np.asarray(Image.open(PICTURE).convert("RGB")), np.asarray(scene.image().convert("RGB")))


def test_the_walkthrough_as_written_gets_right_answers(venv, ports):
    steps = walkthrough_steps()
    assert steps[0].startswith("make serve") and sum("qwen3vl-serve --role" in s for s in steps) == 2
    for client in ("qwen3vl-client", "curl -s localhost:8000", "curl -s localhost:9000", "from openai import OpenAI"):
        assert any(client in s for s in steps), client
    started: list[Started] = []
    try:
        for step in steps:
            run_step(step, venv, ports, started)
        for server in started:  # qwen3vl-serve says where it waits and when it is ready
            log = server.log_path.read_text()
            assert "qwen3vl-serve: ready after" in log, log[-3000:]
    finally:
        for server in reversed(started):
            server.stop()
