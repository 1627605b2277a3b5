"""The toy "shapes" world: a GenEval-style grammar over 32x32 images of 1-4 flat shapes.

Every fastpref claim has to be checkable on a small CPU with no model hub, so this module is a
miniature of the real text-to-image problem: captions from GenEval's six categories, a renderer
that draws a random image satisfying a caption (fast enough to render on the fly), and a
train/eval split whose eval captions bind attributes in ways no training caption does.

Grammar (one caption per PromptSpec, `parse_caption` inverts `PromptSpec.caption`):

    single_object  "a circle"                             bare shape, the color is left free
    colors         "a red circle"
    counting       "three circles"                        2-4 objects, colors left free
    two_objects    "a circle and a square"                two different shapes, colors free
    position       "a red circle left of a blue square"   two distinct colored objects
    color_attr     "a red circle and a blue square"       different shapes and different colors

A caption describes the whole image: the renderer draws exactly the objects it names (a free
color is drawn at random per object), on a plain background, upright, never overlapping and at
least `MIN_GAP` pixels apart so that a connected-component verifier can be exact.

Relations follow GenEval's rule (see `relation_holds`): the centre offset, shrunk by 10% of the
two objects' summed size, must point within 60 degrees of the relation's axis. The renderer
places related objects within 25 degrees of the axis so ground truth is never borderline.

Held-out split (`eval_prompts`): every word appears in training captions, but
- the color-shape pairs in `HELD_OUT_COLOR_SHAPES` never appear in a training caption (they
  make up the eval `colors` prompts and every eval `position` / `color_attr` prompt),
- the count-shape pairs in `HELD_OUT_COUNT_SHAPES` are eval-only (`counting`),
- `two_objects` pairs appear in training in one order only; eval has the other order,
- the bare shape `HELD_OUT_SINGLE_SHAPE` ("a triangle") is eval-only (`single_object`).
Training images still show held-out bindings (a free-colored "a triangle and a circle" may be a
red triangle) -- only the captions never name them, as with real compositional generalization.

Worlds (`WORLDS`, `get_world`): everything above is world "v1", the module-level constants and the
default of every function, kept bit-identical because the shipped models were trained on it. World
"v2" is big enough for a held-out split of >= 24 prompts in every category: 8 shapes, 8 colors,
counts 2-5 (counting captions may name a color: "three red circles"), and optional sizes
("small" / "medium" / "large") on single objects ("a small circle", "a large red square"). Its split:
- `held_out_color_shapes` (8 pairs, one per shape and per color) never appear in a training caption
  (eval `colors`, and every eval `position` / `color_attr` prompt, and colored eval `counting`);
- `held_out_count_shapes` (8 pairs, one per shape) are eval-only in `counting`, with or without color;
- every sized bare shape ("a small circle") is eval-only (`single_object`); training captions pair
  sizes with colors ("a small red circle") and bare shapes with no size ("a circle");
- `two_objects`: each unordered pair is trained in one order, evaluated in the other (as in v1).
A PromptSpec carries its world's name (`spec.world`), so rendering, variants and the verifier
follow the spec; prompt lists, parsing and sampling take `world=` ("v1" by default).
"""

from __future__ import annotations

import functools
import itertools
from dataclasses import dataclass, field

import numpy as np

IMAGE_SIZE = 32
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 180, 60),
    "blue": (50, 90, 230),
    "yellow": (230, 210, 40),
}
BACKGROUND: tuple[int, int, int] = (16, 16, 16)
RELATIONS: tuple[str, ...] = ("left of", "right of", "above", "below")
CATEGORIES: tuple[str, ...] = (
    "single_object",
    "colors",
    "counting",
    "two_objects",
    "position",
    "color_attr",
)
COUNT_WORDS: dict[int, str] = {2: "two", 3: "three", 4: "four"}
MAX_OBJECTS = 4
PLURALS: dict[str, str] = {shape: shape + "s" for shape in SHAPES}

HELD_OUT_COLOR_SHAPES: frozenset[tuple[str, str]] = frozenset(
    {("red", "triangle"), ("green", "circle"), ("blue", "square")}
)
HELD_OUT_COUNT_SHAPES: frozenset[tuple[int, str]] = frozenset(
    {(2, "circle"), (3, "square"), (4, "triangle")}
)
HELD_OUT_SINGLE_SHAPE = "triangle"

# Geometry at IMAGE_SIZE; scaled linearly for other sizes. Ranges are inclusive bbox widths
# chosen so the three shapes have similar areas and four of the largest still fit with gaps.
_WIDTH_RANGE: dict[str, tuple[int, int]] = {"circle": (7, 10), "square": (6, 9), "triangle": (8, 11)}
MIN_GAP = 2  # empty pixels between any two objects' bounding boxes
BORDER = 1  # empty pixels between objects and the image edge
POSITION_THRESHOLD = 0.1  # GenEval's offset shrink, as a fraction of the summed object sizes
_RELATION_AXES: dict[str, tuple[float, float]] = {  # unit (dx, dy), y pointing down
    "left of": (-1.0, 0.0),
    "right of": (1.0, 0.0),
    "above": (0.0, -1.0),
    "below": (0.0, 1.0),
}
_RENDER_MAX_ANGLE_COS = float(np.cos(np.deg2rad(25.0)))


@dataclass(frozen=True, eq=False)
class World:
    """One toy world's vocabulary, geometry and held-out split (see the module docstring).

    `sizes` maps a size word to its inclusive bbox-width range; `sized_categories` may name a size;
    `free_sizes` (by the scene's object count) are the sizes an object with no size word is drawn
    at, so that every drawn object has a definite size class (ground truth is never borderline);
    without sizes, `width_ranges` per shape is used (v1)."""

    name: str
    shapes: tuple[str, ...]
    colors: dict[str, tuple[int, int, int]]
    count_words: dict[int, str]
    plurals: dict[str, str]
    held_out_color_shapes: frozenset
    held_out_count_shapes: frozenset
    held_out_single_shapes: frozenset = frozenset()
    width_ranges: dict[str, tuple[int, int]] = field(default_factory=dict)
    aspects: dict[str, float] = field(default_factory=dict)  # bbox height / width (default 1)
    sizes: dict[str, tuple[int, int]] = field(default_factory=dict)
    sized_categories: tuple[str, ...] = ()
    free_sizes: dict[int, tuple[str, ...]] = field(default_factory=dict)
    colored_counting: bool = False
    min_gap: int = MIN_GAP  # empty pixels between objects' boxes, at IMAGE_SIZE

    @property
    def max_objects(self) -> int:
        return max(self.count_words)

    def vocabulary(self) -> list[str]:
        """Every word any caption can contain, sorted (the word-level tokenizer's vocabulary)."""
        words = {"a", "and", *self.shapes, *self.plurals.values(), *self.colors, *self.count_words.values(),
                 *self.sizes}
        if any(word[0] in "aeiou" for word in (*self.shapes, *self.colors, *self.sizes)):
            words.add("an")
        for relation in RELATIONS:
            words.update(relation.split())
        return sorted(words)

    def size_of_width(self, width: float) -> str | None:
        """The size class of a bbox width: the size whose range is nearest (None in a world without sizes)."""
        if not self.sizes:
            return None
        return min(self.sizes, key=lambda z: max(self.sizes[z][0] - width, width - self.sizes[z][1], 0.0))

    def box_size(self, shape: str, width: int) -> tuple[int, int]:
        """(height, width) of a shape's bounding box."""
        if not self.aspects:
            return _box_size(shape, width)
        return max(3, int(round(width * self.aspects.get(shape, 1.0)))), width


def get_world(name: "str | World") -> World:
    """The registered world called `name` ("v1", "v2"); a World passes through."""
    if isinstance(name, World):
        return name
    if name not in WORLDS:
        raise ValueError(f"world={name!r} is not one of {tuple(WORLDS)}")
    return WORLDS[name]


@dataclass(frozen=True)
class ObjectGroup:
    """`count` objects of `shape`, of `color` and `size` if named (None: free). Checked against every
    registered world's words here; against its own world's by the PromptSpec that holds it."""

    shape: str
    color: str | None
    count: int = 1
    size: str | None = None

    def __post_init__(self) -> None:
        worlds = WORLDS.values()
        shapes = tuple(dict.fromkeys(s for w in worlds for s in w.shapes))
        if self.shape not in shapes:
            raise ValueError(f"ObjectGroup.shape={self.shape!r} is not one of {shapes}")
        colors = tuple(dict.fromkeys(c for w in worlds for c in w.colors))
        if self.color is not None and self.color not in colors:
            raise ValueError(f"ObjectGroup.color={self.color!r} is not one of {colors}")
        most = max(w.max_objects for w in worlds)
        if not 1 <= self.count <= most:
            raise ValueError(f"ObjectGroup.count={self.count} is not in 1..{most}")
        sizes = tuple(dict.fromkeys(z for w in worlds for z in w.sizes))
        if self.size is not None and self.size not in sizes:
            raise ValueError(f"ObjectGroup.size={self.size!r} is not one of {sizes}")

    def __repr__(self) -> str:  # v1's repr, unchanged, for groups without a size
        size = f", size={self.size!r}" if self.size is not None else ""
        return f"ObjectGroup(shape={self.shape!r}, color={self.color!r}, count={self.count!r}{size})"

    @property
    def phrase(self) -> str:
        adjectives = [w for w in (self.size, self.color) if w]
        if self.count == 1:
            first = (adjectives or [self.shape])[0]
            words = ["an" if first[0] in "aeiou" else "a", *adjectives, self.shape]  # v1 has no vowel words
        else:
            words = [_ALL_COUNT_WORDS[self.count], *adjectives, _ALL_PLURALS[self.shape]]
        return " ".join(words)


@dataclass(frozen=True)
class PromptSpec:
    category: str
    groups: tuple[ObjectGroup, ...]
    relation: str | None = None
    world: str = "v1"  # the name of the World whose grammar the spec follows

    def __post_init__(self) -> None:
        _validate_spec(self)

    def __repr__(self) -> str:  # v1's repr, unchanged, for v1 specs
        world = f", world={self.world!r}" if self.world != "v1" else ""
        return f"PromptSpec(category={self.category!r}, groups={self.groups!r}, relation={self.relation!r}{world})"

    @property
    def caption(self) -> str:
        if len(self.groups) == 1:
            return self.groups[0].phrase
        joiner = self.relation if self.category == "position" else "and"
        return f"{self.groups[0].phrase} {joiner} {self.groups[1].phrase}"

    @property
    def num_objects(self) -> int:
        return sum(group.count for group in self.groups)


def _validate_spec(spec: PromptSpec) -> None:
    """Enforce the category's shape of spec, so every PromptSpec has a caption in the grammar."""
    cat, groups = spec.category, spec.groups
    if cat not in CATEGORIES:
        raise ValueError(f"PromptSpec.category={cat!r} is not one of {CATEGORIES}")
    if not isinstance(groups, tuple) or not all(isinstance(g, ObjectGroup) for g in groups):
        raise ValueError(f"PromptSpec.groups must be a tuple of ObjectGroup, got {groups!r}")
    if not isinstance(spec.world, str) or spec.world not in WORLDS:
        raise ValueError(f"PromptSpec.world={spec.world!r} is not one of {tuple(WORLDS)}")
    w = WORLDS[spec.world]
    for g in groups:
        if g.shape not in w.shapes:
            raise ValueError(f"PromptSpec.groups: shape {g.shape!r} is not one of world {w.name}'s {w.shapes}")
        if g.color is not None and g.color not in w.colors:
            raise ValueError(f"PromptSpec.groups: color {g.color!r} is not one of world {w.name}'s {tuple(w.colors)}")
        if g.count > 1 and g.count not in w.count_words:
            raise ValueError(f"PromptSpec.groups: count {g.count} is not one of world {w.name}'s {tuple(w.count_words)}")
        if g.size is not None and (g.size not in w.sizes or cat not in w.sized_categories or g.count != 1):
            raise ValueError(f"PromptSpec.groups: size {g.size!r} is not allowed in world {w.name}'s category "
                             f"{cat!r} (sizes {tuple(w.sizes)} on single objects of {w.sized_categories})")
    want_groups = 1 if cat in ("single_object", "colors", "counting") else 2
    if len(groups) != want_groups:
        raise ValueError(f"PromptSpec.groups: category {cat!r} needs {want_groups} group(s), got {len(groups)}")
    if (spec.relation is not None) != (cat == "position"):
        raise ValueError(f"PromptSpec.relation={spec.relation!r}: only category 'position' has a relation")
    if spec.relation is not None and spec.relation not in RELATIONS:
        raise ValueError(f"PromptSpec.relation={spec.relation!r} is not one of {RELATIONS}")
    colored = [g.color is not None for g in groups]
    if cat == "counting":
        if groups[0].count < 2 or (groups[0].color is not None and not w.colored_counting):
            raise ValueError(f"PromptSpec.groups: 'counting' needs one uncolored group of 2-4, got {groups[0]}")
        return
    if any(g.count != 1 for g in groups):
        raise ValueError(f"PromptSpec.groups: category {cat!r} has single objects only, got {groups}")
    if cat in ("single_object", "two_objects") and any(colored):
        raise ValueError(f"PromptSpec.groups: category {cat!r} leaves colors free, got {groups}")
    if cat in ("colors", "position", "color_attr") and not all(colored):
        raise ValueError(f"PromptSpec.groups: category {cat!r} needs colored groups, got {groups}")
    if cat in ("two_objects", "color_attr") and groups[0].shape == groups[1].shape:
        raise ValueError(f"PromptSpec.groups: category {cat!r} needs two different shapes, got {groups}")
    if cat == "color_attr" and groups[0].color == groups[1].color:
        raise ValueError(f"PromptSpec.groups: 'color_attr' needs two different colors, got {groups}")
    if cat == "position" and groups[0] == groups[1]:
        raise ValueError(f"PromptSpec.groups: 'position' needs two distinguishable objects, got {groups}")


# ---------------------------------------------------------------------------------------------
# Parsing


_RELATION_FIRST_WORDS = {rel.split()[0]: rel for rel in RELATIONS}


def parse_caption(caption: str, world: "str | World" = "v1") -> PromptSpec:
    """Inverse of PromptSpec.caption in `world`. Raises ValueError naming the first word that does not fit."""
    w = get_world(world)
    if not isinstance(caption, str):
        raise ValueError(f"parse_caption: caption must be a str, got {type(caption).__name__}")
    words = caption.strip().lower().split()
    if not words:
        raise ValueError("parse_caption: empty caption")
    first, pos = _parse_group(words, 0, caption, w)
    if pos == len(words):
        if first.count > 1:
            category = "counting"
        else:
            category = "colors" if first.color else "single_object"
        return _spec_or_error(category, (first,), None, caption, w)
    word = words[pos]
    if word == "and":
        second, end = _parse_group(words, pos + 1, caption, w)
        relation = None
        category = "color_attr" if first.color or second.color else "two_objects"
    elif word in _RELATION_FIRST_WORDS:
        relation = _RELATION_FIRST_WORDS[word]
        rel_words = relation.split()
        if words[pos : pos + len(rel_words)] != rel_words:
            bad = words[pos + 1] if pos + 1 < len(words) else "<end>"
            raise ValueError(f"parse_caption: expected {relation!r} in {caption!r}, got word {bad!r}")
        second, end = _parse_group(words, pos + len(rel_words), caption, w)
        category = "position"
    else:
        raise ValueError(f"parse_caption: unexpected word {word!r} in {caption!r} (expected 'and' or a relation)")
    if end != len(words):
        raise ValueError(f"parse_caption: unexpected word {words[end]!r} after the end of {caption!r}")
    return _spec_or_error(category, (first, second), relation, caption, w)


def _parse_group(words: list[str], pos: int, caption: str, w: World) -> tuple[ObjectGroup, int]:
    if pos >= len(words):
        raise ValueError(f"parse_caption: {caption!r} ends where an object was expected")
    head = words[pos]
    numbers = {word: n for n, word in w.count_words.items()}
    if head in ("a", "an"):
        nxt = words[pos + 1] if pos + 1 < len(words) else ""
        if (head == "an") != (nxt[:1] in tuple("aeiou")) or (head == "an" and "an" not in w.vocabulary()):
            raise ValueError(f"parse_caption: {head!r} cannot come before {nxt!r} in {caption!r}")
        count = 1
    elif head in numbers:
        count = numbers[head]
    else:
        raise ValueError(f"parse_caption: unknown word {head!r} in {caption!r} (expected 'a' or a number word)")
    pos += 1
    size = None
    if pos < len(words) and words[pos] in w.sizes:
        size = words[pos]
        pos += 1
    color = None
    if pos < len(words) and words[pos] in w.colors:
        color = words[pos]
        pos += 1
    if pos >= len(words):
        raise ValueError(f"parse_caption: {caption!r} ends where a shape was expected")
    noun = words[pos]
    shape = noun if count == 1 else {plural: s for s, plural in w.plurals.items()}.get(noun)
    if shape not in w.shapes:
        form = "singular shape" if count == 1 else "plural shape"
        raise ValueError(f"parse_caption: unknown word {noun!r} in {caption!r} (expected a {form})")
    return ObjectGroup(shape, color, count, size), pos + 1


def _spec_or_error(category: str, groups: tuple, relation: str | None, caption: str, w: World) -> PromptSpec:
    try:
        return PromptSpec(category, groups, relation, w.name)
    except ValueError as err:
        raise ValueError(f"parse_caption: {caption!r} is outside the grammar: {err}") from None


def vocabulary(world: "str | World" = "v1") -> list[str]:
    """Every word any caption can contain, sorted (the word-level tokenizer's vocabulary)."""
    return get_world(world).vocabulary()


# ---------------------------------------------------------------------------------------------
# Prompt lists and the held-out split


def _all_specs(w: World) -> list[PromptSpec]:
    specs: list[PromptSpec] = []
    name = w.name

    def sizes_of(category: str) -> tuple[str | None, ...]:
        return (None, *w.sizes) if category in w.sized_categories else (None,)

    colored = [ObjectGroup(s, c) for c in w.colors for s in w.shapes]
    specs += [PromptSpec("single_object", (ObjectGroup(s, None, 1, z),), None, name)
              for z in sizes_of("single_object") for s in w.shapes]
    specs += [PromptSpec("colors", (ObjectGroup(s, c, 1, z),), None, name)
              for z in sizes_of("colors") for c in w.colors for s in w.shapes]
    counting_colors = (None, *w.colors) if w.colored_counting else (None,)
    specs += [PromptSpec("counting", (ObjectGroup(s, c, n),), None, name)
              for c in counting_colors for n in w.count_words for s in w.shapes]
    specs += [
        PromptSpec("two_objects", (ObjectGroup(a, None), ObjectGroup(b, None)), None, name)
        for a, b in itertools.permutations(w.shapes, 2)
    ]
    specs += [
        PromptSpec("position", (a, b), rel, name) for a, b in itertools.permutations(colored, 2) for rel in RELATIONS
    ]
    specs += [
        PromptSpec("color_attr", (a, b), None, name)
        for a, b in itertools.permutations(colored, 2)
        if a.shape != b.shape and a.color != b.color
    ]
    return specs


def is_held_out(spec: PromptSpec) -> bool:
    """True if the spec's caption binds attributes the training captions never bind (in its world)."""
    w = WORLDS[spec.world]
    group = spec.groups[0]
    if spec.category == "single_object":
        return group.shape in w.held_out_single_shapes or group.size is not None
    if spec.category == "counting":
        return (group.count, group.shape) in w.held_out_count_shapes or (group.color, group.shape) in w.held_out_color_shapes
    if spec.category == "two_objects":
        # each unordered pair is trained in one order: the second shape follows the first by 1 .. n/2
        # places cyclically through the world's shapes (ties at n/2 broken by the first's index)
        n = len(w.shapes)
        i, j = w.shapes.index(spec.groups[0].shape), w.shapes.index(spec.groups[1].shape)
        step = (j - i) % n
        return not (2 * step < n or (2 * step == n and 2 * i < n))
    return any((g.color, g.shape) in w.held_out_color_shapes for g in spec.groups)


@functools.lru_cache(maxsize=None)
def _split(split: str, world: str = "v1") -> tuple[PromptSpec, ...]:
    if split not in ("train", "eval"):
        raise ValueError(f"split={split!r} must be 'train' or 'eval'")
    want_held_out = split == "eval"
    return tuple(s for s in _all_specs(get_world(world)) if is_held_out(s) == want_held_out)


@functools.lru_cache(maxsize=None)
def _split_by_category(split: str, world: str = "v1") -> tuple[tuple[str, tuple[PromptSpec, ...]], ...]:
    specs = _split(split, world)
    return tuple((c, tuple(s for s in specs if s.category == c)) for c in CATEGORIES)


def train_prompts(world: "str | World" = "v1") -> list[PromptSpec]:
    """Every training spec, in a fixed order; pretraining draws captions only from these."""
    return list(_split("train", get_world(world).name))


def eval_prompts(world: "str | World" = "v1") -> list[PromptSpec]:
    """Every held-out spec, in a fixed order (disjoint from train_prompts())."""
    return list(_split("eval", get_world(world).name))


def sample_spec(rng: np.random.Generator, split: str = "train", world: "str | World" = "v1") -> PromptSpec:
    """A category uniformly at random, then a spec of that category uniformly (categories are
    balanced, although position/color_attr have far more distinct captions)."""
    by_category = _split_by_category(split, get_world(world).name)
    _, specs = by_category[int(rng.integers(len(by_category)))]
    return specs[int(rng.integers(len(specs)))]


# ---------------------------------------------------------------------------------------------
# Rendering


@functools.lru_cache(maxsize=None)
def shape_mask(shape: str, height: int, width: int) -> np.ndarray:
    """The shape filling a height x width box, sampled at pixel centres (bool, read-only).

    Also the verifier's template: a rendered object's mask equals its template exactly."""
    ys = (np.arange(height) + 0.5)[:, None] / height  # in (0, 1)
    xs = (np.arange(width) + 0.5)[None, :] / width
    if shape == "square":
        mask = np.ones((height, width), dtype=bool)
    elif shape == "circle":
        mask = (xs - 0.5) ** 2 + (ys - 0.5) ** 2 <= 0.25
    elif shape == "triangle":  # upright, apex at the top centre, base on the bottom row
        mask = np.abs(xs - 0.5) <= 0.5 * ys
    elif shape == "diamond":
        mask = np.abs(xs - 0.5) + np.abs(ys - 0.5) <= 0.5
    elif shape == "cross":  # a plus sign: two bars of a third of the box
        mask = (np.abs(xs - 0.5) <= 1 / 6) | (np.abs(ys - 0.5) <= 1 / 6)
    elif shape == "ring":  # a disc with a hole of 40% of its radius
        radius2 = (xs - 0.5) ** 2 + (ys - 0.5) ** 2
        mask = (radius2 <= 0.25) & (radius2 >= 0.04)
    elif shape == "heart":  # two lobes on top of a downward point
        lobes = ((np.abs(xs - 0.5) - 0.25) ** 2 + (ys - 0.28) ** 2) <= 0.27**2
        point = (ys >= 0.28) & (np.abs(xs - 0.5) <= 0.5 * (1.0 - ys) / 0.72)
        mask = lobes | point
    elif shape == "bar":  # a filled rectangle; the World makes its box wide
        mask = np.ones((height, width), dtype=bool)
    else:
        raise ValueError(f"shape={shape!r} is not one of {SHAPES}")
    mask = np.broadcast_to(mask, (height, width)).copy()
    mask.flags.writeable = False
    return mask


def _box_size(shape: str, width: int) -> tuple[int, int]:
    """(height, width) of a shape's bounding box: triangles are a bit flatter than wide."""
    if shape == "triangle":
        return max(3, int(round(width * 0.85))), width
    return width, width


@dataclass(frozen=True)
class PlacedObject:
    """One drawn object: bbox rows [top, bottom) and columns [left, right)."""

    shape: str
    color: str
    top: int
    left: int
    bottom: int
    right: int
    size: str | None = None  # the drawn size class in a world with sizes

    @property
    def centroid(self) -> tuple[float, float]:
        """(x, y) of the drawn pixels' mean, the same quantity the verifier measures."""
        ys, xs = np.nonzero(shape_mask(self.shape, self.bottom - self.top, self.right - self.left))
        return self.left + float(xs.mean()) + 0.5, self.top + float(ys.mean()) + 0.5

    @property
    def box_size(self) -> tuple[int, int]:
        return self.bottom - self.top, self.right - self.left


def relation_holds(a_center, a_size, b_center, b_size, relation: str, min_component: float = 0.5) -> bool:
    """GenEval's position rule: a is `relation` b if the centre offset a-b, shrunk per axis by
    POSITION_THRESHOLD x (sum of the two sizes on that axis), has a unit-direction component of more
    than `min_component` along the relation's axis. Sizes are (height, width)."""
    if relation not in _RELATION_AXES:
        raise ValueError(f"relation={relation!r} is not one of {RELATIONS}")
    offset = np.array([a_center[0] - b_center[0], a_center[1] - b_center[1]], dtype=np.float64)
    norm = float(np.linalg.norm(offset))
    if norm == 0.0:
        return False
    slack = POSITION_THRESHOLD * np.array([a_size[1] + b_size[1], a_size[0] + b_size[0]], dtype=np.float64)
    revised = np.maximum(np.abs(offset) - slack, 0.0) * np.sign(offset)
    axis = np.array(_RELATION_AXES[relation])
    return float(revised @ axis) / norm > min_component


class LayoutError(RuntimeError):
    pass


def _place(
    rng: np.random.Generator,
    boxes: list[tuple[int, int]],
    size: int,
    gap: int,
    relation: str | None,
    attempts: int = 200,
) -> list[tuple[int, int]]:
    """Top-left corners for boxes (h, w) with >= gap empty pixels between boxes and BORDER from the
    edge; with a relation, box 0 is placed `relation` box 1 within 25 degrees of its axis."""
    border = max(1, round(BORDER * size / IMAGE_SIZE))
    for _ in range(attempts):
        corners: list[tuple[int, int]] = []
        for i, (h, w) in enumerate(boxes):
            hi_y, hi_x = size - border - h, size - border - w
            if hi_y < border or hi_x < border:
                raise LayoutError(f"an object of {h}x{w} px does not fit a {size}px image")
            cand_y = rng.integers(border, hi_y + 1, size=64)
            cand_x = rng.integers(border, hi_x + 1, size=64)
            ok = np.ones(64, dtype=bool)
            for (py, px), (ph, pw) in zip(corners, boxes):
                apart_y = (cand_y >= py + ph + gap) | (cand_y + h + gap <= py)
                apart_x = (cand_x >= px + pw + gap) | (cand_x + w + gap <= px)
                ok &= apart_y | apart_x
            if relation is not None and i == 1:
                # box 0 must be `relation` of box 1: offset from this candidate to box 0's centre
                (ay, ax), (ah, aw) = corners[0], boxes[0]
                dx = (ax + aw / 2) - (cand_x + w / 2)
                dy = (ay + ah / 2) - (cand_y + h / 2)
                norm = np.maximum(np.hypot(dx, dy), 1e-9)
                ux, uy = _RELATION_AXES[relation]
                ok &= (dx * ux + dy * uy) / norm >= _RENDER_MAX_ANGLE_COS
            hits = np.flatnonzero(ok)
            if hits.size == 0:
                break
            corners.append((int(cand_y[hits[0]]), int(cand_x[hits[0]])))
        else:
            return corners
    raise LayoutError(f"no layout found for {len(boxes)} objects in {size}px after {attempts} attempts")


def render_scene(
    spec: PromptSpec, rng: np.random.Generator, size: int = IMAGE_SIZE
) -> tuple[np.ndarray, list[PlacedObject]]:
    """render() plus the drawn objects (ground truth for testing the verifier)."""
    if not isinstance(spec, PromptSpec):
        raise ValueError(f"spec must be a PromptSpec, got {type(spec).__name__}")
    w = WORLDS[spec.world]
    scale = size / IMAGE_SIZE
    color_names = list(w.colors)
    items: list[tuple[str, str, str | None]] = []
    for group in spec.groups:
        for _ in range(group.count):
            color = group.color or color_names[int(rng.integers(len(color_names)))]
            items.append((group.shape, color, group.size))
    boxes, classes = [], []
    for shape, _, size_word in items:
        if w.sizes:  # a free size is drawn first, so every object has a definite size class
            if size_word is None:
                free = w.free_sizes[len(items)]
                size_word = free[int(rng.integers(len(free)))]
            lo, hi = w.sizes[size_word]
        else:
            lo, hi = w.width_ranges[shape]
        width = max(3, int(round(int(rng.integers(lo, hi + 1)) * scale)))
        boxes.append(w.box_size(shape, width))
        classes.append(size_word)
    gap = max(1, round(w.min_gap * scale))
    corners = _place(rng, boxes, size, gap, spec.relation)
    image = np.empty((size, size, 3), dtype=np.uint8)
    image[:] = BACKGROUND
    placed = []
    for (shape, color, _), size_word, (h, bw), (top, left) in zip(items, classes, boxes, corners):
        image[top : top + h, left : left + bw][shape_mask(shape, h, bw)] = w.colors[color]
        placed.append(PlacedObject(shape, color, top, left, top + h, left + bw, size_word))
    return image, placed


def render(spec: PromptSpec, rng: np.random.Generator, size: int = IMAGE_SIZE) -> np.ndarray:
    """A random (size, size, 3) uint8 image that satisfies spec exactly."""
    return render_scene(spec, rng, size)[0]


def sample_batch(
    rng: np.random.Generator, batch_size: int, split: str = "train", size: int = IMAGE_SIZE,
    world: "str | World" = "v1",
) -> tuple[np.ndarray, list[str]]:
    """(B, size, size, 3) uint8 images and their captions, specs drawn with sample_spec."""
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} must be >= 1")
    images = np.empty((batch_size, size, size, 3), dtype=np.uint8)
    captions = []
    for i in range(batch_size):
        spec = sample_spec(rng, split, world)
        images[i] = render(spec, rng, size)
        captions.append(spec.caption)
    return images, captions


def one_attribute_variants(spec: PromptSpec) -> list[PromptSpec]:
    """Every in-grammar spec of the same category that differs from spec in one attribute: one
    group's shape, color or count, the relation, or (for position) the two groups swapped. Hard
    negatives for contrastive models and for measuring a verifier's false accepts."""
    variants: list[PromptSpec] = []
    w = WORLDS[spec.world]

    def add(groups: tuple[ObjectGroup, ...], relation: str | None) -> None:
        try:
            candidate = PromptSpec(spec.category, groups, relation, spec.world)
        except ValueError:  # the change left the grammar (e.g. two groups became equal)
            return
        if candidate != spec and candidate not in variants:
            variants.append(candidate)

    for i, group in enumerate(spec.groups):
        options = [ObjectGroup(s, group.color, group.count, group.size) for s in w.shapes]
        if group.color is not None:
            options += [ObjectGroup(group.shape, c, group.count, group.size) for c in w.colors]
        if spec.category == "counting":
            options += [ObjectGroup(group.shape, group.color, n) for n in w.count_words]
        if group.size is not None:
            options += [ObjectGroup(group.shape, group.color, group.count, z) for z in w.sizes]
        for option in options:
            add(spec.groups[:i] + (option,) + spec.groups[i + 1 :], spec.relation)
    if spec.relation is not None:
        for relation in RELATIONS:
            add(spec.groups, relation)
        add(spec.groups[::-1], spec.relation)
    return variants


# Color names a careless captioner mixes up (as web alt-text does): each maps to its partner.
CONFUSABLE_COLORS = {"red": "orange", "orange": "red", "blue": "purple", "purple": "blue",
                     "green": "cyan", "cyan": "green", "yellow": "white", "white": "yellow"}


def confuse_colors(caption: str, rng: np.random.Generator, probability: float, world: "str | World" = "v1") -> str:
    """`caption` with each color word swapped for its confusable partner (CONFUSABLE_COLORS) with `probability`,
    the image left as it was: a systematic caption flaw for pretraining a base that preference data can correct.

    A swap whose partner is not in `world` is not made; a caption whose swaps would make it a held-out caption or
    leave the grammar is kept whole, so the held-out captions stay unseen in training."""
    w = get_world(world)
    words = caption.split(" ")
    swapped = [CONFUSABLE_COLORS[word] if (word in w.colors and CONFUSABLE_COLORS.get(word) in w.colors
                                           and rng.random() < probability) else word for word in words]
    if swapped == words:
        return caption
    for i in range(len(swapped) - 1):  # "an orange" -> "a red"
        if swapped[i] in ("a", "an"):
            swapped[i] = "an" if swapped[i + 1][:1] in tuple("aeiou") else "a"
    noisy = " ".join(swapped)
    try:
        spec = parse_caption(noisy, w)
    except ValueError:  # the swap left the grammar (two groups became equal)
        return caption
    return caption if is_held_out(spec) else noisy


def degrade(
    images: np.ndarray,
    rng: np.random.Generator,
    blur_sigma: float = 0.8,
    color_shift: float = 20.0,
    noise: float = 8.0,
) -> np.ndarray:
    """Imperfect copies of uint8 images (..., H, W, 3), like a small decoder's outputs: a Gaussian
    blur of `blur_sigma` px, one uniform color offset in [-color_shift, color_shift] per channel
    per image, and Gaussian pixel noise of std `noise` (all in 0-255 units)."""
    images = np.asarray(images)
    if images.dtype != np.uint8 or images.ndim < 3 or images.shape[-1] != 3:
        raise ValueError(f"images must be uint8 (..., H, W, 3), got {images.dtype} {images.shape}")
    out = images.astype(np.float32)
    if blur_sigma > 0:
        radius = int(np.ceil(2.5 * blur_sigma))
        taps = np.exp(-0.5 * (np.arange(-radius, radius + 1) / blur_sigma) ** 2)
        taps /= taps.sum()
        for axis in (-3, -2):  # separable: rows, then columns, edges replicated
            pad = [(0, 0)] * out.ndim
            pad[axis] = (radius, radius)
            padded = np.pad(out, pad, mode="edge")
            length = out.shape[axis]
            out = sum(tap * np.take(padded, np.arange(i, i + length), axis=axis) for i, tap in enumerate(taps))
    batch_shape = images.shape[:-3]
    out = out + rng.uniform(-color_shift, color_shift, size=batch_shape + (1, 1, 3))
    out = out + rng.normal(0.0, noise, size=out.shape)
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


# ---------------------------------------------------------------------------------------------
# The registered worlds

V1 = World(
    name="v1",
    shapes=SHAPES,
    colors=COLORS,
    count_words=COUNT_WORDS,
    plurals=PLURALS,
    held_out_color_shapes=HELD_OUT_COLOR_SHAPES,
    held_out_count_shapes=HELD_OUT_COUNT_SHAPES,
    held_out_single_shapes=frozenset({HELD_OUT_SINGLE_SHAPE}),
    width_ranges=_WIDTH_RANGE,
)

_V2_SHAPES = ("circle", "square", "triangle", "diamond", "cross", "ring", "heart", "bar")
_V2_COLORS = {
    **COLORS,  # v1's four, unchanged
    "orange": (240, 130, 30),
    "purple": (160, 60, 220),
    "cyan": (40, 210, 210),
    "white": (235, 235, 235),
}
V2 = World(
    name="v2",
    shapes=_V2_SHAPES,
    colors=_V2_COLORS,
    count_words={2: "two", 3: "three", 4: "four", 5: "five"},
    plurals={s: ("crosses" if s == "cross" else s + "s") for s in _V2_SHAPES},
    # one pair per shape and per color (a Latin transversal), so every word keeps training partners
    held_out_color_shapes=frozenset(zip(("purple", "white", "red", "cyan", "yellow", "blue", "orange", "green"),
                                        _V2_SHAPES)),
    # one count per shape, each count twice
    held_out_count_shapes=frozenset(zip((2, 3, 4, 5, 3, 2, 5, 4), _V2_SHAPES)),
    aspects={"triangle": 0.85, "heart": 0.9, "bar": 0.5},
    # bbox widths at 32 px; a measured width between two ranges goes to the nearer one
    sizes={"small": (7, 8), "medium": (10, 11), "large": (13, 14)},
    sized_categories=("single_object", "colors"),
    free_sizes={1: ("small", "medium", "large"), 2: ("small", "medium"), 3: ("small", "medium"),
                4: ("small",), 5: ("small",)},
    colored_counting=True,
    min_gap=3,  # brighter colors and five objects: 2 px let a blurred decoder join neighbours
)

WORLDS: dict[str, World] = {"v1": V1, "v2": V2}
_ALL_COUNT_WORDS = {n: word for w in WORLDS.values() for n, word in w.count_words.items()}
_ALL_PLURALS = {s: plural for w in WORLDS.values() for s, plural in w.plurals.items()}
