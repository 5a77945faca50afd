"""The questions asked about a picture, each with its one right answer.

Answers are short, lower case and end with a period; an answer is right when the model's text,
stripped of surrounding white space, equals it exactly.

| category | question | answer |
|---|---|---|
| colour | "What colour is the circle?" (exactly one circle) | "red." |
| shape | "What shape is the blue one?" (exactly one blue shape) | "a triangle." |
| count | "How many shapes are there?" | "one." / "two." / "three." |
| exists | "Is there a green square?" ("an orange ...") | "yes." / "no." |
| describe | "Describe the picture." | "a red circle and a blue square." (left to right) |
| compare | two pictures, "Which picture has more shapes?" | "the first." / "the second." / "neither." |
| json | "Describe the picture as JSON." | '{"colour": "red", "shape": "circle", "count": 2}' |

The json answer names the leftmost shape and how many there are, in `json.dumps`' form with the
keys in JSON_SCHEMA's order, so that a grammar for that schema allows the answer as trained. It is
taught only by the fine-tuning stage (`qwen3vl-train-demo --init-from ... --json-share ...`) and
asked under the schema by `qwen3vl-bench demo-accuracy`'s json row; it is not one of CATEGORIES
(the free-text rows).
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass

from .scenes import COLOURS, KINDS, Scene, random_scene

CATEGORIES = ("colour", "shape", "count", "exists", "describe", "compare")
JSON_CATEGORY = "json"
JSON_QUESTION = "Describe the picture as JSON."
# The schema the json answers follow (and the demo-accuracy row enforces with structured output).
JSON_SCHEMA = {"type": "object",
               "properties": {"colour": {"enum": sorted(COLOURS)}, "shape": {"enum": list(KINDS)},
                              "count": {"type": "integer", "minimum": 1, "maximum": 3}},
               "required": ["colour", "shape", "count"], "additionalProperties": False}
ONE_PICTURE = CATEGORIES[:-1]
NUMBERS = {1: "one", 2: "two", 3: "three"}
# What guessing scores: the answer drawn uniformly from the category's answers. For describe,
# guessing one to three shapes in order is near 0.
CHANCE = {"colour": 1 / len(COLOURS), "shape": 1 / len(KINDS), "count": 1 / 3, "exists": 1 / 2,
          "describe": 0.0, "compare": 1 / 3}


def article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


@dataclass(frozen=True)
class Question:
    category: str
    text: str
    answer: str
    scenes: tuple[Scene, ...]        # the pictures, in request order

    def is_right(self, reply: str) -> bool:
        return reply.strip() == self.answer


def ask(category: str, scene: Scene, rng: random.Random) -> Question | None:
    """A question of `category` about `scene`, or None where the category does not apply
    (no shape is the only one of its kind or colour)."""
    shapes = scene.shapes
    if category in ("colour", "shape"):
        # "What colour is the circle?" needs exactly one circle; "What shape is the blue one?"
        # exactly one blue shape.
        key = "kind" if category == "colour" else "colour"
        unique = [s for s in shapes if sum(getattr(t, key) == getattr(s, key) for t in shapes) == 1]
        if not unique:
            return None
        s = rng.choice(unique)
        if category == "colour":
            return Question(category, f"What colour is the {s.kind}?", f"{s.colour}.", (scene,))
        return Question(category, f"What shape is the {s.colour} one?", f"a {s.kind}.", (scene,))
    if category == "count":
        return Question(category, "How many shapes are there?", f"{NUMBERS[len(shapes)]}.", (scene,))
    if category == "exists":
        present = {(s.colour, s.kind) for s in shapes}
        if rng.random() < 0.5:
            colour, kind = rng.choice(sorted(present))
        else:
            # Half of the "no" questions name a colour or a kind that is in the picture, so that
            # neither alone gives the answer away.
            absent = [(c, k) for c in COLOURS for k in KINDS if (c, k) not in present]
            near = [(c, k) for c, k in absent if any(c == pc or k == pk for pc, pk in present)]
            colour, kind = rng.choice(near if near and rng.random() < 0.5 else absent)
        answer = "yes." if (colour, kind) in present else "no."
        return Question(category, f"Is there {article(colour)} {colour} {kind}?", answer, (scene,))
    if category == "describe":
        return Question(category, "Describe the picture.", scene.description(), (scene,))
    if category == JSON_CATEGORY:
        return Question(category, JSON_QUESTION, json_answer(scene), (scene,))
    raise ValueError(f"unknown one-picture category {category!r}")


def json_answer(scene: Scene) -> str:
    """'{"colour": "red", "shape": "circle", "count": 2}': the leftmost shape and the number of
    shapes, keys in JSON_SCHEMA's order."""
    first = scene.shapes[0]
    return json.dumps({"colour": first.colour, "shape": first.kind, "count": len(scene.shapes)})


def compare(first: Scene, second: Scene) -> Question:
    """"Which picture has more shapes?" about two pictures."""
    a, b = len(first.shapes), len(second.shapes)
    answer = "the first." if a > b else "the second." if b > a else "neither."
    return Question("compare", "Which picture has more shapes?", answer, (first, second))


def random_question(category: str, rng: random.Random) -> Question:
    """A fresh picture (or two) and a question of `category` about it."""
    if category == "compare":
        return compare(random_scene(rng), random_scene(rng))
    while True:
        q = ask(category, random_scene(rng), rng)
        if q is not None:
            return q
