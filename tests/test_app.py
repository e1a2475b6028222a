"""The DingTalk app robot: the standard-library WebSocket client against a real WebSocket server
(the `websockets` package), the Stream connection against a fake gateway (tickets, pings,
disconnect, a half-open socket), pages as interactive cards that a click claims, commands
written to the robot, and the custom robots as the fallback when the app's API fails."""

import json
import socket
import sqlite3
import threading
import time

import pytest
import websockets.sync.server

import alertbridge
from tests.kit import (
    APP_PEOPLE,
    app_config,
    config_text,
    get,
    make_alert,
    make_payload,
    post,
    wait_until,
)
from tests.test_incidents import FIRING, RESOLVED, Recorder, group
from tests.test_service import cli


def metrics(bridge):
    return get(bridge.address, "/metrics")[1]


# ---- the WebSocket client, against a real server


@pytest.fixture
def server():
    """A websockets server; `behave(ws)` runs for each connection (echo by default)."""
    state = {"behave": lambda ws: [ws.send(m) for m in ws]}

    def handler(ws):
        state["behave"](ws)

    with websockets.sync.server.serve(handler, "127.0.0.1", 0, max_size=8 << 20) as srv:
        threading.Thread(target=srv.serve_forever, daemon=True).start()
        state["url"] = f"ws://127.0.0.1:{srv.socket.getsockname()[1]}/path?ticket=x"
        yield state
        srv.shutdown()


def test_the_client_shakes_hands_and_exchanges_small_and_large_masked_messages(server):
    ws = alertbridge.WebSocket.connect(server["url"], timeout=5)
    for size in (
        0,
        5,
        125,
        126,
        65535,
        65536,
        1_000_000,
    ):  # 7-bit, 16-bit and 64-bit lengths
        text = ("页" * size)[:size]
        ws.send_text(text)
        assert ws.recv(timeout=5) == text
    ws.close()


def test_a_fragmented_message_arrives_whole_and_a_ping_in_between_is_answered(server):
    pongs = []

    def behave(ws):
        ws.recv()
        ws.send(["frag", "mented ", "mess", "age"])  # four frames: text, then continuations
        pongs.append(ws.ping(b"are you there").wait(5))
        ws.send("after the ping")
        ws.recv()

    server["behave"] = behave
    ws = alertbridge.WebSocket.connect(server["url"], timeout=5)
    ws.send_text("go")
    assert ws.recv(timeout=5) == "fragmented message"
    assert ws.recv(timeout=5) == "after the ping"  # the ping was answered on the way
    assert pongs == [True]
    ws.send_text("bye")
    ws.close()


def test_a_close_from_the_server_ends_recv_and_a_timeout_keeps_what_arrived(server):
    def behave(ws):
        ws.recv()
        ws.close(1001, "going away")

    server["behave"] = behave
    ws = alertbridge.WebSocket.connect(server["url"], timeout=5)
    with pytest.raises(socket.timeout):
        ws.recv(timeout=0.05)  # nothing yet: a timeout, the connection still up
    ws.send_text("now")
    with pytest.raises(alertbridge.WebSocketClosed, match="1001"):
        ws.recv(timeout=5)


def test_a_server_that_does_not_speak_websocket_is_refused():
    listener = socket.create_server(("127.0.0.1", 0))

    def answer():
        conn, _ = listener.accept()
        conn.recv(4096)
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
        conn.close()

    threading.Thread(target=answer, daemon=True).start()
    with pytest.raises(alertbridge.WebSocketClosed, match="200 OK"):
        alertbridge.WebSocket.connect(f"ws://127.0.0.1:{listener.getsockname()[1]}/", timeout=5)
    listener.close()


# ---- the app, end to end in one process


def app_bridge(make_bridge, sqlite_db, app, extra=""):
    receivers = {
        "ops": {
            "robots": "ops-1, ops-2",
            "app_group": "cid-ops",
            "at_severities": "critical",
        },
        "dev": {"robots": "dev-1"},
    }
    return make_bridge(sqlite_db, receivers=receivers, extra=app_config(app) + APP_PEOPLE + extra)


def firing(instance="node-1:9100", status="firing"):
    return make_payload("ops", [make_alert("DiskFull", instance, status=status)])


def test_a_page_is_a_card_a_click_claims_it_as_the_clicker_and_the_card_changes(
    make_bridge, sqlite_db, app, fake
):
    bridge = app_bridge(make_bridge, sqlite_db, app)
    assert wait_until(lambda: app.connections == 1, timeout=10)
    assert post(bridge.address, firing())[0] == 200
    assert wait_until(lambda: app.cards, timeout=10)
    [(track, card)] = app.cards.items()
    assert card["body"]["openSpaceId"] == "dtv1.card//IM_GROUP.cid-ops"
    assert card["body"]["callbackType"] == "STREAM"
    assert "DiskFull" in card["params"]["title"] and card["params"]["state"] == "open"
    assert fake.delivered() == []  # the card went instead of a robot message
    assert wait_until(lambda: bridge.store.open_incident("ops", track.split(".")[1]), timeout=10)

    answer = app.click(track, "manager4321")
    assert answer["cardData"]["cardParamMap"]["state"] == "claimed"
    assert "张三" in answer["cardData"]["cardParamMap"]["status"]
    incident = bridge.store.open_incident("ops", track.split(".")[1])
    assert incident["state"] == "acknowledged" and incident["acknowledged_by"] == "zhangsan"
    assert "alertbridge_time_to_acknowledge_seconds_count" in metrics(bridge)

    updates = len(card["updates"])
    assert post(bridge.address, firing())[0] == 200  # the group again (repeat_interval)
    assert wait_until(lambda: len(card["updates"]) > updates, timeout=10)
    assert card["params"]["state"] == "claimed"  # the claim stays shown

    assert post(bridge.address, firing(status="resolved"))[0] == 200  # resolved: same card
    assert wait_until(lambda: card["params"]["state"] == "resolved", timeout=10)
    assert len(app.cards) == 1 and fake.delivered() == []


def test_whoever_a_card_cannot_mention_hears_the_page_through_the_robots(
    make_bridge, sqlite_db, app, fake
):
    """A card @-mentions DingTalk user ids only: a page's @ by mobile number (at_mobiles, a
    person with only a mobile) was silently dropped when the page became a card."""
    receivers = {
        "ops": {
            "robots": "ops-1",
            "app_group": "cid-ops",
            "at_mobiles": "13800000000",
            "at_people": "zhangsan",
            "at_severities": "critical",
        },
        "dev": {"robots": "dev-1"},
    }
    bridge = make_bridge(sqlite_db, receivers=receivers, extra=app_config(app) + APP_PEOPLE)
    assert post(bridge.address, firing())[0] == 200
    assert wait_until(lambda: app.cards, timeout=10)
    [card] = app.cards.values()
    assert card["body"]["imGroupOpenDeliverModel"]["atUserIds"] == {"manager4321": "manager4321"}
    assert fake.wait_for(lambda f: len(f.delivered()) == 1)
    [note] = fake.delivered()
    assert note.body["at"]["atMobiles"] == ["13800000000"] and "@13800000000" in note.text
    assert "DiskFull" in note.text and "告警卡片见上" in note.text
    journal = sqlite3.connect(bridge.config.service.journal)
    rows = journal.execute("SELECT request_id, claims FROM messages ORDER BY id").fetchall()
    journal.close()
    [(_, page_claims), (beside, note_claims)] = rows  # the @ note carries the page's claims:
    assert beside.startswith("card-mention:") and note_claims == page_claims != ""  # once sent
    assert post(bridge.address, firing())[0] == 200  # the group again: the card, no new note
    assert wait_until(lambda: card["updates"], timeout=10)
    assert len(fake.delivered()) == 1


def test_when_the_card_api_fails_the_page_goes_through_the_robots(
    make_bridge, sqlite_db, app, fake
):
    app.card_failures = [500]
    bridge = app_bridge(make_bridge, sqlite_db, app)
    assert post(bridge.address, firing())[0] == 200
    assert wait_until(lambda: fake.delivered(), timeout=10)
    assert "DiskFull" in fake.delivered()[0].text and not app.cards
    assert 'api="card",outcome="refused"' in metrics(bridge)

    app.card_failures = [403]  # the app's rate limit: the robots meanwhile, nothing lost
    assert post(bridge.address, firing("node-2:9100"))[0] == 200
    assert wait_until(lambda: len(fake.delivered()) == 2, timeout=10)
    assert 'outcome="throttled"' in metrics(bridge)
    assert "QpsLimitForApi" in get(bridge.address, "/")[1]  # the status page says why


def test_a_card_created_but_not_delivered_to_the_group_goes_through_the_robots(
    make_bridge, sqlite_db, app, fake
):
    """createAndDeliver succeeds when the card is created, and says per group whether it was
    delivered: the robot not in the group (or a wrong app_group) is a page nobody saw."""
    app.groups_without_robot.add("cid-ops")
    bridge = app_bridge(make_bridge, sqlite_db, app)
    assert post(bridge.address, firing())[0] == 200
    assert wait_until(lambda: fake.delivered(), timeout=10)
    assert "DiskFull" in fake.delivered()[0].text and not app.cards
    assert 'api="card",outcome="refused"' in metrics(bridge)
    page = get(bridge.address, "/")[1]
    assert "robot is not a member of the group" in page
    assert 'last error <span class="t">' in page  # when: an old error is not taken for a new one

    app.groups_without_robot.clear()  # the robot added to the group: the next page is a card
    assert post(bridge.address, firing("node-2:9100"))[0] == 200
    assert wait_until(lambda: app.cards, timeout=10)
    assert len(fake.delivered()) == 1


def test_an_expired_token_is_fetched_again_and_the_card_still_goes(
    make_bridge, sqlite_db, app, fake
):
    bridge = app_bridge(make_bridge, sqlite_db, app)
    assert post(bridge.address, firing())[0] == 200
    assert wait_until(lambda: len(app.cards) == 1, timeout=10)
    app.expire_tokens()  # DingTalk refuses the token it gave (401)
    assert post(bridge.address, firing("node-2:9100"))[0] == 200
    assert wait_until(lambda: app.calls["/v1.0/oauth2/accessToken"] == 2, timeout=10)
    assert wait_until(lambda: sum(len(c["updates"]) for c in app.cards.values()) == 1, timeout=10)
    assert fake.delivered() == []


def test_the_stream_answers_pings_reconnects_on_disconnect_and_leaves_a_half_open_socket(
    make_bridge, sqlite_db, app, monkeypatch
):
    monkeypatch.setattr(alertbridge.StreamClient, "PING_EVERY", 0.2)
    monkeypatch.setattr(alertbridge.StreamClient, "DEAD_AFTER", 1.0)
    monkeypatch.setattr(alertbridge.StreamClient, "LOOK", 0.1)
    bridge = app_bridge(make_bridge, sqlite_db, app)
    assert wait_until(lambda: app.connections == 1, timeout=10)
    answer = app.ask("SYSTEM", "ping", json.dumps({"opaque": "abc"}))
    assert answer["code"] == 200 and json.loads(answer["data"]) == {"opaque": "abc"}

    app.disconnect()  # the gateway asks: a new ticket, a new connection, at once
    assert wait_until(lambda: app.connections == 2, timeout=10)
    # the gateway counts a connection before the client has the handshake's answer: frozen
    # then, the client's handshake (not a connection) would hang, and heal at the thaw
    assert app.ask("SYSTEM", "ping", "{}")["code"] == 200

    app.freeze()  # half-open: no byte either way; the client's pings go unanswered
    started = time.monotonic()
    assert wait_until(lambda: bridge.stream.socket is None, timeout=10)
    assert time.monotonic() - started < 5  # DEAD_AFTER (1 s here, 50 s in production)
    assert wait_until(lambda: "no Stream connection" in get(bridge.address, "/")[1], timeout=20)
    app.thaw()
    assert wait_until(lambda: app.connections == 3, timeout=20)
    assert app.ask("SYSTEM", "ping", "{}")["code"] == 200
    status = get(bridge.address, "/")[1]
    assert "DingTalk app ding-app" in status and "no Stream connection" not in status
    assert "ops → cid-ops" in status


def test_a_frame_seen_again_gets_the_same_answer_and_fragments_are_joined(
    make_bridge, sqlite_db, app
):
    bridge = app_bridge(make_bridge, sqlite_db, app)
    assert wait_until(lambda: app.connections == 1, timeout=10)
    first = app.ask("CALLBACK", "/v1.0/card/instances/callback", {"outTrackId": "x"}, "m-1")
    again = app.ask("CALLBACK", "/v1.0/card/instances/callback", {"outTrackId": "x"}, "m-1")
    assert first == again
    app.send_fragmented(
        {
            "type": "SYSTEM",
            "headers": {"topic": "ping", "messageId": "m-2"},
            "data": json.dumps({"pad": "x" * 100_000}),
        }
    )
    answer = app.answers.get(timeout=10)
    assert answer["headers"]["messageId"] == "m-2" and len(answer["data"]) > 100_000
    assert bridge.stream.socket is not None


def test_commands_written_to_the_robot_claim_list_and_tell_who_is_on_call(
    make_bridge, sqlite_db, app
):
    rotation = "\n[rotation:primary]\npeople = zhangsan\nstart = 2026-11-30\n"
    bridge = app_bridge(make_bridge, sqlite_db, app, extra=rotation)
    assert wait_until(lambda: app.connections == 1, timeout=10)
    assert post(bridge.address, firing())[0] == 200
    assert wait_until(lambda: bridge.store.incidents(10), timeout=10)
    number = bridge.store.incidents(10)[0]["id"]
    listing = app.reply_to(app.write("告警", "manager4321"))["text"]["content"]
    assert f"#{number}" in listing and "DiskFull" in listing
    reply = app.reply_to(app.write(f"认领 {number}", "manager4321"))["text"]["content"]
    assert "张三" in reply
    assert bridge.store.incidents(10)[0]["acknowledged_by"] == "zhangsan"
    helped = app.reply_to(app.write("what?", "someone"))["text"]["content"]
    assert "claim N" in helped and "认领 N" in helped
    assert "app_group = cid-ops" in helped  # how a team learns its group's id
    for word in ("值班", "oncall"):
        assert "primary：张三 值班至" in app.reply_to(app.write(word, "x"))["text"]["content"]
    assert app.reply_to(app.write("claim 999", "x"))["text"]["content"] == "没有未结束的事件 #999。"


def test_commands_find_an_open_incident_older_than_many_newer_ones(make_bridge, sqlite_db, app):
    """`open` and `claim N` read the open incidents themselves: they looked among the newest
    100 and 200 incidents, so an incident still open behind busier groups was "not open"."""
    bridge = app_bridge(make_bridge, sqlite_db, app)
    assert wait_until(lambda: app.connections == 1, timeout=10)
    recorder = Recorder(bridge.store, "j-test")
    recorder.webhook(group(FIRING, key="old"), "2026-11-24 08:00:00")
    for n in range(230):  # busier groups since: 200 came and went, 30 still open
        recorder.webhook(group(FIRING, key=f"k{n}"), "2026-11-24 08:01:00")
        if n < 200:
            recorder.webhook(group(RESOLVED, key=f"k{n}"), "2026-11-24 08:02:00")
    [old] = [i for i in bridge.store.incidents(1000) if i["state"] == "open"][-1:]
    listing = app.reply_to(app.write("open", "manager4321"))["text"]["content"]
    assert listing.count("\n#") == 19 and listing.endswith("…另有 11 个更早的。")
    reply = app.reply_to(app.write(f"claim {old['id']}", "manager4321"))["text"]["content"]
    assert reply == f"#{old['id']}：张三 已认领。"
    assert bridge.store.incident(old["id"])["acknowledged_by"] == "zhangsan"


def test_open_lists_the_groups_own_incidents_and_a_failure_is_answered(
    make_bridge, sqlite_db, app, monkeypatch
):
    """`open` in a group lists the incidents of the receivers whose cards go there (and says how
    many are open elsewhere); `open all` lists every one. A command the history cannot answer
    gets a reply saying so, not silence."""
    bridge = app_bridge(make_bridge, sqlite_db, app)
    assert wait_until(lambda: app.connections == 1, timeout=10)
    recorder = Recorder(bridge.store, "j-test")
    recorder.webhook(group(FIRING, key="o"), "2026-11-24 08:00:00")
    dev = alertbridge.Route("dev", ())
    recorder.webhook(group(FIRING, key="d", receiver="dev"), "2026-11-24 08:01:00", route=dev)
    ops, other = sorted(bridge.store.incidents(10), key=lambda i: i["route"] != "ops")

    here = app.reply_to(app.write("open", "x"))["text"]["content"]
    assert here.splitlines() == [
        f"#{ops['id']} {ops['title']} · 未认领",
        "其他群还有 1 个未结束：open all / 告警 全部",
    ]
    for words in ("open all", "告警 全部"):
        everywhere = app.reply_to(app.write(words, "x"))["text"]["content"]
        assert everywhere.splitlines() == [
            f"#{other['id']} {other['title']} · 未认领",
            f"#{ops['id']} {ops['title']} · 未认领",
        ]
    no_receiver = app.reply_to(app.write("open", "x", conversation="cid-elsewhere"))
    assert no_receiver["text"]["content"] == everywhere  # a group no receiver names: all

    def unavailable(*args, **kwargs):
        raise alertbridge.StoreUnavailable("the history does not answer")

    monkeypatch.setattr(bridge.store, "open_incidents", unavailable)
    failed = app.reply_to(app.write("open", "x"))["text"]["content"]
    assert failed.startswith("未完成：StoreUnavailable: the history does not answer。")  # zh
    monkeypatch.setattr(bridge.store, "claim", unavailable)  # a click: told on the card
    track = alertbridge.card_track("ops", ops["group_hash"])
    status = app.click(track, "manager4321")["cardData"]["cardParamMap"]["status"]
    assert status.startswith("未完成：StoreUnavailable: the history does not answer。")


def test_send_test_sends_a_card_too_and_says_whether_the_group_got_it(daemon, app, fake):
    """--send-test proves the whole path of a route: its robots, and with app_group a card
    delivered to the group (credentials, template, the robot in the group), through the running
    daemon or, without one, directly."""
    receivers = {"ops": {"robots": "ops-1", "app_group": "cid-ops"}, "dev": {"robots": "dev-1"}}
    child = daemon(receivers=receivers, extra=app_config(app) + APP_PEOPLE)
    child.wait_healthy()
    through = cli("--send-test", "ops", config=child.config)  # the running daemon sends it
    assert through.returncode == 0, through.stdout + through.stderr
    how, robot, card = through.stdout.splitlines()
    assert how.startswith(f"via the daemon on :{child.port}, its config loaded at ")
    assert card == "app card to cid-ops: delivered (template alerts.schema)"
    child.wait_log("route=ops send-test: ")
    [card] = app.cards.values()
    assert "AlertbridgeTest" in card["params"]["markdown"] and len(fake.delivered()) == 1
    assert wait_until(lambda: app.connections == 1, timeout=10)
    answer = app.click(card["body"]["outTrackId"], "manager4321")  # a test card: nothing open
    assert "没有未结束的事件" in answer["cardData"]["cardParamMap"]["status"]  # language = zh

    app.groups_without_robot.add("cid-ops")
    assert child.stop() == 0
    alone = cli("--send-test", "ops", config=child.config)  # no daemon: sent from the command
    assert alone.returncode == 1
    assert alone.stdout.splitlines()[-1] == (
        "app card to cid-ops: NOT delivered: the card was not delivered to IM_GROUP cid-ops: "
        "robot is not a member of the group"
    )
    assert cli("--send-test", "dev", config=child.config).returncode == 0  # no app_group


def test_the_app_needs_its_credentials_and_a_template(tmp_path):
    path = tmp_path / "config.ini"
    path.write_text(
        "[receiver:ops]\nrobots = r\napp_group = cid-1\n"
        "[robot:r]\nurl = https://oapi.dingtalk.com/robot/send?access_token=t\n",
        encoding="utf-8",
    )
    with pytest.raises(alertbridge.ConfigError, match=r"app_group: set \[app\] client_id"):
        alertbridge.load_config(str(path))
    path.write_text(path.read_text() + "[app]\nclient_id = x\n", encoding="utf-8")
    with pytest.raises(alertbridge.ConfigError, match="set both"):
        alertbridge.load_config(str(path))


def test_check_app_fetches_a_token_and_a_ticket_and_says_why_not(tmp_path, app, capsys):
    path = tmp_path / "config.ini"
    base = (
        "[receiver:ops]\nrobots = r\napp_group = cid-1\n"
        "[robot:r]\nurl = https://oapi.dingtalk.com/robot/send?access_token=t\n"
        f"[app]\nclient_id = {app.client_id}\ncard_template = t\napi_url = {app.url}\n"
    )
    path.write_text(base + f"client_secret = {app.client_secret}\n", encoding="utf-8")
    assert alertbridge.main(["-c", str(path), "--check-app"]) == 0
    said = capsys.readouterr().out
    assert "token OK" in said and "Stream ticket OK" in said and app.client_secret not in said
    assert alertbridge.main(["-c", str(path), "--check-config"]) == 0
    said = capsys.readouterr().out
    assert f"app {app.client_id} (secret set): cards for receivers ops" in said
    assert app.client_secret not in said
    path.write_text(base + "client_secret = wrong-secret\n", encoding="utf-8")
    assert alertbridge.main(["-c", str(path), "--check-app"]) == 1
    said = capsys.readouterr().out
    assert "NOT OK: HTTP 400 invalidClientIdOrSecret" in said and "wrong-secret" not in said


def test_an_escalation_step_dings_its_people_through_the_app(make_bridge, sqlite_db, app, fake):
    receivers = {
        "ops": {"robots": "ops-1", "app_group": "cid-ops", "escalation": "fast"},
        "dev": {"robots": "dev-1"},
    }
    escalation = "\n[escalation:fast]\nsteps =\n    1s = zhangsan\n"
    bridge = make_bridge(
        sqlite_db,
        receivers=receivers,
        extra=app_config(app) + "ding = call\n" + APP_PEOPLE + escalation,
    )
    assert post(bridge.address, firing())[0] == 200
    assert wait_until(lambda: app.dings, timeout=30)
    [ding] = app.dings
    assert ding["receiverUserIdList"] == ["manager4321"] and ding["remindType"] == 3
    assert "DiskFull" in ding["content"]
    # the step's message still goes to the group, @-mentioning him
    assert fake.wait_for(lambda f: any("升级第 1 步" in m.text for m in f.delivered()))


def test_check_config_names_the_escalation_people_a_ding_cannot_reach(tmp_path, app):
    """`ding = call` with a step whose person has only a mobile: --check-config said OK and the
    DING silently skipped him."""
    path = tmp_path / "config.ini"
    path.write_text(
        config_text(
            lambda token: f"http://127.0.0.1:9/robot/send?access_token={token}",
            alertbridge.Database(driver="sqlite", path=str(tmp_path / "h.db")),
            receivers={
                "ops": {"robots": "ops-1", "escalation": "fast"},
                "dev": {"robots": "dev-1"},
            },
            extra=app_config(app)
            + "ding = call\n"
            + APP_PEOPLE
            + "\n[person:lisi]\nname = 李四\nmobile = 13800000002\n"
            + "\n[rotation:nights]\npeople = zhangsan, lisi\nstart = 2026-11-30\n"
            + "\n[escalation:fast]\nsteps =\n    5m = rotation:nights\n",
        ),
        encoding="utf-8",
    )
    result = cli("--check-config", config=path)
    assert result.returncode == 0, result.stderr
    assert (
        "note: escalation steps reach lisi without a user_id: DING cannot reach them"
        in result.stdout
    )


def test_a_token_is_kept_until_shortly_before_it_expires_then_fetched_again(tmp_path, app):
    path = tmp_path / "config.ini"
    path.write_text(
        "[receiver:ops]\nrobots = r\n"
        "[robot:r]\nurl = https://oapi.dingtalk.com/robot/send?access_token=t\n" + app_config(app),
        encoding="utf-8",
    )
    config = alertbridge.load_config(str(path))
    now = [1000.0]
    api = alertbridge.AppAPI(lambda: config, alertbridge.Metrics(), clock=lambda: now[0])
    first = api.token()
    now[0] += 7200 - 301  # expireIn is 7200 s: kept until 300 s before
    assert api.token() == first and app.calls["/v1.0/oauth2/accessToken"] == 1
    now[0] += 2
    assert api.token() != first and app.calls["/v1.0/oauth2/accessToken"] == 2


def test_a_card_is_a_send_like_a_robots_and_its_title_is_escaped_like_its_markdown(
    make_bridge, sqlite_db, app, fake
):
    """A page that went as a card is in the send log, the delivery metrics and the history's
    notifications, as one through a robot; an alertname with markdown in it shows as written in
    the card's title, as in its text (not bold, no link)."""
    bridge = app_bridge(make_bridge, sqlite_db, app)
    name = "Disk**Full**[x](http://evil)"
    payload = make_payload("ops", [make_alert(name, "node-1:9100", severity="warning")])
    assert post(bridge.address, payload)[0] == 200
    assert wait_until(lambda: app.cards, timeout=10)
    [card] = app.cards.values()
    assert "Disk\\*\\*Full\\*\\*\\[x\\](http://evil)" in card["params"]["title"]
    assert "**Full**" not in card["params"]["title"] + card["params"]["markdown"]
    delivered = 'alertbridge_alerts_delivered_total{receiver="ops"} 1'
    assert wait_until(lambda: delivered in metrics(bridge), timeout=10)
    exposed = metrics(bridge)
    assert 'alertbridge_sends_total{errcode="0",kind="dingtalk",receiver="ops",robot="app"} 1' in (
        exposed
    )
    assert "alertbridge_delivery_seconds_count" in exposed
    assert wait_until(lambda: alertbridge.Store(sqlite_db).incidents(), timeout=10)
    from tests.kit import history

    assert wait_until(lambda: history(bridge, "notifications"), timeout=10)
    [sent] = history(bridge, "notifications")
    assert (sent["robot"], sent["errcode"], sent["alerts"]) == ("app", 0, 1)


def test_a_command_whose_reply_hangs_holds_no_click(make_bridge, sqlite_db, app, fake):
    """Commands are answered off the Stream connection's thread: while the reply to one hangs
    (a slow sessionWebhook, [app] timeout 30 s), a card's click is still answered at once."""
    receivers = {"ops": {"robots": "ops-1", "app_group": "cid-ops"}, "dev": {"robots": "dev-1"}}
    extra = app_config(app).replace("timeout = 5", "timeout = 30") + APP_PEOPLE
    bridge = make_bridge(sqlite_db, receivers=receivers, extra=extra)
    assert wait_until(lambda: app.connections == 1, timeout=10)
    assert post(bridge.address, firing())[0] == 200
    assert wait_until(lambda: app.cards, timeout=10)
    [track] = app.cards
    assert wait_until(lambda: bridge.store.open_incident("ops", track.split(".")[1]), timeout=10)
    app.replies_held.clear()
    try:
        app.write("oncall", "manager4321")  # its reply hangs
        answer = app.click(track, "manager4321")  # within 10 s
        assert answer["cardData"]["cardParamMap"]["state"] == "claimed"
        assert app.replies == []
    finally:
        app.replies_held.set()


def test_a_burst_of_commands_while_replies_hang_is_two_threads_and_a_bounded_wait(
    make_bridge, sqlite_db, app, fake, caplog
):
    """Each command had a thread of its own: 1,500 messages while replies hung were 759
    threads at once. Two threads answer, 100 commands wait; the rest are logged, not kept."""
    bridge = app_bridge(make_bridge, sqlite_db, app)
    assert wait_until(lambda: app.connections == 1, timeout=10)
    app.replies_held.clear()
    try:
        sessions = [app.write("oncall", "manager4321") for _ in range(150)]
        assert wait_until(lambda: "commands wait for an answer already" in caplog.text, 30)
        assert sorted(t.name for t in bridge.app_desk.workers()) == ["command-1", "command-2"]
    finally:
        app.replies_held.set()
    assert app.reply_to(sessions[0])["text"]["content"]  # the first ones are answered
    assert bridge.stream.is_alive()
