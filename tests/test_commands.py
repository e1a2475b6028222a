"""Commands written to the app robot act only where they may: in a group, on the incidents of the
receivers whose app_group it is; in a one-to-one chat, for a [person], on the incidents of the
receivers that page them; a silence needs a [person] and lasts [oncall] silence_max at most. A
number no incident can have is answered, not logged as an error; the answer goes only to
DingTalk (or the [app] api_url's host)."""

import http.server
import json
import logging
import threading
import time
import uuid
from datetime import datetime

import pytest

import alertbridge
from tests.kit import app_config, wait_until
from tests.test_incidents import FIRING, Recorder, group

PEOPLE = """
[person:zhangsan]
name = 张三
user_id = manager4321

[person:wangwu]
name = 王五
user_id = dba007

[person:lisi]
name = 李四
mobile = 13800000002

[escalation:db-pages]
steps =
    10m = wangwu
"""
RECEIVERS = {  # their answers in English unless desk(language=...)
    "ops": {"robots": "ops-1, ops-2", "app_group": "cid-ops", "at_people": "zhangsan"},
    "db": {"robots": "ops-3", "app_group": "cid-db", "escalation": "db-pages"},
    "dev": {"robots": "dev-1"},
}


class FakeAlertmanager:
    """Alertmanager's API v2 on loopback, as far as silences go: each silence posted is kept
    and gets an id; a group's alerts, asked for, still fire (nothing resolves under a test)."""

    def __init__(self):
        self.silences = []
        handler = type("Handler", (_AlertmanagerHandler,), {"am": self})
        self.http = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        threading.Thread(target=self.http.serve_forever, args=(0.02,), daemon=True).start()
        self.url = f"http://127.0.0.1:{self.http.server_address[1]}"

    def stop(self):
        self.http.shutdown()
        self.http.server_close()

    def lasted(self, silence):
        ends, starts = (datetime.fromisoformat(silence[k].replace("Z", "+00:00"))
                        for k in ("endsAt", "startsAt"))
        return (ends - starts).total_seconds()


class _AlertmanagerHandler(http.server.BaseHTTPRequestHandler):
    am: FakeAlertmanager

    def log_message(self, *args):
        pass

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))))
        self.am.silences.append(body)
        self._answer({"silenceID": f"s-{len(self.am.silences)}"})

    def do_GET(self):
        self._answer([{"status": {"state": "suppressed"}, "endsAt": "2999-01-01T00:00:00Z"}])

    def _answer(self, body):
        raw = json.dumps(body).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(raw)))
        self.end_headers()
        self.wfile.write(raw)


@pytest.fixture
def alertmanager():
    server = FakeAlertmanager()
    yield server
    server.stop()


@pytest.fixture
def desk(make_bridge, sqlite_db, app, alertmanager):
    """desk(oncall="...", database=..., language=... or languages={route: ...}) -> a running
    bridge with an open incident of each receiver: {route: incident number}."""

    def start(oncall="", database=sqlite_db, language="en", languages=None):
        extra = (app_config(app) + PEOPLE
                 + f"\n[oncall]\nalertmanager_api = {alertmanager.url}\n{oncall}\n")
        languages = languages or dict.fromkeys(RECEIVERS, language)
        receivers = {name: {**r, "language": languages[name]} for name, r in RECEIVERS.items()}
        bridge = make_bridge(database, receivers=receivers, extra=extra)
        assert wait_until(lambda: app.connections == 1, timeout=10)
        recorder = Recorder(bridge.store, "j-test")
        for route in RECEIVERS:
            recorder.webhook(group(FIRING, key=route, receiver=route), "2026-11-24 08:00:00",
                             route=alertbridge.Route(route, ()))
        bridge.numbers = {i["route"]: i["id"] for i in bridge.store.incidents(10)}
        return bridge

    return start


def say(app, text, user_id="manager4321", conversation="cid-ops", one_to_one=False, webhook=""):
    """Someone writes to the robot, in a group or one to one (user_id "": a message without
    senderStaffId); the session its reply goes to. Returns once the command was handled."""
    session = uuid.uuid4().hex
    data = {
        "conversationId": conversation,
        "conversationType": "1" if one_to_one else "2",
        "senderId": "$:LWCP_v1:$" + uuid.uuid4().hex,
        "senderNick": user_id or "someone",
        "msgtype": "text",
        "text": {"content": text},
        "sessionWebhook": webhook or f"{app.url}/session/{session}",
        "sessionWebhookExpiredTime": int(time.time() * 1000) + 3600_000,
    }
    if user_id:
        data["senderStaffId"] = user_id
    app.ask("CALLBACK", "/v1.0/im/bot/messages/get", data)
    return session


def answer(app, text, **where):
    return app.reply_to(say(app, text, **where))["text"]["content"]


def acknowledged_by(bridge, route):
    return bridge.store.incident(bridge.numbers[route])["acknowledged_by"]


def test_a_group_acts_only_on_the_incidents_of_its_own_receivers(desk, app, alertmanager):
    """The hostile review's case: incident numbers count up from 1, and a number alone claimed
    one team's incident and silenced another's for 168 h."""
    bridge = desk(oncall="silence_max = 7d")
    n = bridge.numbers
    assert answer(app, f"claim {n['db']}") == f"#{n['db']} is not one of this group's incidents."
    assert answer(app, f"silence {n['dev']} 168h") == (
        f"#{n['dev']} is not one of this group's incidents."
    )
    assert answer(app, f"认领 #{n['ops']}", conversation="cid-elsewhere") == (
        f"#{n['ops']} is not one of this group's incidents."
    )
    assert acknowledged_by(bridge, "db") is None and acknowledged_by(bridge, "dev") is None
    assert alertmanager.silences == []

    assert answer(app, f"claim {n['ops']}") == f"#{n['ops']}: 张三 has it."
    stranger = answer(app, f"claim {n['db']}", user_id="x-stranger", conversation="cid-db")
    assert stranger == f"#{n['db']}: x-stranger has it."  # in its group, anyone there claims


def test_one_to_one_commands_are_for_people_on_the_incidents_that_page_them(
    desk, app, alertmanager
):
    bridge = desk()
    n, alone = bridge.numbers, {"conversation": "cid-1to1", "one_to_one": True}
    for text in (f"claim {n['ops']}", f"silence {n['ops']} 168h"):
        assert answer(app, text, user_id="x-stranger", **alone) == (
            "Commands in a one-to-one chat are for people in [person] (one whose user_id is "
            "yours): write in your team's group instead."
        )
    assert answer(app, f"claim {n['db']}", **alone) == (
        f"#{n['db']} is not one of your incidents: receiver db neither @-mentions you nor "
        f"escalates to you."
    )
    assert acknowledged_by(bridge, "ops") is None and acknowledged_by(bridge, "db") is None
    assert alertmanager.silences == []

    assert answer(app, f"claim {n['ops']}", **alone) == f"#{n['ops']}: 张三 has it."  # at_people
    by_step = answer(app, f"claim {n['db']}", user_id="dba007", **alone)  # an escalation step's
    assert by_step == f"#{n['db']}: 王五 has it."
    assert answer(app, f"silence {n['db']} 1h", user_id="dba007", **alone).startswith(
        f"#{n['db']} silenced for 1h"
    )


def test_a_silence_needs_a_person_and_lasts_silence_max_at_most(desk, app, alertmanager):
    bridge = desk()  # silence_max unset: 1d
    number = bridge.numbers["ops"]
    assert answer(app, f"silence {number} 1h", user_id="x-stranger") == (
        "Only people in [person] may silence (a [person:HANDLE] whose user_id is yours): "
        "nothing was changed."
    )
    assert answer(app, f"silence {number} 168h") == (
        f"A silence lasts 1m to 1d here ([oncall] silence_max): silence {number} 1h."
    )
    assert alertmanager.silences == []
    assert answer(app, f"静默 {number} 2h") == f"#{number} silenced for 2h (silence s-1)."
    [silence] = alertmanager.silences
    assert alertmanager.lasted(silence) == 2 * 3600 and silence["createdBy"] == "张三"


def test_a_silence_of_days_is_taken_as_every_duration_is(desk, app, alertmanager):
    """`silence N 2d` was refused with "a silence lasts 1m to 7d": commands read no days."""
    bridge = desk(oncall="silence_max = 7d")
    number = bridge.numbers["ops"]
    assert answer(app, f"silence {number} 2d") == f"#{number} silenced for 2d (silence s-1)."
    assert alertmanager.lasted(alertmanager.silences[0]) == 2 * 86400
    assert answer(app, f"silence {number} 1.2.3h") == (  # no duration: answered, not a crash
        f"A silence lasts 1m to 7d here ([oncall] silence_max): silence {number} 1h."
    )


def test_a_card_button_longer_than_silence_max_changes_nothing(desk, app, alertmanager):
    bridge = desk(oncall="silence_max = 1h")
    [ops] = [i for i in bridge.store.incidents(10) if i["route"] == "ops"]
    track = alertbridge.card_track("ops", ops["group_hash"])
    status = app.click(track, "manager4321", "silence_4h")["cardData"]["cardParamMap"]
    assert status == {
        "status": "A silence lasts 1h at most here ([oncall] silence_max): nothing was changed."
    }
    assert alertmanager.silences == []
    shown = app.click(track, "manager4321", "silence_1h")["cardData"]["cardParamMap"]
    assert shown["state"] == "silenced" and len(alertmanager.silences) == 1


def test_a_message_without_a_staff_id_acts_as_nobody(desk, app, alertmanager):
    """senderId is the robot's alias for the sender: it names no [person], and a message
    without senderStaffId must not act as a person who has no user_id (李四, a mobile)."""
    bridge = desk()
    number = bridge.numbers["ops"]
    for text in (f"claim {number}", f"silence {number} 1h"):
        assert answer(app, text, user_id="") == (
            "Who wrote this is not known (no senderStaffId): nothing was changed."
        )
    assert acknowledged_by(bridge, "ops") is None and alertmanager.silences == []


def test_a_number_no_incident_can_have_is_answered_and_logs_no_error(desk, app, database, caplog):
    """Beyond the history's BIGINT, or digits that str.isdigit() takes and int() does not: the
    writer is told there is no such incident; no ERROR with a traceback in the log."""
    caplog.set_level(logging.WARNING, logger="alertbridge")
    desk(database=database)
    for written in ("99999999999999999999", "9223372036854775808", "²", "#²", "0", "١٢"):
        for command in ("claim", "silence"):
            reply = answer(app, f"{command} {written} 1h")
            assert reply == f"No open incident #{written.lstrip('#')}.", (command, written)
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR] == []


class Listener:
    """A loopback HTTP server that only counts the requests it gets."""

    def __init__(self):
        self.requests = []
        listener = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                listener.requests.append(self.path)
                self.send_response(200)
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"{}")

        self.http = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.http.serve_forever, args=(0.02,), daemon=True).start()
        self.port = self.http.server_address[1]

    def stop(self):
        self.http.shutdown()
        self.http.server_close()


def test_the_answer_goes_to_no_other_host_and_its_session_is_never_logged(desk, app, caplog):
    caplog.set_level(logging.INFO, logger="alertbridge")
    elsewhere = Listener()
    try:
        desk()
        webhook = f"http://127.0.0.1:{elsewhere.port}/robot/sendBySession?session=S3SSION-T0KEN"
        for _ in range(2):
            say(app, "open", webhook=webhook)
        assert app.reply_to(say(app, "open"))  # [app] api_url's host is answered
        assert elsewhere.requests == []
    finally:
        elsewhere.stop()
    refused = [r.getMessage() for r in caplog.records if "sessionWebhook" in r.getMessage()]
    assert refused == [
        "stream: a command's sessionWebhook points to host=127.0.0.1, neither DingTalk nor "
        "[app] api_url: not answered"
    ]  # once, by host alone
    assert not any("S3SSION-T0KEN" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize(
    "webhook, allowed",
    [
        ("https://oapi.dingtalk.com/robot/sendBySession?session=abc", True),
        ("https://api.dingtalk.com/v1.0/robot/x", True),
        ("https://oapi.dingtalk.com:443/robot/sendBySession", True),
        ("http://127.0.0.1:{port}/session/x", True),  # [app] api_url's scheme, host and port
        ("http://oapi.dingtalk.com/robot/sendBySession", False),
        ("https://oapi.dingtalk.com:8443/robot/sendBySession", False),
        ("https://oapi.dingtalk.com.example.net/robot/sendBySession", False),
        ("https://oapi.dingtalk.com@example.net/robot/sendBySession", False),
        ("https://example.net/?https://oapi.dingtalk.com/", False),
        ("http://127.0.0.1:{other}/session/x", False),
        ("https://127.0.0.1:{port}/session/x", False),
        ("https://oapi.dingtalk.com:port/", False),
        ("https://[::1/", False),
        ("file:///etc/passwd", False),
        ("", False),
    ],
)
def test_only_dingtalk_and_the_api_urls_host_take_a_reply(webhook, allowed):
    api_url = "http://127.0.0.1:9999"
    given = webhook.format(port=9999, other=9998)
    assert alertbridge.reply_allowed(given, api_url) is allowed


def test_a_cards_silence_button_needs_a_person_as_the_command_does(desk, app, alertmanager):
    """Anyone in the group may claim from the card; a silence mutes the alerts for everyone,
    so the card's 🔕 needs a [person], as `silence N` does (a stranger made a 4 h silence)."""
    bridge = desk()
    [ops] = [i for i in bridge.store.incidents(10) if i["route"] == "ops"]
    track = alertbridge.card_track("ops", ops["group_hash"])
    status = app.click(track, "stranger99", "silence_4h")["cardData"]["cardParamMap"]
    assert status["status"].startswith("Only people in [person] may silence")
    assert alertmanager.silences == []
    claimed = app.click(track, "stranger99", "claim")["cardData"]["cardParamMap"]
    assert claimed["state"] == "claimed"


def test_answers_follow_the_receivers_language(desk, app, alertmanager):
    """With language = zh the answers were English (`张三 has it`, `No open incident`)."""
    bridge = desk(oncall="silence_max = 7d", language="zh")
    n = bridge.numbers
    assert answer(app, f"claim {n['db']}") == f"#{n['db']} 不是本群的事件。"
    assert answer(app, "claim 99999") == "没有未结束的事件 #99999。"
    assert answer(app, f"claim {n['ops']}").startswith(f"#{n['ops']}：")
    assert answer(app, f"silence {n['ops']} 2d") == f"#{n['ops']} 已静默 2d（静默 s-1）。"
    assert answer(app, f"silence {n['ops']} 1h", user_id="x-stranger").startswith(
        "只有 [person] 中的人可以静默")
    assert "I am" not in answer(app, "oncall") and "until" not in answer(app, "oncall")


def test_a_listing_and_a_failure_are_told_in_the_groups_language_too(
    desk, app, alertmanager, monkeypatch
):
    """With language = zh, `open` named the states in English (`· acknowledged`) and a command
    or click the history could not serve was answered `Not done: ...`."""
    bridge = desk(language="zh")
    n = bridge.numbers
    assert answer(app, f"claim {n['ops']}").startswith(f"#{n['ops']}：")
    assert answer(app, "open").splitlines()[0] == f"#{n['ops']} DiskFull · 已认领 · 张三"
    assert answer(app, "open", conversation="cid-db") == f"#{n['db']} DiskFull · 未认领\n" + (
        "其他群还有 2 个未结束：open all / 告警 全部")

    def unavailable(*args, **kwargs):
        raise alertbridge.StoreUnavailable("the history does not answer")

    monkeypatch.setattr(bridge.store, "open_incidents", unavailable)
    assert answer(app, "open") == (
        "未完成：StoreUnavailable: the history does not answer。请一分钟后再试。")
    monkeypatch.setattr(bridge.store, "claim", unavailable)
    [ops] = [i for i in bridge.store.incidents(10) if i["route"] == "ops"]
    track = alertbridge.card_track("ops", ops["group_hash"])
    status = app.click(track, "manager4321", "claim")["cardData"]["cardParamMap"]["status"]
    assert status.startswith("未完成：StoreUnavailable")


def test_a_chat_is_refused_another_teams_incident_in_its_own_language(desk, app, alertmanager):
    """FAULTS 9 across languages: ops's group (zh) may not act on db's incident (en), nor db's
    group on ops's; each is told in its own language, and nothing changes. What is done to an
    incident is told in its receiver's."""
    bridge = desk(languages={"ops": "zh", "db": "en", "dev": "en"})
    n = bridge.numbers
    assert answer(app, f"claim {n['db']}") == f"#{n['db']} 不是本群的事件。"
    assert answer(app, f"silence {n['ops']} 1h", conversation="cid-db") == (
        f"#{n['ops']} is not one of this group's incidents."
    )
    assert acknowledged_by(bridge, "ops") is None and acknowledged_by(bridge, "db") is None
    assert alertmanager.silences == []
    assert answer(app, f"claim {n['db']}", user_id="dba007", conversation="cid-db") == (
        f"#{n['db']}: 王五 has it."
    )
    assert answer(app, f"claim {n['ops']}") == f"#{n['ops']}：张三 已认领。"
