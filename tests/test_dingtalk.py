"""One DingTalk request: signing, the answer classified once, a total deadline, and whatever
comes back never raises, never leaks a token, and always says why."""

import json

import pytest

import alertbridge
from alertbridge import (
    FAILED,
    MISCONFIGURED,
    SENT,
    THROTTLED,
    TOO_LONG,
    Robot,
    SendResult,
    post_to_dingtalk,
)
from tests.fakedingtalk import BROKEN
from tests.kit import ROBOTS

OPS1 = ROBOTS["ops-1"]


def robot_at(fake, name="ops-1", **extra):
    spec = {**ROBOTS[name], **extra}
    return Robot(
        name,
        fake.url(spec["token"]),
        secret=spec.get("secret", ""),
        keyword=spec.get("keyword", ""),
    )


BODY = b'{"msgtype": "markdown", "markdown": {"title": "t", "text": "hello alert"}}'


@pytest.mark.parametrize(
    "errcode, outcome",
    [
        (0, SENT),
        (410100, THROTTLED),
        (130101, THROTTLED),
        (310000, MISCONFIGURED),
        (300001, MISCONFIGURED),
        (400101, MISCONFIGURED),
        (400102, MISCONFIGURED),
        (460101, TOO_LONG),
        (101002, TOO_LONG),
        (-1, FAILED),
        (None, FAILED),
        (42, FAILED),
    ],
)
def test_every_answer_is_classified_in_one_place(errcode, outcome):
    assert SendResult(errcode, "").outcome == outcome


def test_a_signed_request_is_accepted(fake):
    result = post_to_dingtalk(robot_at(fake), BODY, 5)
    assert (result.errcode, result.errmsg, result.ok) == (0, "ok", True)
    assert fake.requests[0].token == OPS1["token"]


def test_a_wrong_secret_is_refused_by_dingtalk_and_said_so(fake):
    result = post_to_dingtalk(robot_at(fake, secret="SECwrong"), BODY, 5)
    assert (result.errcode, result.outcome) == (310000, MISCONFIGURED) and "sign" in result.errmsg


def refuse(fake, why):
    """A robot DingTalk refuses, and why: the fake answers as DingTalk does."""
    if why == "wrong secret":
        return robot_at(fake, secret="SECwrong")
    if why == "clock off":  # this server's clock two hours behind DingTalk's
        return robot_at(fake)
    if why == "no keyword":
        return robot_at(fake, "ops-2", keyword="")
    if why == "ip not allowed":
        fake.add_robot("tok-walled-0123456789", allowed_ips=("203.0.113.7",))
        return robot_at(fake, token="tok-walled-0123456789")
    if why == "no such token":
        return robot_at(fake, token="tok-removed-0123456789")
    fake.disable_robot(OPS1["token"])
    return robot_at(fake)


@pytest.mark.parametrize(
    "why, errcode, errmsg, fix",
    [
        ("wrong secret", 310000, "sign not match", "set [robot:ops-1] secret to the robot's 加签"),
        ("clock off", 310000, "timestamp", "check this server's clock (NTP)"),
        ("no keyword", 310000, "keywords not in content", "set [robot:ops-2] keyword = one of"),
        ("ip not allowed", 310000, "ip 127.0.0.1 not in whitelist",
         "this server's address (127.0.0.1) is not in the robot's IP allow-list: add it under "
         "the robot's 安全设置"),
        ("no such token", 300001, "token is not exist",
         "copy the robot's Webhook URL into [robot:ops-1] url again"),
        ("disabled", 400102, "", "the robot is turned off (停用) in DingTalk: turn it on"),
    ],
)
def test_each_refusal_comes_with_its_fix_from_the_channel(
    fake, monkeypatch, why, errcode, errmsg, fix
):
    robot = refuse(fake, why)
    if why == "clock off":
        real = alertbridge.time.time
        monkeypatch.setattr(alertbridge.time, "time", lambda: real() - 7200)
    result = post_to_dingtalk(robot, BODY, 5)
    assert (result.errcode, result.outcome) == (errcode, MISCONFIGURED)
    assert errmsg in result.errmsg
    said = alertbridge.CHANNELS[robot.kind].fix(result.errcode, result.errmsg, robot.name)
    assert fix in said and "\n" not in said


@pytest.mark.parametrize(
    "errmsg, fix",
    [  # DingTalk's newer answers are in Chinese
        ("description:ip 不在白名单中;solution:请联系对应群的管理员，设置机器人安全ip地址段",
         "is not in the robot's IP allow-list"),
        ("description:关键词不匹配;solution:请联系群管理员查看此机器人的关键词", "keyword = one of"),
        ("description:sign不匹配;solution:请确认签名和生成签名的时间戳必须都是毫秒", "secret to the"),
        ("something new", "compare [robot:r] keyword and secret, and this server's address"),
    ],
)
def test_a_security_refusal_is_told_apart_by_its_errmsg_in_either_language(errmsg, fix):
    assert fix in alertbridge.RobotChannel.fix(310000, errmsg, "r")


def test_answers_that_are_no_config_error_have_no_fix():
    assert [alertbridge.RobotChannel.fix(code, "x", "r") for code in (0, 410100, 460101, -1,
                                                                        None)] == [""] * 5


@pytest.mark.parametrize(
    "broken, why",
    [
        ("json-array", "not a JSON object"),
        ("json-null", "not a JSON object"),
        ("bad-status-line", "BadStatusLine"),
        ("cut-chunked", "IncompleteRead"),
    ],
)
def test_a_broken_answer_is_no_answer_and_never_raises(fake, broken, why):
    fake.fail_next(OPS1["token"], broken)
    result = post_to_dingtalk(robot_at(fake), BODY, 5)
    assert result.errcode is None and result.outcome == FAILED and why in result.errmsg
    assert broken in BROKEN


def test_http_errors_and_refused_connections_are_no_answer(fake):
    fake.fail_next(OPS1["token"], "http500")
    assert post_to_dingtalk(robot_at(fake), BODY, 5).errmsg == "HTTP 500"
    closed = Robot(
        "r", "http://127.0.0.1:9/robot/send?access_token=tok"
    )  # nothing listens on port 9
    result = post_to_dingtalk(closed, BODY, 5)
    assert result.errcode is None and result.errmsg.startswith("network:")


def test_an_answer_trickled_past_the_timeout_is_cut_there(fake):
    fake.fail_next(OPS1["token"], "trickle")  # a byte every 0.1 s: no single read times out
    result = post_to_dingtalk(robot_at(fake), BODY, 1)
    assert result.errcode is None and result.errmsg == "no complete answer within timeout (1s)"
    assert not fake.release.is_set()  # cut by us, while DingTalk still trickled


def test_a_failed_exchange_never_carries_the_token_or_secret():
    robot = Robot("r", "http://127.0.0.1:9/robot/send?access_token=tok-leak x", secret="SECleak")
    result = post_to_dingtalk(robot, b"{}", 2)  # a URL load would have refused
    assert result.errcode is None and result.outcome == FAILED
    assert "tok-leak" not in result.errmsg and "SECleak" not in result.errmsg


def test_retry_delay_stays_bounded_after_any_number_of_attempts():
    for attempts in (0, 1, 10, 1023, 1024, 10**6):
        assert 0 < alertbridge.retry_delay(attempts, 2.0, 300.0) <= 300.0
    assert alertbridge.retry_delay(0, 2.0, 300.0, jitter=lambda a, b: b) == 2.0
    assert alertbridge.retry_delay(3, 2.0, 300.0, jitter=lambda a, b: b) == 16.0


@pytest.mark.parametrize(
    "card, errcode",
    [
        (
            {
                "title": "t",
                "text": "hello alert",
                "btnOrientation": "0",
                "btns": [{"title": "Silence", "actionURL": "https://am/#/silences/new"}],
            },
            0,
        ),
        (
            {
                "title": "t",
                "text": "hello alert",
                "singleTitle": "Open",
                "singleURL": "https://am/",
            },
            0,
        ),
        ({"title": "t", "text": "hello alert", "btns": []}, 40035),
        (
            {
                "title": "t",
                "text": "hello alert",
                "btnOrientation": "2",
                "btns": [{"title": "a", "actionURL": "https://x/"}],
            },
            40035,
        ),
        ({"title": "t", "text": "hello alert", "btns": [{"title": "a"}]}, 40035),
        ({"text": "hello alert", "btns": [{"title": "a", "actionURL": "https://x/"}]}, 40035),
    ],
)
def test_the_fake_checks_an_action_cards_shape_as_dingtalk_does(fake, card, errcode):
    body = json.dumps({"msgtype": "actionCard", "actionCard": card}).encode()
    assert post_to_dingtalk(robot_at(fake), body, timeout=5).errcode == errcode
