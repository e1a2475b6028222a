"""Feishu's custom bot and WeCom's group robot, each a channel of its own, against fakes that
check what the real APIs check (tests/fakechats.py): their wire formats, signing, mentions,
limits, refusals explained; the same pipeline, budgets, storms and crashes as DingTalk's."""

import dataclasses
import io
import json
import re
from datetime import datetime, timedelta, timezone

import pytest

import alertbridge
from tests.fakechats import FakeFeishu, FakeWeCom
from tests.kit import (
    ONCALL,
    ROBOTS,
    ROOT,
    Daemon,
    TcpProxy,
    delivered_ids,
    empty_mysql,
    free_port,
    history,
    kill_mid_storm,
    make_alert,
    make_payload,
    metric,
    post,
    rows,
    settle,
    storm_payloads,
    wait_until,
)
from tests import test_e2e as e2e
from tests.test_delivery import FAST, post_all
from tests.test_e2e import alertmanager  # noqa: F401 (the fixture)
from tests.test_incidents import LINK, claim_request

HOSTILE = "C:\\new \" ' ) ] \n < & \u2028 <at id=all></at> <@all> <font color=red>x</font>"
FEISHU = {
    "fs-1": {"token": "fs-hook-1-0123456789abcdef", "secret": "fs1-signing-secret",
             "keyword": "告警"},
    "fs-2": {"token": "fs-hook-2-0123456789abcdef"},
}
WECOM = {
    "wc-1": {"token": "wc-key-1-0123456789abcdef"},
    "wc-2": {"token": "wc-key-2-0123456789abcdef"},
}


def started(fake_class, robots, **options):
    server = fake_class(**options).start()
    for robot in robots.values():
        server.add_robot(robot["token"], robot.get("secret", ""), robot.get("keyword", ""))
    return server


@pytest.fixture
def feishu():
    server = started(FakeFeishu, FEISHU)
    yield server
    server.stop()


@pytest.fixture
def wecom():
    server = started(FakeWeCom, WECOM)
    yield server
    server.stop()


def robots_at(fake, robots, **keys):
    """The robots' config, at this fake, with more keys (kind, rate_limit) for each."""
    return {name: {**r, "url": fake.url(r["token"]), **keys} for name, r in robots.items()}


def chat_bridge(make_bridge, database, fake, sections, keys=None, options=None, **receiver):
    """A Bridge with these robot sections of one kind, at their fake (`keys`: more of each
    robot's, such as rate_limit; `options`: config_text's), and a receiver ops, every
    receiver's default, of all of them unless `receiver` names its robots."""
    receiver.setdefault("robots", ", ".join(sections))
    return make_bridge(database, robots=robots_at(fake, sections, **(keys or {})),
                       receivers={"ops": receiver}, main={"default_receiver": "ops"},
                       **(options or {}))


def robot_of(fake, robots, name):
    r = robots[name]
    kind = alertbridge.channel_kind(fake.url(r["token"]))
    return alertbridge.Robot(name, fake.url(r["token"]), r.get("secret", ""),
                             r.get("keyword", ""), kind)


def channel(kind):
    return alertbridge.CHANNELS[kind](lambda: alertbridge.Config())


def send(fake, robots, name, request):
    robot = robot_of(fake, robots, name)
    made = channel(robot.kind)
    return made.post(robot, made.encode(request), 5)


CARD = alertbridge.FeishuChannel.card("a title", "告警 text")


# --- Feishu -------------------------------------------------------------------------------


def test_a_feishu_url_is_its_own_kind_and_its_token_never_shown(tmp_path, feishu):
    url = feishu.url("fs-hook-1-0123456789abcdef")
    assert alertbridge.channel_kind(url) == "feishu"
    assert alertbridge.channel_kind(
        "https://open.larksuite.com/open-apis/bot/v2/hook/x") == "feishu"  # Lark's, the same
    path = tmp_path / "config.ini"
    path.write_text(
        "[receiver:ops]\nrobots = fs, apart\n"
        f"[robot:fs]\nurl = {url}\nsecret = s3cret-value\n"
        f"[robot:apart]\nurl = {feishu.url('')}\ntoken = fs-hook-2-0123456789abcdef\n",
        encoding="utf-8",
    )
    config = alertbridge.load_config(str(path))
    fs, apart = config.routes["ops"].robots
    assert apart.url == feishu.url("fs-hook-2-0123456789abcdef") and apart.kind == "feishu"
    summary = alertbridge.check_config(config)
    assert "0123456789abcdef" not in summary and "s3cret" not in summary
    assert "/hook/fs-h***" in summary and "feishu, 100 msgs/60s and 5 msgs/1s" in summary
    path.write_text(f"[receiver:ops]\nrobots = fs\n[robot:fs]\nurl = {feishu.url('')}\n",
                    encoding="utf-8")
    with pytest.raises(alertbridge.ConfigError, match="has no token after /open-apis/bot"):
        alertbridge.load_config(str(path))


def test_feishu_takes_a_signed_card_and_its_refusals_are_read_with_their_fix(feishu):
    assert send(feishu, FEISHU, "fs-1", CARD).ok  # signed, with its keyword
    [taken] = feishu.delivered()
    assert taken.body["card"]["header"]["title"]["content"] == "a title"
    assert set(taken.body) == {"msg_type", "card", "timestamp", "sign"}

    wrong = dict(FEISHU, **{"fs-1": {**FEISHU["fs-1"], "secret": "not-the-secret"}})
    refused = send(feishu, wrong, "fs-1", CARD)
    assert (refused.errcode, refused.outcome) == (19021, alertbridge.MISCONFIGURED)
    assert "签名校验" in alertbridge.FeishuChannel.fix(19021, refused.errmsg, "fs-1")
    no_keyword = send(feishu, FEISHU, "fs-1", alertbridge.FeishuChannel.card("t", "text"))
    assert (no_keyword.errcode, no_keyword.outcome) == (19024, alertbridge.MISCONFIGURED)
    assert "keyword" in alertbridge.FeishuChannel.fix(19024, "", "fs-1")
    unknown = send(feishu, {"x": {"token": "no-such-hook"}}, "x", CARD)
    assert (unknown.errcode, unknown.outcome) == (19001, alertbridge.MISCONFIGURED)
    assert "no-such-hook" not in unknown.errmsg

    answers = [send(feishu, FEISHU, "fs-2", CARD) for _ in range(7)]  # past 5 a second
    throttled = [a for a in answers if not a.ok]
    assert throttled and all(a.outcome == alertbridge.THROTTLED for a in throttled)
    assert {a.rest for a in throttled} == {1.0}  # x-ogw-ratelimit-reset, as the pool rests it
    assert alertbridge.FeishuChannel.outcome(11232) == alertbridge.THROTTLED  # from a send log


def test_a_feishu_group_gets_a_coloured_card_with_buttons_and_mentions(
    make_bridge, feishu, database
):
    bridge = chat_bridge(make_bridge, database, feishu, FEISHU, at_mobiles="13800000000",
                         at_user_ids="feishu:ou_lisi0001", message_type="actionCard")
    alert = make_alert("DiskFull", "db-1", annotations={"description": HOSTILE})
    assert post(bridge, make_payload("ops", [alert]))[0] == 200
    assert feishu.wait_for(lambda f: len(f.delivered()) == 1)
    card = feishu.delivered()[0].body["card"]
    text = card["elements"][0]["content"]
    assert card["header"]["template"] == "red"  # a critical firing
    assert "<at id=ou_lisi0001></at>" in text and "@13800000000" in text
    assert "＜at id=all>" in text and "<at id=all>" not in text  # a label mentions nobody
    assert "<font" not in text and "\u2028" not in text
    assert [b["url"] for b in card["elements"][1]["actions"]]  # Alertmanager's buttons
    resolved = dict(alert, status="resolved", endsAt="2026-11-24T09:00:00Z")
    assert post(bridge, make_payload("ops", [resolved], status="resolved"))[0] == 200
    assert feishu.wait_for(lambda f: len(f.delivered()) == 2)
    assert feishu.delivered()[1].body["card"]["header"]["template"] == "green"
    settle(bridge)
    [row] = history(bridge)
    assert row["status"] == "resolved" and row["notified_count"] == 2


def test_a_long_feishu_message_is_split_to_its_20_kb_never_cut(make_bridge, feishu, sqlite_db):
    bridge = chat_bridge(make_bridge, sqlite_db, feishu, FEISHU, robots="fs-1")
    alerts = [
        make_alert("DiskFull", f"db-{i}", annotations={"description": "磁盘 " * 1200})
        for i in range(12)
    ]
    assert post(bridge, make_payload("ops", alerts))[0] == 200
    settle(bridge)
    taken = feishu.delivered()
    assert len(taken) > 1 and all(r.size <= FakeFeishu.MAX_BYTES for r in taken)
    assert all(alertbridge.TRUNCATED_MARK not in r.text for r in taken)
    assert [r for r in feishu.requests if r.errcode != 0] == []
    assert all(r["notified_count"] == 1 for r in history(bridge)) and len(history(bridge)) == 12


# --- WeCom --------------------------------------------------------------------------------


def test_wecom_takes_markdown_and_its_refusals_are_read_with_their_fix(wecom, tmp_path):
    url = wecom.url("wc-key-1-0123456789abcdef")
    assert alertbridge.channel_kind(url) == "wecom"
    assert alertbridge.WeComChannel.mask(url).endswith("?key=wc-k***")
    markdown = {"msgtype": "markdown", "markdown": {"content": "#### t\n\nbody"}}
    assert send(wecom, WECOM, "wc-1", markdown).ok
    unknown = send(wecom, {"x": {"token": "no-such-key"}}, "x", markdown)
    assert (unknown.errcode, unknown.outcome) == (93000, alertbridge.MISCONFIGURED)
    assert "copy the robot's webhook URL" in alertbridge.WeComChannel.fix(93000, "", "x")
    long = {"msgtype": "markdown", "markdown": {"content": "x" * 4097}}
    assert send(wecom, WECOM, "wc-1", long).outcome == alertbridge.TOO_LONG
    answers = [send(wecom, WECOM, "wc-2", markdown) for _ in range(21)]
    assert answers[-1].errcode == 45009 and answers[-1].outcome == alertbridge.THROTTLED


def test_a_wecom_group_gets_markdown_then_a_text_that_ats_by_phone(make_bridge, wecom, database):
    bridge = chat_bridge(make_bridge, database, wecom, WECOM, at_mobiles="13800000000",
                         at_user_ids="wecom:zhangsan", message_type="actionCard")
    alert = make_alert("DiskFull", "db-1", annotations={"description": HOSTILE})
    assert post(bridge, make_payload("ops", [alert]))[0] == 200
    assert wecom.wait_for(lambda f: len(f.delivered()) == 2)
    markdown, text = (r.body for r in wecom.delivered())
    content = markdown["markdown"]["content"]
    assert markdown["msgtype"] == "markdown" and "<@zhangsan>" not in content  # in the text
    assert "＜@all>" in content and "<@all>" not in content  # a label mentions nobody
    assert "](http" in content  # the buttons, as links
    assert text["msgtype"] == "text" and text["text"]["mentioned_mobile_list"] == ["13800000000"]
    assert text["text"]["mentioned_list"] == ["zhangsan"]
    assert "DiskFull" in text["text"]["content"]
    settle(bridge)
    [row] = history(bridge)
    assert row["notified_count"] == 1


def test_a_wecom_mention_by_user_id_alone_stays_in_the_markdown(make_bridge, wecom, sqlite_db):
    bridge = chat_bridge(make_bridge, sqlite_db, wecom, WECOM, robots="wc-1",
                         at_user_ids="wecom:zhangsan")
    assert post(bridge, make_payload("ops", [make_alert()]))[0] == 200
    settle(bridge)
    [only] = wecom.delivered()
    assert only.body["msgtype"] == "markdown" and "<@zhangsan>" in only.text


def test_a_long_wecom_message_is_split_to_its_4096_bytes_never_cut(make_bridge, wecom, sqlite_db):
    bridge = chat_bridge(make_bridge, sqlite_db, wecom, WECOM)
    alerts = [
        make_alert("DiskFull", f"db-{i}", annotations={"description": "磁盘 " * 150})
        for i in range(8)
    ]
    assert post(bridge, make_payload("ops", alerts))[0] == 200
    settle(bridge)
    taken = wecom.delivered()
    assert len(taken) > 1 and all(len(r.text.encode()) <= 4096 for r in taken)
    assert all(alertbridge.TRUNCATED_MARK not in r.text for r in taken)
    assert [r for r in wecom.requests if r.errcode != 0] == []
    assert len(history(bridge)) == 8


# --- storms, crashes, a mixed receiver ----------------------------------------------------

STORMS = {  # the fake's windows, as the robots' rate_limit says them
    "feishu": (FakeFeishu, FEISHU, ((20, 2.0), (5, 0.5)), "20/2s, 5/0.5s", (11232, 99991400)),
    "wecom": (FakeWeCom, WECOM, ((20, 2.0),), "20/2s", (45009,)),
}


def storm_group(g, per_group=4):
    return make_payload("ops", [
        make_alert(f"Storm{g % 7}", f"storm-{g}-{i}", severity="warning",
                   starts_at="2026-11-24T08:00:00Z")
        for i in range(per_group)
    ])


@pytest.mark.parametrize("kind", sorted(STORMS))
def test_a_storm_uses_each_channels_whole_budget_and_is_never_throttled(
    make_bridge, database, kind
):
    """Webhooks keep coming, five for each message a robot takes, until the robots have sent
    three windows' worth: every slot finds a message waiting, so the robots run at their whole
    budget (less the reserve), in every window, and their platform never throttles them."""
    fake_class, robots, windows, rate_limit, throttles = STORMS[kind]
    fake = started(fake_class, robots, windows=windows)
    try:
        bridge = chat_bridge(make_bridge, database, fake, robots,
                             keys={"rate_limit": rate_limit}, options={"delivery": FAST})
        (count, window), reserve = windows[0], alertbridge.Delivery.reserve
        target, groups = len(robots) * (count - reserve) * 3, 0
        assert post_all(bridge, [storm_group(g) for g in range(30)]) == [200] * 30
        groups = 30
        while len(fake.delivered()) < target:
            taken = len(fake.delivered())
            assert post_all(bridge, [storm_group(g) for g in range(groups, groups + 5)]) == [
                200] * 5
            groups += 5
            assert fake.wait_for(lambda f: len(f.delivered()) > taken, timeout=30)
        expected = {f"storm-{g}-{i}" for g in range(groups) for i in range(4)}
        assert fake.wait_for(lambda f: delivered_ids(f) >= expected, timeout=90)
        settle(bridge, timeout=60)
        assert [r.errcode for r in fake.requests if r.errcode in throttles] == []
        for token in (r["token"] for r in robots.values()):
            assert fake.max_per_window(token, window) >= count - reserve  # the whole budget
            for each, seconds in windows:
                assert fake.max_per_window(token, seconds) <= each  # and never more
        rows = history(bridge)
        assert len(rows) == groups * 4 and min(r["notified_count"] for r in rows) >= 1
    finally:
        fake.stop()


def test_kill_9_with_a_receiver_of_three_kinds_loses_nothing(
    tmp_path, fast_fake, feishu, wecom, database, daemon
):
    robots = {
        "ops-1": ROBOTS["ops-1"],
        **robots_at(feishu, {"fs-2": FEISHU["fs-2"]}, rate_limit="20/1s, 5/1s"),
        **robots_at(wecom, {"wc-1": WECOM["wc-1"]}, rate_limit="20/1s"),
    }
    feishu.windows, wecom.windows = ((20, 1.0), (5, 1.0)), ((20, 1.0),)
    receivers = {"ops": {"robots": "ops-1, fs-2, wc-1"}, "dev": {"robots": "ops-1"}}
    options = dict(database=database, robots=robots, receivers=receivers, delivery=FAST)
    child = daemon(main={"journal_sync": "full"}, **options)
    child.wait_healthy()
    payloads = storm_payloads(groups=120, per_group=10)
    outcome = kill_mid_storm(child, payloads, after=50)
    assert 50 <= sum(o == 200 for o in outcome) < 120  # killed mid-storm

    again = daemon(main={"journal_sync": "full", "port": str(child.port)}, **options)
    try:
        again.wait_healthy()
        for i, payload in enumerate(payloads):  # Alertmanager retries what was not acked
            if outcome[i] != 200:
                assert post(again.url, payload)[0] == 200
        expected = {f"storm-{g}-{i}" for g in range(120) for i in range(10)}

        def everywhere():
            return set().union(*(delivered_ids(f) for f in (fast_fake, feishu, wecom)))

        assert wait_until(lambda: everywhere() >= expected, timeout=90), sorted(
            expected - everywhere()
        )[:5]
        assert all(f.delivered() for f in (fast_fake, feishu, wecom))  # each kind took a turn
        assert wait_until(
            lambda: metric(again.url, "alertbridge_record_backlog_events") == 0, timeout=60
        )
    finally:
        assert again.stop() == 0
    instances = [r["instance"] for r in rows(database, "SELECT instance FROM alerts")]
    assert set(instances) >= expected and len(instances) == 1200
    refusals = [r.errcode for f in (fast_fake, feishu, wecom) for r in f.requests if r.errcode]
    assert refusals == []


def test_the_preview_and_dry_run_show_each_kinds_own_request(tmp_path, feishu, wecom):
    path = tmp_path / "config.ini"
    path.write_text(
        "[receiver:ops]\nrobots = fs, wc\nmessage_type = actionCard\n"
        f"[robot:fs]\nurl = {feishu.url('fs-hook-2-0123456789abcdef')}\n"
        f"[robot:wc]\nurl = {wecom.url('wc-key-1-0123456789abcdef')}\n",
        encoding="utf-8",
    )
    payload = tmp_path / "payload.json"
    payload.write_text(json.dumps(make_payload("ops", [make_alert()])), encoding="utf-8")
    out, err = io.StringIO(), io.StringIO()
    alertbridge.render_payload(alertbridge.load_config(str(path)), str(payload), out, err)
    lines = out.getvalue().splitlines()
    bodies = [json.loads(line) for line in lines if line.startswith("{")]
    assert [b.get("msg_type") or b.get("msgtype") for b in bodies] == ["interactive", "markdown"]
    notes = err.getvalue().splitlines()
    assert [line.split(": ")[0].rsplit(" ", 1)[1] for line in notes if line.startswith("#")] == [
        "fs", "wc"]  # one message: what each robot would get, sized for the narrower
    assert "of 4,096 bytes" in notes[-1]


# --- from a real Alertmanager -------------------------------------------------------------

CHATS = {"feishu": (FakeFeishu, FEISHU), "wecom": (FakeWeCom, WECOM)}


def card_title(request):
    """The title a group's chat list shows: a Feishu card's header, WeCom's first line."""
    if "card" in request.body:
        return request.body["card"]["header"]["title"]["content"]
    return request.text.split("\n")[0].removeprefix("#### ")


@pytest.mark.parametrize("kind", sorted(CHATS))
def test_a_real_alertmanager_pages_a_group_of_each_kind(
    make_bridge, fake, database, alertmanager, kind
):
    fake_class, robots = CHATS[kind]
    chat = started(fake_class, robots)
    try:
        bridge = make_bridge(
            database,
            robots={**robots_at(chat, robots), "dev-1": ROBOTS["dev-1"]},
            receivers={"ops": {"robots": ", ".join(robots)}, "dev": {"robots": "dev-1"}},
        )
        am = alertmanager(bridge.address)
        pushed = e2e.alerts()
        e2e.push(am, pushed)
        assert chat.wait_for(lambda f: len(f.delivered()) == 3, timeout=60), chat.requests
        assert sorted(card_title(r) for r in chat.delivered()) == [
            "[CRITICAL · FIRING:1] DiskFull node",
            "[WARNING · FIRING:1] DiskFull node",
            "[WARNING · FIRING:1] HighLoad node",
        ]
        assert {r.token for r in chat.delivered()} == {r["token"] for r in robots.values()}
        assert fake.wait_for(lambda f: len(f.delivered()) == 1)  # dev's DingTalk robot
        ended = datetime.now(timezone.utc) - timedelta(seconds=1)
        e2e.push(am, [{**a, "endsAt": ended.isoformat()} for a in pushed[:2]])
        assert chat.wait_for(
            lambda f: sum("RESOLVED:1] DiskFull" in card_title(r) for r in f.delivered()) == 2,
            timeout=60,
        )
        settle(bridge)
        rows = {r["instance"]: r for r in history(bridge)}
        assert rows["10.0.0.1:9100"]["status"] == "resolved" and len(rows) == 4
        assert all(s["errcode"] == 0 for s in history(bridge, "notifications"))
    finally:
        chat.stop()


def test_the_docs_feishu_and_wecom_robots_are_flagged_as_placeholders(tmp_path):
    """A robot pasted from docs/channels.md is never called, and --check-config says so."""
    for page in ("docs/channels.md", "docs/channels.zh-CN.md"):
        text = (ROOT / page).read_text(encoding="utf-8")
        sections = re.findall(r"^\[robot:([\w-]+)\]\n((?:\w+ = .+\n)+)", text, re.M)
        assert {kind for name, _ in sections for kind in ("feishu", "wecom") if kind in name} == {
            "feishu", "wecom"}
        for name, keys in sections:
            path = tmp_path / "config.ini"
            path.write_text(f"[receiver:ops]\nrobots = {name}\n[robot:{name}]\n{keys}",
                            encoding="utf-8")
            config = alertbridge.load_config(str(path))
            [robot] = config.routes["ops"].robots
            assert robot.placeholder_key == "token" and robot.kind in name, (page, name)
            assert "PLACEHOLDER TOKEN: not used" in alertbridge.check_config(config)
            only_secret = keys.replace("YOUR_HOOK_TOKEN", "a-real-hook-0123456789")
            if "secret" in keys:
                path.write_text(f"[receiver:ops]\nrobots = {name}\n[robot:{name}]\n{only_secret}",
                                encoding="utf-8")
                [robot] = alertbridge.load_config(str(path)).routes["ops"].robots
                assert robot.placeholder_key == "secret", (page, name)
    hints = {kind: alertbridge.CHANNELS[kind].PLACEHOLDER_HINTS["token"]
             for kind in ("feishu", "wecom")}
    assert "hook" in hints["feishu"] and "key=" in hints["wecom"]


def test_people_are_at_by_each_platforms_id_in_pages_and_escalation_notes(tmp_path):
    """[person] feishu_id and wecom_id: a page and an escalation step's note @ the person by
    the id of the robot's own platform (Feishu in the card, WeCom <@userid> in markdown, or a
    text message when a phone number must be @-ed too)."""
    path = tmp_path / "config.ini"
    path.write_text(
        "[alertbridge]\ndefault_receiver = ops\n"
        "[receiver:ops]\nrobots = fs, wc\nat_people = lisi\n"
        "[person:lisi]\nname = 李四\nfeishu_id = ou_lisi0001\nwecom_id = lisi\n"
        "[person:wang]\nmobile = 13800000009\n"
        "[robot:fs]\nurl = https://open.feishu.cn/open-apis/bot/v2/hook/fs-hook-real-01\n"
        "[robot:wc]\nurl = https://qyapi.weixin.qq.com/cgi-bin/webhook/send?key=wc-key-real-1\n",
        encoding="utf-8",
    )
    config = alertbridge.load_config(str(path))
    route, channels = config.routes["ops"], alertbridge.Channels(lambda: config)
    renderer = alertbridge.Renderer(lambda: config)
    fs, wc = route.robots
    webhook = alertbridge.parse_webhook(json.dumps(make_payload("ops", [make_alert()])).encode())
    body = alertbridge.Body(alerts=tuple(webhook.alerts))
    [page] = renderer.plan(route, body, channels)
    card = alertbridge.request_body(renderer, channels, route, page, fs)
    assert "<at id=ou_lisi0001></at>" in card["card"]["elements"][0]["content"]
    markdown = alertbridge.request_body(renderer, channels, route, page, wc)
    assert "<@lisi>" in markdown["markdown"]["content"]
    note = alertbridge.Body(
        kind=alertbridge.NOTE, title="escalated", note="DiskFull: nobody claimed it",
        mention=alertbridge.Mentions(mobiles=("13800000009",),
                                     user_ids=("feishu:ou_lisi0001", "wecom:lisi")),
    )
    to_feishu = alertbridge.request_body(renderer, channels, route, note, fs)
    assert "<at id=ou_lisi0001></at> @13800000009" in to_feishu["card"]["elements"][0]["content"]
    to_wecom = alertbridge.request_body(renderer, channels, route, note, wc)
    assert to_wecom["msgtype"] == "text"  # a phone number: only a text message can @ it
    assert to_wecom["text"]["mentioned_list"] == ["lisi"]
    assert to_wecom["text"]["mentioned_mobile_list"] == ["13800000009"]


@pytest.mark.parametrize("kind", sorted(CHATS))
def test_a_page_of_enormous_labels_still_fits_and_goes_out(make_bridge, sqlite_db, kind):
    """FAULTS 8: a 6,000-character alertname makes a title, a silence link and buttons longer
    than a WeCom message: the title is cut, buttons that do not fit are left out, and the page
    goes out (a message too long for every robot would have waited until it expired)."""
    fake_class, robots = CHATS[kind]
    chat = started(fake_class, robots)
    try:
        bridge = chat_bridge(make_bridge, sqlite_db, chat, robots, message_type="actionCard")
        payload = make_payload("ops", [make_alert("A" * 6000, "db-1")])
        payload["groupLabels"] = {"alertname": "A" * 6000}
        assert post(bridge, payload)[0] == 200
        assert chat.wait_for(lambda f: len(f.delivered()) == 1), chat.requests
        assert [r.errcode for r in chat.requests] == [0]
        assert "…" in card_title(chat.delivered()[0])
    finally:
        chat.stop()


def test_what_a_kind_cannot_do_is_said_at_load_check_and_start(tmp_path, caplog):
    """FAULTS 12: a WeCom robot with a secret (WeCom does not sign) would check "signed" and
    sign nothing; a Feishu receiver that @s by phone number would check OK and @ nobody."""
    wecom = "https://qyapi.weixin.qq.com/cgi-bin/webhook/send?key=wc-key-real-1"
    path = tmp_path / "config.ini"
    path.write_text(f"[receiver:ops]\nrobots = wc\n[robot:wc]\nurl = {wecom}\nsecret = s\n",
                    encoding="utf-8")
    with pytest.raises(alertbridge.ConfigError, match=r"\[robot:wc\] secret: WeCom robots do not"):
        alertbridge.load_config(str(path))
    path.write_text(
        "[alertbridge]\nport = 0\nstate_dir = state\n"
        "[receiver:ops]\nrobots = fs, wc\nat_mobiles = 13800000000\nat_people = lisi, wang\n"
        "[person:lisi]\nmobile = 13800000001\nfeishu_id = ou_lisi0001\n"
        "[person:wang]\nmobile = 13800000002\n"
        "[robot:fs]\nurl = https://open.feishu.cn/open-apis/bot/v2/hook/fs-hook-real-01\n"
        f"[robot:wc]\nurl = {wecom}\n",
        encoding="utf-8",
    )
    config = alertbridge.load_config(str(path))
    said = ("receiver ops: Feishu robots cannot @ a phone number, so wang, 13800000000 would "
            "only be named: give people feishu_id (or at_user_ids = feishu:ID)")
    assert alertbridge.not_at_by_phone(config) == [said]  # WeCom @s phones in a text message
    assert f"note: {said}" in alertbridge.check_config(config)
    bridge = alertbridge.Bridge(config).start()
    bridge.stop()
    assert said in [r.getMessage() for r in caplog.records]


def test_send_test_reaches_feishu_and_wecom_robots_and_says_what_each_answered(
    tmp_path, feishu, wecom, capsys
):
    """--send-test through each kind's robots (no daemon: directly): the fakes check the
    signature and the keyword; a refusal comes with its fix, and no token is printed."""
    feishu.add_robot("fs-hook-3-signed", "its-own-secret")
    path = tmp_path / "config.ini"
    path.write_text(
        f"[alertbridge]\nport = {free_port()}\nstate_dir = {tmp_path / 'state'}\n"
        "[receiver:ops]\nrobots = fs, bad, wc\n"
        f"[robot:fs]\nurl = {feishu.url(FEISHU['fs-1']['token'])}\n"
        f"secret = {FEISHU['fs-1']['secret']}\nkeyword = 告警\n"
        f"[robot:bad]\nurl = {feishu.url('fs-hook-3-signed')}\nsecret = not-its-secret\n"
        f"[robot:wc]\nurl = {wecom.url(WECOM['wc-1']['token'])}\n",
        encoding="utf-8",
    )
    assert alertbridge.send_test(alertbridge.load_config(str(path)), "ops") == 1
    out = capsys.readouterr().out
    assert out.startswith("directly, through the robots of")
    assert [r.token for r in feishu.delivered()] == [FEISHU["fs-1"]["token"]]
    assert [r.token for r in wecom.delivered()] == [WECOM["wc-1"]["token"]]
    assert "19021" in out and "签名校验" in out  # the refusal, with its fix
    assert "0123456789abcdef" not in out


@pytest.mark.parametrize("kind", sorted(CHATS))
def test_a_page_to_feishu_or_wecom_is_claimed_from_its_link_and_the_group_told(
    make_bridge, sqlite_db, kind
):
    """The claim loop on each kind: the page's Claim link (a card button on Feishu, a link
    line on WeCom) opens the claim page; the claim is noted in the group, through its robots."""
    fake_class, robots = CHATS[kind]
    chat = started(fake_class, robots)
    try:
        bridge = chat_bridge(make_bridge, sqlite_db, chat, robots, options={"extra": ONCALL},
                             claim_links="true", message_type="actionCard")
        payload = make_payload("ops", [make_alert("DiskFull", "db-1")]) | {"groupKey": "g-disk"}
        assert post(bridge, payload)[0] == 200
        assert chat.wait_for(lambda f: len(f.delivered()) == 1)
        token = LINK.search(chat.delivered()[0].text).group(1)
        if kind == "feishu":
            [claim, *_] = chat.delivered()[0].body["card"]["elements"][1]["actions"]
            assert claim["text"]["content"] == "我来处理" and token in claim["url"]
        assert wait_until(lambda: alertbridge.Store(sqlite_db).incidents() != [])
        _, _, cookies = claim_request(bridge, token)
        form = {"person": "zhangsan", "csrf": cookies["alertbridge_csrf"]}
        status, html, _ = claim_request(bridge, token, "POST", form, cookies)
        assert status == 200 and "✅ 张三 已认领" in html
        assert chat.wait_for(lambda f: len(f.delivered()) == 2)
        assert "张三" in chat.delivered()[1].text  # the note, in the group's own format
    finally:
        chat.stop()


def test_two_instances_cut_apart_keep_to_each_feishu_window_together(tmp_path, feishu):
    """HA on Feishu's two windows: the instance cut off from MySQL sends alone with half of
    each window, and the leader, presuming so, keeps to its half: together never over 8 per
    2 s nor 2 per 0.25 s (Feishu's 100/min and 5/s, scaled), and no page lost."""
    from tests import test_cluster as ha

    feishu.windows = ((8, 2.0), (2, 0.25))
    robots = robots_at(feishu, FEISHU, rate_limit="8/2s, 2/0.25s")
    settings = empty_mysql()
    proxies = [TcpProxy(settings.port).start() for _ in range(2)]
    children = []
    for number, (name, proxy) in enumerate(zip(("a", "b"), proxies)):
        directory = tmp_path / f"{number}-{name}"
        directory.mkdir()
        children.append(Daemon(
            directory, feishu.url, dataclasses.replace(settings, port=proxy.port),
            delivery=ha.SMALL, extra=ha.cluster(name), robots=robots,
            receivers={"ops": {"robots": "fs-1, fs-2"}, "dev": {"robots": "fs-2"}},
        ))
    try:
        for child in children:
            child.wait_healthy()
        leader = ha.leader_of(children)
        cut = children.index(next(c for c in children if c is not leader))
        proxies[cut].cut()
        payloads = storm_payloads(groups=40, per_group=5)
        for payload in payloads[:8]:
            assert [post(c.url, payload)[0] for c in children] == [200, 200]
        assert wait_until(lambda: ha.role(children[cut]) == "alone", timeout=30)
        for payload in payloads[8:]:
            assert [post(c.url, payload)[0] for c in children] == [200, 200]
        expected = ha.storm_ids(40, 5)
        assert feishu.wait_for(lambda f: set(ha.accepted_ids(f)) >= expected, timeout=120)
        assert wait_until(lambda: ha.idle(feishu, quiet=3), timeout=60)
        assert [r.errcode for r in feishu.requests if r.errcode] == []
        for token in (r["token"] for r in FEISHU.values()):
            assert feishu.max_per_window(token, 2.0) <= 8
            assert feishu.max_per_window(token, 0.25) <= 2
    finally:
        for child in children:
            child.kill()


def test_the_dry_run_counts_what_each_platform_counts(tmp_path):
    """FAULTS 12: a WeCom message of 4,094 bytes of content (its body 4,150) was shown as over
    its 4,096 bytes, in red on the preview: WeCom counts the content, not the body."""
    path = tmp_path / "config.ini"
    path.write_text(
        "[alertbridge]\nport = 0\nstate_dir = state\ndefault_receiver = ops\n"
        "[receiver:ops]\nrobots = wc\n"
        "[robot:wc]\nurl = https://qyapi.weixin.qq.com/cgi-bin/webhook/send?key=wc-key-real-1\n",
        encoding="utf-8",
    )
    payload = make_payload("ops", [make_alert("A" * 6000, "x")])
    payload["groupLabels"] = {"alertname": "A" * 6000}
    (tmp_path / "big.json").write_text(json.dumps(payload), encoding="utf-8")
    out, err = io.StringIO(), io.StringIO()
    config = alertbridge.load_config(str(path))
    alertbridge.render_payload(config, str(tmp_path / "big.json"), out, err)
    [body] = [json.loads(line) for line in out.getvalue().splitlines()]
    content = len(body["markdown"]["content"].encode())
    assert content <= 4096 < len(json.dumps(body, ensure_ascii=False).encode())
    assert f"{content:,} of 4,096 bytes" in err.getvalue()
    bridge = alertbridge.Bridge(config).start()
    try:
        status, html = bridge.preview.preview(form={"payload": json.dumps(payload)})
    finally:
        bridge.stop()
    assert status == 200 and f"<span class='ok'>{content:,} of 4,096 bytes" in html
