"""A procedurally generated world with exact ground truth: seeded scenes, their captions, VQA pairs and caption scoring.

Everything is a pure function of a seed, so the toy VLMs, the exported datasets and the tests see the same world on
every machine. Personal concepts carry a ``mark`` (coloured dots, a hat) that pretraining scenes never contain.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field, replace

import numpy as np
from PIL import Image

IMAGE_SIZE = 64
SHAPES = ("circle", "square", "triangle", "hexagon", "star", "diamond", "figure")
COLORS = {
    "red": (215, 35, 35),
    "green": (40, 175, 55),
    "blue": (35, 75, 225),
    "yellow": (240, 215, 30),
    "purple": (135, 50, 185),
    "orange": (250, 135, 20),
    "teal": (20, 165, 160),
    "pink": (250, 140, 195),
}
SIZES = {"small": 15, "large": 25}
TEXTURES = ("plain", "striped", "checkered")
BACKGROUNDS = ("grass", "sand", "water", "snow", "stone")
MARK_KINDS = ("dots", "hat")
MARK_COLORS = {"magenta": (235, 20, 210), "white": (250, 250, 250), "black": (15, 15, 15), "cyan": (40, 235, 250)}
# Proper names the language models learn as words; personalization identifiers are drawn from these.
NAMES = (
    "Bobby",
    "Mia",
    "Alice",
    "Leo",
    "Nora",
    "Oscar",
    "Ruby",
    "Max",
    "Lily",
    "Sam",
    "Zoe",
    "Felix",
    "Ivy",
    "Hugo",
    "Ella",
    "Milo",
    "Luna",
    "Theo",
    "Rosa",
    "Finn",
    "Ada",
    "Otto",
    "Iris",
    "Jack",
    "Maya",
    "Kai",
    "Nina",
    "Eli",
)
NUMBER_WORDS = ("zero", "one", "two", "three")
RELATIONS = ("left of", "right of", "above", "below")
POSITIONS = ("on the left", "in the middle", "on the right")
CAPTION_PROMPT = "Please caption this image."


@dataclass(frozen=True)
class SceneObject:
    """One object: its attributes, centre and bounding-box side in pixels, and a personal-concept mark if any."""

    shape: str
    color: str
    size: str
    texture: str
    x: int
    y: int
    side: int
    mark: str | None = None  # "dots:<color>" or "hat:<color>"; only personal concepts have one
    concept: str | None = None  # identifier of the personal concept this object is

    def phrase(self) -> str:
        """The grammar's noun phrase, e.g. "a small red striped circle"."""
        texture = "" if self.texture == "plain" else f"{self.texture} "
        return f"a {self.size} {self.color} {texture}{self.shape}"

    def box(self) -> tuple[int, int, int, int]:
        half = self.side // 2
        return self.x - half, self.y - half, self.x - half + self.side, self.y - half + self.side


@dataclass(frozen=True)
class Scene:
    """Scene graph: background, objects (ordered by x), and the seed that renders its pixels."""

    background: str
    objects: tuple[SceneObject, ...]
    seed: int
    names: dict[int, str] = field(default_factory=dict)  # object index -> name the caption uses for it

    def to_dict(self) -> dict:
        return {
            "background": self.background,
            "seed": self.seed,
            "names": {str(k): v for k, v in self.names.items()},
            "objects": [asdict(o) for o in self.objects],
        }

    @staticmethod
    def from_dict(d: dict) -> Scene:
        return Scene(
            d["background"],
            tuple(SceneObject(**o) for o in d["objects"]),
            d["seed"],
            {int(k): v for k, v in d.get("names", {}).items()},
        )


@dataclass(frozen=True)
class Concept:
    """A personal concept: a distinctive instance (mark) on a common shape/colour, with the identifier that names it."""

    identifier: str
    shape: str
    color: str
    mark: str

    def describe(self) -> str:
        kind, mark_color = self.mark.split(":")
        extra = f"with {mark_color} dots" if kind == "dots" else f"wearing a {mark_color} hat"
        return f"{self.color} {self.shape} {extra}"


# Curated so that every concept has a same-shape, same-colour hard negative and a clearly visible mark.
_CONCEPT_TEMPLATES = (
    ("hexagon", "teal", "dots:magenta"),
    ("figure", "orange", "hat:black"),
    ("star", "purple", "dots:white"),
    ("figure", "blue", "hat:magenta"),
    ("circle", "yellow", "dots:black"),
    ("figure", "red", "hat:cyan"),
    ("square", "green", "dots:magenta"),
    ("diamond", "pink", "dots:black"),
)


def make_concepts(n: int = 2, seed: int = 0) -> list[Concept]:
    """The first n personal concepts of the world for this seed, each named by a distinct known name."""
    if not 1 <= n <= len(_CONCEPT_TEMPLATES):
        raise ValueError(f"n_concepts must be between 1 and {len(_CONCEPT_TEMPLATES)}")
    rng = np.random.default_rng([seed, 7])
    names = rng.permutation(len(NAMES))[:n]
    start = int(rng.integers(len(_CONCEPT_TEMPLATES))) if seed else 0
    return [Concept(NAMES[j], *_CONCEPT_TEMPLATES[(start + i) % len(_CONCEPT_TEMPLATES)]) for i, j in enumerate(names)]


def _place(rng: np.random.Generator, sides: list[int]) -> list[tuple[int, int]] | None:
    """Non-overlapping centres for the given box sides, or None after too many tries."""
    centres: list[tuple[int, int]] = []
    for side in sides:
        for _ in range(60):
            lo, hi = side // 2 + 1, IMAGE_SIZE - side // 2 - 2
            x, y = int(rng.integers(lo, hi + 1)), int(rng.integers(lo, hi + 1))
            if all(
                abs(x - cx) > (side + cs) // 2 + 2 or abs(y - cy) > (side + cs) // 2 + 2
                for (cx, cy), cs in zip(centres, sides, strict=False)
            ):
                centres.append((x, y))
                break
        else:
            return None
    return centres


def _random_object(rng: np.random.Generator) -> dict:
    shape = SHAPES[int(rng.integers(len(SHAPES)))]
    texture = "plain" if shape == "figure" else TEXTURES[int(rng.integers(len(TEXTURES)))]
    return {
        "shape": shape,
        "color": list(COLORS)[int(rng.integers(len(COLORS)))],
        "size": list(SIZES)[int(rng.integers(len(SIZES)))],
        "texture": texture,
    }


def generic_mark(shape: str, color: str, rng: np.random.Generator) -> str | None:
    """A mark for a pretraining object (dots on shapes, hats on figures), as real pretraining images show polka dots and
    hats on all kinds of things; never one that makes the object a personal concept's twin."""
    kind = "hat" if shape == "figure" else "dots"
    mark = f"{kind}:{list(MARK_COLORS)[int(rng.integers(len(MARK_COLORS)))]}"
    return None if (shape, color, mark) in _CONCEPT_TEMPLATES else mark


def sample_scene(
    seed: int,
    n_objects: int | None = None,
    concepts: tuple[Concept, ...] = (),
    hard_negative_of: Concept | None = None,
    mark_rate: float = 0.0,
) -> Scene:
    """A random scene; ``concepts`` are placed in it (with their marks), ``hard_negative_of`` adds an unmarked twin.
    ``mark_rate``: share of the other objects that carry a generic mark (pretraining only)."""
    rng = np.random.default_rng([seed, 1])
    n = n_objects or int(rng.integers(1, 4))
    n = max(n, len(concepts) + (hard_negative_of is not None))
    specs = []
    for c in concepts:
        specs.append(
            {
                "shape": c.shape,
                "color": c.color,
                "size": list(SIZES)[int(rng.integers(2))],
                "texture": "plain",
                "mark": c.mark,
                "concept": c.identifier,
            }
        )
    if hard_negative_of is not None:
        texture = "plain" if hard_negative_of.shape == "figure" else TEXTURES[int(rng.integers(len(TEXTURES)))]
        specs.append(
            {
                "shape": hard_negative_of.shape,
                "color": hard_negative_of.color,
                "size": list(SIZES)[int(rng.integers(2))],
                "texture": texture,
            }
        )
    while len(specs) < n:
        spec = _random_object(rng)
        # companions of a concept never share its shape and colour: only hard negatives do
        if any(spec["shape"] == c.shape and spec["color"] == c.color for c in concepts):
            continue
        specs.append(spec)
    order = rng.permutation(len(specs))
    specs = [specs[i] for i in order]
    while True:
        sides = [int(round(SIZES[s["size"]] * rng.uniform(0.9, 1.12))) for s in specs]
        centres = _place(rng, sides)
        if centres is not None:
            break
    if mark_rate:
        mark_rng = np.random.default_rng([seed, 5])
        for spec in specs:
            if "mark" not in spec and mark_rng.random() < mark_rate:
                spec["mark"] = generic_mark(spec["shape"], spec["color"], mark_rng)
    objects = [
        SceneObject(x=x, y=y, side=side, **spec) for spec, (x, y), side in zip(specs, centres, sides, strict=True)
    ]
    objects.sort(key=lambda o: (o.x, o.y))
    background = BACKGROUNDS[int(rng.integers(len(BACKGROUNDS)))]
    names = {i: o.concept for i, o in enumerate(objects) if o.concept}
    return Scene(background, tuple(objects), seed, names)


def with_names(scene: Scene, names: dict[int, str]) -> Scene:
    """The same scene with some objects named (as pretraining does for arbitrary objects)."""
    return replace(scene, names=dict(names))


# ---------------------------------------------------------------- rendering


def _background(kind: str, rng: np.random.Generator) -> np.ndarray:
    yy, xx = np.mgrid[0:IMAGE_SIZE, 0:IMAGE_SIZE].astype(np.float32)
    noise = rng.normal(0, 1, (IMAGE_SIZE, IMAGE_SIZE, 1)).astype(np.float32)
    phase = rng.uniform(0, 2 * np.pi)
    if kind == "grass":
        base, img = np.array([70, 115, 45]), noise * 10 + (np.sin(xx * 1.7 + phase) * 12)[..., None]
    elif kind == "sand":
        base, img = np.array([205, 180, 125]), noise * 9
    elif kind == "water":
        waves = np.sin(yy * 0.8 + np.sin(xx * 0.3 + phase) * 2) * 14
        base, img = np.array([55, 95, 135]), waves[..., None] + noise * 4
    elif kind == "snow":
        base, img = np.array([232, 236, 242]), noise * 5
    else:  # stone
        blotch = np.sin(xx * 0.45 + phase) * np.cos(yy * 0.5 - phase)
        base, img = np.array([125, 122, 118]), (blotch * 18)[..., None] + noise * 8
    return base[None, None, :] + img


def _mask(obj: SceneObject) -> np.ndarray:
    yy, xx = np.mgrid[0:IMAGE_SIZE, 0:IMAGE_SIZE].astype(np.float32) + 0.5
    dx, dy, r = xx - obj.x, yy - obj.y, obj.side / 2
    if obj.shape == "circle":
        return dx * dx + dy * dy <= r * r
    if obj.shape == "square":
        return (np.abs(dx) <= r * 0.88) & (np.abs(dy) <= r * 0.88)
    if obj.shape == "diamond":
        return np.abs(dx) + np.abs(dy) <= r
    if obj.shape == "triangle":
        return (dy <= r * 0.85) & (dy >= -r) & (np.abs(dx) <= (dy + r) * 0.58)
    if obj.shape == "hexagon":
        return (np.abs(dy) <= r * 0.87) & (np.abs(dx) * 0.87 + np.abs(dy) * 0.5 <= r * 0.87)
    if obj.shape == "star":
        angle, dist = np.arctan2(dy, dx), np.sqrt(dx * dx + dy * dy)
        return dist <= r * (0.55 + 0.45 * np.cos(5 * angle + np.pi / 2) ** 2)
    # figure: a head over a widening body, the person-like glyph
    head = dx * dx + (dy + r * 0.55) ** 2 <= (r * 0.38) ** 2
    body = (dy >= -r * 0.15) & (dy <= r) & (np.abs(dx) <= r * 0.3 + (dy + r * 0.15) * 0.35)
    return head | body


def _paint(img: np.ndarray, obj: SceneObject) -> None:
    yy, xx = np.mgrid[0:IMAGE_SIZE, 0:IMAGE_SIZE]
    mask = _mask(obj)
    color = np.array(COLORS[obj.color], dtype=np.float32)
    dark = color * 0.35
    if obj.texture == "striped":
        pattern = ((xx + yy) // 3) % 2 == 0
    elif obj.texture == "checkered":
        pattern = ((xx // 3) + (yy // 3)) % 2 == 0
    else:
        pattern = np.zeros_like(mask)
    img[mask] = color
    img[mask & pattern] = dark
    r = obj.side / 2
    if obj.shape == "figure":  # skin-coloured face keeps the head readable as a head
        head = (xx + 0.5 - obj.x) ** 2 + (yy + 0.5 - obj.y + r * 0.55) ** 2 <= (r * 0.3) ** 2
        img[head] = (235, 195, 160)
    if obj.mark is not None:
        img[mark_mask(obj)] = np.array(MARK_COLORS[obj.mark.split(":")[1]], dtype=np.float32)


def mark_mask(obj: SceneObject) -> np.ndarray:
    """Pixels of an object's mark (none without one): dots over its body, or a hat with a brim over the head."""
    yy, xx = np.mgrid[0:IMAGE_SIZE, 0:IMAGE_SIZE]
    if obj.mark is None:
        return np.zeros((IMAGE_SIZE, IMAGE_SIZE), dtype=bool)
    if obj.mark.startswith("dots"):
        step = max(4, int(round(obj.side / 4)))
        return _mask(obj) & ((xx - obj.x) % step < 2) & ((yy - obj.y) % step < 2)
    r, top = obj.side / 2, obj.y - obj.side / 2 * 0.93
    dx, y = np.abs(xx + 0.5 - obj.x), yy + 0.5
    brim = (dx <= r * 0.6) & (np.abs(y - (top + r * 0.2)) <= max(1.0, r * 0.1))
    crown = (dx <= r * 0.35) & (y >= top - r * 0.3) & (y <= top + r * 0.2)
    return brim | crown


def render_scene(scene: Scene) -> Image.Image:
    """Pixels of a scene graph: a deterministic function of the scene (its seed drives the background noise)."""
    rng = np.random.default_rng([scene.seed, 2])
    img = _background(scene.background, rng)
    for obj in scene.objects:
        _paint(img, obj)
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8), "RGB")


# ---------------------------------------------------------------- language


def relation(a: SceneObject, b: SceneObject) -> str:
    """Where a is relative to b, along the axis that separates them most."""
    dx, dy = a.x - b.x, a.y - b.y
    if abs(dx) >= abs(dy):
        return "left of" if dx < 0 else "right of"
    return "above" if dy < 0 else "below"


def horizontal_position(obj: SceneObject) -> str:
    third = IMAGE_SIZE / 3
    return POSITIONS[0] if obj.x < third else (POSITIONS[1] if obj.x < 2 * third else POSITIONS[2])


def _join(parts: list[str]) -> str:
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def caption_order(scene: Scene) -> list[int]:
    """Object indices in the order an unnamed caption mentions them: left to right, or "above" first for a vertical
    pair."""
    objs = scene.objects
    if len(objs) == 2 and relation(objs[0], objs[1]) not in ("left of", "above"):
        return [1, 0]
    return list(range(len(objs)))


def caption(scene: Scene) -> str:
    """The grammar's caption; named objects take subject position ("Bobby is left of a blue square on grass.")."""
    objs, names = scene.objects, scene.names
    named = [i for i in range(len(objs)) if i in names]
    others = [objs[i].phrase() for i in range(len(objs)) if i not in names]
    where = f" on {scene.background}."
    if not named:
        if len(objs) == 2:
            first, second = (objs[i] for i in caption_order(scene))
            text = f"{first.phrase()} {relation(first, second)} {second.phrase()}"
        else:
            text = _join(others)
        return text[0].upper() + text[1:] + where
    subject = _join([names[i] for i in named])
    verb = "is" if len(named) == 1 else "are"
    if len(objs) == 1:
        return f"{subject} is{where}"
    if len(objs) == 2:
        a, b = named[0], 1 - named[0]
        target = names[b] if b in names else objs[b].phrase()
        return f"{names[a]} is {relation(objs[a], objs[b])} {target}{where}"
    return f"{subject} {verb} with {_join(others)}{where}"


def caption_prompt(names: list[str] | tuple[str, ...] = ()) -> str:
    """LLaVA captioning instruction, with the personalized "of {identifier}." form when names are given."""
    return f"Please caption this image of {_join(list(names))}." if names else CAPTION_PROMPT


def vqa_pairs(scene: Scene, rng: np.random.Generator) -> list[tuple[str, str]]:
    """Question/answer pairs about colour, shape, position, count and relation that the scene graph answers exactly."""
    objs = scene.objects
    pairs = [("How many objects are there?", NUMBER_WORDS[len(objs)])]
    for i, o in enumerate(objs):
        if i in scene.names:
            pairs.append((f"Where is {scene.names[i]} in the image?", horizontal_position(o)))
            continue
        if sum(p.shape == o.shape for p in objs) == 1:
            pairs.append((f"What color is the {o.shape}?", o.color))
        if sum(p.color == o.color for p in objs) == 1:
            pairs.append((f"What shape is the {o.color} object?", o.shape))
        if sum(p.color == o.color and p.shape == o.shape for p in objs) == 1:
            pairs.append((f"Where is the {o.color} {o.shape}?", horizontal_position(o)))
    unique = [o for o in objs if sum(p.color == o.color and p.shape == o.shape for p in objs) == 1]
    if len(unique) >= 2:
        a, b = (unique[i] for i in rng.permutation(len(unique))[:2])
        rel = RELATIONS[int(rng.integers(4))]
        pairs.append(
            (f"Is the {a.color} {a.shape} {rel} the {b.color} {b.shape}?", "yes" if relation(a, b) == rel else "no")
        )
    return pairs


# ---------------------------------------------------------------- scoring

_PHRASE = re.compile(r"\b[Aa] (small|large) (\w+) (?:(striped|checkered) )?(\w+)")


def caption_attribute_accuracy(text: str, scene: Scene, identifiers: dict[str, int] | None = None) -> tuple[int, int]:
    """(correct, total) attribute slots of a caption against the scene graph.

    Slots: size/colour/texture/shape of every object, the background, and the relation of two-object scenes.
    ``identifiers`` maps a name to the object index it denotes (personal concepts; defaults to ``scene.names``):
    a name in the caption counts as all four attributes of its object. Missing or invented objects cost 4 slots each.
    """
    identifiers = dict(scene.names and {v: k for k, v in scene.names.items()}) if identifiers is None else identifiers
    objs = scene.objects
    named = {idx for name, idx in identifiers.items() if re.search(rf"\b{re.escape(name)}\b", text)}
    phrases = [(m.start(), m.groups()) for m in _PHRASE.finditer(text)]
    remaining = [i for i in range(len(objs)) if i not in named]
    correct = 4 * len(named)
    matched: dict[int, int] = {}  # phrase position -> object index
    for start, (size, color, texture, shape) in phrases:
        scores = [
            (
                sum(
                    (
                        objs[i].size == size,
                        objs[i].color == color,
                        objs[i].texture == (texture or "plain"),
                        objs[i].shape == shape,
                    )
                ),
                -i,
            )
            for i in remaining
        ]
        if not scores:
            break
        best, neg_i = max(scores)
        correct += best
        matched[start] = -neg_i
        remaining.remove(-neg_i)
    total = 4 * max(len(objs), len(named) + len(phrases)) + 1
    correct += f" on {scene.background}" in text
    if len(objs) == 2:
        total += 1
        rel = next((r for r in RELATIONS if f" {r} " in text), None)
        if rel is not None:
            at = text.index(f" {rel} ")
            name_positions = {
                m.start(): identifiers[m.group(0)]
                for name in identifiers
                for m in re.finditer(rf"\b{re.escape(name)}\b", text)
                if identifiers[name] in named
            }
            spans = sorted({**matched, **name_positions}.items())
            before = [i for s, i in spans if s < at]
            after = [i for s, i in spans if s > at]
            if before and after and before[-1] != after[0]:
                correct += relation(objs[before[-1]], objs[after[0]]) == rel
    return correct, total
