"""`qwen3vl-serve`: run a real tritonserver on this repository's models for one checkpoint.

tritonserver, the Python backend and its stubs come from the `nvidia-pytriton` wheel (no
Docker needed); inside the `tritonserver` Docker image the image's own binary is used instead.
The checkpoint and device reach the models through environment variables, so changing
checkpoints needs no edit to the repository's files.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shutil
import signal
import subprocess
import sys
import sysconfig
from pathlib import Path

from ..settings import ServingConfig

REPO_ROOT = Path(__file__).resolve().parents[3]  # the checkout, for an editable install
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
    return cmd + args.extra


def server_env(args) -> dict[str, str]:
    env = dict(os.environ)
    # The Python backend stub must import this environment's packages (our numpy, torch,
    # transformers and this package), whoever started us.
    venv_bin = str(Path(sys.executable).parent)
    env["PATH"] = venv_bin + os.pathsep + env.get("PATH", "")
    env["VIRTUAL_ENV"] = sys.prefix
    paths = [p for p in sys.path if p and Path(p).is_dir()]
    package_root = str(Path(__file__).resolve().parents[2])  # wherever this package is imported from
    env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys([package_root, *paths]))
    env["QWEN3VL_PACKAGE_ROOT"] = package_root  # the stub ignores PYTHONPATH; the model.py shells read this
    settings, given = settings_from_args(args)
    env.update(settings.env(given))
    return env


def openai_command(args) -> list[str]:
    """qwen3vl-openai in front of this server's ensemble; the model's name is the checkpoint
    directory's (`--openai-arg=--model-name=NAME` overrides it)."""
    return [sys.executable, "-m", "qwen3vl.cli.openai_server", "--triton-url", f"127.0.0.1:{args.grpc_port}",
            "--host", args.openai_host, "--port", str(args.openai_port),
            "--model-name", Path(args.checkpoint).resolve().name, *args.openai_arg]


def _die_with_parent() -> None:
    """Linux: the server gets SIGTERM if this launcher dies without forwarding a signal."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def parse_args(argv=None):
    return build_parser().parse_args(argv)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="qwen3vl-serve", description=__doc__.splitlines()[0])
    p.add_argument("--check", action="store_true", help="assemble the Python backend directory, print where, exit")
    p.add_argument("--role", choices=sorted(ROLES), default="aggregated",
                   help="which models this server loads: aggregated (all three), encoder (qwen3_encoder running "
                        "the vision tower), language (ensemble, qwen3_language, a qwen3_encoder fetching from "
                        "--encoder-url)")
    add_setting_flags(p)
    p.add_argument("--host", default="127.0.0.1",
                   help="address the HTTP, gRPC and metrics endpoints listen on (default: loopback only; "
                        "0.0.0.0 for every interface, as the containers pass)")
    p.add_argument("--http-port", type=int, default=8000, help="Triton's HTTP port (health, metadata, generate)")
    p.add_argument("--grpc-port", type=int, default=8001,
                   help="Triton's gRPC port (streaming; what encoder servers are reached on)")
    p.add_argument("--metrics-port", type=int, default=8002, help="Triton's Prometheus metrics port (/metrics)")
    p.add_argument("--model-repository", default=str(DEFAULT_MODEL_REPOSITORY),
                   help="the model repository (this project's; the image has it at /opt/qwen3vl/model_repository)")
    p.add_argument("--log-verbose", type=int, default=0, help="tritonserver's --log-verbose level")
    p.add_argument("--openai-port", type=int, default=0, metavar="PORT",
                   help="also serve the OpenAI-compatible API (qwen3vl-openai) on this port, in front of this "
                        "server's ensemble (default: 0, off)")
    p.add_argument("--openai-host", default="127.0.0.1", help="the OpenAI API's address (default: 127.0.0.1)")
    p.add_argument("--openai-arg", action="append", default=[], metavar="ARG",
                   help="a further qwen3vl-openai flag, repeatable: --openai-arg=--allow-image-url-domains=example.com")
    p.add_argument("extra", nargs="*", help="further tritonserver flags, after --")
    return p


def flags_table() -> str:
    """The README's table of qwen3vl-serve's own flags (those that are no setting; the settings
    table has the rest), generated from the parser."""
    settings = {f.name for f in dataclasses.fields(ServingConfig)}
    rows = ["| `qwen3vl-serve` flag | default | meaning |", "|---|---|---|"]
    for action in build_parser()._actions:
        if action.dest in settings or action.dest == "help":
            continue
        flag = " ".join(f"`{o}`" for o in action.option_strings) or "`-- ARGS`"
        default = action.default
        if action.dest == "model_repository":
            default = "the checkout's `model_repository/` (`QWEN3VL_MODEL_REPOSITORY`)"
        elif action.choices:
            default = f"{default} (of {', '.join(action.choices)})"
        elif default is None or default is False or default == []:
            default = ""
        help = (action.help or "").replace("|", "\\|")
        rows.append(f"| {flag} | {default} | {help} |")
    return "\n".join(rows)


def add_setting_flags(p: argparse.ArgumentParser) -> None:
    """One flag per ServingConfig setting that has one, its help and default from there. A flag
    not given leaves the setting to the environment, the model config, or the default."""
    for f in dataclasses.fields(ServingConfig):
        flag = f.metadata["flag"]
        if not flag:
            continue
        help = f"{f.metadata['help']} (default: {f.default if f.default != '' else 'none'})"
        if isinstance(f.default, bool):
            p.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=None, help=help)
        elif f.name == "encoder_urls":
            p.add_argument(flag, dest=f.name, action="append", default=None, metavar="HOST:PORT",
                           help="language role: an encoder server's gRPC address; repeat for several")
        else:
            p.add_argument(flag, dest=f.name, type=type(f.default), default=None, help=help)


def settings_from_args(args) -> tuple[ServingConfig, set[str]]:
    """The settings the flags give (those not given keep their defaults), and which were given."""
    given = {f.name: getattr(args, f.name) for f in dataclasses.fields(ServingConfig)
             if getattr(args, f.name, None) is not None}
    if "checkpoint" in given:
        given["checkpoint"] = str(Path(given["checkpoint"]).resolve())
    if "encoder_urls" in given:
        given["encoder_urls"] = ",".join(given["encoder_urls"])
    return ServingConfig(**given), set(given)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.check:
        server_dir, _ = pytriton_dirs()
        print(f"tritonserver: {server_dir / 'bin' / 'tritonserver'}\nbackends: {python_backend_dir(server_dir)}")
        return 0
    if not args.checkpoint:
        sys.exit("qwen3vl-serve: --checkpoint DIR is required")
    if args.openai_port and args.role == "encoder":
        sys.exit("qwen3vl-serve: --openai-port needs the ensemble: roles aggregated and language serve it")
    if args.role == "language" and not (args.encoder_urls or os.environ.get("QWEN3VL_ENCODER_URLS")):
        sys.exit("qwen3vl-serve: --role language needs --encoder-url HOST:PORT (an encoder server's gRPC port)")
    if not (Path(args.checkpoint) / "config.json").is_file():
        sys.exit(f"qwen3vl-serve: {args.checkpoint} has no config.json (not a checkpoint directory)")
    if not (Path(args.model_repository) / "ensemble" / "config.pbtxt").is_file():
        sys.exit(f"qwen3vl-serve: {args.model_repository} is not this project's model repository; "
                 "pass --model-repository or set QWEN3VL_MODEL_REPOSITORY")
    env = server_env(args)
    # The Python backend stub links libpython dynamically: this interpreter's LIBDIR first, or
    # the system's older libpython loads beside our standard library.
    libdirs = [sysconfig.get_config_var("LIBDIR")]
    system_binary = shutil.which("tritonserver") if os.environ.get("QWEN3VL_SYSTEM_TRITON") else None
    if system_binary:  # e.g. the tritonserver Docker image: its own backends are in place
        binary, backend_dir = system_binary, None
    else:
        server_dir, libs = pytriton_dirs()
        binary, backend_dir = str(server_dir / "bin" / "tritonserver"), python_backend_dir(server_dir)
        libdirs.append(str(libs))
    env["LD_LIBRARY_PATH"] = os.pathsep.join(d for d in [*libdirs, env.get("LD_LIBRARY_PATH", "")] if d)
    proc = subprocess.Popen(server_command(args, backend_dir, binary), env=env, preexec_fn=_die_with_parent)
    # The API in its own session: a terminal's Ctrl-C reaches it once, through us.
    api = subprocess.Popen(openai_command(args), env=env, preexec_fn=_die_with_parent,
                           start_new_session=True) if args.openai_port else None
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
    return _wait(proc, api, lambda: stopping)


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


if __name__ == "__main__":
    sys.exit(main())
