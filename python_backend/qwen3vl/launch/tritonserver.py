"""tritonserver on this repository's models for one checkpoint, as `qwen3vl-serve` runs it: the
binary and its Python backend directory, its command line per role, its environment, and
running it with the OpenAI-compatible API beside it.

tritonserver, the Python backend and its stubs come from the `nvidia-pytriton` wheel (no
Docker needed); inside the `tritonserver` Docker image the image's own binary is used instead.
The checkpoint and device reach the models through environment variables (ServingConfig.env),
so changing checkpoints needs no edit to the repository's files.

The functions that build command lines take `args`, the options as `qwen3vl-serve` parses
them (qwen3vl.cli.serve.build_parser).
"""

from __future__ import annotations

import errno
import os
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import threading
import time
import urllib.request
from pathlib import Path

from ..paths import PACKAGE_ROOT, REPO_ROOT
from ..settings import ServingConfig
from .processes import end_model_processes

DEFAULT_MODEL_REPOSITORY = os.environ.get("QWEN3VL_MODEL_REPOSITORY") or str(REPO_ROOT / "model_repository")

# Which models each role loads from the one repository (explicit model control), and the
# config variant (`configs/<name>.pbtxt`) it selects where a model has one: a language server's
# qwen3_encoder forwards to the encoder servers.
ROLES = {
    "aggregated": (["qwen3_encoder", "qwen3_language", "ensemble"], None),
    "encoder": (["qwen3_encoder"], None),
    "language": (["qwen3_encoder", "qwen3_language", "ensemble"], "language"),
}


def pytriton_dirs() -> tuple[Path, Path]:
    """(tritonserver dir, its shared-library dir) inside the installed nvidia-pytriton wheel."""
    try:
        import pytriton
    except ImportError:
        sys.exit("qwen3vl-serve: nvidia-pytriton is not installed and no tritonserver is on PATH; run `make setup`")
    root = Path(pytriton.__file__).parent
    return root / "tritonserver", root.parent / "nvidia_pytriton.libs"


def python_backend_dir(server_dir: Path) -> Path:
    """A backend directory holding libtriton_python.so, its utils and the stub for this Python,
    assembled once (copied: Triton finds the stub next to the backend library)."""
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "qwen3vl-triton" / f"py{version}"
    target = cache / "backends" / "python"
    sources = {
        "libtriton_python.so": server_dir / "backends/python/libtriton_python.so",
        "triton_python_backend_utils.py": server_dir / "backends/python/triton_python_backend_utils.py",
        "triton_python_backend_stub": server_dir / f"python_backend_stubs/{version}/triton_python_backend_stub",
    }
    target.mkdir(parents=True, exist_ok=True)
    for name, src in sources.items():
        if not src.exists():
            sys.exit(f"qwen3vl-serve: {src} is missing from the nvidia-pytriton wheel (Python {version} unsupported?)")
        dst = target / name
        if not dst.exists() or dst.stat().st_size != src.stat().st_size:
            shutil.copy2(src, dst)
    return target.parent


def server_command(args, backend_dir: Path | None, binary: str) -> list[str]:
    """tritonserver's command line: the repository, ports and addresses, explicit model control
    loading the role's models (and its config variant), then `args.extra` as given."""
    cmd = [
        binary,
        f"--model-repository={args.model_repository}",
        f"--http-port={args.http_port}",
        f"--grpc-port={args.grpc_port}",
        f"--metrics-port={args.metrics_port}",
        f"--http-address={args.host}",
        f"--grpc-address={args.host}",
        f"--metrics-address={args.host}",
        "--model-control-mode=explicit",
        "--exit-on-error=true",
        f"--log-verbose={args.log_verbose}",
    ]
    if backend_dir:
        cmd.append(f"--backend-directory={backend_dir}")
    models, config_name = ROLES[args.role]
    cmd += [f"--load-model={m}" for m in models]
    if config_name:
        cmd.append(f"--model-config-name={config_name}")
    if not gpu_present():
        cmd += CPU_HOST_FLAGS
    return cmd + args.extra


# On a host without a GPU: no GPU metrics (no NVML and DCGM errors at start) and no pinned
# memory pool (no CUDA warning about it); those features need a GPU. What tritonserver 2.51
# still logs on a CPU host is in docs/troubleshooting.md.
CPU_HOST_FLAGS = ["--allow-gpu-metrics=false", "--pinned-memory-pool-byte-size=0"]


def gpu_present() -> bool:
    """Whether this host has an NVIDIA driver (its control device; without importing torch)."""
    return Path("/dev/nvidiactl").exists()


def server_env(settings: ServingConfig, given: set[str], libdirs: list[str] = ()) -> dict[str, str]:
    """tritonserver's environment: this one, plus what the Python backend stub needs to import
    this environment's packages, the `given` settings (ServingConfig.env), and `libdirs` first
    on LD_LIBRARY_PATH."""
    env = dict(os.environ)
    # The Python backend stub must import this environment's packages (our numpy, torch,
    # transformers and this package), whoever started us.
    venv_bin = str(Path(sys.executable).parent)
    env["PATH"] = venv_bin + os.pathsep + env.get("PATH", "")
    env["VIRTUAL_ENV"] = sys.prefix
    paths = [p for p in sys.path if p and Path(p).is_dir()]
    package_root = str(PACKAGE_ROOT)  # wherever this package is imported from
    env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys([package_root, *paths]))
    env["QWEN3VL_PACKAGE_ROOT"] = package_root  # the stub ignores PYTHONPATH; the model.py shells read this
    env.update(settings.env(given))
    env["LD_LIBRARY_PATH"] = os.pathsep.join(d for d in [*libdirs, env.get("LD_LIBRARY_PATH", "")] if d)
    return env


def openai_command(args) -> list[str]:
    """qwen3vl-openai in front of this server's ensemble, serving the model under qwen3vl-openai's
    own default name, as everywhere (`--openai-arg=--model-name=NAME` changes it)."""
    return [sys.executable, "-m", "qwen3vl.cli.openai_server", "--triton-url", f"127.0.0.1:{args.grpc_port}",
            "--host", args.openai_host, "--port", str(args.openai_port), *args.openai_arg]


def ports_in_use(args) -> list[str]:
    """What stands in the way of the ports tritonserver (and the OpenAI API) will listen on: a port
    given twice, or one another program listens on. Checked before tritonserver starts, so a clash
    shows at once, not after the models have loaded (minutes for a large checkpoint)."""
    wanted = [("--http-port", args.host, args.http_port), ("--grpc-port", args.host, args.grpc_port),
              ("--metrics-port", args.host, args.metrics_port)]
    if args.openai_port:
        wanted.append(("--openai-port", args.openai_host, args.openai_port))
    problems, seen = [], {}
    for flag, host, port in wanted:
        if port in seen:
            problems.append(f"{flag} {port} is also {seen[port]}'s port")
            continue
        seen[port] = flag
        with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
            # As the servers bind: a listener in the way is refused, a closed connection's TIME_WAIT is not.
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind((host, port))
            except OSError as e:
                why = "another program listens on it" if e.errno == errno.EADDRINUSE else e.strerror
                problems.append(f"{flag} {port} on {host}: {why}")
    return problems


def _die_with_parent() -> None:
    """Linux: the server gets SIGTERM if this launcher dies without forwarding a signal."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def locate_tritonserver() -> tuple[str, Path | None, list[str]]:
    """(tritonserver binary, the backend directory to pass it or None, library directories for
    LD_LIBRARY_PATH): the nvidia-pytriton wheel's, or with $QWEN3VL_SYSTEM_TRITON the one on
    PATH (e.g. the tritonserver Docker image, whose own backends are in place)."""
    # The Python backend stub links libpython dynamically: this interpreter's LIBDIR first, or
    # the system's older libpython loads beside our standard library.
    libdirs = [sysconfig.get_config_var("LIBDIR")]
    system_binary = shutil.which("tritonserver") if os.environ.get("QWEN3VL_SYSTEM_TRITON") else None
    if system_binary:
        return system_binary, None, libdirs
    server_dir, libs = pytriton_dirs()
    return str(server_dir / "bin" / "tritonserver"), python_backend_dir(server_dir), [*libdirs, str(libs)]


def endpoints(args) -> tuple[str, str]:
    """(the URL that answers 200 once every model is ready, where the server listens: for people)."""
    local = {"0.0.0.0": "127.0.0.1", "::": "[::1]"}.get(args.host, f"[{args.host}]" if ":" in args.host else args.host)
    where = f"HTTP {local}:{args.http_port}, gRPC {local}:{args.grpc_port}, metrics http://{local}:{args.metrics_port}/metrics"
    if args.openai_port:
        host = {"0.0.0.0": "127.0.0.1"}.get(args.openai_host, args.openai_host)
        where += f", OpenAI API http://{host}:{args.openai_port}/v1"
    return f"http://{local}:{args.http_port}/v2/health/ready", where


def announce_ready(server: subprocess.Popen, ready_url: str, where: str, every_s: float = 10.0) -> None:
    """Say, every `every_s` while the models load, that qwen3vl-serve is waiting (and how long
    it has), then that the server is ready and where; nothing if it exits first."""
    start, said = time.monotonic(), 0.0
    direct = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # never through a proxy
    print(f"qwen3vl-serve: tritonserver started (pid {server.pid}); loading the models", file=sys.stderr, flush=True)
    while server.poll() is None:
        try:
            with direct.open(ready_url, timeout=2) as response:
                if response.status == 200:
                    print(f"qwen3vl-serve: ready after {time.monotonic() - start:.0f} s: {where}",
                          file=sys.stderr, flush=True)
                    return
        except (OSError, ValueError):  # not listening yet, or not ready (503)
            pass
        if (waited := time.monotonic() - start) - said >= every_s:
            said = waited
            print(f"qwen3vl-serve: waiting for tritonserver to load the models ({waited:.0f} s)",
                  file=sys.stderr, flush=True)
        time.sleep(0.5)


def run(server_cmd: list[str], env: dict[str, str], api_cmd: list[str] | None = None,
        ready: tuple[str, str] | None = None) -> int:
    """Run tritonserver (`server_cmd`) and, with `api_cmd`, the OpenAI API beside it, both dying
    with this process; SIGTERM and SIGINT are passed on to them. With `ready` (endpoints()), say
    when the server is ready. tritonserver's exit status."""
    proc = subprocess.Popen(server_cmd, env=env, preexec_fn=_die_with_parent)
    if ready:
        threading.Thread(target=announce_ready, args=(proc, *ready), name="ready", daemon=True).start()
    # The API in its own session: a terminal's Ctrl-C reaches it once, through us.
    api = subprocess.Popen(api_cmd, env=env, preexec_fn=_die_with_parent,
                           start_new_session=True) if api_cmd else None
    children = [p for p in (proc, api) if p is not None]
    stopping = False

    def forward(signum, _frame):
        nonlocal stopping
        stopping = True
        for child in children:
            if child.poll() is None:
                child.send_signal(signum)

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, forward)
    code = _wait(proc, api, lambda: stopping)
    # Killed (SIGKILL, the OOM killer) or not, nothing of the server may outlive it.
    killed = end_model_processes(proc.pid)
    if killed:
        print(f"qwen3vl-serve: tritonserver exited ({code}) leaving {len(killed)} model process(es) stuck "
              f"({', '.join(f'{Path(p.model).parent.parent.name} pid {p.pid}' for p in killed)}): killed, "
              "their shared memory removed", file=sys.stderr, flush=True)
    return code


def _wait(server: subprocess.Popen, api: subprocess.Popen | None, stopping) -> int:
    """tritonserver's exit status once it exits (the API is stopped then). An API that exits on
    its own (e.g. its port is taken) stops the server too: half a deployment is not left up."""
    while True:
        try:
            code = server.wait(timeout=1)
            break
        except subprocess.TimeoutExpired:
            if api is not None and api.poll() is not None and not stopping():
                print(f"qwen3vl-serve: the OpenAI API exited with {api.returncode}; stopping tritonserver",
                      file=sys.stderr, flush=True)
                server.send_signal(signal.SIGTERM)
                return server.wait() or api.returncode or 1
    if api is not None and api.poll() is None:
        api.send_signal(signal.SIGTERM)
        try:
            api.wait(30)
        except subprocess.TimeoutExpired:
            api.kill()
            api.wait()
    return code
