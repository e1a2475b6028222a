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
