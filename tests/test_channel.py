"""The channel seam: a second way of talking to a chat service, written only for this test and
plugged in as a real one is (its class in CHANNELS, `kind =` in [robot:NAME]), runs through the
same senders, renderer, journal, history and preview without any of them knowing its wire
format; a receiver may mix it with DingTalk robots."""

import http.server
import json
import logging
import threading
import urllib.request

import pytest

import alertbridge
from tests.kit import history, make_alert, make_payload, post, settle


class PlainChannel(alertbridge.Channel):
    """A made-up service: {"text": ..., "notify": [...]} bodies of 2,000 bytes at most, no
    buttons (they become lines of links), mentions beside anything; HTTP 429 means slow down.
    Its URL carries its credential as ?key=..."""

    KIND, NAME = "plain", "Plain"
    PERSON_KEY = "plain_id"
    LIMIT = 2000
    RATE_LIMITS = ()  # [delivery] rate_limit per rate_window, as DingTalk's
    DECLARED = ()
    NO_CREDENTIAL = "has no key parameter"
    PLACEHOLDER_HINTS = {"token": "put the service's key into config.ini", "secret": ""}
    PLACEHOLDERS = {"token": ("CHANGE_ME",), "secret": ()}

    def __init__(self, config):
        self.config = config

    @staticmethod
    def takes(url):
        return "/plain" in url

    @staticmethod
    def credential(url):
        return url.partition("key=")[2]

    @staticmethod
    def with_credential(url, token, where):
        return url + "?key=" + token

    @staticmethod
    def mask(url):
        return url.partition("key=")[0] + "key=***"

    def limit(self):
        return self.LIMIT

    def mentions_apart(self, rendered):
        return False

    def request(self, rendered, robot):
        links = [f"{label}: {url}" for label, url in rendered.buttons]
        head = [rendered.title]
        tail = list(rendered.notes) + links
        notify = list(rendered.mentions.mobiles + rendered.mentions.user_ids_of(self.KIND))
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

    @staticmethod
    def post(robot, payload, timeout):
        call = urllib.request.Request(robot.url, data=payload, method="POST")
        try:
            with urllib.request.urlopen(call, timeout=timeout) as answer:
                status = answer.status
        except urllib.error.HTTPError as exc:
            status = exc.code
        errcode = 0 if status == 200 else status  # 0: taken, as the history reads every channel
        return alertbridge.SendResult(errcode, "", kind=PlainChannel.KIND)

    @staticmethod
    def outcome(errcode):
        return {0: alertbridge.SENT, 429: alertbridge.THROTTLED}.get(errcode, alertbridge.FAILED)

    @staticmethod
    def fix(errcode, errmsg, name):
        return f"put the service's key into [robot:{name}] url" if errcode == 401 else ""


@pytest.fixture
def plain_channel(monkeypatch):
    """The channel plugged in as a kind of robot."""
    monkeypatch.setitem(alertbridge.CHANNELS, PlainChannel.KIND, PlainChannel)


@pytest.fixture
def plain_service(plain_channel):
    received, refusing = [], []  # refusing: HTTP statuses to answer next, in order

    class Handler(http.server.BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            if refusing:
                self.send_response(refusing.pop(0))
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            received.append(body)
            self.send_response(200)
            self.send_header("Content-Length", "0")
            self.end_headers()

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}/plain?key=plain-key", received, refusing
    server.shutdown()
    server.server_close()


def test_a_second_channel_goes_through_the_same_pipeline(
    tmp_path, plain_service, sqlite_db, caplog
):
    url, received, _ = plain_service
    path = tmp_path / "config.ini"
    path.write_text(
        f"[alertbridge]\nport = 0\nstate_dir = state\njournal_sync = normal\n"
        f"[database]\ndriver = sqlite\npath = {sqlite_db.path}\n"
        f"[receiver:ops]\nrobots = plain\nat_mobiles = 13800000000\nmessage_type = actionCard\n"
        f"[robot:plain]\nurl = {url}\n",
        encoding="utf-8",
    )
    bridge = alertbridge.Bridge(alertbridge.load_config(str(path))).start()
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
        assert [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING] == []
        rows = history(bridge)
        assert len(rows) == 4 and all(r["notified_count"] == 1 for r in rows)
        form = {"payload": json.dumps(make_payload("ops", alerts[:1]))}
        status, html = bridge.preview.preview(form=form)
        assert status == 200 and "plain to robot plain" in html
    finally:
        bridge.stop()


def test_a_receiver_mixing_kinds_sends_each_robot_its_own_wire_format(
    tmp_path, plain_service, fake, sqlite_db
):
    url, received, refusing = plain_service
    fake.add_robot("mixed-ding")
    path = tmp_path / "config.ini"
    path.write_text(
        f"[alertbridge]\nport = 0\nstate_dir = state\njournal_sync = normal\n"
        f"[database]\ndriver = sqlite\npath = {sqlite_db.path}\n"
        f"[receiver:ops]\nrobots = plain, ding\nat_mobiles = 13800000000\n"
        f"[robot:plain]\nurl = {url}\nkind = plain\n"
        f"[robot:ding]\nurl = {fake.url('mixed-ding')}\n",
        encoding="utf-8",
    )
    bridge = alertbridge.Bridge(alertbridge.load_config(str(path))).start()
    try:
        big = [
            make_alert("DiskFull", f"db-{i}", annotations={"description": "磁盘 " * 150})
            for i in range(4)
        ]
        assert post(bridge, make_payload("ops", big))[0] == 200
        settle(bridge)
        to_ding = fake.delivered("mixed-ding")
        assert received and to_ding  # robots in turn, each in its own format
        assert all("msgtype" not in r and r["notify"] == ["13800000000"] for r in received)
        assert all(r.body["msgtype"] == "markdown" for r in to_ding)
        # sized for the narrowest: every part fits the plain service's 2,000 bytes whole
        assert all(r.size <= PlainChannel.LIMIT for r in to_ding)
        assert all(alertbridge.TRUNCATED_MARK not in r.text for r in to_ding)
        assert all(alertbridge.TRUNCATED_MARK not in r["text"] for r in received)

        refusing.append(500)  # the plain robot fails: its message fails over to DingTalk's
        before = len(fake.delivered("mixed-ding"))
        for i in range(2):  # one of the two is the plain robot's turn
            assert post(bridge, make_payload("ops", [make_alert(f"Small{i}", "db")]))[0] == 200
        settle(bridge)
        assert not refusing
        titles = [r.text for r in fake.delivered("mixed-ding")[before:]]
        assert len(titles) + sum("Small" in r["text"] for r in received) == 2
        assert any("Small" in t for t in titles)
        rows = history(bridge)
        assert len(rows) == 6 and all(r["notified_count"] == 1 for r in rows)
    finally:
        bridge.stop()


def test_each_kind_of_robot_mentions_people_by_its_own_platforms_id(
    tmp_path, plain_service, fake, sqlite_db
):
    """[person:X] takes an id for each channel (its PERSON_KEY): a receiver mixing kinds @s the
    same person on each robot by that robot's platform's id, never another's."""
    url, received, _ = plain_service
    fake.add_robot("ids-ding")
    path = tmp_path / "config.ini"
    path.write_text(
        f"[alertbridge]\nport = 0\nstate_dir = state\njournal_sync = normal\n"
        f"[database]\ndriver = sqlite\npath = {sqlite_db.path}\n"
        f"[receiver:ops]\nrobots = plain, ding\nat_people = lisi\n"
        f"at_user_ids = plain:lead-1, boss01\n"
        f"[person:lisi]\nuser_id = lisi01\nplain_id = lisi-plain\n"
        f"[robot:plain]\nurl = {url}\nkind = plain\n"
        f"[robot:ding]\nurl = {fake.url('ids-ding')}\n",
        encoding="utf-8",
    )
    config = alertbridge.load_config(str(path))
    assert config.people["lisi"].user_ids == ("lisi01", "plain:lisi-plain")
    bridge = alertbridge.Bridge(config).start()
    try:
        for i in range(2):  # the robots in turn: one message each
            assert post(bridge, make_payload("ops", [make_alert(f"Disk{i}", "db")]))[0] == 200
            settle(bridge)
        (to_plain,), (to_ding,) = received, fake.delivered("ids-ding")
        assert to_plain["notify"] == ["lead-1", "lisi-plain"]
        assert to_ding.body["at"]["atUserIds"] == ["boss01", "lisi01"]
        assert "plain" not in to_ding.text and "lisi01" not in to_plain["text"]
    finally:
        bridge.stop()


def test_a_person_needs_an_id_some_kind_of_robot_can_mention(tmp_path, plain_channel):
    path = tmp_path / "config.ini"
    path.write_text("[receiver:ops]\nrobots = r\nat_people = lisi\n[person:lisi]\nname = 李四\n"
                    "[robot:r]\nurl = https://oapi.dingtalk.com/robot/send?access_token=abc\n",
                    encoding="utf-8")
    keys = "feishu_id or plain_id or user_id or wecom_id"  # every kind's id, a channel's too
    with pytest.raises(alertbridge.ConfigError, match=rf"set mobile or {keys}"):
        alertbridge.load_config(str(path))
    path.write_text(path.read_text(encoding="utf-8").replace("name = 李四", "plain_id = l@x"),
                    encoding="utf-8")
    with pytest.raises(alertbridge.ConfigError, match=r"\[person:lisi\] plain_id: not a user id"):
        alertbridge.load_config(str(path))
