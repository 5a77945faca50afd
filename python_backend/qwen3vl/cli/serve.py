"""`qwen3vl-serve`: run a real tritonserver on this repository's models for one checkpoint.

The options and their checks are here; assembling, configuring and running tritonserver is
qwen3vl.launch.tritonserver's.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from pathlib import Path

from ..launch.tritonserver import (DEFAULT_MODEL_REPOSITORY, ROLES, endpoints, locate_tritonserver,
                                   openai_command, ports_in_use, python_backend_dir, pytriton_dirs, run, server_command,
                                   server_env)
from ..settings import ServingConfig


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
    """docs/serving.md's table of qwen3vl-serve's own flags (those that are no setting; the settings
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
    if clashes := ports_in_use(args):
        sys.exit("qwen3vl-serve: cannot listen where asked (nothing started): " + "; ".join(clashes)
                 + ". Choose free ports with the flags named.")
    settings, given = settings_from_args(args)
    binary, backend_dir, libdirs = locate_tritonserver()
    env = server_env(settings, given, libdirs)
    return run(server_command(args, backend_dir, binary), env, openai_command(args) if args.openai_port else None,
               endpoints(args))


if __name__ == "__main__":
    sys.exit(main())
