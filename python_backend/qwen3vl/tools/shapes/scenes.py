"""Seeded pictures of coloured shapes on a white canvas, with the facts needed to grade answers.

A picture is a white canvas of 96 to 320 pixels per side (any aspect ratio in that range) holding
one to three filled shapes that do not overlap. Each shape is a circle, a square or a triangle, in
one of six colours drawn from a range of shades (hue, saturation and value jittered around the
colour a person would name), spanning 20 to 45 % of the canvas' short side.

"Left to right" must mean one thing at a glance, so two shapes' centres are apart horizontally by
at least half the wider one's side (and `MIN_CENTRE_GAP` of the canvas width): a shape is never
straight above another. Otherwise positions are uniform.
"""

from __future__ import annotations

import colorsys
import io
import random
from dataclasses import dataclass

from PIL import Image, ImageDraw

KINDS = ("circle", "square", "triangle")
# Hue ranges (degrees) inside which every shade reads as the name; saturation and value are drawn
# high enough that none of them reads as grey, brown or pastel.
COLOURS = {
    "red": (-8.0, 8.0),
    "orange": (22.0, 34.0),
    "yellow": (50.0, 60.0),
    "green": (95.0, 145.0),
    "blue": (205.0, 235.0),
    "purple": (270.0, 295.0),
}
MIN_SIDE, MAX_SIDE = 96, 320          # canvas side, pixels
MIN_SPAN, MAX_SPAN = 0.20, 0.45       # shape size / canvas short side
MIN_CENTRE_GAP = 0.08                 # horizontal centre gap / canvas width, at least
MIN_CENTRE_GAP_SIDES = 0.5            # horizontal centre gap / the wider shape's side, at least
GAP_PIXELS = 2                        # white pixels at least between two shapes' boxes


@dataclass(frozen=True)
class Shape:
    kind: str                 # one of KINDS
    colour: str               # one of COLOURS
    rgb: tuple[int, int, int]
    box: tuple[int, int, int, int]   # left, top, right, bottom (pixels, inclusive)

    @property
    def centre_x(self) -> float:
        return (self.box[0] + self.box[2]) / 2


@dataclass(frozen=True)
class Scene:
    width: int
    height: int
    shapes: tuple[Shape, ...]        # left to right

    def image(self) -> Image.Image:
        """The picture, RGB, `width` x `height`."""
        im = Image.new("RGB", (self.width, self.height), (255, 255, 255))
        draw = ImageDraw.Draw(im)
        for s in self.shapes:
            left, top, right, bottom = s.box
            if s.kind == "circle":
                draw.ellipse(s.box, fill=s.rgb)
            elif s.kind == "square":
                draw.rectangle(s.box, fill=s.rgb)
            else:  # an upright triangle filling its box
                draw.polygon([((left + right) / 2, top), (right, bottom), (left, bottom)], fill=s.rgb)
        return im

    def png(self) -> bytes:
        buf = io.BytesIO()
        self.image().save(buf, format="PNG")
        return buf.getvalue()

    def description(self) -> str:
        """"a red circle, an orange square and a green triangle." (left to right)."""
        parts = [f"{'an' if s.colour[0] in 'aeiou' else 'a'} {s.colour} {s.kind}" for s in self.shapes]  # "an orange"
        text = parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]
        return text + "."


def shade(colour: str, rng: random.Random) -> tuple[int, int, int]:
    """One RGB shade a person would call `colour`."""
    lo, hi = COLOURS[colour]
    hue = (rng.uniform(lo, hi) % 360.0) / 360.0
    sat = rng.uniform(0.65, 1.0)
    # Dark yellow is olive and dark orange is brown; the other colours keep their name darker.
    val = rng.uniform(*{"yellow": (0.85, 1.0), "orange": (0.8, 1.0)}.get(colour, (0.6, 1.0)))
    return tuple(round(255 * c) for c in colorsys.hsv_to_rgb(hue, sat, val))


def random_scene(rng: random.Random, num_shapes: int | None = None) -> Scene:
    """A picture drawn from `rng` (a `random.Random`; the same state gives the same picture)."""
    n = num_shapes if num_shapes is not None else rng.randint(1, 3)
    while True:                                   # retry the rare layouts that cannot fit
        width, height = rng.randint(MIN_SIDE, MAX_SIDE), rng.randint(MIN_SIDE, MAX_SIDE)
        short = min(width, height)
        shapes: list[Shape] = []
        for _ in range(n):
            for _attempt in range(100):
                side = round(short * rng.uniform(MIN_SPAN, MAX_SPAN))
                left, top = rng.randint(0, width - side), rng.randint(0, height - side)
                box = (left, top, left + side - 1, top + side - 1)
                if all(_apart(box, s.box, width) for s in shapes):
                    colour = rng.choice(list(COLOURS))
                    shapes.append(Shape(rng.choice(KINDS), colour, shade(colour, rng), box))
                    break
            else:
                break
        if len(shapes) == n:
            return Scene(width, height, tuple(sorted(shapes, key=lambda s: s.centre_x)))


def _apart(a, b, width: int) -> bool:
    """Boxes a and b do not touch, and their centres are far enough apart horizontally."""
    separated = (a[2] + GAP_PIXELS < b[0] or b[2] + GAP_PIXELS < a[0]
                 or a[3] + GAP_PIXELS < b[1] or b[3] + GAP_PIXELS < a[1])
    return separated and centre_gap(a, b) >= min_centre_gap(a, b, width)


def centre_gap(a, b) -> float:
    """Horizontal distance between boxes' centres, pixels."""
    return abs((a[0] + a[2]) - (b[0] + b[2])) / 2


def min_centre_gap(a, b, width: int) -> float:
    """The least horizontal centre gap two shapes' boxes may have on a canvas `width` wide."""
    wider = max(a[2] - a[0], b[2] - b[0]) + 1
    return max(MIN_CENTRE_GAP * width, MIN_CENTRE_GAP_SIDES * wider)
