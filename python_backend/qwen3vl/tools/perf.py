"""perf_analyzer against the served `ensemble`: fetch a binary that runs here, write its input
data for our contract, run it over gRPC streaming.

    python -m qwen3vl.tools.perf --url 127.0.0.1:8001 --image cat.png --max-tokens 32 --concurrency 1:4

PyPI's `perf-analyzer` needs glibc 2.38; the `tritonclient==2.41.0` manylinux1 wheel carries a
`perf_analyzer` that runs on older glibc against tritonserver 2.51 once `libb64.so.0d` and
`libcudart.so.12` resolve. Both ship inside the `nvidia-pytriton` wheel's `nvidia_pytriton.libs`
under hashed names, so `ensure_perf_analyzer` downloads that wheel (not installed: the venv keeps
its current tritonclient), extracts the one binary and links the two libraries under their
sonames in a private directory that goes on `LD_LIBRARY_PATH` for perf_analyzer only.

Images in `--input-data`: a JSON string under "content" reaches the model as its UTF-8 bytes,
never base64-decoded, so raw PNG/JPEG bytes cannot be written that way. A {"b64": ...} value is
decoded and sent as the tensor's serialized bytes, which for a BYTES tensor is Triton's wire
format: per element a 4-byte little-endian length, then the bytes. `write_input_data` writes
images that way, so the model gets the image files exactly as `qwen3vl-client` sends them.
"""

from __future__ import annotations

import argparse
import base64
import csv
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
from tritonclient.utils import serialize_byte_tensor

from .. import contract
from ..paths import REPO_ROOT

DEFAULT_CACHE = REPO_ROOT / ".work" / "perf_analyzer"
TRITONCLIENT_VERSION = "2.41.0"
WHEEL_PLATFORM = "manylinux1_x86_64"
WHEEL_MEMBER = f"tritonclient-{TRITONCLIENT_VERSION}.data/data/bin/perf_analyzer"
# soname perf_analyzer asks for -> glob of the hashed copy in nvidia_pytriton.libs
LIBRARIES = {"libb64.so.0d": "libb64-*.so.0d", "libcudart.so.12": "libcudart-*.so.12*"}


class PerfAnalyzerError(RuntimeError):
    pass


def _pytriton_libs() -> Path | None:
    try:
        import pytriton
    except ImportError:
        return None
    libs = Path(pytriton.__file__).resolve().parent.parent / "nvidia_pytriton.libs"
    return libs if libs.is_dir() else None


def _system_has(soname: str) -> bool:
    try:
        out = subprocess.run(["ldconfig", "-p"], capture_output=True, text=True, check=False).stdout
    except OSError:
        return False
    return any(line.strip().startswith(soname + " ") for line in out.splitlines())


def _download_wheel(dest: Path) -> Path:
    dest.mkdir(parents=True, exist_ok=True)
    name = f"tritonclient-{TRITONCLIENT_VERSION}-py3-none-{WHEEL_PLATFORM}.whl"
    if not (dest / name).is_file():
        cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:",
               "--platform", WHEEL_PLATFORM, f"tritonclient=={TRITONCLIENT_VERSION}", "-d", str(dest)]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0 or not (dest / name).is_file():
            raise PerfAnalyzerError(f"could not download {name} ({' '.join(cmd)}):\n{done.stderr[-2000:]}")
    return dest / name


def _link(target: Path, link: Path) -> None:
    """Point `link` at `target`, atomically (concurrent callers see the old or the new link)."""
    if link.is_symlink() and Path(os.readlink(link)) == target:
        return
    tmp = link.with_name(f".{link.name}.{os.getpid()}")
    tmp.unlink(missing_ok=True)
    tmp.symlink_to(target)
    os.replace(tmp, link)


def ensure_perf_analyzer(cache_dir: str | Path | None = None) -> tuple[Path, dict[str, str]]:
    """(perf_analyzer binary, environment to run it with); idempotent, cached in `cache_dir`
    (default: the repository's .work/perf_analyzer, or $QWEN3VL_PERF_CACHE).

    $QWEN3VL_PERF_ANALYZER names a binary to use as is (e.g. inside Triton's SDK container)."""
    env = dict(os.environ)
    given = os.environ.get("QWEN3VL_PERF_ANALYZER")
    if given:
        if not os.access(given, os.X_OK):
            raise PerfAnalyzerError(f"QWEN3VL_PERF_ANALYZER={given} is not an executable")
        return Path(given), env
    cache = Path(cache_dir or os.environ.get("QWEN3VL_PERF_CACHE") or DEFAULT_CACHE)
    binary = cache / "bin" / "perf_analyzer"
    if not binary.is_file():
        wheel = _download_wheel(cache / "wheels")
        binary.parent.mkdir(parents=True, exist_ok=True)
        with zipfile.ZipFile(wheel) as zf, tempfile.NamedTemporaryFile(dir=binary.parent, delete=False) as tmp:
            with zf.open(WHEEL_MEMBER) as src:
                shutil.copyfileobj(src, tmp)
        os.chmod(tmp.name, 0o755)
        os.replace(tmp.name, binary)

    libdir = cache / "lib"
    libdir.mkdir(parents=True, exist_ok=True)
    bundled = _pytriton_libs()
    missing = []
    for soname, pattern in LIBRARIES.items():
        found = sorted(bundled.glob(pattern)) if bundled else []
        if found:
            _link(found[-1], libdir / soname)
        elif not (libdir / soname).exists() and not _system_has(soname):
            missing.append(soname)
    if missing:
        raise PerfAnalyzerError(f"perf_analyzer needs {', '.join(missing)}: install nvidia-pytriton "
                                "(`pip install -e '.[server]'`), or Debian's libb64-0d and a CUDA 12 runtime")
    env["LD_LIBRARY_PATH"] = os.pathsep.join(p for p in (str(libdir), env.get("LD_LIBRARY_PATH", "")) if p)
    return binary, env


def bytes_tensor_b64(items: Sequence[bytes]) -> dict:
    """A BYTES tensor of raw byte strings as perf_analyzer input data: {"b64": serialized, "shape": [n]}
    (serialized = Triton's BYTES wire format, a 4-byte little-endian length before each element)."""
    wire = serialize_byte_tensor(np.array(list(items), dtype=object)).item()
    return {"b64": base64.b64encode(wire).decode("ascii"), "shape": [len(items)]}


def input_step(prompt: str, images: Sequence[bytes] = (), max_tokens: int = 16, temperature: float = 0.0,
               stream: bool = True, videos: Sequence[bytes] = (), video_fps: float | None = None) -> dict:
    """One request of the ensemble contract (DESIGN section 3) in perf_analyzer's JSON form."""
    step = {contract.TEXT_INPUT: [prompt],
            contract.MAX_TOKENS: [int(max_tokens)],
            contract.TEMPERATURE: [float(temperature)],
            contract.STREAM: [bool(stream)]}
    if images:
        step[contract.IMAGES] = bytes_tensor_b64(list(images))
    if videos:
        step[contract.VIDEOS] = bytes_tensor_b64(list(videos))
    if video_fps is not None:
        step[contract.VIDEO_FPS] = [float(video_fps)]
    return step


def write_input_data(path: str | Path, prompts: Iterable[str], images: Sequence[bytes | str | Path] = (),
                     max_tokens: int = 16, temperature: float = 0.0, stream: bool = True,
                     videos: Sequence[bytes | str | Path] = (), video_fps: float | None = None) -> Path:
    """Write perf_analyzer's --input-data file: one step per prompt, each with all `images` and
    `videos` (raw file bytes, or paths to read) before the text, greedy by default, streamed."""
    def read(items):
        return [Path(i).read_bytes() if isinstance(i, (str, Path)) else bytes(i) for i in items]

    blobs, clips = read(images), read(videos)
    steps = [input_step(p, blobs, max_tokens, temperature, stream, clips, video_fps) for p in prompts]
    if not steps:
        raise ValueError("write_input_data: at least one prompt is needed")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"data": steps}, indent=1) + "\n")
    return path


def perf_command(binary: str | Path, url: str, input_data: str | Path, model: str = "ensemble",
                 concurrency: str = "1:4", measurement_ms: int = 4000, stability: int = 50,
                 csv_path: str | Path | None = None, extra: Sequence[str] = ()) -> list[str]:
    cmd = [str(binary), "-m", model, "-i", "grpc", "-u", url, "--streaming", "--input-data", str(input_data),
           "--concurrency-range", concurrency, "--measurement-interval", str(measurement_ms),
           "--stability-percentage", str(stability)]
    if csv_path:
        cmd += ["-f", str(csv_path)]
    return cmd + list(extra)


def read_csv(path: str | Path) -> list[dict[str, float]]:
    """perf_analyzer's -f report: one row per concurrency, numbers as floats, by concurrency."""
    with open(path, newline="") as f:
        rows = [{k: float(v) for k, v in row.items() if v not in (None, "")} for row in csv.DictReader(f)]
    return sorted(rows, key=lambda r: r.get("Concurrency", 0))


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m qwen3vl.tools.perf",
                                description="Run perf_analyzer against the ensemble over gRPC streaming.",
                                epilog="Arguments after -- go to perf_analyzer as they are.")
    p.add_argument("--url", default="127.0.0.1:8001", help="HOST:GRPC_PORT")
    p.add_argument("--model", default="ensemble")
    p.add_argument("--prompt", action="append", help="prompt; repeat for several (perf_analyzer cycles them)")
    p.add_argument("--image", action="append", default=[], help="image file sent with every request; repeatable")
    p.add_argument("--video", action="append", default=[], help="video file sent with every request; repeatable")
    p.add_argument("--fps", type=float, help="video frames sampled per second (default: the server's)")
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--concurrency", default="1:4", help="perf_analyzer --concurrency-range START:END[:STEP]")
    p.add_argument("--measurement-interval", type=int, default=4000, help="ms per measurement window")
    p.add_argument("--stability-percentage", type=int, default=50)
    p.add_argument("--input-data", help="where to write the input JSON (default: in the cache directory)")
    p.add_argument("--csv", help="also write perf_analyzer's CSV report here")
    p.add_argument("--cache-dir", help=f"where perf_analyzer is kept (default {DEFAULT_CACHE})")
    p.add_argument("--dry-run", action="store_true", help="write the input data, print the command, do not run")
    p.add_argument("extra", nargs="*", help="perf_analyzer flags, after --")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    prompts = args.prompt or ["Describe this picture." if args.image or args.video else "Tell me a short story."]
    try:
        images = [Path(i).read_bytes() for i in args.image]
        videos = [Path(i).read_bytes() for i in args.video]
    except OSError as e:
        sys.exit(f"qwen3vl.tools.perf: cannot read input file: {e}")
    cache = Path(args.cache_dir or os.environ.get("QWEN3VL_PERF_CACHE") or DEFAULT_CACHE)
    input_path = write_input_data(args.input_data or cache / "input.json", prompts, images, args.max_tokens,
                                  videos=videos, video_fps=args.fps)
    try:
        binary, env = (Path("perf_analyzer"), dict(os.environ)) if args.dry_run else ensure_perf_analyzer(cache)
    except PerfAnalyzerError as e:
        sys.exit(f"qwen3vl.tools.perf: {e}")
    cmd = perf_command(binary, args.url, input_path, args.model, args.concurrency, args.measurement_interval,
                       args.stability_percentage, args.csv, args.extra)
    print("$ " + " ".join(cmd), flush=True)
    if args.dry_run:
        return 0
    return subprocess.run(cmd, env=env).returncode


if __name__ == "__main__":
    sys.exit(main())
