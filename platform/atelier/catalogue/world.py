"""The shop world: an endless, captioned stream of the synthetic shop's products with the ground
truth of every image (class, style, metal, backdrop). The shop base model and the shop CLIP are
pretrained on it (`atelier models pretrain`).

One style per class is held out of the world, so that fine-tuning on that style's catalogue photos
teaches the base something it has never seen, as DreamBooth teaches SD a product it never saw.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import numpy as np
from PIL import Image

from atelier.catalogue import synth
from atelier.catalogue.schema import CLASSES, instance_prompt

# The study's [BH] beaded hoops among them. Studs are grouped into one concept by the catalogue
# build (one or two photos per style), so holding one of their styles out teaches little; they
# keep all theirs.
HELD_OUT: dict[str, str] = {"hoops": "beaded", "necklaces": "charm", "rings": "signet"}
BACKDROPS = ("light", "dark")
# Drawn at twice the side and reduced, so edges are anti-aliased as a camera's would be.
OVERSAMPLE = 2


@dataclass(frozen=True)
class WorldItem:
    """One world image's ground truth; `image` draws it."""

    index: int
    class_name: str
    style: str
    metal: str
    backdrop: str
    seed: int

    def caption(self, rng: random.Random | None = None, keep: float = 1.0) -> str:
        """'photo of a pair of beaded hoops, 14k gold, on a dark background'. With `rng`, the
        style, metal and backdrop are each kept with probability `keep`, so that class prompts
        ("photo of a pair of hoops") and partial ones are in the world's language too."""
        def kept() -> bool:
            return rng is None or rng.random() < keep

        style = self.style if kept() else None
        words = [instance_prompt(self.class_name, "", style, CLASSES[self.class_name])]
        if kept():
            words.append(self.metal.lower())
        if kept():
            words.append(f"on a {self.backdrop} background")
        return ", ".join(words)

    def image(self, side: int = 64) -> Image.Image:
        rng = random.Random(f"{self.seed}:world-photo:{self.index}")
        big = synth.draw(self.class_name, self.style, synth.METALS[self.metal],
                         (side * OVERSAMPLE, side * OVERSAMPLE), rng, backdrop=self.backdrop)
        return big.resize((side, side), Image.Resampling.LANCZOS)


def is_held_out(class_name: str, style: str | None) -> bool:
    """Whether the world never shows this class's style (a catalogue concept may have no style)."""
    return style is not None and HELD_OUT.get(class_name) == style


def styles(class_name: str, *, held_out: bool = False) -> tuple[str, ...]:
    """The class's styles in the world (or, with held_out=True, the one kept out of it)."""
    return tuple(s for s in synth.SHOP[class_name] if is_held_out(class_name, s) == held_out)


def item(index: int, seed: int = 0) -> WorldItem:
    """The world's `index`-th product: class, style, metal and backdrop uniform, so that no metal
    or backdrop is rare (the shop itself has dark backdrops a quarter of the time)."""
    rng = random.Random(f"{seed}:world:{index}")
    class_name = rng.choice(sorted(synth.SHOP))
    return WorldItem(index=index, class_name=class_name, style=rng.choice(styles(class_name)),
                     metal=rng.choice(sorted(synth.METALS)), backdrop=rng.choice(BACKDROPS), seed=seed)


def pixels(images: list[Image.Image]) -> np.ndarray:
    """Images as a float32 (N, 3, H, W) array in [-1, 1], as the VAE takes them."""
    stack = np.stack([np.asarray(i.convert("RGB"), dtype=np.float32) for i in images])
    return (stack / 127.5 - 1.0).transpose(0, 3, 1, 2)


def batch(indices: range | list[int], seed: int = 0, *, side: int = 64,
          caption_rng: random.Random | None = None, keep: float = 1.0
          ) -> tuple[np.ndarray, list[str], list[WorldItem]]:
    """The images (as `pixels`), captions and ground truth of the world's items at `indices`."""
    items = [item(i, seed) for i in indices]
    images = pixels([it.image(side) for it in items])
    return images, [it.caption(caption_rng, keep) for it in items], items
