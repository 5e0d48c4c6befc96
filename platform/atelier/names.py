"""Names made from people's text (file names, styles, run names): lower-case letters and digits in
runs joined by '-', the one form that is a valid registry name, run name and Kubernetes name."""

from __future__ import annotations

import re
import unicodedata

# Letters NFKD does not split into an ASCII base and accents.
_LETTERS = str.maketrans({"ß": "ss", "æ": "ae", "Æ": "AE", "ø": "o", "Ø": "O", "œ": "oe", "Œ": "OE",
                          "ł": "l", "Ł": "L", "đ": "d", "Đ": "D", "þ": "th", "Þ": "Th", "ı": "i"})


def slug(text: str, fallback: str = "") -> str:
    """"Beaded Hoops_2" -> "beaded-hoops-2", "Étoile" -> "etoile"; `fallback` when nothing of `text` is left.

    Accented Latin letters lose their accents (NFKD) rather than the whole letter; scripts without
    an ASCII reading (中文) leave nothing, so callers that need a name pass a `fallback`."""
    ascii_text = unicodedata.normalize("NFKD", str(text).translate(_LETTERS))
    ascii_text = ascii_text.encode("ascii", "ignore").decode("ascii")
    return re.sub(r"[^a-z0-9]+", "-", ascii_text.lower()).strip("-") or fallback
