"""Intake: the Alertmanager payload, and every kind of bad request gets a clear 4xx while the
bridge keeps serving."""

import json
import logging
import re
import socket
from datetime import datetime, timezone

import pytest

import alertbridge
from tests.kit import DELETE, history, load_fixture, make_alert, make_payload, post, set_at, settle

GOOD = load_fixture("am025-dev-firing.json")


def raw_exchange(bridge, data, timeout=10):
    """Send raw bytes, half-close, and return every response the bridge wrote, parsed."""
    host, port = bridge.server.server_address[:2]
    with socket.create_connection((host, port), timeout=timeout) as sock:
        sock.sendall(data)
        sock.shutdown(socket.SHUT_WR)
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    responses = []
    while answer:
        head, _, rest = answer.partition(b"\r\n\r\n")
        length = int(re.search(rb"Content-Length: (\d+)", head).group(1))
        responses.append((int(head.split()[1]), rest[:length]))
        answer = rest[length:]
    return responses


def raw_request(bridge, data):
    """Send raw bytes; (status, body) of the one answer."""
    return raw_exchange(bridge, data)[0]


def with_(path, value):
    """GOOD with one field replaced, path like ('alerts', 0, 'startsAt'); value None deletes it."""
    return set_at(json.loads(json.dumps(GOOD)), path, DELETE if value is None else value)


def malformed_bodies():
    """100 bodies that can never succeed, each with a reason a person would recognize."""
    bodies = [
        b"",
        b"{",
        b"[]",
        b"null",
        b"42",
        b'"text"',
        b"\xff\xfe\x00",
        b'{"version": "4"',
        b"[" * 100000 + b"]" * 100000,
        '{"version":"4","x":"\ud800"}'.encode("utf-8", "surrogatepass"),
    ]
    fields = {
        ("version",): [None, "3", 4, "", ["4"]],
        ("status",): [None, "pending", 1, ""],
        ("receiver",): [None, "", 7, ["ops"]],
        ("alerts",): [None, {}, "x", 5],
        ("groupLabels",): [[], "x", {"a": 1}],
        ("commonLabels",): [{"a": None}, 3],
        ("commonAnnotations",): [{"a": []}],
        ("externalURL",): [5, {}],
        ("truncatedAlerts",): [-1, "3", 1.5, True],
        ("alerts", 0): ["alert", 1, [], "x" * 10],
        ("alerts", 0, "status"): [None, "ok", 1],
        ("alerts", 0, "labels"): [None, {}, [], "a=b", {"a": 1}, {"a": {"b": "c"}}],
        ("alerts", 0, "annotations"): [[], {"s": 1}, "x"],
        ("alerts", 0, "startsAt"): [
            None,
            "",
            "yesterday",
            "2026-11-24",
            "2026-11-24T08:00:00",
            "2026-13-01T00:00:00Z",
            "2026-02-30T00:00:00Z",
            "2026-11-24T25:00:00Z",
            "2026-11-24T08:00:00+8",
            1700000000,
            "2026-11-24T08:00:00.Z",
            "2026-11-24T08:00:00.1234567890Z",
        ],
        ("alerts", 0, "endsAt"): ["never", 0, "0001-01-01", "2026-11-24T08:00:00ZZ"],
        ("alerts", 0, "fingerprint"): [5, ["x"]],
        ("alerts", 0, "generatorURL"): [5, {}],
    }
    for path, values in fields.items():
        for value in values:
            if value is None and path[-1] in ("groupLabels",):
                continue
            bodies.append(json.dumps(with_(path, value)).encode())
    bodies += [
        json.dumps({**GOOD, "alerts": [GOOD["alerts"][0], 7]}).encode(),
        json.dumps({**GOOD, "alerts": [{}]}).encode(),
    ]
    while len(bodies) < 100:
        bodies.append(b"{" * len(bodies) + b"}")
    return bodies[:100]


def test_100_malformed_requests_get_4xx_and_the_daemon_keeps_serving(make_bridge, sqlite_db):
    bridge = make_bridge(sqlite_db)
    statuses = []
    for body in malformed_bodies():
        status, reply = post(bridge, body)
        assert 400 <= status < 500, (status, body[:120])
        assert isinstance(reply, dict) and reply["error"], reply
        statuses.append(status)
    assert len(statuses) == 100
    status, reply = post(bridge, GOOD)
    assert status == 200 and reply["status"] == "accepted"
    settle(bridge)
    assert len(history(bridge)) == 1


@pytest.mark.parametrize(
    "request_bytes, status, reason",
    [
        (b"POST /nowhere HTTP/1.1\r\nContent-Length: 2\r\n\r\n{}", 404, "no such endpoint"),
        (b"GET /alertmanager HTTP/1.1\r\n\r\n", 405, "use POST"),
        (b"DELETE / HTTP/1.1\r\n\r\n", 405, "use POST"),
        (
            b"POST /alertmanager HTTP/1.1\r\nContent-Type: application/json\r\n\r\n{}",
            411,
            "Content-Length",
        ),
        (
            b"POST /alertmanager HTTP/1.1\r\nTransfer-Encoding: "
            b"chunked\r\n\r\n2\r\n{}\r\n0\r\n\r\n",
            411,
            "chunked",
        ),
        (
            b"POST /alertmanager HTTP/1.1\r\nContent-Length: 99999999\r\n\r\n{}",
            413,
            "max_body_bytes",
        ),
        (
            b"POST /alertmanager HTTP/1.1\r\nContent-Type: text/plain\r\nContent-Length: "
            b"2\r\n\r\n{}",
            415,
            "application/json",
        ),
        (b"POST /alertmanager HTTP/1.1\r\nContent-Length: abc\r\n\r\n{}", 400, "Content-Length"),
        (b"POST /alertmanager HTTP/1.1\r\nContent-Length: 10\r\n\r\n{}", 400, "body ended"),
        (b'POST /alertmanager/ops HTTP/1.1\r\nContent-Length: 7\r\n\r\n{"a":1}', 400, "version"),
        (b'POST /dingtalk/ops/send HTTP/1.1\r\nContent-Length: 7\r\n\r\n{"a":1}', 400, "version"),
        (b"GET /dingtalk/ops/send HTTP/1.1\r\n\r\n", 405, "use POST"),
        (b"POST /dingtalk/ops HTTP/1.1\r\nContent-Length: 2\r\n\r\n{}", 404, "no such endpoint"),
    ],
)
def test_each_bad_request_gets_its_status_and_a_one_line_reason(
    make_bridge, sqlite_db, request_bytes, status, reason
):
    bridge = make_bridge(sqlite_db)
    got, body = raw_request(bridge, request_bytes)
    assert got == status
    assert body.count(b"\n") == 1 and body.endswith(b"\n")
    assert reason in json.loads(body)["error"]


def test_oversized_body_is_refused_before_it_is_read(make_bridge, sqlite_db):
    bridge = make_bridge(sqlite_db, main={"max_body_bytes": "2048"})
    big = make_payload("dev", [make_alert(annotations={"description": "x" * 4000})])
    status, reply = post(bridge, big)
    assert status == 413 and "2048" in reply["error"]
    status, _ = post(bridge, make_payload("dev", [make_alert()]))
    assert status == 200


def test_unknown_receiver_without_default_is_404(make_bridge, sqlite_db):
    bridge = make_bridge(sqlite_db, main={"default_receiver": ""})
    status, reply = post(bridge, make_payload("nobody", [make_alert()]))
    assert status == 404 and "nobody" in reply["error"]


def test_alertmanager_time_forms_are_accepted(make_bridge, sqlite_db):
    bridge = make_bridge(sqlite_db)
    alerts = [
        make_alert(instance="ns", starts_at="2026-11-24T21:47:13.776597105Z"),
        make_alert(instance="offset", starts_at="2026-11-25T05:47:13+08:00"),
        make_alert(instance="future-end", ends_at="2030-01-01T00:00:00Z"),
        {**make_alert(instance="no-fingerprint"), "fingerprint": "", "generatorURL": ""},
    ]
    status, reply = post(bridge, make_payload("dev", alerts))
    assert status == 200 and reply["alerts"] == 4
    settle(bridge)
    rows = {r["instance"]: r for r in history(bridge)}
    assert rows["ns"]["starts_at"] == "2026-11-24 21:47:13.776"
    assert rows["offset"]["starts_at"] == "2026-11-24 21:47:13.000"
    assert rows["future-end"]["ends_at"] is None  # a firing alert's endsAt is only an estimate
    assert len(rows["no-fingerprint"]["fingerprint"]) == 16


def test_health_endpoints_answer(make_bridge, sqlite_db):
    bridge = make_bridge(sqlite_db)
    assert post(bridge, None, path="/-/healthy", method="GET") == (200, "OK\n")
    status, reply = post(bridge, None, path="/-/ready", method="GET")
    assert status == 200 and reply["journal"] == "ok"


UTC = timezone.utc


@pytest.mark.parametrize(
    "text, expected",
    [
        (
            "2026-11-24T21:47:13.776597105Z",
            (2026, 11, 24, 21, 47, 13, 776597),
        ),  # nanoseconds: cut, not rounded
        ("2026-11-24T21:47:13.999999999Z", (2026, 11, 24, 21, 47, 13, 999999)),
        ("2026-11-24T21:47:13.7Z", (2026, 11, 24, 21, 47, 13, 700000)),
        ("2026-11-24T21:47:13.123456Z", (2026, 11, 24, 21, 47, 13, 123456)),
        ("2026-11-24T21:47:13Z", (2026, 11, 24, 21, 47, 13, 0)),
        ("2026-11-24t21:47:13z", (2026, 11, 24, 21, 47, 13, 0)),
        ("2026-11-24 21:47:13Z", (2026, 11, 24, 21, 47, 13, 0)),
        ("2026-11-25T05:47:13.5+08:00", (2026, 11, 24, 21, 47, 13, 500000)),
        ("2026-11-24T16:17:13-05:30", (2026, 11, 24, 21, 47, 13, 0)),
        ("2026-11-24T21:47:13-00:00", (2026, 11, 24, 21, 47, 13, 0)),
        (
            "2027-01-01T07:59:59.000000001+08:00",
            (2026, 12, 31, 23, 59, 59, 0),
        ),  # offset crosses the year
        ("2024-02-29T00:00:00Z", (2024, 2, 29, 0, 0, 0, 0)),
        ("0001-01-01T00:00:00Z", None),  # Go's zero time
    ],
)
def test_rfc3339_times_parse_the_same_on_every_python(text, expected):
    parsed = alertbridge.parse_time(text, "t")
    assert parsed == (datetime(*expected, tzinfo=UTC) if expected else None)


@pytest.mark.parametrize(
    "text",
    [
        "2026-11-24T21:47:13",
        "2026-11-24T21:47:13.Z",
        "2026-11-24T21:47:13.1234567890Z",
        "2026-11-24T21:47:13+0800",
        "2026-11-24T21:47:13+08",
        "2026-11-24T21:47:13+24:00",
        "2026-11-24T21:47:13+08:60",
        "2025-02-29T00:00:00Z",
        "2026-11-24T24:00:00Z",
        "2026-11-24T23:59:60Z",
        "２０２６-11-24T21:47:13Z",
        "1969-12-31T23:59:59Z",
        "9999-12-31T23:59:59Z",
    ],
)
def test_times_that_are_not_rfc3339_or_out_of_range_are_refused(text):
    with pytest.raises(alertbridge.BadRequest) as error:
        alertbridge.parse_time(text, "alerts[0].startsAt")
    assert error.value.status == 400 and error.value.reason.startswith("alerts[0].startsAt: ")


def test_reload_takes_a_post_without_a_body(make_bridge, sqlite_db):
    """What `curl -XPOST http://127.0.0.1:9097/-/reload` sends: no Content-Length at all."""
    bridge = make_bridge(sqlite_db)
    status, body = raw_request(bridge, b"POST /-/reload HTTP/1.1\r\nHost: x\r\n\r\n")
    assert status == 200 and json.loads(body) == {"status": "reloaded"}


def webhook_request(payload, path="/alertmanager"):
    body = json.dumps(payload).encode()
    return (
        b"POST %s HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: "
        b"%d\r\n\r\n" % (path.encode(), len(body)) + body
    )


@pytest.mark.parametrize("path", ["/metrics", "/-/healthy", "/-/ready", "/nowhere"])
def test_a_body_on_an_endpoint_that_takes_none_is_never_read_as_a_request(
    make_bridge, sqlite_db, path
):
    """Behind a proxy that lets only GET /metrics through, a webhook hidden in its body must not
    reach DingTalk."""
    bridge = make_bridge(sqlite_db)
    hidden = webhook_request(make_payload("dev", [make_alert("Smuggled")]))
    request = (
        b"GET %s HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % (path.encode(), len(hidden))
        + hidden
    )
    responses = raw_exchange(bridge, request)
    assert len(responses) == 1
    assert bridge.journal.backlog() == (0, None, 0, None)


@pytest.mark.parametrize(
    "framing, status",
    [
        (b"Content-Length: 2\r\nContent-Length: 40", 400),  # which one? neither
        (b"Content-Length: 2\r\nContent-Length: 2", 400),
        (b"Content-Length: 2\r\nTransfer-Encoding: chunked", 400),
        (b"Content-Length: \xb2", 400),  # Latin-1 '²': isdigit() is true
        (b"Content-Length: 1" + b"0" * 5000, 400),  # more digits than int() takes
        (b"Content-Length: -2", 400),
        (b"Content-Length: 0x2", 400),
    ],
    ids=[
        "two-lengths",
        "repeated-length",
        "length-and-chunked",
        "superscript-two",
        "5000-digits",
        "negative",
        "hex",
    ],
)
def test_framing_that_is_not_one_plain_length_gets_400_and_the_connection_ends(
    make_bridge, sqlite_db, framing, status
):
    bridge = make_bridge(sqlite_db)
    second = webhook_request(make_payload("dev", [make_alert("Smuggled")]))
    request = b"POST /alertmanager HTTP/1.1\r\nHost: x\r\n" + framing + b"\r\n\r\n{}" + second
    responses = raw_exchange(bridge, request)
    assert [r[0] for r in responses] == [status]  # the rest of the stream is not parsed
    assert json.loads(responses[0][1])["error"]
    assert bridge.journal.backlog() == (0, None, 0, None)


def test_a_bearer_token_beyond_ascii_is_compared_as_the_utf8_alertmanager_sends(
    make_bridge, sqlite_db
):
    bridge = make_bridge(sqlite_db, extra="[auth]\nbearer_token = 令牌-ü-token\n")
    body = json.dumps(make_payload("dev", [make_alert()])).encode()
    head = (
        "POST /alertmanager HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\nAuthorization: Bearer "
    ).encode()
    assert raw_exchange(bridge, head + "令牌-ü-token".encode() + b"\r\n\r\n" + body)[0][0] == 200
    assert raw_exchange(bridge, head + "令牌-u-token".encode() + b"\r\n\r\n" + body)[0][0] == 401


def test_request_text_cannot_forge_a_log_line(make_bridge, sqlite_db, caplog):
    caplog.set_level(logging.DEBUG, logger="alertbridge")
    bridge = make_bridge(sqlite_db)
    forged = "x\nINFO alertbridge request_id=0 accepted receiver=ops\r"
    payload = make_payload(forged, [make_alert()])
    payload["groupKey"] = forged
    assert post(bridge, payload)[0] == 200  # via default_receiver
    assert post(bridge, make_payload("dev", [make_alert()]), path="/alertmanager/a%0Ab")[0] == 200
    bad_label = make_payload("dev", [make_alert(labels={forged: 1})])
    assert post(bridge, bad_label)[0] == 400
    settle(bridge)
    messages = [r.getMessage() for r in caplog.records]
    assert any("x\\nINFO" in m for m in messages) and any("a\\nb" in m for m in messages)
    assert not [m for m in messages if "\n" in m or "\r" in m]


def test_a_webhook_of_no_alerts_is_accepted_and_opens_or_resolves_no_incident(
    make_bridge, sqlite_db
):
    """A notification with an empty alerts list (the fuzzer found it was a 500)."""
    bridge = make_bridge(sqlite_db)
    for status in ("firing", "resolved"):
        payload = make_payload("ops", [], status=status) | {"groupKey": "g-empty"}
        assert post(bridge, payload)[0] == 200
    settle(bridge)
    assert alertbridge.Store(sqlite_db).incidents() == []


# Grafana-managed alerts: Grafana's webhook contact point (version "1", orgId, state)

GRAFANA_DOCS = load_fixture("grafana-docs-firing.json")  # the payload Grafana's docs show


def grafana_with(path, value):
    """Grafana's documented payload with one field replaced (None deletes it)."""
    return set_at(json.loads(json.dumps(GRAFANA_DOCS)), path, DELETE if value is None else value)


def test_grafanas_documented_webhook_becomes_alerts_with_its_links_and_values():
    webhook = alertbridge.parse_webhook(json.dumps(GRAFANA_DOCS).encode())
    assert (webhook.receiver, webhook.group_key, webhook.truncated) == (
        "My Super Webhook", "{}:{}", 0)
    first, second = webhook.alerts
    assert first["labels"]["alertname"] == "High memory usage"
    assert first["starts_at"] == "2021-10-12 07:51:03.157" and first["ends_at"] is None
    assert first["fingerprint"] == "c6eadffa33fcdf37"
    assert first["generator_url"] == "https://play.grafana.org/alerting/1afz29v7z/edit"
    assert first["external_url"] == "https://play.grafana.org/"
    assert first["grafana"] == {
        "silence_url": "https://play.grafana.org/alerting/silence/new?alertmanager=grafana"
                       "&matchers=alertname%3DT2%2Cteam%3Dblue%2Czone%3Dus-1",
        "dashboard_url": "", "panel_url": "", "image_url": "", "values": "B=44.2394, C=1"}
    assert second["grafana"]["silence_url"].endswith("zone%3Deu-1")
    am = alertbridge.parse_webhook(json.dumps(load_fixture("am025-dev-firing.json")).encode())
    assert "grafana" not in am.alerts[0]  # Alertmanager's alerts are as they were


def test_grafanas_notifier_payloads_as_its_tests_expect_them_are_accepted():
    """Shaped like grafana/alerting's receivers/webhook tests: a zero startsAt, values null,
    an empty valueString, a per-alert orgId, and a group cut by max_alerts."""
    now = datetime(2026, 12, 1, 8, 0, tzinfo=timezone.utc)
    one = alertbridge.parse_webhook(
        json.dumps(load_fixture("grafana-notifier-one-alert.json")).encode(), now=now)
    alert, = one.alerts
    assert alert["starts_at"] == "2026-12-01 08:00:00.000"   # Go's zero time: when it came
    assert alert["grafana"]["panel_url"] == "http://localhost/d/abcd?orgId=1&viewPanel=efgh"
    assert alert["grafana"]["dashboard_url"] == "http://localhost/d/abcd?orgId=1"
    assert alert["grafana"]["values"] == ""
    cut = alertbridge.parse_webhook(
        json.dumps(load_fixture("grafana-notifier-truncated.json")).encode(), now=now)
    assert cut.truncated == 1 and len(cut.alerts) == 2
    assert cut.alerts[0]["grafana"]["values"].startswith("[ var='B' labels={lbl1=val1} value=10 ]")


@pytest.mark.parametrize("path, value, reason", [
    (("orgId",), None, "version: \"1\" is Grafana's webhook, which has orgId and state"),
    (("state",), None, "version: \"1\" is Grafana's webhook, which has orgId and state"),
    (("orgId",), "1", "orgId: must be an integer"),
    (("orgId",), True, "orgId: must be an integer"),
    (("state",), 1, "state: must be a string"),
    (("alerts", 0, "values"), [1, 2], "alerts[0].values: must be an object of numbers"),
    (("alerts", 0, "values"), {"B": "44"}, "alerts[0].values.B: must be a number (a float64)"),
    (("alerts", 0, "values"), {"B": 10 ** 400}, "alerts[0].values.B: must be a number"),
    (("alerts", 0, "values"), {"B": True}, "alerts[0].values.B: must be a number"),
    (("alerts", 0, "valueString"), 5, "alerts[0].valueString: must be a string"),
    (("alerts", 0, "silenceURL"), {}, "alerts[0].silenceURL: must be a string"),
    (("alerts", 0, "panelURL"), 3, "alerts[0].panelURL: must be a string"),
    (("alerts", 0, "status"), "alerting", "alerts[0].status: must be 'firing' or 'resolved'"),
    (("alerts", 0, "labels"), {}, "alerts[0].labels: required"),
])
def test_a_malformed_grafana_webhook_gets_400_and_a_one_line_reason(
        make_bridge, sqlite_db, path, value, reason):
    with pytest.raises(alertbridge.BadRequest) as raised:
        alertbridge.parse_webhook(json.dumps(grafana_with(path, value)).encode())
    assert raised.value.reason.startswith(reason)
    bridge = make_bridge(sqlite_db)
    got, body = raw_request(bridge, webhook_request(grafana_with(path, value)))
    assert got == 400 and body.count(b"\n") == 1
    assert json.loads(body)["error"].startswith(reason)
    assert post(bridge, GRAFANA_DOCS)[0] == 200    # and the daemon goes on taking Grafana's


def test_grafana_values_are_bounded_before_they_are_read_whole():
    many = {f"Q{i:05d}": i * 0.5 for i in range(50000)}
    webhook = alertbridge.parse_webhook(
        json.dumps(grafana_with(("alerts", 0, "values"), many)).encode())
    values = webhook.alerts[0]["grafana"]["values"]
    assert values.startswith("Q00000=0, Q00001=0.5, ") and values.endswith("(+49980)")
    assert values.count("=") == alertbridge.MAX_VALUES
    assert len(values) <= alertbridge.VALUES_CHARS
    bad_late = {**many, "Z": "not a number"}   # past the values shown, still checked
    with pytest.raises(alertbridge.BadRequest, match="values.Z: must be a number"):
        alertbridge.parse_webhook(
            json.dumps(grafana_with(("alerts", 0, "values"), bad_late)).encode())
    long_text = grafana_with(("alerts", 0, "values"), None)
    set_at(long_text, ("alerts", 0, "valueString"), "[ var='B' value=1 ], " * 20000)
    set_at(long_text, ("alerts", 0, "silenceURL"), "https://g/" + "s" * 100000)
    at_limit = "https://g/d/x?var=" + "v" * (alertbridge.LINK_CHARS - 18)
    set_at(long_text, ("alerts", 0, "panelURL"), at_limit)
    alert = alertbridge.parse_webhook(json.dumps(long_text).encode()).alerts[0]
    assert len(alert["grafana"]["values"]) == alertbridge.VALUES_CHARS
    assert alert["grafana"]["values"].endswith("…")
    assert alert["grafana"]["panel_url"] == at_limit


def test_a_grafana_link_too_long_is_left_out_never_cut():
    """A silence link cut short would drop matchers: Grafana's form would offer a silence of
    more alerts than the one that fired. Over LINK_CHARS, the link is not shown at all."""
    matchers = "%2C".join(f"label{i}%3D{'v' * 40}" for i in range(60))
    long_silence = "https://g/alerting/silence/new?alertmanager=grafana&matchers=" + matchers
    assert len(long_silence) > alertbridge.LINK_CHARS
    payload = grafana_with(("alerts", 0, "silenceURL"), long_silence)
    alert = alertbridge.parse_webhook(json.dumps(payload).encode()).alerts[0]
    assert alert["grafana"]["silence_url"] == ""
    assert alert["grafana"]["values"] == "B=44.2394, C=1"   # the rest of the alert is kept
