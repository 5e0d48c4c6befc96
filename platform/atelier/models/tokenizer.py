"""CLIP's tokenizer, built offline from the BPE vocabulary that the open_clip_torch wheel ships.

Stable Diffusion 1.x/2.x use CLIP's 49,408-token BPE vocabulary. No hub is reachable here, so the
built-in models build a `CLIPTokenizer` from that vocabulary: the token ids are exactly CLIP's, so
identifier allocation behaves as it will against a real SD checkpoint.
"""

from __future__ import annotations

import gzip
import importlib.metadata
from functools import lru_cache
from pathlib import Path

from atelier.errors import NotFound

VOCAB_FILE = "open_clip/bpe_simple_vocab_16e6.txt.gz"
MAX_LENGTH = 77  # CLIP's context; the pipeline overflows if the tokenizer is left at its default
# CLIP keeps the first 48,894 merges of the file (49,408 = 256 bytes x 2 + merges + 2 specials).
N_MERGES = 49152 - 256 - 2


def vocab_path() -> Path:
    try:
        dist = importlib.metadata.distribution("open_clip_torch")
    except importlib.metadata.PackageNotFoundError:
        dist = None
    path = Path(str(dist.locate_file(VOCAB_FILE))) if dist else None
    if path is None or not path.exists():
        raise NotFound(
            "CLIP's BPE vocabulary is not installed",
            where=VOCAB_FILE,
            hint="run `make install`, or `pip install --no-deps open_clip_torch==3.3.0`",
        )
    return path


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible byte -> printable-character table."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    chars = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, (chr(c) for c in chars), strict=True))


@lru_cache(maxsize=1)
def clip_vocab_and_merges() -> tuple[dict[str, int], list[str]]:
    lines = gzip.open(vocab_path(), "rt", encoding="utf-8").read().split("\n")
    merges = lines[1 : N_MERGES + 1]
    base = list(_bytes_to_unicode().values())
    tokens = base + [t + "</w>" for t in base]
    tokens += ["".join(m.split()) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    return {t: i for i, t in enumerate(tokens)}, merges


def build_clip_tokenizer():
    """A `transformers.CLIPTokenizer` with CLIP's exact vocabulary and a 77-token limit."""
    from transformers import CLIPTokenizer

    vocab, merges = clip_vocab_and_merges()
    pairs = [tuple(m.split()) for m in merges]
    # transformers 5 takes merges as pairs too (its annotation says strings only).
    return CLIPTokenizer(vocab=dict(vocab), merges=pairs, model_max_length=MAX_LENGTH)  # type: ignore[arg-type]
