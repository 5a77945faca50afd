"""docker/: no Docker engine here, so the files are checked statically against the package they
wrap, and the command the container runs is run for real (minus Docker) on a tiny checkpoint."""

from __future__ import annotations

import fnmatch
import json
import os
import re
import shlex
import signal
import stat
import subprocess
import sys
import sysconfig
import time
import tomllib
import urllib.request
from pathlib import Path

import pytest
import yaml

from conftest import LOG_DIR, png
from qwen3vl.cli import serve
from qwen3vl.client import ask
from qwen3vl.launch import tritonserver
from qwen3vl.launch.server import free_ports

ROOT = Path(__file__).resolve().parents[1]
DOCKER = ROOT / "docker"
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())


def dockerfile(path: Path = DOCKER / "Dockerfile") -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) in order; continuation lines joined, comments dropped."""
    out, buf = [], ""
    for line in path.read_text().splitlines():
        if not buf and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if line.rstrip().endswith("\\"):
            buf += line.rstrip()[:-1] + " "
            continue
        buf += line
        word, _, rest = buf.strip().partition(" ")
        out.append((word.upper(), rest.strip()))
        buf = ""
    return out


def instructions(name: str) -> list[str]:
    return [args for word, args in dockerfile() if word == name]


def exec_form(args: str) -> list[str]:
    value = json.loads(args)
    assert isinstance(value, list) and all(isinstance(v, str) for v in value), f"not exec form: {args}"
    return value


def env_of_dockerfile() -> dict[str, str]:
    env = {}
    for args in instructions("ENV"):
        for item in shlex.split(args):
            key, _, value = item.partition("=")
            env[key] = value
    return env


def container_command() -> list[str]:
    """What the container runs: the base image's entrypoint is kept, so CMD is the command."""
    assert not instructions("ENTRYPOINT"), "the image's nvidia_entrypoint.sh must stay the entrypoint"
    (cmd,) = instructions("CMD")
    return exec_form(cmd)


def triton_release_of_tag(tag: str) -> str:
    """NGC tag YY.MM -> Triton 2.N.0: one minor release a month, 24.10 being 2.51.0."""
    yy, mm = (int(x) for x in re.fullmatch(r"(\d\d)\.(\d\d)(?:-py3)?", tag).groups())
    return f"2.{yy * 12 + mm - 247}.0"


def compose() -> dict:
    return yaml.safe_load((DOCKER / "docker-compose.yml").read_text())


def service() -> dict:
    services = compose()["services"]
    assert set(services) == {"triton", "openai"}, "the aggregated deployment: one server, and its OpenAI API"
    return services["triton"]


# --- Dockerfile ---------------------------------------------------------------------------


def test_base_image_is_the_triton_release_of_the_pytriton_wheel():
    (base,) = instructions("FROM")
    image, _, tag = base.partition(":")
    assert image == "nvcr.io/nvidia/tritonserver"
    assert tag.endswith("-py3"), "the -py3 image carries the Python backend"
    assert triton_release_of_tag("24.10-py3") == "2.51.0" and triton_release_of_tag("25.01") == "2.54.0"
    # nvidia-pytriton 0.7.0 carries tritonserver 2.51.0 (its server reports it: see the real run below)
    assert "nvidia-pytriton==0.7.0" in PYPROJECT["project"]["optional-dependencies"]["server"]
    assert triton_release_of_tag(tag) == "2.51.0"


def test_container_runs_qwen3vl_serve_with_flags_serve_accepts():
    cmd = container_command()
    assert cmd[0] == "qwen3vl-serve"
    assert PYPROJECT["project"]["scripts"]["qwen3vl-serve"] == "qwen3vl.cli.serve:main"
    args = serve.parse_args(cmd[1:])
    assert not args.extra and not args.check
    assert args.checkpoint == "/models/checkpoint"
    assert (args.http_port, args.grpc_port, args.metrics_port) == (8000, 8001, 8002)
    assert args.role == "aggregated"
    # the repository it serves is the one the image copies in
    (workdir,) = instructions("WORKDIR")
    copies = {shlex.split(c)[-1]: shlex.split(c)[0] for c in instructions("COPY")}
    assert copies[f"./{Path(args.model_repository).relative_to(workdir)}"] == "model_repository"
    assert env_of_dockerfile()["QWEN3VL_SYSTEM_TRITON"] == "1"
    assert set(" ".join(instructions("EXPOSE")).split()) == {"8000", "8001", "8002"}


def test_image_python_fits_the_package_and_the_linked_stub():
    runs = " ".join(instructions("RUN"))
    (version,) = set(re.findall(r"python(3\.\d+) -m venv", runs))
    required = PYPROJECT["project"]["requires-python"]
    assert required.startswith(">=") and tuple(map(int, version.split("."))) >= tuple(
        map(int, required[2:].split(".")))
    assert f"python_backend_stubs/{version}/triton_python_backend_stub" in runs
    assert f"libpython{version}" in runs, "the stub links libpython dynamically"
    stub = Path(sysconfig.get_paths()["purelib"]) / "pytriton/tritonserver/python_backend_stubs" / version
    assert (stub / "triton_python_backend_stub").is_file(), "nvidia-pytriton has no stub for that Python"
    # the pins come from pyproject.toml, not a copy of them
    assert "COPY pyproject.toml ./" in [f"COPY {c}" for c in instructions("COPY")]
    assert "p['dependencies']" in runs and "pip install -r /tmp/requirements.txt" in runs
    assert "pip install --no-deps ." in runs


def test_healthcheck_in_dockerfile_asks_the_ready_endpoint():
    (check,) = instructions("HEALTHCHECK")
    assert "CMD" in check and "127.0.0.1:8000/v2/health/ready" in check


def test_dockerignore_keeps_what_the_image_copies():
    rules = [r for r in (DOCKER / "Dockerfile.dockerignore").read_text().splitlines()
             if r.strip() and not r.startswith("#")]

    def ignored(path: str) -> bool:  # last matching rule wins, like Docker's
        result = False
        for rule in rules:
            negate, pattern = rule.startswith("!"), rule.lstrip("!")
            if fnmatch.fnmatch(path, pattern) or fnmatch.fnmatch(path, pattern.replace("**/", "")) or \
                    path.startswith(pattern + "/"):
                result = not negate
        return result

    for source in (shlex.split(c)[0] for c in instructions("COPY")):
        assert not ignored(source), f"{source} is copied but ignored"
    assert ignored(".venv") and ignored(".work") and ignored("tests")
    assert ignored("python_backend/qwen3vl/__pycache__")


# --- compose -------------------------------------------------------------------------------


def test_compose_builds_this_dockerfile_and_publishes_the_ports():
    svc = service()
    context = (DOCKER / svc["build"]["context"]).resolve()
    assert context == ROOT
    assert (context / svc["build"]["dockerfile"]).resolve() == (DOCKER / "Dockerfile").resolve()
    assert sorted(svc["ports"]) == ["8000:8000", "8001:8001", "8002:8002"]
    args = serve.parse_args(container_command()[1:])
    (volume,) = svc["volumes"]
    assert volume["target"] == args.checkpoint and volume["read_only"] is True
    assert volume["source"].startswith("${QWEN3VL_CHECKPOINT")


def test_compose_reserves_gpus_and_checks_health():
    svc = service()
    (device,) = svc["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and "gpu" in device["capabilities"]
    test = svc["healthcheck"]["test"]
    assert test[0] == "CMD" and f"127.0.0.1:{serve.parse_args(container_command()[1:]).http_port}/v2/health/ready" in test[-1]
    assert svc["shm_size"], "the Python backend needs more than Docker's 64 MiB /dev/shm"


# --- the container's command, run here -----------------------------------------------------


def emulated_image_tritonserver(tmp: Path) -> Path:
    """A `tritonserver` on PATH that behaves like the image's: the nvidia-pytriton binary with its
    backends and libraries where it expects them (the image has them in /opt/tritonserver)."""
    server_dir, libs = tritonserver.pytriton_dirs()
    backends = tritonserver.python_backend_dir(server_dir)
    bindir = tmp / "image-bin"
    bindir.mkdir()
    wrapper = bindir / "tritonserver"
    libpath = os.pathsep.join([sysconfig.get_config_var("LIBDIR"), str(libs)])
    wrapper.write_text("#!/bin/sh\n"
                       f'touch "{tmp}/image-tritonserver-ran"\n'
                       f'export LD_LIBRARY_PATH="{libpath}${{LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}}"\n'
                       f'exec "{server_dir}/bin/tritonserver" --backend-directory="{backends}" "$@"\n')
    wrapper.chmod(wrapper.stat().st_mode | stat.S_IXUSR)
    return bindir


def test_the_container_command_serves_a_tiny_checkpoint(checkpoint, tmp_path):
    """CMD with the container's paths and ports mapped to this machine, QWEN3VL_SYSTEM_TRITON=1 and
    a `tritonserver` on PATH like the image's: ready on the healthcheck URL, answers an image
    request, reports the Triton release the base image tag names, stops cleanly on SIGTERM."""
    cmd = container_command()
    http, grpc, metrics = free_ports(3)
    mapping = {"/models/checkpoint": str(checkpoint), "8000": str(http), "8001": str(grpc), "8002": str(metrics),
               "/opt/qwen3vl/model_repository": str(ROOT / "model_repository")}
    argv = [mapping.get(a, a) for a in cmd[1:]] + ["--device", "cpu"]  # no GPU here; auto would pick cpu anyway
    env = {**os.environ, **{k: v for k, v in env_of_dockerfile().items() if k not in ("PATH", "VIRTUAL_ENV")}}
    env["PATH"] = os.pathsep.join([str(emulated_image_tritonserver(tmp_path)), str(Path(sys.executable).parent),
                                   env.get("PATH", "")])
    script = Path(sys.executable).parent / cmd[0]
    assert script.is_file(), f"{cmd[0]} is not installed in this environment"
    log_path = LOG_DIR / "container-command.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([str(script), *argv], env=env, stdout=log, stderr=subprocess.STDOUT)
        try:
            ready, deadline = False, time.monotonic() + 300
            while not ready and time.monotonic() < deadline:
                assert proc.poll() is None, f"server exited {proc.returncode}:\n{log_path.read_text()[-4000:]}"
                try:
                    with urllib.request.urlopen(f"http://127.0.0.1:{http}/v2/health/ready", timeout=2) as r:
                        ready = r.status == 200
                except OSError:
                    time.sleep(0.5)
            assert ready, log_path.read_text()[-4000:]
            assert (tmp_path / "image-tritonserver-ran").exists(), "serve.py did not run the tritonserver on PATH"
            with urllib.request.urlopen(f"http://127.0.0.1:{http}/v2", timeout=5) as r:
                version = json.loads(r.read())["version"]
            (base,) = instructions("FROM")
            assert version == triton_release_of_tag(base.partition(":")[2])
            answer = ask(f"127.0.0.1:{grpc}", "grpc", stream=True, prompt="What is this?",
                         images=[png(64, 48, seed=5)], max_tokens=4, temperature=0.0, timeout_s=120)
            assert answer.token_ids and answer.finish_reason in ("stop", "length")
        finally:
            proc.send_signal(signal.SIGTERM)
            try:
                rc = proc.wait(90)
            except subprocess.TimeoutExpired:
                proc.kill()
                rc = proc.wait()
    assert rc == 0, log_path.read_text()[-4000:]


def test_disaggregated_compose_commands_parse_and_wire_encoders_to_the_language_server():
    from qwen3vl.cli.serve import parse_args

    services = yaml.safe_load((DOCKER / "docker-compose.disaggregated.yml").read_text())["services"]
    roles = {name: parse_args(s["command"][1:]) for name, s in services.items() if s["command"][0] == "qwen3vl-serve"}
    encoders = [n for n, a in roles.items() if a.role == "encoder"]
    (language,) = [a for a in roles.values() if a.role == "language"]
    assert len(encoders) >= 2
    assert sorted(language.encoder_urls) == sorted(f"{n}:{roles[n].grpc_port}" for n in encoders)
    for s in services.values():
        assert s["build"]["dockerfile"] == "docker/Dockerfile"
    # One GPU per server, none shared: the language model runs on one device (docs/operating.md, Sizing).
    gpus = [d["device_ids"] for n in roles for d in services[n]["deploy"]["resources"]["reservations"]["devices"]]
    assert all(len(ids) == 1 for ids in gpus) and len({i for ids in gpus for i in ids}) == len(gpus), gpus


@pytest.mark.parametrize("compose_file, server", [("docker-compose.yml", "triton"),
                                                  ("docker-compose.disaggregated.yml", "language")])
def test_compose_runs_the_openai_api_in_front_of_the_server(compose_file, server):
    """The `openai` service: qwen3vl-openai (flags its parser accepts) on the server's gRPC port,
    listening on all interfaces on the port it publishes and checks, after the server is healthy."""
    from qwen3vl.cli import openai_server

    services = yaml.safe_load((DOCKER / compose_file).read_text())["services"]
    api, target = services["openai"], services[server]
    assert api["command"][0] == "qwen3vl-openai"
    assert PYPROJECT["project"]["scripts"]["qwen3vl-openai"] == f"{openai_server.__name__}:main"
    args = openai_server.parse_args(api["command"][1:])
    host, _, port = args.triton_url.partition(":")
    target_command = target.get("command") or container_command()
    assert host == server and int(port) == serve.parse_args(target_command[1:]).grpc_port
    assert args.host == "0.0.0.0" and api["ports"] == [f"{args.port}:{args.port}"]
    assert f"127.0.0.1:{args.port}/health" in api["healthcheck"]["test"][-1]
    assert api["depends_on"] == {server: {"condition": "service_healthy"}}
    assert api["image"] == target.get("image", services[server].get("image"))
    assert (DOCKER / api["build"]["context"]).resolve() == ROOT and api["build"]["dockerfile"] == "docker/Dockerfile"
    # what the image installs (dependencies and the server extra) holds what the API imports
    installed = " ".join(PYPROJECT["project"]["dependencies"] + PYPROJECT["project"]["optional-dependencies"]["server"])
    for package in ("fastapi", "uvicorn", "prometheus-client", "httpx2", "tritonclient"):
        assert package in installed
