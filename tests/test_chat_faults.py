"""Hostile pass over the Feishu and WeCom channels and the per-window budgets (issue 35).
Each test here fails on the code it was written against."""

import json

import pytest

import alertbridge
from alertbridge import Delivery, Robot, RobotPool, Route, SendResult
from tests.kit import make_alert, make_payload

FS = "https://open.feishu.cn/open-apis/bot/v2/hook/fs-hook-1-0123456789abcdef"
WC = "https://qyapi.weixin.qq.com/cgi-bin/webhook/send?key=wc-key-1-0123456789abcdef"
DT = "https://oapi.dingtalk.com/robot/send?access_token=dt-token-0123456789abcdef"
T0 = 1_000_000.0


def load(tmp_path, receiver, robots):
    text = "[alertbridge]\ndefault_receiver = ops\n[receiver:ops]\n" + receiver + "\n"
    for name, body in robots.items():
        text += f"[robot:{name}]\n{body}\n"
    path = tmp_path / "config.ini"
    path.write_text(text, encoding="utf-8")
    return alertbridge.load_config(str(path))


def requests(config, payload):
    """(body kind, robot name, request, encoded) for every robot and every body planned."""
    route = config.routes["ops"]
    renderer = alertbridge.Renderer(lambda: config)
    channels = alertbridge.Channels(lambda: config)
    webhook = alertbridge.parse_webhook(json.dumps(payload).encode())
    out = []
    for _, body in alertbridge.bodies_of(route, webhook):
        for each in renderer.expand(route, body, channels):
            for robot in route.robots:
                request = alertbridge.request_body(renderer, channels, route, each, robot)
                out.append((each.kind, robot.name, request, channels.encode(robot, request)))
    return out


# --- FAULTS 6: a value written into Feishu's card markdown -----------------------------------


def test_an_alertname_cannot_at_everyone_through_a_feishu_mention_message(tmp_path):
    """A receiver of DingTalk and Feishu robots, actionCard, @ by phone: the card's @ message
    (MENTION) may go to the Feishu bot, which writes the plain title into card markdown."""
    config = load(tmp_path, "robots = dt, fs\nmessage_type = actionCard\nat_mobiles = 13800000000",
                  {"dt": f"url = {DT}", "fs": f"url = {FS}"})
    alert = make_alert("<at id=all></at><font color=red>Boom</font>")
    sent = requests(config, make_payload("ops", [alert]))
    [mention] = [r for kind, name, r, _ in sent if kind == alertbridge.MENTION and name == "fs"]
    text = mention["card"]["elements"][0]["content"]
    assert "<at id=all>" not in text and "<font" not in text


# --- FAULTS 8: unbounded input against WeCom's 4096 bytes and Feishu's 20 KB -----------------


def wecom_content(request):
    return request["markdown"]["content"] if request["msgtype"] == "markdown" \
        else request["text"]["content"]


def test_a_wecom_message_with_long_links_stays_within_4096_bytes(tmp_path):
    """Buttons become links outside the alert text: long silence/runbook URLs are never cut,
    so the content passes 4096 bytes and WeCom refuses it (40058) on every retry."""
    config = load(tmp_path, "robots = wc\nmessage_type = actionCard", {"wc": f"url = {WC}"})
    alert = make_alert("Big", labels={"pod": "p" * 1500, "x": "y" * 1500},
                       annotations={"summary": "s", "runbook_url": "https://rb/" + "r" * 1900})
    for kind, name, request, _ in requests(config, make_payload("ops", [alert])):
        assert len(wecom_content(request).encode()) <= 4096, kind


def test_a_wecom_message_with_a_long_alertname_stays_within_4096_bytes(tmp_path):
    """The heading (#### title) is outside the room truncate_to cuts to."""
    config = load(tmp_path, "robots = wc", {"wc": f"url = {WC}"})
    for kind, name, request, _ in requests(config, make_payload("ops", [make_alert("T" * 6000)])):
        assert len(wecom_content(request).encode()) <= 4096, kind


def test_a_feishu_card_with_a_long_silence_button_stays_within_20_kb(tmp_path):
    """A button's URL (the silence link, from unbounded labels) is never cut or left out: the
    body passes 20 KB, Feishu answers 9499 (read as FAILED, not TOO_LONG) on every retry."""
    config = load(tmp_path, "robots = fs\nmessage_type = actionCard", {"fs": f"url = {FS}"})
    alert = make_alert("Big", labels={"pod": 'p"' * 4000})
    robot = config.routes["ops"].robots[0]
    for kind, name, request, encoded in requests(config, make_payload("ops", [alert])):
        signed = alertbridge.FeishuChannel.signed(
            Robot("fs", FS, secret="s", kind="feishu"), encoded)
        assert len(signed) <= 20 * 1024, kind
    assert robot.kind == "feishu"


def test_feishu_9499_too_large_is_read_as_too_long():
    raw = json.dumps({"code": 9499, "msg": "Bad Request: the request body exceeds 20 KB"})
    result = alertbridge.FeishuChannel.read(400, {}, raw.encode())
    assert result.outcome == alertbridge.TOO_LONG


# --- FAULTS 11 / 7: budgets -----------------------------------------------------------------


def feishu(name="f"):
    return Robot(name, f"https://open.feishu.cn/open-apis/bot/v2/hook/tok-{name}", kind="feishu")


def test_a_cluster_share_below_one_a_second_neither_crashes_nor_stops_a_feishu_robot():
    """[cluster] instances = 6: int(5 * 1/6) == 0 slots a second. next_slot_at raises
    IndexError (_free_at with capacity 0 and no slots) and the robot never sends."""
    f = feishu()
    windows = {f.key: alertbridge.FeishuChannel.RATE_LIMITS}
    pool = RobotPool(lambda: Delivery(), share=lambda: 1 / 6, windows=lambda: windows.__getitem__)
    route = Route("ops", (f,))
    free = pool.next_slot_at(route, T0, urgent=False)   # raises IndexError now
    assert free is not None and free < T0 + 60
    assert pool.acquire(route, free, set(), urgent=True) is f


def test_a_feishu_429_saying_reset_0_still_rests_the_robot():
    """FAULTS 7: a reset of 0 rested the robot 0 s, and the next message hit the gateway at
    once: its shortest window at least, longer each time it repeats."""
    result = alertbridge.FeishuChannel.read(429, {"x-ogw-ratelimit-reset": "0"}, b"{}")
    assert result.outcome == alertbridge.THROTTLED and result.rest == 0
    f = feishu()
    windows = {f.key: alertbridge.FeishuChannel.RATE_LIMITS}
    pool = RobotPool(lambda: Delivery(reserve=0), windows=lambda: windows.__getitem__)
    route = Route("ops", (f,))
    now = T0
    for rest in (1, 2, 4):  # three 429s in a row
        assert pool.acquire(route, now, set()) is f
        pool.release(f, result, now)
        assert pool.next_slot_at(route, now) == now + rest
        now += rest


def test_a_feishu_429_with_a_non_decimal_digit_reset_is_still_a_throttle():
    """'²'.isdigit() is True but float('²') raises: the exception turns the throttle into
    'no answer' (FAILED), and the robot is not rested."""
    result = alertbridge.FeishuChannel.read(429, {"x-ogw-ratelimit-reset": "\u00b2"}, b"{}")
    assert result.outcome == alertbridge.THROTTLED


def test_direct_send_test_keeps_a_robots_own_windows_and_reads_its_channels_codes(
    tmp_path, monkeypatch
):
    """--send-test without a daemon builds RobotPool(lambda: config.delivery): every robot
    counted in [delivery] 20/60s, and the send log read as DingTalk's errcodes. A WeCom robot
    with rate_limit = 2/1m that sent twice a second ago gets a third; a Feishu robot
    throttled (11232) a second ago is called again."""
    config = load(tmp_path, "robots = wc, fs",
                  {"wc": f"url = {WC}\nrate_limit = 2/1m", "fs": f"url = {FS}"})
    wc, fs = config.routes["ops"].robots
    now = alertbridge.time.time()
    monkeypatch.setattr(alertbridge, "journal_sends", lambda path: [
        (wc.key, now - 2, 0), (wc.key, now - 1, 0), (fs.key, now - 1, 11232)])
    posted = []
    monkeypatch.setattr(alertbridge.Channels, "post",
                        lambda self, robot, payload, timeout: posted.append(robot.name)
                        or SendResult(0, "ok", kind=robot.kind))
    monkeypatch.setattr(alertbridge, "ask_daemon",
                        lambda *a, **k: (_ for _ in ()).throw(OSError("no daemon")))
    alertbridge.send_test(config, "ops")
    assert posted == []


def test_a_restart_does_not_rest_a_feishu_bot_minutes_for_gateway_throttles_of_a_second():
    """Three 429s in a row, each saying reset 1 s: live, the bot rests 1 s each time. After
    a restart the send log (errcodes only) rests it 60 * 2**2 = 240 s: every page of the
    receiver held four minutes."""
    f = feishu()
    windows = {f.key: alertbridge.FeishuChannel.RATE_LIMITS}
    classify = alertbridge.classify([f])
    pool = RobotPool(lambda: Delivery(), classify=lambda: classify,
                     windows=lambda: windows.__getitem__)
    pool.restore([(f.key, T0 + i, 99991400) for i in range(3)], T0 + 3)
    assert pool.next_slot_at(Route("ops", (f,)), T0 + 3) < T0 + 3 + 60


# --- FAULTS 12: checks that say OK -----------------------------------------------------------


def test_check_config_notes_a_feishu_receiver_that_ats_by_phone_only(tmp_path):
    """Feishu bots cannot @ a phone number: a Feishu-only receiver with at_mobiles @s nobody,
    and check-config says ", @13800000000" as if it did."""
    config = load(tmp_path, "robots = fs\nat_mobiles = 13800000000", {"fs": f"url = {FS}"})
    summary = alertbridge.check_config(config)
    assert "note:" in summary and "13800000000" in summary.split("note:", 1)[1]
