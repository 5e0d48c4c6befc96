"""Rare-token identifiers for DreamBooth concepts: allocation, and checks of hand-edited ones."""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import TYPE_CHECKING

from atelier.errors import InvalidInput

if TYPE_CHECKING:
    from atelier.catalogue.schema import ConceptsFile

# Later BPE merges are rarer in CLIP's training text, so their tokens carry less prior meaning.
RARE_ID_MIN = 40000
_CANDIDATE = re.compile(r"^[a-z]{3,4}</w>$")
# Rare tokens that are still slurs, profanity or otherwise unfit to appear in a product's prompt.
DENYLIST = frozenset(
    "fck nips jap japs milf stfu lewd klan kkkk shat dike".split()
)
_WORD = re.compile(r"[a-z]+")


def words_of(texts: Iterable[str]) -> set[str]:
    """Lower-case letter runs of the texts: what identifiers must not collide with."""
    return {w for text in texts for w in _WORD.findall(text.lower())}


def is_single_token(tokenizer, word: str) -> bool:
    """Whether `word` is one whole-word token of the tokenizer (e.g. 'sks' -> ['sks</w>'])."""
    return tokenizer.tokenize(word) == [word + "</w>"]


def allocate_identifiers(n: int, tokenizer, avoid: set[str]) -> list[str]:
    """Choose `n` distinct rare identifiers, deterministically.

    The rule, after the DreamBooth paper (a rare token has a weak prior, so fine-tuning can bind
    it to the concept without fighting an existing meaning):

    1. candidates are the vocabulary's whole-word tokens of 3-4 lower-case ASCII letters
       (`[a-z]{3,4}</w>`) whose token id is above 40,000: the last BPE merges, the rarest words;
    2. they are taken from the highest id down, so the same tokenizer and `avoid` always give the
       same identifiers;
    3. a candidate is skipped if it is in `avoid` (every word of the catalogue's titles, styles and
       prompts), in a small deny-list of slurs and profanity, or if it does not tokenize back to
       exactly one token, alone and inside a prompt ("photo of a {word} ring").
    """
    if n < 0:
        raise ValueError("n must be >= 0")
    avoid = {w.lower() for w in avoid}
    vocab = tokenizer.get_vocab()
    candidates = sorted(
        ((i, t[: -len("</w>")]) for t, i in vocab.items() if i > RARE_ID_MIN and _CANDIDATE.match(t)),
        reverse=True,
    )
    chosen: list[str] = []
    for _, word in candidates:
        if len(chosen) == n:
            break
        if word in avoid or word in DENYLIST:
            continue
        if not is_single_token(tokenizer, word):
            continue
        if tokenizer.tokenize(f"photo of a {word} ring").count(word + "</w>") != 1:
            continue
        chosen.append(word)
    if len(chosen) < n:
        raise InvalidInput(
            f"only {len(chosen)} rare single-token identifiers are available, {n} are needed",
            where="identifiers",
        )
    return chosen


def validate_identifiers(concepts_file: ConceptsFile, tokenizer) -> None:
    """Check a (possibly hand-edited) concepts file's identifiers against the tokenizer.

    Raises InvalidInput naming the concept and identifier when one is shared by two concepts, is
    not one token ("beadedhoops" is four), is not one token of its instance prompt, or when the
    prompt does not fit the tokenizer's context.
    """
    seen: dict[str, str] = {}
    max_length = getattr(tokenizer, "model_max_length", None)
    for i, concept in enumerate(concepts_file.concepts):
        where = f"concepts.{i}.identifier ({concept.name})"
        ident = concept.identifier
        if ident in seen:
            raise InvalidInput(
                f"identifier {ident!r} is also used by concept {seen[ident]!r}", where=where
            )
        seen[ident] = concept.name
        if not is_single_token(tokenizer, ident):
            pieces = tokenizer.tokenize(ident)
            raise InvalidInput(
                f"identifier {ident!r} is {len(pieces)} tokens {pieces}, not one",
                where=where,
                hint="choose a rare word that is one token, e.g. `atelier catalogue build` allocates them",
            )
        tokens = tokenizer.tokenize(concept.instance_prompt)
        if tokens.count(ident + "</w>") != 1:
            raise InvalidInput(
                f"identifier {ident!r} is not exactly one token of the instance prompt "
                f"{concept.instance_prompt!r}",
                where=where,
            )
        if max_length and len(tokens) + 2 > max_length:
            raise InvalidInput(
                f"instance prompt is {len(tokens) + 2} tokens, over the tokenizer's {max_length}",
                where=f"concepts.{i}.instance_prompt ({concept.name})",
            )
