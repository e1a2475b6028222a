"""The channel seam: a second way of talking to a chat service, written only for this test, runs
through the same senders, renderer, journal, history and preview without any of them knowing
its wire format."""

import http.server
import json
import threading
import urllib.request

import pytest

import alertbridge
from tests.kit import history, make_alert, make_payload, post, settle


class PlainChannel:
    """A made-up service: {"text": ..., "notify": [...]} bodies of 2,000 bytes at most, no
    buttons (they become lines of links), mentions beside anything; HTTP 429 means slow down."""

    LIMIT = 2000

    def limit(self):
        return self.LIMIT

    def mentions_apart(self, rendered):
        return False

    def request(self, rendered, robot):
        links = [f"{label}: {url}" for label, url in rendered.buttons]
        head = [rendered.title]
        tail = list(rendered.notes) + links
        notify = list(rendered.mentions.mobiles + rendered.mentions.user_ids)
        request = {"text": "\n".join(head + tail), "notify": notify}
        room = self.LIMIT - len(self.encode(request))
        text = alertbridge.truncate_to("\n\n".join(rendered.blocks), room)
        request["text"] = "\n".join(head + [text] + tail)
        return request

    def mention_request(self, body, robot):
        raise AssertionError("this channel mentions beside buttons")

    def fits(self, rendered, robot):
        return alertbridge.TRUNCATED_MARK not in self.request(rendered, robot)["text"]

    @staticmethod
    def encode(request):
        return json.dumps(request, ensure_ascii=False).encode()

    @staticmethod
    def shown(request):
        return alertbridge.Shown("plain", "", request["text"], (), markdown=False)

    def post(self, robot, payload, timeout):
        call = urllib.request.Request(robot.url, data=payload, method="POST")
        try:
            with urllib.request.urlopen(call, timeout=timeout) as answer:
                return alertbridge.SendResult(0, "ok", outcome=self.outcome(answer.status))
        except urllib.error.HTTPError as exc:
            return alertbridge.SendResult(exc.code, "slow down", outcome=self.outcome(exc.code))

    @staticmethod
    def outcome(status):
        return {200: alertbridge.SENT, 429: alertbridge.THROTTLED}.get(status, alertbridge.FAILED)


@pytest.fixture
def plain_service():
    received = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_POST(self):
            received.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
            self.send_response(200)
            self.send_header("Content-Length", "0")
            self.end_headers()

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}/post?access_token=plain", received
    server.shutdown()
    server.server_close()


def test_a_second_channel_goes_through_the_same_pipeline(tmp_path, plain_service, sqlite_db):
    url, received = plain_service
    path = tmp_path / "config.ini"
    path.write_text(
        f"[alertbridge]\nport = 0\nstate_dir = state\njournal_sync = normal\n"
        f"[database]\ndriver = sqlite\npath = {sqlite_db.path}\n"
        f"[receiver:ops]\nrobots = plain\nat_mobiles = 13800000000\nmessage_type = actionCard\n"
        f"[robot:plain]\nurl = {url}\n",
        encoding="utf-8",
    )
    bridge = alertbridge.Bridge(alertbridge.load_config(str(path)), channel=PlainChannel()).start()
    try:
        alerts = [
            make_alert("DiskFull", f"db-{i}", annotations={"description": "磁盘 " * 150})
            for i in range(4)
        ]
        assert post(bridge, make_payload("ops", alerts))[0] == 200
        settle(bridge)
        assert len(received) > 1  # split by its own limit
        assert all(
            len(json.dumps(r, ensure_ascii=False).encode()) <= PlainChannel.LIMIT for r in received
        )
        assert all(
            r["notify"] == ["13800000000"] and "Prometheus: http" in r["text"] for r in received
        )
        assert "msgtype" not in received[0] and "(1/" in received[0]["text"]
        rows = history(bridge)
        assert len(rows) == 4 and all(r["notified_count"] == 1 for r in rows)
        form = {"payload": json.dumps(make_payload("ops", alerts[:1]))}
        status, html = bridge.preview.preview(form=form)
        assert status == 200 and "plain to robot plain" in html
    finally:
        bridge.stop()
