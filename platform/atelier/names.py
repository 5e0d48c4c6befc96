"""Names made from people's text (file names, styles, run names): lower-case letters and digits in
runs joined by '-', the one form that is a valid registry name, run name and Kubernetes name."""

from __future__ import annotations

import re


def slug(text: str, fallback: str = "") -> str:
    """"Beaded Hoops_2" -> "beaded-hoops-2"; `fallback` when nothing of `text` is left."""
    return re.sub(r"[^a-z0-9]+", "-", str(text).lower()).strip("-") or fallback
