"""A procedurally drawn person-description dataset in the CUHK-PEDES layout.

:func:`generate_synthetic_pedes` draws small pedestrian images with PIL and writes ``<root>/CUHK-PEDES/reid_raw.json``
plus ``<root>/CUHK-PEDES/imgs/synth/*.png``, so that :func:`~attnselect.data.pedes.read_cuhk_pedes` loads it like the
real benchmark. It exists to train and test the whole pipeline on a CPU in minutes without downloading anything.

An identity is a fixed set of attributes (hair colour and length, hat, upper-body garment colour, pattern and
sleeves, lower-body garment type and colour, shoe colour, bag type and colour, plus an undescribed skin tone). The
images of an identity differ in pose (position, scale, leg stance, arm swing), lighting, background and noise.
Each caption describes every attribute with varied wording and order. A share of the identities are generated as
near-twins of another identity that differ only in one small detail (the bag, the shoe colour or the hat), so that
retrieval has to look at fine detail, which is what token selection is meant to preserve. Twins share a split.

Every record also carries an ``"attributes"`` dict (ignored by the reader) and the folder holds ``synthetic.json``
with the generation parameters.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np

__all__ = [
    "PersonAttributes",
    "describe_person",
    "generate_synthetic_pedes",
    "render_person",
    "sample_identities",
    "synthetic_pedes_root",
]

logger = logging.getLogger(__name__)

COLOURS: dict[str, tuple[int, int, int]] = {
    "black": (28, 28, 30),
    "white": (236, 236, 232),
    "grey": (128, 128, 128),
    "red": (200, 32, 36),
    "orange": (240, 128, 24),
    "yellow": (236, 212, 40),
    "green": (40, 150, 60),
    "blue": (36, 72, 204),
    "purple": (124, 48, 164),
    "pink": (240, 136, 184),
    "brown": (122, 74, 36),
}
HAIR_COLOURS = {
    "black": (20, 18, 18),
    "brown": (96, 58, 28),
    "blonde": (222, 190, 108),
    "grey": (150, 150, 150),
    "red": (170, 60, 30),
}
SKIN_TONES = [(241, 200, 170), (224, 172, 130), (190, 135, 95), (140, 95, 65), (100, 66, 44)]
GARMENT_COLOURS = [c for c in COLOURS]
SHOE_COLOURS = ["black", "white", "brown", "red", "blue", "grey"]
BAG_COLOURS = ["black", "brown", "red", "blue", "green", "yellow", "pink", "white"]
HAT_COLOURS = ["black", "white", "red", "blue", "yellow", "green"]
PATTERNS = ["plain", "striped", "checked", "dotted"]
LOWER_TYPES = ["trousers", "shorts", "skirt"]
BAG_TYPES = [None, "backpack", "handbag"]


@dataclass(frozen=True)
class PersonAttributes:
    """The attributes that define one synthetic identity (all but ``skin`` appear in the captions).

    Examples:
        >>> a = PersonAttributes("black", "short", None, "red", "striped", "white", "long", "trousers", "blue",
        ...                      "white", "backpack", "black", "left", 0)
        >>> a.upper_colour, a.bag
        ('red', 'backpack')
    """

    hair_colour: str
    hair_length: str  # "short" | "long"
    hat: str | None  # hat colour, or None
    upper_colour: str
    upper_pattern: str  # plain | striped | checked | dotted
    pattern_colour: str
    sleeves: str  # "long" | "short"
    lower_type: str  # trousers | shorts | skirt
    lower_colour: str
    shoe_colour: str
    bag: str | None  # None | "backpack" | "handbag"
    bag_colour: str | None
    bag_side: str  # "left" | "right" (image side; not in captions because training flips images)
    skin: int  # index into SKIN_TONES

    def key(self) -> tuple:
        """The described attributes (identities must differ in at least one of them)."""
        d = asdict(self)
        d.pop("skin")
        d.pop("bag_side")
        if d["upper_pattern"] == "plain":
            d["pattern_colour"] = None
        return tuple(sorted(d.items()))


# ----------------------------------------------------------------------------------------------------------------
# identities
# ----------------------------------------------------------------------------------------------------------------
def _choice(rng: np.random.Generator, items):
    return items[int(rng.integers(len(items)))]


def _random_attributes(rng: np.random.Generator) -> PersonAttributes:
    upper = _choice(rng, GARMENT_COLOURS)
    pattern = _choice(rng, PATTERNS)
    pattern_colour = _choice(rng, [c for c in GARMENT_COLOURS if c != upper])
    lower = _choice(rng, [c for c in GARMENT_COLOURS if c != upper])
    bag = _choice(rng, BAG_TYPES)
    return PersonAttributes(
        hair_colour=_choice(rng, list(HAIR_COLOURS)),
        hair_length=_choice(rng, ["short", "long"]),
        hat=_choice(rng, HAT_COLOURS) if rng.random() < 0.3 else None,
        upper_colour=upper,
        upper_pattern=pattern,
        pattern_colour=pattern_colour,
        sleeves=_choice(rng, ["long", "short"]),
        lower_type=_choice(rng, LOWER_TYPES),
        lower_colour=lower,
        shoe_colour=_choice(rng, SHOE_COLOURS),
        bag=bag,
        bag_colour=_choice(rng, BAG_COLOURS) if bag else None,
        bag_side=_choice(rng, ["left", "right"]),
        skin=int(rng.integers(len(SKIN_TONES))),
    )


def _twin(base: PersonAttributes, rng: np.random.Generator) -> PersonAttributes:
    """A copy of ``base`` differing only in one small detail: the bag, the shoe colour or the hat."""
    detail = _choice(rng, ["bag", "shoes", "hat"])
    if detail == "shoes":
        return replace(base, shoe_colour=_choice(rng, [c for c in SHOE_COLOURS if c != base.shoe_colour]))
    if detail == "hat":
        if base.hat is None:
            return replace(base, hat=_choice(rng, HAT_COLOURS))
        return replace(
            base, hat=None if rng.random() < 0.5 else _choice(rng, [c for c in HAT_COLOURS if c != base.hat])
        )
    if base.bag is None:
        return replace(base, bag=_choice(rng, ["backpack", "handbag"]), bag_colour=_choice(rng, BAG_COLOURS))
    r = rng.random()
    if r < 0.4:
        return replace(base, bag=None, bag_colour=None)
    if r < 0.7:
        return replace(base, bag_colour=_choice(rng, [c for c in BAG_COLOURS if c != base.bag_colour]))
    return replace(base, bag="handbag" if base.bag == "backpack" else "backpack")


def sample_identities(
    num_ids: int, rng: np.random.Generator, twin_fraction: float = 0.3
) -> list[tuple[int, PersonAttributes]]:
    """``num_ids`` identities with pairwise different described attributes, as ``(group, attributes)``.

    About ``twin_fraction`` of them are near-twins of the previous identity (same group) differing in one small
    detail only.

    Args:
        num_ids: number of identities.
        rng: numpy random generator.
        twin_fraction: probability that an identity is a near-twin of the previous one.

    Returns:
        ``[(group, PersonAttributes), ...]``, groups numbered from 0 in order.

    Examples:
        >>> import numpy as np
        >>> people = sample_identities(5, np.random.default_rng(0))
        >>> len(people), people[0][0], len({attrs.key() for _, attrs in people})  # all described differently
        (5, 0, 5)
    """
    seen: set[tuple] = set()
    out: list[tuple[int, PersonAttributes]] = []
    group = -1
    while len(out) < num_ids:
        if out and rng.random() < twin_fraction and out[-1][0] == group:
            attrs = _twin(out[-1][1], rng)
            g = group
        else:
            attrs = _random_attributes(rng)
            g = group + 1
        if attrs.key() in seen:
            continue
        seen.add(attrs.key())
        group = g
        out.append((g, attrs))
    return out


# ----------------------------------------------------------------------------------------------------------------
# drawing
# ----------------------------------------------------------------------------------------------------------------
def _shade(rgb: tuple[int, int, int], f: float) -> tuple[int, int, int]:
    return tuple(int(min(255, max(0, round(c * f)))) for c in rgb)  # type: ignore[return-value]


def _background(draw, w: int, h: int, rng: np.random.Generator) -> None:
    base = tuple(int(x) for x in rng.integers(60, 200, size=3))
    kind = _choice(rng, ["plain", "stripes", "gradient", "blocks"])
    draw.rectangle([0, 0, w, h], fill=base)
    if kind == "stripes":
        step = int(rng.integers(w // 8 + 2, w // 3 + 3))
        for x in range(0, w, step * 2):
            draw.rectangle([x, 0, x + step, h], fill=_shade(base, float(rng.uniform(0.8, 1.2))))
    elif kind == "gradient":
        other = tuple(int(x) for x in rng.integers(60, 200, size=3))
        for y in range(0, h, 4):
            a = y / max(h - 1, 1)
            draw.rectangle([0, y, w, y + 4], fill=tuple(int(b * (1 - a) + o * a) for b, o in zip(base, other)))
    elif kind == "blocks":
        for _ in range(int(rng.integers(3, 8))):
            x0, y0 = int(rng.integers(0, w)), int(rng.integers(0, h))
            bw, bh = int(rng.integers(w // 6 + 1, w // 2 + 2)), int(rng.integers(h // 10 + 1, h // 3 + 2))
            draw.rectangle([x0, y0, x0 + bw, y0 + bh], fill=_shade(base, float(rng.uniform(0.75, 1.25))))
    floor = int(h * rng.uniform(0.75, 0.9))
    draw.rectangle([0, floor, w, h], fill=_shade(base, float(rng.uniform(0.55, 0.8))))


def render_person(attrs: PersonAttributes, rng: np.random.Generator, image_size: tuple[int, int] = (128, 48)):
    """Draw one image of ``attrs`` with a random pose, background and noise; returns an RGB ``PIL.Image``.

    Args:
        attrs: the identity.
        rng: numpy random generator (all randomness of the image comes from it).
        image_size: ``(H, W)`` of the output.

    Examples:
        >>> import numpy as np
        >>> rng = np.random.default_rng(0)
        >>> image = render_person(sample_identities(1, rng)[0][1], rng, image_size=(64, 24))
        >>> image.mode, image.size  # PIL size is (W, H)
        ('RGB', (24, 64))
    """
    from PIL import Image, ImageDraw

    hgt, wid = image_size
    ss = 2  # supersampling for smooth edges
    h, w = hgt * ss, wid * ss
    img = Image.new("RGB", (w, h))
    d = ImageDraw.Draw(img)
    _background(d, w, h, rng)

    light = float(rng.uniform(0.85, 1.12))

    def col(name: str, table=COLOURS) -> tuple[int, int, int]:
        return _shade(table[name], light)

    skin = _shade(SKIN_TONES[attrs.skin], light)
    u = h * float(rng.uniform(0.8, 0.93))  # person height in pixels
    cx = w / 2 + w * float(rng.uniform(-0.08, 0.08))
    y0 = (h - u) * float(rng.uniform(0.2, 0.8))
    half_torso = min(0.10 * u, 0.22 * w)
    arm_w = 0.05 * u
    leg_w = 0.08 * u

    def Y(f: float) -> float:
        return y0 + f * u

    side = 1 if attrs.bag_side == "right" else -1
    upper = col(attrs.upper_colour)
    lower = col(attrs.lower_colour)

    # hair behind the head (long hair), backpack behind the body
    head_r = 0.065 * u
    head_c = (cx, Y(0.075))
    hair = _shade(HAIR_COLOURS[attrs.hair_colour], light)
    if attrs.hair_length == "long":
        d.rectangle([cx - head_r * 1.1, head_c[1], cx + head_r * 1.1, Y(0.21)], fill=hair)
    if attrs.bag == "backpack":
        bag = col(attrs.bag_colour)
        inner, outer = cx + side * (half_torso - 0.02 * u), cx + side * (half_torso + arm_w + 0.06 * u)
        d.rounded_rectangle([min(inner, outer), Y(0.16), max(inner, outer), Y(0.44)], radius=0.02 * u, fill=bag)

    # legs and lower garment
    stance = _choice(rng, ["together", "apart", "walk_l", "walk_r"])
    offsets = {"together": (0.0, 0.0), "apart": (-0.05, 0.05), "walk_l": (-0.08, 0.02), "walk_r": (-0.02, 0.08)}
    foot_dx = [o * u for o in offsets[stance]]
    hip_y, knee_cut, ankle_y = Y(0.52), Y(0.70), Y(0.93)
    for k, hx in enumerate((cx - 0.05 * u, cx + 0.05 * u)):
        fx = hx + foot_dx[k]
        leg = [(hx - leg_w / 2, hip_y), (hx + leg_w / 2, hip_y), (fx + leg_w / 2, ankle_y), (fx - leg_w / 2, ankle_y)]
        d.polygon(leg, fill=skin if attrs.lower_type != "trousers" else lower)
        if attrs.lower_type == "shorts":
            a = (knee_cut - hip_y) / (ankle_y - hip_y)
            kx = hx + a * (fx - hx)
            d.polygon([leg[0], leg[1], (kx + leg_w / 2 + 1, knee_cut), (kx - leg_w / 2 - 1, knee_cut)], fill=lower)
        # shoes
        d.rectangle([fx - leg_w * 0.65, Y(0.925), fx + leg_w * 0.75, Y(0.975)], fill=col(attrs.shoe_colour))
    d.rectangle([cx - half_torso * 0.95, Y(0.48), cx + half_torso * 0.95, hip_y + 1], fill=lower)
    if attrs.lower_type == "skirt":
        d.polygon(
            [
                (cx - half_torso * 0.95, Y(0.48)),
                (cx + half_torso * 0.95, Y(0.48)),
                (cx + half_torso * 1.3, Y(0.72)),
                (cx - half_torso * 1.3, Y(0.72)),
            ],
            fill=lower,
        )

    # arms (behind the torso edges), sleeves, hands
    swing = float(rng.uniform(-0.04, 0.04)) * u
    for s in (-1, 1):
        sx = cx + s * (half_torso + arm_w / 2 - 1)
        hx = sx + s * abs(swing) * 0.5 + swing * 0.5
        arm = [
            (sx - arm_w / 2, Y(0.16)),
            (sx + arm_w / 2, Y(0.16)),
            (hx + arm_w / 2, Y(0.46)),
            (hx - arm_w / 2, Y(0.46)),
        ]
        d.polygon(arm, fill=skin)
        cut = 0.46 if attrs.sleeves == "long" else 0.27
        a = (cut - 0.16) / 0.30
        mx = sx + a * (hx - sx)
        d.polygon([arm[0], arm[1], (mx + arm_w / 2, Y(cut)), (mx - arm_w / 2, Y(cut))], fill=upper)
        d.ellipse([hx - arm_w * 0.6, Y(0.455), hx + arm_w * 0.6, Y(0.5)], fill=skin)
        if attrs.bag == "handbag" and s == side:
            bag = col(attrs.bag_colour)
            bx = hx + s * 0.025 * u
            d.line([(hx, Y(0.47)), (bx, Y(0.53))], fill=bag, width=max(1, int(0.012 * u)))
            d.rectangle([bx - 0.045 * u, Y(0.53), bx + 0.045 * u, Y(0.62)], fill=bag)

    # torso and pattern
    tx0, tx1, ty0, ty1 = cx - half_torso, cx + half_torso, Y(0.15), Y(0.49)
    d.rectangle([tx0, ty0, tx1, ty1], fill=upper)
    pc = col(attrs.pattern_colour)
    step = 0.045 * u
    thick = max(1.0, 0.016 * u)
    if attrs.upper_pattern in ("striped", "checked"):
        y = ty0 + step / 2
        while y < ty1 - thick:
            d.rectangle([tx0, y, tx1, y + thick], fill=pc)
            y += step
    if attrs.upper_pattern == "checked":
        x = tx0 + step / 2
        while x < tx1 - thick:
            d.rectangle([x, ty0, x + thick, ty1], fill=pc)
            x += step
    if attrs.upper_pattern == "dotted":
        r = max(1.0, 0.014 * u)
        y, row = ty0 + step / 2, 0
        while y < ty1 - r:
            x = tx0 + step / 2 + (step / 2 if row % 2 else 0)
            while x < tx1 - r:
                d.ellipse([x - r, y - r, x + r, y + r], fill=pc)
                x += step
            y += step
            row += 1
    if attrs.bag == "backpack":  # strap across the shoulder
        bag = col(attrs.bag_colour)
        sx = cx + side * half_torso * 0.55
        d.line([(sx, ty0), (sx + side * 0.02 * u, Y(0.33))], fill=bag, width=max(1, int(0.025 * u)))

    # head, hair, hat
    d.rectangle([cx - 0.025 * u, Y(0.12), cx + 0.025 * u, ty0 + 1], fill=skin)
    d.ellipse([head_c[0] - head_r, head_c[1] - head_r, head_c[0] + head_r, head_c[1] + head_r], fill=skin)
    d.chord([head_c[0] - head_r, head_c[1] - head_r, head_c[0] + head_r, head_c[1] + head_r * 0.9], 180, 360, fill=hair)
    if attrs.hat is not None:
        hat = col(attrs.hat)
        d.rectangle(
            [
                head_c[0] - head_r * 1.45,
                head_c[1] - head_r * 0.55,
                head_c[0] + head_r * 1.45,
                head_c[1] - head_r * 0.25,
            ],
            fill=hat,
        )
        d.rectangle(
            [head_c[0] - head_r * 0.95, head_c[1] - head_r * 1.35, head_c[0] + head_r * 0.95, head_c[1] - head_r * 0.4],
            fill=hat,
        )

    img = img.resize((wid, hgt), Image.BILINEAR)
    arr = np.asarray(img, dtype=np.float32)
    arr = arr + rng.normal(0.0, float(rng.uniform(2.0, 9.0)), size=arr.shape).astype(np.float32)
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), mode="RGB")


# ----------------------------------------------------------------------------------------------------------------
# captions
# ----------------------------------------------------------------------------------------------------------------
_SUBJECTS = ["A person", "The pedestrian", "This person", "A pedestrian", "The person", "Someone"]


def _upper_phrase(a: PersonAttributes, rng: np.random.Generator) -> str:
    garment = _choice(rng, ["shirt", "top"] + (["jacket", "sweater"] if a.sleeves == "long" else ["t-shirt"]))
    sleeve = f"{a.sleeves}-sleeved "
    if a.upper_pattern == "plain":
        return _choice(rng, [f"a plain {a.upper_colour} {sleeve}{garment}", f"a {a.upper_colour} {sleeve}{garment}"])
    if a.upper_pattern == "striped":
        return _choice(
            rng,
            [
                f"a {a.upper_colour} {sleeve}{garment} with {a.pattern_colour} stripes",
                f"a {a.upper_colour} and {a.pattern_colour} striped {sleeve}{garment}",
            ],
        )
    if a.upper_pattern == "checked":
        return _choice(
            rng,
            [
                f"a {a.upper_colour} {sleeve}{garment} with a {a.pattern_colour} checked pattern",
                f"a {a.upper_colour} and {a.pattern_colour} checked {sleeve}{garment}",
            ],
        )
    return _choice(
        rng,
        [
            f"a {a.upper_colour} {sleeve}{garment} with {a.pattern_colour} dots",
            f"a {a.upper_colour} {sleeve}{garment} with a {a.pattern_colour} dotted pattern",
        ],
    )


def _lower_phrase(a: PersonAttributes, rng: np.random.Generator) -> str:
    if a.lower_type == "trousers":
        return f"{a.lower_colour} {_choice(rng, ['trousers', 'pants'])}"
    if a.lower_type == "shorts":
        return f"{a.lower_colour} shorts"
    return f"a {a.lower_colour} skirt"


def _shoe_phrase(a: PersonAttributes, rng: np.random.Generator) -> str:
    return f"{a.shoe_colour} {_choice(rng, ['shoes', 'sneakers', 'boots'])}"


def _bag_sentence(a: PersonAttributes, rng: np.random.Generator, pron: str) -> str | None:
    if a.bag is None:
        if rng.random() < 0.5:
            return _choice(rng, [f"{pron} is not carrying a bag.", f"{pron} carries no bag."])
        return None
    if a.bag == "backpack":
        return _choice(
            rng, [f"{pron} carries a {a.bag_colour} backpack.", f"{pron} has a {a.bag_colour} backpack on the back."]
        )
    return _choice(
        rng, [f"{pron} holds a small {a.bag_colour} handbag.", f"{pron} carries a {a.bag_colour} handbag in one hand."]
    )


def _hat_sentence(a: PersonAttributes, rng: np.random.Generator, pron: str) -> str | None:
    if a.hat is None:
        return f"{pron} wears no hat." if rng.random() < 0.3 else None
    return _choice(rng, [f"{pron} wears a {a.hat} hat.", f"{pron} has a {a.hat} cap on the head."])


def describe_person(a: PersonAttributes, rng: np.random.Generator) -> str:
    """One caption mentioning every described attribute, with random wording and sentence order.

    Args:
        a: the identity.
        rng: numpy random generator (wording and order).

    Returns:
        The caption.

    Examples:
        >>> import numpy as np
        >>> a = PersonAttributes("black", "short", None, "red", "plain", "white", "long", "trousers", "blue",
        ...                      "white", None, None, "left", 0)
        >>> caption = describe_person(a, np.random.default_rng(0))
        >>> "short black hair" in caption, "blue trousers" in caption
        (True, True)
    """
    subject = _choice(rng, _SUBJECTS)
    hair = f"{a.hair_length} {a.hair_colour} hair"
    upper, lower, shoes = _upper_phrase(a, rng), _lower_phrase(a, rng), _shoe_phrase(a, rng)
    form = int(rng.integers(3))
    if form == 0:
        first = f"{subject} with {hair} is wearing {upper}, {lower} and {shoes}."
        rest = []
    elif form == 1:
        first = f"{subject} has {hair} and wears {upper}."
        rest = [
            f"{_choice(rng, ['The bottom is', 'Below that are', 'On the legs are'])} {lower}.".replace(
                "are a ", "is a "
            ),
            f"The shoes are {a.shoe_colour}." if rng.random() < 0.5 else f"They have {shoes}.",
        ]
    else:
        first = f"{subject} is dressed in {upper} and {lower}."
        rest = [f"The hair is {a.hair_length} and {a.hair_colour}.", f"On the feet are {shoes}."]
    pron = _choice(rng, ["The person", "This pedestrian", "The walker"])
    for s in (_hat_sentence(a, rng, pron), _bag_sentence(a, rng, pron)):
        if s is not None:
            rest.append(s)
    order = rng.permutation(len(rest))
    return " ".join([first, *[rest[i] for i in order]])


# ----------------------------------------------------------------------------------------------------------------
# dataset writer
# ----------------------------------------------------------------------------------------------------------------
_MARKER = "synthetic.json"


def _split_counts(num_groups: int, split: tuple[float, float, float]) -> tuple[int, int, int]:
    n_val = max(1, round(num_groups * split[1]))
    n_test = max(1, round(num_groups * split[2]))
    n_train = num_groups - n_val - n_test
    if n_train < 1:
        raise ValueError(f"generate_synthetic_pedes: too few identity groups ({num_groups}) for three splits")
    return n_train, n_val, n_test


def generate_synthetic_pedes(
    root: str | os.PathLike,
    num_ids: int = 200,
    images_per_id: int = 4,
    captions_per_image: int = 2,
    image_size: tuple[int, int] = (128, 48),
    seed: int = 0,
    *,
    split: tuple[float, float, float] = (0.6, 0.2, 0.2),
    twin_fraction: float = 0.3,
) -> Path:
    """Write a synthetic dataset in the CUHK-PEDES layout and return the data root.

    Identities are numbered 1..num_ids: training ones first (so 0-based training pids are exactly 0..C-1),
    then validation, then test; near-twin groups are never split across splits. Regenerating into the same
    ``root`` replaces a previous synthetic dataset; a real ``reid_raw.json`` (without the synthetic marker) is
    never overwritten.

    Args:
        root: data root; the dataset goes to ``root/CUHK-PEDES``.
        num_ids: number of identities over all splits (>= 3).
        images_per_id: images drawn per identity.
        captions_per_image: captions per image (different wording of the same attributes).
        image_size: ``(H, W)`` of the images.
        seed: everything (identities, images, captions) is a deterministic function of the arguments.
        split: fractions of identity groups for train / val / test.
        twin_fraction: probability that an identity is a near-twin of the previous one.

    Returns:
        ``Path(root)``, ready for ``read_cuhk_pedes(root)``.

    Examples:
        >>> import tempfile
        >>> with tempfile.TemporaryDirectory() as tmp:
        ...     root = generate_synthetic_pedes(tmp, num_ids=6, images_per_id=2, image_size=(32, 16))
        ...     files = sorted(p.name for p in (root / "CUHK-PEDES").iterdir())
        >>> files
        ['imgs', 'reid_raw.json', 'synthetic.json']
    """
    if num_ids < 3:
        raise ValueError(f"generate_synthetic_pedes: num_ids must be >= 3 (one per split), got {num_ids}")
    if images_per_id < 1 or captions_per_image < 1:
        raise ValueError("generate_synthetic_pedes: images_per_id and captions_per_image must be >= 1")
    if len(image_size) != 2 or min(image_size) < 16:
        raise ValueError(f"generate_synthetic_pedes: image_size must be (H, W) with H, W >= 16, got {image_size}")
    if len(split) != 3 or min(split) < 0 or sum(split) <= 0:
        raise ValueError(f"generate_synthetic_pedes: split must be three non-negative fractions, got {split}")
    root = Path(root).expanduser()
    ddir = root / "CUHK-PEDES"
    if (ddir / "reid_raw.json").exists() and not (ddir / _MARKER).exists():
        raise FileExistsError(f"{ddir / 'reid_raw.json'} exists and is not a synthetic dataset; refusing to overwrite")
    img_dir = ddir / "imgs" / "synth"
    if img_dir.exists():
        shutil.rmtree(img_dir)
    img_dir.mkdir(parents=True)

    rng = np.random.default_rng(seed)
    ids = sample_identities(num_ids, rng, twin_fraction)
    groups = sorted({g for g, _ in ids})
    total = sum(split)
    n_train, n_val, _ = _split_counts(len(groups), tuple(s / total for s in split))  # type: ignore[arg-type]
    order = rng.permutation(len(groups))
    split_of_group = {}
    for rank, gi in enumerate(order):
        split_of_group[groups[gi]] = "train" if rank < n_train else "val" if rank < n_train + n_val else "test"
    by_split = {s: [a for g, a in ids if split_of_group[g] == s] for s in ("train", "val", "test")}

    records = []
    pid = 0
    for split_name in ("train", "val", "test"):
        for attrs in by_split[split_name]:
            pid += 1
            for k in range(images_per_id):
                rel = f"synth/{pid:05d}_{k:02d}.png"
                render_person(attrs, rng, tuple(image_size)).save(ddir / "imgs" / rel, compress_level=1)
                caps: list[str] = []
                for _ in range(captions_per_image):
                    cap = describe_person(attrs, rng)
                    for _retry in range(5):
                        if cap not in caps:
                            break
                        cap = describe_person(attrs, rng)
                    caps.append(cap)
                records.append(
                    {
                        "split": split_name,
                        "captions": caps,
                        "file_path": rel,
                        "processed_tokens": [c.lower().replace(".", " .").replace(",", " ,").split() for c in caps],
                        "id": pid,
                        "attributes": asdict(attrs),
                    }
                )
    params = {
        "num_ids": num_ids,
        "images_per_id": images_per_id,
        "captions_per_image": captions_per_image,
        "image_size": list(image_size),
        "seed": seed,
        "split": list(split),
        "twin_fraction": twin_fraction,
        "format": 1,
    }
    with open(ddir / "reid_raw.json", "w", encoding="utf-8") as fh:
        json.dump(records, fh)
    with open(ddir / _MARKER, "w", encoding="utf-8") as fh:
        json.dump(params, fh, indent=1)
    logger.info(
        "synthetic CUHK-PEDES layout at %s: %d train / %d val / %d test identities, %d images",
        ddir,
        len(by_split["train"]),
        len(by_split["val"]),
        len(by_split["test"]),
        len(records),
    )
    return root


def synthetic_pedes_root(root: str | os.PathLike | None = None, **kwargs) -> Path:
    """Return a data root holding the synthetic dataset for ``kwargs``, generating it only if needed.

    Args:
        root: data root; default ``<tmp>/attnselect_synthetic_pedes``.
        **kwargs: arguments of :func:`generate_synthetic_pedes` (``num_ids``, ``images_per_id``, ``seed``, ...).

    Returns:
        The data root, to pass to ``read_cuhk_pedes`` / ``load_pedes("CUHK-PEDES", root)``.

    Examples:
        >>> import tempfile
        >>> with tempfile.TemporaryDirectory() as tmp:
        ...     first = synthetic_pedes_root(tmp, num_ids=6, images_per_id=2, image_size=(32, 16))
        ...     again = synthetic_pedes_root(tmp, num_ids=6, images_per_id=2, image_size=(32, 16))  # reused as is
        ...     (first == again, (first / "CUHK-PEDES" / "reid_raw.json").is_file())
        (True, True)
    """
    root = Path(root).expanduser() if root is not None else Path(tempfile.gettempdir()) / "attnselect_synthetic_pedes"
    marker = root / "CUHK-PEDES" / _MARKER
    if marker.is_file():
        import inspect

        sig = inspect.signature(generate_synthetic_pedes)
        wanted = {name: kwargs.get(name, p.default) for name, p in sig.parameters.items() if name != "root"}
        wanted["image_size"] = list(wanted["image_size"])
        wanted["split"] = list(wanted["split"])
        with open(marker, encoding="utf-8") as fh:
            have = json.load(fh)
        have.pop("format", None)
        if have == wanted and (root / "CUHK-PEDES" / "reid_raw.json").is_file():
            return root
    return generate_synthetic_pedes(root, **kwargs)
