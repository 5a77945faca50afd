"""`make demo`: the bundled demo checkpoint, a real tritonserver, a new picture, streamed answers.

The checkpoint (checkpoints/shapes, made by `qwen3vl-train-demo`) is a small Qwen3-VL-MoE trained
on pictures of coloured shapes. The demo draws a picture it has never seen, saves it, asks the
served model about it over gRPC streaming through the ensemble, and says whether each answer is
right. It exits 1 if no answer comes back (a wrong answer is the model's, not a failure of the
serving: docs/demo-checkpoint.md gives its accuracy).

    python -m qwen3vl.tools.demo [--seed N] [--question TEXT] [--out-dir .work/demo]

`--preset tiny|small --checkpoint DIR` runs the old demo instead: a random checkpoint (the words
are nonsense), for a look at the serving path alone.
"""

from __future__ import annotations

import argparse
import random
import sys
from pathlib import Path

from ..client import ask
from ..launch.server import Server
from .make_checkpoint import make_checkpoint
from .shapes.accuracy import CHECKPOINT, MAX_TOKENS
from .shapes.questions import ONE_PICTURE, Question, ask as question_about
from .shapes.scenes import random_scene

DEMO_STREAM = "demo"   # the pictures' random stream: training draws from "<seed>/train"


def demo_questions(seed: int, extra: str | None) -> list[Question]:
    """A fresh three-shape picture and one question of each category that applies to it."""
    rng = random.Random(f"{DEMO_STREAM}/{seed}")
    scene = random_scene(rng, num_shapes=rng.randint(2, 3))
    asked = [q for c in ONE_PICTURE if (q := question_about(c, scene, rng)) is not None]
    asked.sort(key=lambda q: q.category != "describe")           # "Describe the picture." first
    if extra:
        asked = [Question("own", extra, "", (scene,))]
    return asked


def progress(line: str) -> None:
    """While the server loads: how long so far, and what the models last said."""
    print(f"  {line}", flush=True)


def stream_answer(url: str, prompt: str, images: list[bytes], max_tokens: int):
    print(f"\nuser: [picture] {prompt}\nassistant: ", end="", flush=True)
    answer = ask(url, "grpc", stream=True, prompt=prompt, images=images, max_tokens=max_tokens,
                 temperature=0.0, on_text=lambda s: print(s, end="", flush=True))
    return answer


def timing(answer) -> str:
    n = len(answer.token_ids)
    rate = (n - 1) / (answer.total_s - answer.ttft_s) if n > 1 and answer.total_s > answer.ttft_s else 0.0
    return (f"[{answer.chunks} streamed responses, {n} tokens, finish_reason={answer.finish_reason}, "
            f"TTFT {answer.ttft_s * 1000:.0f} ms, {rate:.1f} tokens/s after the first]")


def shapes_demo(args) -> int:
    questions = demo_questions(args.seed, args.question)
    scene = questions[0].scenes[0]
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    picture = out_dir / f"picture-{args.seed}.png"
    picture.write_bytes(scene.png())
    print(f"checkpoint: {args.checkpoint} (trained by qwen3vl-train-demo on pictures of shapes)")
    print(f"picture: {picture} ({scene.width}x{scene.height}, new: not from training)")
    print(f"on it, left to right: {scene.description()}", flush=True)
    log = out_dir / "demo-server.log"
    print(f"starting tritonserver (log: {log}) ...", flush=True)
    wrong = 0
    with Server(args.checkpoint, log, progress=progress) as server:
        print(f"server ready: gRPC {server.grpc_url}, HTTP {server.http_url}", flush=True)
        for q in questions:
            answer = stream_answer(server.grpc_url, q.text, [scene.png()], MAX_TOKENS)
            if not answer.finish_reason:
                print("\ndemo: no answer came back", file=sys.stderr)
                return 1
            if q.answer:
                right = q.is_right(answer.text)
                wrong += not right
                print(f"\n  -> {'right' if right else 'WRONG, the answer is ' + repr(q.answer)}  {timing(answer)}")
            else:
                print(f"\n  {timing(answer)}")
    graded = sum(bool(q.answer) for q in questions)
    if graded:
        print(f"\n{graded - wrong} of {graded} answers right")
    return 0


def random_checkpoint_demo(args) -> int:
    from io import BytesIO

    checkpoint = make_checkpoint(args.checkpoint, preset=args.preset)
    print(f"checkpoint: {checkpoint} (random weights: the words will be nonsense)", flush=True)
    log = Path(args.out_dir) / "demo-server.log"
    print(f"starting tritonserver (log: {log}) ...", flush=True)
    rng = random.Random(f"{DEMO_STREAM}/{args.seed}")
    buf = BytesIO()
    random_scene(rng).image().save(buf, format="PNG")
    with Server(checkpoint, log, progress=progress) as server:
        print(f"server ready: gRPC {server.grpc_url}, HTTP {server.http_url}", flush=True)
        answer = stream_answer(server.grpc_url, args.question or "Describe the picture.", [buf.getvalue()],
                               args.max_tokens)
        print(f"\n\n{timing(answer)}")
        if not answer.token_ids or not answer.finish_reason:
            print("demo: no answer came back", file=sys.stderr)
            return 1
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="qwen3vl-demo", description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", default=str(CHECKPOINT))
    p.add_argument("--preset", choices=("tiny", "small"),
                   help="make and serve a RANDOM checkpoint of this preset at --checkpoint instead")
    p.add_argument("--seed", type=int, default=7, help="which new picture to draw")
    p.add_argument("--question", help="ask this instead of the standard questions (not graded)")
    p.add_argument("--max-tokens", type=int, default=32, help="with --preset")
    p.add_argument("--out-dir", default=".work/demo", help="where the picture and the server log go")
    args = p.parse_args(argv)
    return random_checkpoint_demo(args) if args.preset else shapes_demo(args)


if __name__ == "__main__":
    sys.exit(main())
