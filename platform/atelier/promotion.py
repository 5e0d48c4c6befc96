"""Promotion: moving a registry alias ("shop-beaded-hoops@prod") to another version, behind an
optional gate on measured quality, with a webhook told of every move.

The move itself is the registry's (`Registry.promote` / `rollback`: a conditional write, so two
promoters never both win). This module adds the policy around it:
- a gate ("clip_i > 0.8 and fid < 40"): the candidate's latest evaluation must meet every
  condition and beat the version the alias names now on each metric named, in the metric's
  better direction; checked between reading the alias and moving it, so what was compared is
  what gets replaced;
- the webhook (`promotion_webhook` in the settings), POSTed the move as JSON. A webhook that
  fails does not undo the move: the alias has moved, and the caller is told the webhook failed.
"""

from __future__ import annotations

import operator
import re
from collections.abc import Callable

from pydantic import BaseModel, ConfigDict, Field

from atelier.errors import GateRefused, InvalidInput
from atelier.quality.results import SUMMARY
from atelier.registry import AliasMove, ModelCard, Registry

OPERATORS: dict[str, Callable[[float, float], bool]] = {
    ">=": operator.ge, "<=": operator.le, ">": operator.gt, "<": operator.lt}
_CONDITION = re.compile(r"^\s*([a-z_]+)\s*(>=|<=|>|<)\s*(-?[0-9]+(?:\.[0-9]*)?(?:e-?[0-9]+)?)\s*$")
WEBHOOK_TIMEOUT_S = 5.0
WEBHOOK_ATTEMPTS = 3


class Condition(BaseModel):
    """One condition of a gate: "clip_i > 0.8"."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    metric: str = Field(description=f"A summary metric: {', '.join(SUMMARY)}.")
    op: str = Field(description="One of >, >=, <, <=.")
    threshold: float = Field(description="The value compared with.")

    def __str__(self) -> str:
        return f"{self.metric} {self.op} {self.threshold:g}"


def parse_gate(text: str) -> list[Condition]:
    """"clip_i > 0.8 and fid < 40" as its conditions, or InvalidInput naming the bad part."""
    conditions = []
    for part in re.split(r"\band\b", text):
        match = _CONDITION.match(part)
        if not match:
            raise InvalidInput(f"not a condition: {part.strip()!r} (write METRIC OP NUMBER, joined by "
                               f"'and'; OP is one of {', '.join(OPERATORS)})", where="--promote-if")
        metric, op, threshold = match.groups()
        if metric not in SUMMARY:
            raise InvalidInput(f"unknown metric {metric!r}: one of {', '.join(SUMMARY)}",
                               where="--promote-if")
        conditions.append(Condition(metric=metric, op=op, threshold=float(threshold)))
    return conditions


def gate(registry: Registry, conditions: list[Condition]) -> Callable[[AliasMove | None, ModelCard], None]:
    """The registry's promotion check for `conditions` (GateRefused says which failed)."""

    def check(current: AliasMove | None, card: ModelCard) -> None:
        candidate = _summary(registry, card)
        for c in conditions:
            value = candidate.get(c.metric)
            if value is None:
                raise GateRefused(f"{card.ref} has no {c.metric} (its evaluation could not measure it)",
                                  where=str(c))
            if not OPERATORS[c.op](value, c.threshold):
                raise GateRefused(f"{card.ref} has {c.metric} {value:.4g}, not {c.op} {c.threshold:g}",
                                  where=str(c))
        if current is None or current.version == card.version:
            return  # nothing to beat
        _, incumbent_card = registry.get(current.ref)
        incumbent = _summary(registry, incumbent_card, required=False)
        for metric in dict.fromkeys(c.metric for c in conditions):
            theirs, ours = incumbent.get(metric), candidate[metric]
            if theirs is None or ours is None:
                continue  # the incumbent was never measured on it: the thresholds decide
            higher_is_better = SUMMARY[metric]
            if not (ours > theirs if higher_is_better else ours < theirs):
                raise GateRefused(f"{card.ref} has {metric} {ours:.4g}, which does not beat "
                                  f"{current.ref} ({theirs:.4g}, which @{current.alias} names now)",
                                  where=metric)

    return check


def _summary(registry: Registry, card: ModelCard, *, required: bool = True) -> dict[str, float | None]:
    evaluation = registry.evaluation(card)
    if evaluation is None:
        if required:
            raise GateRefused(f"{card.ref} has not been evaluated", where=card.ref,
                              hint=f"atelier eval {card.ref}")
        return {}
    return evaluation.summary()


def promote(registry: Registry, ref: str, alias: str, *, promote_if: str | None = None,
            note: str | None = None, webhook: str | None = None) -> tuple[AliasMove, str | None]:
    """Move `alias` to the version `ref` names, if it passes `promote_if`; return the move and
    what the webhook said (None: no webhook)."""
    check = gate(registry, parse_gate(promote_if)) if promote_if else None
    move = registry.promote(ref, alias, note=note, check=check)
    return move, notify(webhook, move)


def rollback(registry: Registry, name: str, alias: str, *, note: str | None = None,
             webhook: str | None = None) -> tuple[AliasMove, str | None]:
    move = registry.rollback(name, alias, note=note)
    return move, notify(webhook, move)


def notify(url: str | None, move: AliasMove) -> str | None:
    """POST the move to the webhook; a short line of how it went ("200", "failed: ..."), or
    None without a webhook. Retried on connection errors and 5xx, a few seconds in all."""
    if not url:
        return None
    import requests
    from requests.adapters import HTTPAdapter
    from urllib3.util.retry import Retry

    session = requests.Session()
    retry = Retry(total=WEBHOOK_ATTEMPTS - 1, backoff_factor=0.2, status_forcelist=(500, 502, 503, 504),
                  allowed_methods=frozenset({"POST"}), raise_on_status=False)
    session.mount("http://", HTTPAdapter(max_retries=retry))
    session.mount("https://", HTTPAdapter(max_retries=retry))
    try:
        response = session.post(url, json={"event": "alias-moved", **move.model_dump(mode="json")},
                                timeout=WEBHOOK_TIMEOUT_S)
    except requests.RequestException as e:
        return f"failed: {type(e).__name__}"
    finally:
        session.close()
    return str(response.status_code) if response.ok else f"failed: HTTP {response.status_code}"
