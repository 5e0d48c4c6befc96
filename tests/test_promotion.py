"""Promotion's policy (atelier.promotion) on a moto S3 registry: the gate on measured quality,
the webhook told of every move, and `atelier models promote --promote-if`."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from atelier import promotion
from atelier.errors import GateRefused, InvalidInput
from atelier.registry import Registry
from atelier.storage import Storage
from support import an_evaluation, card_fields, free_port


@pytest.fixture
def registry(settings):
    return Registry(Storage(settings))


@pytest.fixture
def hoops(registry, tmp_path):
    """Three versions of "hoops"; 1 and 2 evaluated (CLIP-I 0.70 and 0.85), 3 never."""
    folder = tmp_path / "full"
    folder.mkdir()
    (folder / "model_index.json").write_text('{"_class_name": "StableDiffusionPipeline"}\n')
    for _ in range(3):
        registry.publish(folder, name="hoops", **card_fields())
    grids = tmp_path / "eval"
    (grids / "grids").mkdir(parents=True)
    (grids / "grids" / "beaded-hoops.png").write_bytes(b"png")
    registry.record_evaluation(grids, an_evaluation("hoops:1", 0.70))
    registry.record_evaluation(grids, an_evaluation("hoops:2", 0.85))
    return registry


def test_gates_parse_into_conditions_and_mistakes_say_what_is_wrong():
    assert [str(c) for c in promotion.parse_gate("clip_i > 0.8 and fid<=40")] == ["clip_i > 0.8", "fid <= 40"]
    assert promotion.parse_gate(" kid < 1e-3 ")[0].threshold == 0.001
    for bad, why in (("clip_i", "not a condition"), ("clip_i = 0.8", "not a condition"),
                     ("sharpness > 1", "unknown metric 'sharpness'"), ("clip_i > 0.8 or fid < 4", "not a condition"),
                     ("clip_i > 0.8 and", "not a condition"), ("__import__('os') > 1", "not a condition")):
        with pytest.raises(InvalidInput, match=why):
            promotion.parse_gate(bad)


def test_the_gate_promotes_only_a_candidate_that_meets_it_and_beats_the_incumbent(hoops):
    promotion.promote(hoops, "hoops:1", "prod")  # no gate: the first promotion
    with pytest.raises(GateRefused, match="clip_i 0.85, not > 0.9"):
        promotion.promote(hoops, "hoops:2", "prod", promote_if="clip_i > 0.9")
    with pytest.raises(GateRefused, match="hoops:3 has not been evaluated") as e:
        promotion.promote(hoops, "hoops:3", "prod", promote_if="clip_i > 0.5")
    assert "atelier eval hoops:3" in str(e.value)
    move, webhook = promotion.promote(hoops, "hoops:2", "prod", promote_if="clip_i > 0.8")
    assert (move.version, move.previous, webhook) == (2, 1, None)
    # Meeting the threshold is not enough: it must beat what @prod serves (FID: lower is better).
    promotion.rollback(hoops, "hoops", "prod")
    hoops.promote("hoops:2", "prod")
    with pytest.raises(GateRefused, match=r"hoops:1 has clip_i 0.7, which does not beat hoops:2"):
        promotion.promote(hoops, "hoops:1", "prod", promote_if="clip_i > 0.5")
    with pytest.raises(GateRefused, match="fid 12.5, which does not beat"):
        promotion.promote(hoops, "hoops:1", "prod", promote_if="fid < 50")
    assert hoops.get("hoops@prod")[1].version == 2  # every refusal left it where it was
    assert [m.version for m in hoops.history("hoops", "prod")] == [1, 2, 1, 2]


class _Hook(BaseHTTPRequestHandler):
    received: list[dict] = []
    status = 200

    def do_POST(self):  # noqa: N802  (the stdlib's name)
        type(self).received.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
        self.send_response(type(self).status)
        self.end_headers()

    def log_message(self, *args):
        pass


@pytest.fixture
def webhook():
    _Hook.received, _Hook.status = [], 200
    server = ThreadingHTTPServer(("127.0.0.1", free_port()), _Hook)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_port}/moved", _Hook
    server.shutdown()


def test_every_move_is_posted_to_the_webhook_and_a_failing_one_does_not_undo_it(hoops, webhook):
    url, hook = webhook
    move, said = promotion.promote(hoops, "hoops:1", "prod", note="first", webhook=url)
    assert said == "200"
    assert hook.received == [{"event": "alias-moved", **move.model_dump(mode="json")}]
    hoops.promote("hoops:2", "prod")
    move, said = promotion.rollback(hoops, "hoops", "prod", webhook=url)
    assert said == "200" and hook.received[-1]["action"] == "rollback" and hook.received[-1]["version"] == 1

    hook.status = 500  # retried, then reported; the alias has moved all the same
    move, said = promotion.promote(hoops, "hoops:2", "prod", webhook=url)
    assert said == "failed: HTTP 500" and len(hook.received) == 2 + promotion.WEBHOOK_ATTEMPTS
    assert hoops.get("hoops@prod")[1].version == 2
    closed = f"http://127.0.0.1:{free_port()}/"
    _, said = promotion.rollback(hoops, "hoops", "prod", webhook=closed)
    assert said == "failed: ConnectionError" and hoops.get("hoops@prod")[1].version == 1


def test_cli_promotes_behind_a_gate_and_says_what_the_webhook_answered(models_cli, hoops, webhook, monkeypatch):
    url, hook = webhook
    monkeypatch.setenv("ATELIER_PROMOTION_WEBHOOK", url)
    code, out, _ = models_cli("promote", "hoops:1", "--alias", "prod")
    assert (code, out) == (0, "hoops@prod -> version 1\nwebhook: 200\n")
    code, _, err = models_cli("promote", "hoops:2", "--alias", "prod", "--promote-if", "clip_i > 0.9")
    assert code == 12 and "not > 0.9" in err
    code, _, err = models_cli("promote", "hoops:2", "--alias", "prod", "--promote-if", "clip_i >> 0.9")
    assert code == 2 and "not a condition" in err
    code, out, _ = models_cli("promote", "hoops:2", "--alias", "prod", "--promote-if", "clip_i > 0.8")
    assert (code, out) == (0, "hoops@prod -> version 2 (was version 1)\nwebhook: 200\n")
    assert len(hook.received) == 2
