"""The core pipeline end to end: webhook -> journal -> DingTalk + history, on SQLite and MariaDB."""

import json
import logging
import socket
import sqlite3

import alertbridge

from tests.kit import (
    DEV,
    OPS,
    SECRETS,
    history,
    load_fixture,
    make_alert,
    make_payload,
    post,
    settle,
)


def test_group_goes_out_signed_with_mentions_and_is_recorded(make_bridge, fake, database):
    bridge = make_bridge(database)
    status, reply = post(bridge, load_fixture("am025-ops-firing-group.json"))
    assert status == 200 and reply["alerts"] == 2
    settle(bridge)

    message, warning = fake.delivered()  # one message per level, the critical first
    assert (message.token, warning.token) == (OPS[0], OPS[1])  # robots in turn; signatures checked
    assert message.body["msgtype"] == "markdown"
    assert (
        message.body["markdown"]["title"] == "[CRITICAL · FIRING:1] DiskFull node"
    )  # group labels
    assert warning.body["markdown"]["title"] == "[WARNING · FIRING:1] DiskFull node"  # told apart
    text = message.text
    assert "10.0.0.1:9100" in text and "10.0.0.2:9100" in warning.text and "磁盘将满" in text
    assert "2026-11-25 05:47:13" in text  # 21:47:13Z shown in Asia/Shanghai
    assert "@13800000000" in text and message.body["at"]["atMobiles"] == ["13800000000"]
    assert warning.body["at"]["atMobiles"] == []  # at_severities = critical
    assert "[Prometheus](http://prom:9090/graph?g0.expr=up)" in text
    assert "http://vm:19093/#/silences/new?filter=" in text

    rows = history(bridge)
    assert [(r["instance"], r["severity"], r["status"]) for r in rows] == [
        ("10.0.0.1:9100", "critical", "firing"),
        ("10.0.0.2:9100", "warning", "firing"),
    ]
    first = rows[0]
    assert (first["alertname"], first["job"], first["receiver"]) == ("DiskFull", "node", "ops")
    assert (first["summary"], first["description"]) == ("磁盘将满", "usage 95%")
    assert json.loads(first["labels"]) == {
        "alertname": "DiskFull",
        "instance": "10.0.0.1:9100",
        "job": "node",
        "severity": "critical",
    }
    assert json.loads(first["annotations"])["summary"] == "磁盘将满"
    assert first["generator_url"] == "http://prom:9090/graph?g0.expr=up"
    assert first["starts_at"] == "2026-11-24 21:47:13.757" and first["ends_at"] is None
    assert (first["received_count"], first["notified_count"], first["robots"]) == (1, 1, "ops-1")

    sends = history(bridge, "notifications")
    assert [
        (s["receiver"], s["robot"], s["alerts"], s["errcode"], s["fingerprints"]) for s in sends
    ] == [("ops", "ops-1", 1, 0, "0ab899e06c62ec30"), ("ops", "ops-2", 1, 0, "b2e09faafa783f36")]


def test_repeat_counts_rotates_and_resolve_closes(make_bridge, fake, database):
    bridge = make_bridge(database)
    post(bridge, load_fixture("am025-ops-firing-group.json"))
    settle(bridge)
    post(bridge, load_fixture("am025-ops-firing-group.json"))  # Alertmanager's repeat_interval
    settle(bridge)
    second = fake.delivered()[1]
    assert second.token == OPS[1] and "告警" in second.text  # keyword robot gets its keyword

    rows = history(bridge)
    assert len(rows) == 2
    assert [(r["received_count"], r["notified_count"], r["robots"]) for r in rows] == [
        (2, 2, "ops-1,ops-3"),
        (2, 2, "ops-2,ops-1"),
    ]

    post(bridge, load_fixture("am025-ops-partly-resolved.json"))
    settle(bridge)
    resolved, still = fake.delivered()[4:]
    assert (resolved.token, still.token) == (OPS[1], OPS[2])
    assert resolved.body["markdown"]["title"] == "[CRITICAL · RESOLVED:1] DiskFull node"
    assert still.body["markdown"]["title"] == "[WARNING · FIRING:1] DiskFull node"
    assert "2026-11-25 05:47:16" in resolved.text and "持续 3s" in resolved.text
    rows = {r["instance"]: r for r in history(bridge)}
    assert rows["10.0.0.1:9100"]["status"] == "resolved"
    assert rows["10.0.0.1:9100"]["ends_at"] == "2026-11-24 21:47:16.781"
    assert rows["10.0.0.2:9100"]["status"] == "firing" and rows["10.0.0.2:9100"]["ends_at"] is None
    assert rows["10.0.0.1:9100"]["notified_count"] == 3

    refire = make_payload(
        "ops",
        [
            make_alert(
                "DiskFull",
                "10.0.0.1:9100",
                fingerprint="0ab899e06c62ec30",
                starts_at="2026-11-24T23:00:00Z",
            )
        ],
    )
    post(bridge, refire)  # a new startsAt is a new occurrence
    settle(bridge)
    assert len(history(bridge)) == 3


def test_robots_rotate_in_turn(make_bridge, fake, database):
    bridge = make_bridge(database)
    for i in range(6):
        post(bridge, make_payload("ops", [make_alert(instance=f"n{i}")]))
        settle(bridge)
    assert [m.token for m in fake.delivered()] == OPS + OPS


def test_failed_robot_fails_over_to_the_next(make_bridge, fake, database):
    bridge = make_bridge(database)
    fake.fail_next(OPS[0], -1)  # "system busy"
    post(bridge, make_payload("ops", [make_alert()]))
    settle(bridge)
    assert [(r.token, r.errcode) for r in fake.requests] == [(OPS[0], -1), (OPS[1], 0)]
    sends = history(bridge, "notifications")
    assert [(s["robot"], s["errcode"]) for s in sends] == [("ops-1", -1), ("ops-2", 0)]
    [row] = history(bridge)
    assert (row["notified_count"], row["robots"]) == (1, "ops-2")


def test_unknown_receiver_uses_default_and_path_names_receiver(make_bridge, fake, database):
    bridge = make_bridge(database)
    post(bridge, make_payload("nobody", [make_alert("A")]))
    post(bridge, make_payload("nobody", [make_alert("B")]), path="/alertmanager/ops")
    settle(bridge)
    by_name = {m.body["markdown"]["title"]: m.token for m in fake.delivered()}
    assert by_name == {"[CRITICAL · FIRING:1] A": DEV, "[CRITICAL · FIRING:1] B": OPS[0]}
    assert sorted((r["alertname"], r["receiver"]) for r in history(bridge)) == [
        ("A", "nobody"),
        ("B", "ops"),
    ]


def test_per_alert_receiver_sends_one_message_per_alert(make_bridge, fake, database):
    bridge = make_bridge(
        database,
        receivers={
            "ops": {"robots": "ops-1, ops-2", "per_alert": "true"},
            "dev": {"robots": "dev-1"},
        },
    )
    post(bridge, load_fixture("am025-ops-firing-group.json"))
    settle(bridge)
    titles = sorted(m.body["markdown"]["title"] for m in fake.delivered())
    assert titles == ["[CRITICAL · FIRING:1] DiskFull node", "[WARNING · FIRING:1] DiskFull node"]
    assert len({m.token for m in fake.delivered()}) == 2
    assert [r["notified_count"] for r in history(bridge)] == [1, 1]


def test_no_token_or_secret_in_logs_or_databases(make_bridge, fake, database, caplog):
    caplog.set_level(logging.DEBUG, logger="alertbridge")
    bridge = make_bridge(database)
    fake.fail_next(OPS[0], 310000)  # an error answer gets logged at ERROR with details
    post(bridge, load_fixture("am025-ops-firing-group.json"))
    post(bridge, load_fixture("am025-dev-firing.json"))
    settle(bridge)
    dumped = caplog.text
    for table in ("alerts", "notifications", "recorder_progress"):
        dumped += json.dumps(history(bridge, table, order="1"), default=str, ensure_ascii=False)
    journal = sqlite3.connect(bridge.config.service.journal)
    for table in ("events", "messages", "sends", "meta"):
        dumped += json.dumps(
            journal.execute(f"SELECT * FROM {table}").fetchall(), ensure_ascii=False
        )
    assert "ops-1" in dumped and "errcode=310000" in caplog.text
    leaked = [s for s in SECRETS if s in dumped]
    assert leaked == []


# --- issue 17: buttons, mentions from labels, history in the message, resolved left out ---------

CARD_ROUTE = {
    "robots": "ops-1",
    "message_type": "actionCard",
    "at_mobiles": "13800000000",
    "at_severities": "critical",
    "at_user_ids_from": "oncall",
    "alert": "{alertname} on {instance}",
    "alertmanager_url": "https://am.example.com",
    "prometheus_url": "https://prom.example.com",
}


def test_action_cards_and_their_mention_reach_dingtalk_as_it_checks_them(
    make_bridge, fake, database
):
    bridge = make_bridge(database, receivers={"ops": CARD_ROUTE, "dev": {"robots": "dev-1"}})
    critical = make_alert(
        "DiskFull",
        "10.0.0.1:9100",
        annotations={"runbook_url": "https://wiki/disk"},
        labels={"oncall": "manager7021"},
    )
    warning = make_alert("DiskFull", "10.0.0.2:9100", severity="warning")
    assert post(bridge, make_payload("ops", [critical, warning]))[0] == 200
    settle(bridge)
    card, mention, second = fake.delivered()  # the fake checks each actionCard's shape
    silence = (
        "https://am.example.com/#/silences/new?filter=%7Balertname%3D%22DiskFull%22%2C%20"
        "instance%3D%2210.0.0.1%3A9100%22%2C%20job%3D%22node%22%2C%20"
        "oncall%3D%22manager7021%22%2C%20severity%3D%22critical%22%7D"
    )
    assert card.body == {
        "msgtype": "actionCard",
        "actionCard": {
            "title": "[CRITICAL · FIRING:1] DiskFull",
            "text": "#### [CRITICAL · FIRING:1] DiskFull\n\nDiskFull on 10.0.0.1:9100",
            "btnOrientation": "0",
            "btns": [
                {"title": "静默", "actionURL": silence},
                {"title": "手册", "actionURL": "https://wiki/disk"},
                {"title": "Prometheus", "actionURL": "https://prom.example.com/graph?g0.expr=up"},
            ],
        },
    }
    assert mention.body == {
        "msgtype": "text",
        "text": {"content": "@13800000000 @manager7021 [CRITICAL · FIRING:1] DiskFull"},
        "at": {"atMobiles": ["13800000000"], "isAtAll": False, "atUserIds": ["manager7021"]},
    }
    assert second.body["msgtype"] == "actionCard" and "10.0.0.2:9100" in second.text
    assert [b["title"] for b in second.body["actionCard"]["btns"]] == ["静默", "Prometheus"]
    assert [r["notified_count"] for r in history(bridge)] == [
        1,
        1,
    ]  # the @ message carries no alert
    sends = history(bridge, "notifications")
    assert [s["alerts"] for s in sends] == [1, 0, 1] and all(s["errcode"] == 0 for s in sends)


def test_a_markdown_message_that_mentions_from_labels_is_exactly_this(make_bridge, fake, sqlite_db):
    receivers = {
        "ops": {"robots": "ops-1"},
        "dev": {
            "robots": "dev-1",
            "alert": "{alertname} on {instance}: {summary}",
            "at_map_label": "team",
            "at_map": "\n    dba = 13900000000, id:0123",
            "at_mobiles_from": "owner",
        },
    }
    bridge = make_bridge(sqlite_db, receivers=receivers)
    payload = make_payload(
        "dev",
        [
            make_alert(
                "Slow_query",
                "db-1:9104",
                labels={"team": "dba", "owner": "13700000000 all"},
                annotations={"summary": "p99 *way* up"},
            )
        ],
    )
    payload["groupLabels"] = {"alertname": "Slow_query"}
    assert post(bridge, payload)[0] == 200
    assert fake.wait_for(lambda f: len(f.delivered()) == 1)
    assert fake.delivered()[0].body == {
        "msgtype": "markdown",
        "markdown": {
            "title": "[CRITICAL · FIRING:1] Slow_query",
            "text": "#### [CRITICAL · FIRING:1] Slow\\_query\n\n"
            "Slow\\_query on db-1:9104: p99 \\*way\\* up\n\n"
            "@13900000000 @13700000000 @0123",
        },
        "at": {
            "atMobiles": ["13900000000", "13700000000"],
            "isAtAll": False,
            "atUserIds": ["0123"],
        },
    }


def test_without_send_resolved_a_resolution_is_recorded_not_sent(make_bridge, fake, database):
    bridge = make_bridge(
        database,
        receivers={
            "ops": {"robots": "ops-1", "send_resolved": "false"},
            "dev": {"robots": "dev-1"},
        },
    )
    post(bridge, make_payload("ops", [make_alert("DiskFull")]))
    settle(bridge)
    post(
        bridge,
        make_payload(
            "ops", [make_alert("DiskFull", status="resolved", ends_at="2026-11-24T08:05:00Z")]
        ),
    )
    settle(bridge)
    assert [m.body["markdown"]["title"] for m in fake.delivered()] == [
        "[CRITICAL · FIRING:1] DiskFull"
    ]
    assert [(r["status"], r["notified_count"]) for r in history(bridge)] == [("resolved", 1)]


def occurrence(starts, ends=None):
    status = "resolved" if ends else "firing"
    return make_payload(
        "ops",
        [
            make_alert(
                "DiskFull", status=status, starts_at=starts, ends_at=ends or "0001-01-01T00:00:00Z"
            )
        ],
    )


def test_a_recurring_alert_says_how_often_it_happened(make_bridge, fake, database):
    bridge = make_bridge(database)
    for payload in (
        occurrence("2026-11-24T08:00:00Z"),
        occurrence("2026-11-24T08:00:00Z", "2026-11-24T08:06:00Z"),
        occurrence("2026-11-24T09:00:00Z"),
        occurrence("2026-11-24T09:00:00Z", "2026-11-24T09:02:30Z"),
        occurrence("2026-11-24T10:00:00Z"),
    ):
        assert post(bridge, payload)[0] == 200
        settle(bridge)  # the history has it before the next one comes
    lines = [[line for line in m.text.splitlines() if "历史" in line] for m in fake.delivered()]
    assert lines == [
        [],
        [],
        ["- 历史：24 小时内第 2 次；上次 11-24 16:06 恢复，持续 6m"],
        [],
        ["- 历史：24 小时内第 3 次；上次 11-24 17:02 恢复，持续 2m30s"],
    ]


def test_a_store_that_does_not_answer_leaves_the_history_out_and_the_page_goes_out(
    make_bridge, fake
):
    silent = socket.socket()  # takes connections, never says a word: MySQL hung
    silent.bind(("127.0.0.1", 0))
    silent.listen(16)
    hung = alertbridge.Database(
        driver="mysql", host="127.0.0.1", port=silent.getsockname()[1], user="root", database="test"
    )
    try:
        bridge = make_bridge(hung)
        assert post(bridge, occurrence("2026-11-24T10:00:00Z"))[0] == 200
        assert fake.wait_for(lambda f: len(f.delivered()) == 1, timeout=60)
        assert "DiskFull" in fake.delivered()[0].text and "历史" not in fake.delivered()[0].text
    finally:
        silent.close()


def test_a_retry_state_logs_a_failure_when_it_changes_waits_longer_and_says_it_works_again(
    caplog,
):
    """Every worker and sender retries through one Retry: a failure repeated is logged once,
    the waits grow and stay bounded, and working again is said once."""
    retry = alertbridge.Retry("worker")
    with caplog.at_level(logging.INFO, logger="alertbridge"):
        waits = [retry.failed("worker: down; retrying") for _ in range(12)]
        retry.failed("worker: refused; retrying", logging.WARNING)
        retry.worked()
        retry.worked()
    lines = [(r.levelname, r.getMessage()) for r in caplog.records]
    assert lines == [
        ("ERROR", "worker: down; retrying"),
        ("WARNING", "worker: refused; retrying"),
        ("INFO", "worker: working again"),
    ]
    assert all(0 < w <= 30 for w in waits) and waits[-1] > waits[0]


def test_a_grafana_notification_goes_out_and_is_recorded_like_any_alert_once_if_sent_twice(
    make_bridge, fake, database
):
    bridge = make_bridge(database, receivers={"dev": {"robots": "dev-1"}})
    grafana = load_fixture("grafana-docs-firing.json")
    status, reply = post(bridge, grafana)
    assert status == 200 and reply["alerts"] == 2
    settle(bridge)
    page, = fake.delivered()     # Grafana's contact point names no receiver here: the default
    assert page.body["markdown"]["title"] == "[FIRING:2] High memory usage, High CPU usage"
    assert "- 数值：B=44.2394, C=1" in page.text
    assert "[Grafana](https://play.grafana.org/alerting/1afz29v7z/edit)" in page.text
    assert "https://play.grafana.org/alerting/silence/new?alertmanager=grafana" in page.text

    rows = history(bridge)
    assert [(r["alertname"], r["receiver"], r["status"]) for r in rows] == [
        ("High memory usage", "My Super Webhook", "firing"),
        ("High CPU usage", "My Super Webhook", "firing"),
    ]
    first = rows[0]
    assert first["generator_url"] == "https://play.grafana.org/alerting/1afz29v7z/edit"
    assert first["summary"] == "This alert was triggered for zone us-1"
    assert first["starts_at"] == "2021-10-12 07:51:03.157" and first["ends_at"] is None

    post(bridge, grafana)    # the same notification again (Grafana's HA peers, a retry)
    settle(bridge)
    rows = history(bridge)
    assert len(rows) == 2 and [r["received_count"] for r in rows] == [2, 2]
    assert len(history(bridge, "incidents")) == 1

    resolved = load_fixture("grafana-docs-firing.json")
    resolved.update(status="resolved", state="ok")
    for alert in resolved["alerts"]:
        alert.update(status="resolved", endsAt="2021-10-12T10:01:03.157076+02:00")
    post(bridge, resolved)
    settle(bridge)
    assert {r["status"] for r in history(bridge)} == {"resolved"}
    assert history(bridge, "incidents")[0]["resolved_at"] is not None


def test_grafanas_test_button_is_answered_only_once_its_page_is_on_its_way(
    make_bridge, fake, database
):
    """The contact point's Test in Grafana's UI says "sent" on our 200: the test notification
    (as grafana/alerting's newTestAlert makes it) must then reach the route's group."""
    bridge = make_bridge(database)
    status, reply = post(bridge, load_fixture("grafana-test-notification.json"),
                         path="/alertmanager/ops")
    assert status == 200 and reply["status"] == "accepted"
    settle(bridge)
    page, = fake.delivered()
    assert page.token == OPS[0] and "TestAlert" in page.body["markdown"]["title"]
    assert "- 数值：\\[ metric='foo' labels={instance=bar} value=10 \\]" in page.text
    assert [(r["alertname"], r["receiver"], r["instance"]) for r in history(bridge)] == [
        ("TestAlert", "ops", "Grafana")]
    status, reply = post(bridge, {**load_fixture("grafana-test-notification.json"), "orgId": "1"},
                         path="/alertmanager/ops")
    assert status == 400 and reply["error"] == "orgId: must be an integer"  # Grafana shows it
