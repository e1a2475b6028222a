"""The core pipeline end to end: webhook -> journal -> DingTalk + history, on SQLite and MariaDB."""

import json
import logging
import sqlite3
import time

import alertbridge

from conftest import (ROBOTS, SECRETS, history, load_fixture, make_alert, make_payload, mysql_connect,
                      mysql_settings, post, require_mysql, settle)

OPS = [ROBOTS[f"ops-{i}"]["token"] for i in (1, 2, 3)]


def test_group_goes_out_signed_with_mentions_and_is_recorded(make_daemon, fake, database):
    daemon = make_daemon(database)
    status, reply = post(daemon, load_fixture("am025-ops-firing-group.json"))
    assert status == 200 and reply["alerts"] == 2
    settle(daemon)

    [message] = fake.delivered()
    assert message.token == OPS[0]                      # first robot in turn; the fake checked its signature
    assert message.body["msgtype"] == "markdown"
    assert message.body["markdown"]["title"] == "[FIRING:2] DiskFull"
    text = message.text
    assert "10.0.0.1:9100" in text and "10.0.0.2:9100" in text and "磁盘将满" in text
    assert "2026-11-25 05:47:13" in text                # 21:47:13Z shown in Asia/Shanghai
    assert "@13800000000" in text and message.body["at"]["atMobiles"] == ["13800000000"]
    assert "[Prometheus](http://prom:9090/graph?g0.expr=up)" in text
    assert "http://vm:19093/#/silences/new?filter=" in text

    rows = history(daemon)
    assert [(r["instance"], r["severity"], r["status"]) for r in rows] == [
        ("10.0.0.1:9100", "critical", "firing"), ("10.0.0.2:9100", "warning", "firing")]
    first = rows[0]
    assert (first["alertname"], first["job"], first["receiver"]) == ("DiskFull", "node", "ops")
    assert (first["summary"], first["description"]) == ("磁盘将满", "usage 95%")
    assert json.loads(first["labels"]) == {"alertname": "DiskFull", "instance": "10.0.0.1:9100",
                                           "job": "node", "severity": "critical"}
    assert json.loads(first["annotations"])["summary"] == "磁盘将满"
    assert first["generator_url"] == "http://prom:9090/graph?g0.expr=up"
    assert first["starts_at"] == "2026-11-24 21:47:13.757" and first["ends_at"] is None
    assert (first["received_count"], first["notified_count"], first["robots"]) == (1, 1, "ops-1")

    [sent] = history(daemon, "notifications")
    assert (sent["receiver"], sent["robot"], sent["alerts"], sent["errcode"]) == ("ops", "ops-1", 2, 0)
    assert sent["fingerprints"] == "0ab899e06c62ec30,b2e09faafa783f36"


def test_repeat_counts_rotates_and_resolve_closes(make_daemon, fake, database):
    daemon = make_daemon(database)
    post(daemon, load_fixture("am025-ops-firing-group.json"))
    settle(daemon)
    post(daemon, load_fixture("am025-ops-firing-group.json"))   # Alertmanager's repeat_interval
    settle(daemon)
    second = fake.delivered()[1]
    assert second.token == OPS[1] and "告警" in second.text       # keyword robot gets its keyword

    rows = history(daemon)
    assert len(rows) == 2
    assert [(r["received_count"], r["notified_count"], r["robots"]) for r in rows] == [(2, 2, "ops-1,ops-2")] * 2

    post(daemon, load_fixture("am025-ops-partly-resolved.json"))
    settle(daemon)
    third = fake.delivered()[2]
    assert third.token == OPS[2]
    assert third.body["markdown"]["title"] == "[FIRING:1 RESOLVED:1] DiskFull"
    assert "2026-11-25 05:47:16" in third.text and "持续 3s" in third.text
    rows = {r["instance"]: r for r in history(daemon)}
    assert rows["10.0.0.1:9100"]["status"] == "resolved"
    assert rows["10.0.0.1:9100"]["ends_at"] == "2026-11-24 21:47:16.781"
    assert rows["10.0.0.2:9100"]["status"] == "firing" and rows["10.0.0.2:9100"]["ends_at"] is None
    assert rows["10.0.0.1:9100"]["notified_count"] == 3

    refire = make_payload("ops", [make_alert("DiskFull", "10.0.0.1:9100", fingerprint="0ab899e06c62ec30",
                                             starts_at="2026-11-24T23:00:00Z")])
    post(daemon, refire)                                          # a new startsAt is a new occurrence
    settle(daemon)
    assert len(history(daemon)) == 3


def test_robots_rotate_in_turn(make_daemon, fake, database):
    daemon = make_daemon(database)
    for i in range(6):
        post(daemon, make_payload("ops", [make_alert(instance=f"n{i}")]))
        settle(daemon)
    assert [m.token for m in fake.delivered()] == OPS + OPS


def test_failed_robot_fails_over_to_the_next(make_daemon, fake, database):
    daemon = make_daemon(database)
    fake.fail_next(OPS[0], -1)                 # "system busy"
    post(daemon, make_payload("ops", [make_alert()]))
    settle(daemon)
    assert [(r.token, r.errcode) for r in fake.requests] == [(OPS[0], -1), (OPS[1], 0)]
    sends = history(daemon, "notifications")
    assert [(s["robot"], s["errcode"]) for s in sends] == [("ops-1", -1), ("ops-2", 0)]
    [row] = history(daemon)
    assert (row["notified_count"], row["robots"]) == (1, "ops-2")


def test_unknown_receiver_uses_default_and_path_names_receiver(make_daemon, fake, database):
    daemon = make_daemon(database)
    post(daemon, make_payload("nobody", [make_alert("A")]))
    post(daemon, make_payload("nobody", [make_alert("B")]), path="/alertmanager/ops")
    settle(daemon)
    by_name = {m.body["markdown"]["title"]: m.token for m in fake.delivered()}
    assert by_name == {"[FIRING:1] A": ROBOTS["dev-1"]["token"], "[FIRING:1] B": OPS[0]}
    assert sorted((r["alertname"], r["receiver"]) for r in history(daemon)) == [("A", "nobody"), ("B", "ops")]


def test_per_alert_receiver_sends_one_message_per_alert(make_daemon, fake, database):
    daemon = make_daemon(database, receivers={"ops": {"robots": "ops-1, ops-2", "per_alert": "true"},
                                              "dev": {"robots": "dev-1"}})
    post(daemon, load_fixture("am025-ops-firing-group.json"))
    settle(daemon)
    titles = sorted(m.body["markdown"]["title"] for m in fake.delivered())
    assert titles == ["[FIRING:1] DiskFull", "[FIRING:1] DiskFull"]
    assert len({m.token for m in fake.delivered()}) == 2
    assert [r["notified_count"] for r in history(daemon)] == [1, 1]


def test_no_token_or_secret_in_logs_or_databases(make_daemon, fake, database, caplog):
    caplog.set_level(logging.DEBUG, logger="alertbridge")
    daemon = make_daemon(database)
    fake.fail_next(OPS[0], 310000)            # an error answer gets logged at ERROR with details
    post(daemon, load_fixture("am025-ops-firing-group.json"))
    post(daemon, load_fixture("am025-dev-firing.json"))
    settle(daemon)
    dumped = caplog.text
    for table in ("alerts", "notifications", "recorder_progress"):
        dumped += json.dumps(history(daemon, table, order="1"), default=str, ensure_ascii=False)
    journal = sqlite3.connect(daemon.config.journal_path)
    for table in ("events", "messages", "sends", "meta"):
        dumped += json.dumps(journal.execute(f"SELECT * FROM {table}").fetchall(), ensure_ascii=False)
    assert "ops-1" in dumped and "errcode=310000" in caplog.text
    leaked = [s for s in SECRETS if s in dumped]
    assert leaked == []


def test_recorder_batches_are_bounded_in_bytes_but_never_empty(tmp_path):
    journal = alertbridge.Journal(str(tmp_path / "journal.db"))
    with journal._writing() as db:
        for size in (600, 300, 300, 50):
            journal._run(db, alertbridge.J_EVENT_ADD, ("webhook", "x" * size, time.time()))
    assert [len(body) for _, _, body in journal.unrecorded(max_bytes=100)] == [600]   # one, however large
    assert [len(body) for _, _, body in journal.unrecorded(max_bytes=1000)] == [600, 300]
    assert len(journal.unrecorded(limit=3, max_bytes=10_000)) == 3


def drop_alerts_table(settings):
    if settings["driver"] == "sqlite":
        db = sqlite3.connect(settings["path"])
        db.execute("DROP TABLE alerts")
        db.commit()
        db.close()
        return
    db = mysql_connect()
    with db.cursor() as cursor:
        cursor.execute("DROP TABLE alerts")
    db.close()


def test_an_alert_larger_than_its_columns_is_recorded_cut_with_the_rest_of_its_webhook(make_daemon, fake, database):
    daemon = make_daemon(database)
    huge = make_alert("Huge", annotations={"summary": "摘要" * 40000, "description": "d" * 70000})
    post(daemon, make_payload("dev", [huge, make_alert("Small")]))
    settle(daemon)
    rows = {r["alertname"]: r for r in history(daemon)}
    assert set(rows) == {"Huge", "Small"}
    assert len(rows["Huge"]["summary"].encode()) <= 65535 and rows["Huge"]["summary"].startswith("摘要摘要")
    assert len(rows["Huge"]["description"]) == 65535
    assert json.loads(rows["Huge"]["annotations"])["description"] == "d" * 70000    # whole in the JSON


def test_a_dropped_history_table_is_created_again_and_nothing_is_lost(make_daemon, fake, database):
    daemon = make_daemon(database)
    post(daemon, make_payload("dev", [make_alert(instance="before")]))
    settle(daemon)
    drop_alerts_table(database)                             # a DBA's mistake, or a restore under way
    post(daemon, make_payload("dev", [make_alert(instance="after")]))
    settle(daemon)
    assert [r["instance"] for r in history(daemon)] == ["after"]
    assert daemon.recorder.store_ok and daemon.journal.message_states() == {"sent": 2}


def test_receivers_differing_by_case_or_emoji_stay_apart_in_both_stores(make_daemon, fake, database):
    daemon = make_daemon(database)
    for receiver in ("ops", "OPS", "ops🔥", "ops🚨", " ops "):   # the last is "ops": spaces are dropped
        post(daemon, make_payload(receiver, [make_alert(fingerprint="same", starts_at="2026-11-24T08:00:00Z")]))
    settle(daemon)
    rows = history(daemon)
    assert sorted(r["receiver"] for r in rows) == sorted(["ops", "OPS", "ops🔥", "ops🚨"])
    assert {r["receiver"]: r["received_count"] for r in rows}["ops"] == 2
    assert all(r["notified_count"] == (2 if r["receiver"] == "ops" else 1) for r in rows)


def test_a_mysql_history_table_made_by_0_3_gets_byte_wise_keys(make_daemon, fake):
    db = require_mysql()
    old_schema = alertbridge.MYSQL_SCHEMA.replace(" CHARACTER SET utf8mb4 COLLATE utf8mb4_bin", "")
    with db.cursor() as cursor:
        for table in ("alerts", "notifications", "recorder_progress"):
            cursor.execute(f"DROP TABLE IF EXISTS {table}")  # noqa: S608 (fixed names)
        for statement in old_schema.split(";"):
            if statement.strip():
                cursor.execute(statement)
    daemon = make_daemon(mysql_settings())
    for receiver in ("ops", "OPS"):
        post(daemon, make_payload(receiver, [make_alert(fingerprint="same")]))
    settle(daemon)
    assert sorted(r["receiver"] for r in history(daemon)) == ["OPS", "ops"]
    with db.cursor() as cursor:
        cursor.execute("SELECT COLUMN_NAME, COLLATION_NAME FROM information_schema.COLUMNS WHERE TABLE_SCHEMA = "
                       "DATABASE() AND TABLE_NAME = 'alerts' AND COLUMN_NAME IN ('receiver', 'fingerprint')")
        assert dict(cursor.fetchall()) == {"receiver": "utf8mb4_bin", "fingerprint": "utf8mb4_bin"}
    db.close()
