"""Storage: the journal (batches, migrations), the history store (values that do not fit, tables
that vanish, keys that must stay apart, outages) and the store process."""

import concurrent.futures
import os
import signal
import dataclasses
import json
import re
import sqlite3
import subprocess
import sys
import time

import pytest

import alertbridge
from tests.kit import (
    ROOT,
    SCRIPT,
    TcpProxy,
    config_text,
    delivered_ids,
    empty_mysql,
    free_port,
    get,
    gone,
    history,
    make_alert,
    make_payload,
    mysql_connect,
    mysql_settings,
    post,
    require_mysql,
    settle,
    store_processes,
    storm_payloads,
    wait_until,
)


def write_events(path, bodies):
    """Add journal events as another writer would (the journal's own tables, its own file)."""
    db = sqlite3.connect(path)
    db.executemany(
        "INSERT INTO events (kind, body, created_at) VALUES (?, ?, ?)",
        [("webhook", body, time.time()) for body in bodies],
    )
    db.commit()
    db.close()


def test_recorder_batches_are_bounded_in_bytes_but_never_empty(tmp_path):
    journal = alertbridge.Journal(str(tmp_path / "journal.db"))
    write_events(journal.path, ["x" * size for size in (600, 300, 300, 50)])
    assert [len(body) for _, _, body in journal.unrecorded(max_bytes=100)] == [
        600
    ]  # one, however large
    assert [len(body) for _, _, body in journal.unrecorded(max_bytes=1000)] == [600, 300]
    assert len(journal.unrecorded(limit=3, max_bytes=10_000)) == 3


JOURNAL_0_3 = """
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE events (id INTEGER PRIMARY KEY AUTOINCREMENT, kind TEXT NOT NULL, body TEXT NOT NULL,
    created_at REAL NOT NULL, recorded INTEGER NOT NULL DEFAULT 0);
CREATE INDEX events_unrecorded ON events (recorded, id);
CREATE TABLE messages (id INTEGER PRIMARY KEY AUTOINCREMENT, receiver TEXT NOT NULL,
    request_id TEXT NOT NULL, body TEXT NOT NULL, packed INTEGER NOT NULL DEFAULT 0,
    state TEXT NOT NULL DEFAULT 'pending',
    created_at REAL NOT NULL, attempts INTEGER NOT NULL DEFAULT 0, next_attempt_at REAL NOT NULL,
    last_error TEXT NOT NULL DEFAULT '', done_at REAL);
CREATE INDEX messages_pending ON messages (state, receiver, id);
CREATE INDEX messages_due ON messages (state, next_attempt_at);
CREATE TABLE sends (id INTEGER PRIMARY KEY AUTOINCREMENT, robot TEXT NOT NULL, at REAL NOT NULL,
    errcode INTEGER);
CREATE INDEX sends_at ON sends (at);
INSERT INTO meta VALUES ('journal_id', 'journal-of-0.3');
INSERT INTO messages (receiver, request_id, body, created_at, next_attempt_at)
    VALUES ('dev', 'r1', '{"alerts": [], "truncated": 0}', 1, 1);
INSERT INTO sends (robot, at, errcode) VALUES ('dev-1', 1e10, 0);
"""


def test_a_journal_made_by_0_3_is_migrated_and_keeps_its_work(tmp_path):
    path = str(tmp_path / "journal.db")
    db = sqlite3.connect(path)
    db.executescript(JOURNAL_0_3)
    db.close()
    journal = alertbridge.Journal(path)
    assert journal.journal_id == "journal-of-0.3"  # recording goes on where it was
    assert journal.pending_routes() == ["dev"] and [
        m.id for m in journal.due_messages("dev", 2)
    ] == [1]
    assert journal.recent_sends(0) == [("dev-1", "", 1e10, 0)]  # matched to its robot by name


def drop_alerts_table(settings):
    if settings.driver == "sqlite":
        db = sqlite3.connect(settings.path)
        db.execute("DROP TABLE alerts")
        db.commit()
        db.close()
        return
    db = mysql_connect()
    with db.cursor() as cursor:
        cursor.execute("DROP TABLE alerts")
    db.close()


def test_an_alert_larger_than_its_columns_is_recorded_cut_with_the_rest_of_its_webhook(
    make_bridge, fake, database
):
    bridge = make_bridge(database)
    huge = make_alert("Huge", annotations={"summary": "摘要" * 40000, "description": "d" * 70000})
    post(bridge, make_payload("dev", [huge, make_alert("Small")]))
    settle(bridge)
    rows = {r["alertname"]: r for r in history(bridge)}
    assert set(rows) == {"Huge", "Small"}
    assert len(rows["Huge"]["summary"].encode()) <= 65535 and rows["Huge"]["summary"].startswith(
        "摘要摘要"
    )
    assert len(rows["Huge"]["description"]) == 65535
    assert (
        json.loads(rows["Huge"]["annotations"])["description"] == "d" * 70000
    )  # whole in the JSON


def test_what_fires_now_comes_from_the_history_newest_first(make_bridge, fake, database):
    bridge = make_bridge(database)
    post(
        bridge,
        make_payload(
            "dev",
            [
                make_alert("Old", starts_at="2026-11-24T07:00:00Z"),
                make_alert("New", starts_at="2026-11-24T09:30:00.5Z"),
                make_alert("Mid", starts_at="2026-11-24T08:00:00Z"),
            ],
        ),
    )
    post(
        bridge,
        make_payload(
            "dev",
            [
                make_alert(
                    "Mid",
                    status="resolved",
                    starts_at="2026-11-24T08:00:00Z",
                    ends_at="2026-11-24T08:10:00Z",
                )
            ],
        ),
    )
    settle(bridge)
    count, rows = bridge.store.firing(1)
    assert count == 2
    assert rows == [
        {
            "receiver": "dev",
            "alertname": "New",
            "severity": "critical",
            "instance": "node-1:9100",
            "summary": "New on node-1:9100",
            "starts_at": "2026-11-24 09:30:00.500",
        }
    ]


def test_a_dropped_history_table_is_created_again_and_nothing_is_lost(make_bridge, fake, database):
    bridge = make_bridge(database)
    post(bridge, make_payload("dev", [make_alert(instance="before")]))
    settle(bridge)
    drop_alerts_table(database)  # a DBA's mistake, or a restore under way
    post(bridge, make_payload("dev", [make_alert(instance="after")]))
    settle(bridge)
    assert [r["instance"] for r in history(bridge)] == ["after"]
    assert bridge.recorder.store_ok and bridge.journal.message_states() == {"sent": 2}


def test_receivers_differing_by_case_or_emoji_stay_apart_in_both_stores(
    make_bridge, fake, database
):
    bridge = make_bridge(database)
    for receiver in (
        "ops",
        "OPS",
        "ops🔥",
        "ops🚨",
        " ops ",
    ):  # the last is "ops": spaces are dropped
        post(
            bridge,
            make_payload(
                receiver, [make_alert(fingerprint="same", starts_at="2026-11-24T08:00:00Z")]
            ),
        )
    settle(bridge)
    rows = history(bridge)
    assert sorted(r["receiver"] for r in rows) == sorted(["ops", "OPS", "ops🔥", "ops🚨"])
    assert {r["receiver"]: r["received_count"] for r in rows}["ops"] == 2
    assert all(r["notified_count"] >= 1 for r in rows)  # "ops" twice, or once if both copies waited


def history_tables_of_0_3(db):
    """The test database's history tables as 0.3 made them: keys in the default collation."""
    old_schema = alertbridge.MYSQL_SCHEMA.replace(" CHARACTER SET utf8mb4 COLLATE utf8mb4_bin", "")
    with db.cursor() as cursor:
        for table in ("alerts", "notifications", "recorder_progress"):
            cursor.execute(f"DROP TABLE IF EXISTS {table}")  # noqa: S608 (fixed names)
        for statement in alertbridge.statements(old_schema):
            cursor.execute(statement)


def test_a_mysql_history_table_made_by_0_3_gets_byte_wise_keys(make_bridge, fake):
    db = require_mysql()
    history_tables_of_0_3(db)
    bridge = make_bridge(mysql_settings())
    for receiver in ("ops", "OPS"):
        post(bridge, make_payload(receiver, [make_alert(fingerprint="same")]))
    settle(bridge)
    assert sorted(r["receiver"] for r in history(bridge)) == ["OPS", "ops"]
    with db.cursor() as cursor:
        cursor.execute(
            "SELECT COLUMN_NAME, COLLATION_NAME FROM information_schema.COLUMNS WHERE "
            "TABLE_SCHEMA = "
            "DATABASE() AND TABLE_NAME = 'alerts' AND COLUMN_NAME IN ('receiver', 'fingerprint')"
        )
        assert dict(cursor.fetchall()) == {"receiver": "utf8mb4_bin", "fingerprint": "utf8mb4_bin"}
    db.close()


def test_an_event_the_store_refuses_is_set_aside_and_recording_goes_on(make_bridge, fake, database):
    bridge = make_bridge(database)
    write_events(
        bridge.journal.path, [json.dumps({"alerts": [{"receiver": "x"}]})]
    )  # no store can take it
    post(bridge, make_payload("dev", [make_alert()]))
    settle(bridge)
    assert len(history(bridge)) == 1
    assert "alertbridge_record_failures_total 1" in bridge.probes.render_metrics()
    db = sqlite3.connect(bridge.journal.path)
    assert db.execute("SELECT COUNT(*) FROM events WHERE recorded = 2").fetchone() == (
        1,
    )  # kept, as failed
    db.close()


def test_store_process_is_restarted_if_it_dies_and_ends_with_the_bridge(
    make_bridge, fake, database
):
    bridge = make_bridge(database)
    post(bridge, make_payload("dev", [make_alert(instance="before")]))
    settle(bridge)
    [first] = store_processes()
    os.kill(first, signal.SIGKILL)  # OOM killer, a stray kill -9...
    assert wait_until(lambda: gone(first))
    post(bridge, make_payload("dev", [make_alert(instance="after")]))
    settle(bridge)
    assert {r["instance"] for r in history(bridge)} == {"before", "after"}
    [second] = store_processes()
    assert second != first and not gone(second)
    bridge.stop()
    assert gone(second)


def post_all(target, payloads, workers=8):
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        return list(pool.map(lambda p: post(target, p)[0], payloads))


def test_mysql_outage_delays_history_not_paging(make_bridge, fast_fake):
    settings = empty_mysql()
    proxy = TcpProxy(settings.port).start()
    bridge = make_bridge(
        dataclasses.replace(settings, port=proxy.port),
        delivery={"rate_window": "1", "retry_base": "0.05", "retry_max": "0.2"},
    )
    post(bridge, make_payload("ops", [make_alert(instance="before")]))
    settle(bridge)

    proxy.cut()
    during = [make_payload("ops", [make_alert(instance=f"during-{i}")]) for i in range(5)]
    assert post_all(bridge, storm_payloads(groups=40, per_group=5) + during) == [200] * 45
    expected = {f"storm-{g}-{i}" for g in range(40) for i in range(5)} | {
        f"during-{i}" for i in range(5)
    }
    assert fast_fake.wait_for(lambda f: delivered_ids(f) >= expected, timeout=60)  # paging went on
    assert wait_until(lambda: bridge.recorder.store_ok is False)
    status, ready = post(bridge, None, path="/-/ready", method="GET")
    assert status == 200 and "unreachable" in ready["store"]
    assert "alertbridge_store_up 0" in bridge.probes.render_metrics()
    assert [r["instance"] for r in history(settings)] == ["before"]

    proxy.start()  # MySQL is back on the same address
    settle(bridge, timeout=60)
    rows = history(settings)
    assert len(rows) == 1 + 200 + 5 and {r["instance"] for r in rows} >= {"before"} | expected
    assert all(r["notified_count"] >= 1 for r in rows)
    sends = history(settings, "notifications")
    assert sum(s["alerts"] for s in sends if s["errcode"] == 0) >= 206


def test_a_missing_privilege_is_named_once_and_a_grant_fixes_it_without_a_restart(daemon, fake):
    """Without ALTER, which the upgrade from 0.3 needs, the log repeated the error and /-/ready
    said "unreachable", sending the operator to the network."""
    db = require_mysql()
    history_tables_of_0_3(db)
    with db.cursor() as cursor:
        cursor.execute("DROP USER IF EXISTS 'ab_no_alter'@'%'")
        cursor.execute("CREATE USER 'ab_no_alter'@'%' IDENTIFIED BY 'no-alter-pw'")
        cursor.execute(
            "GRANT SELECT, INSERT, UPDATE, DELETE, CREATE, INDEX "
            f"ON {mysql_settings().database}.* TO 'ab_no_alter'@'%'"
        )
    try:
        child = daemon(
            database=dataclasses.replace(
                mysql_settings(), user="ab_no_alter", password="no-alter-pw"
            )
        )
        child.wait_healthy()
        assert post(child.url, make_payload("dev", [make_alert()]))[0] == 200
        assert fake.wait_for(lambda f: len(f.delivered()) == 1)  # paging never waits for it
        assert wait_until(lambda: "access denied" in get(child.url, "/-/ready")[1]["store"])
        child.wait_log("Grant what docs/operations.md")
        with db.cursor() as cursor:
            cursor.execute(f"GRANT ALTER ON {mysql_settings().database}.* TO 'ab_no_alter'@'%'")
        assert wait_until(lambda: len(history(mysql_settings())) == 1, timeout=90)
        assert wait_until(lambda: get(child.url, "/-/ready")[1]["store"] == "ok")
        text = child.log.read_text(encoding="utf-8")
        assert text.count("refuses a privilege") == 1 and text.count("making alerts.receiver") == 1
        assert "unreachable" not in text
    finally:
        with db.cursor() as cursor:
            cursor.execute("DROP USER IF EXISTS 'ab_no_alter'@'%'")
        db.close()


OPERATIONS = (ROOT / "docs" / "operations.md").read_text(encoding="utf-8")


def check_config(tmp_path, fake, database):
    """--check-config of a config with this [database], as a child process."""
    path = tmp_path / "config.ini"
    path.write_text(config_text(fake.url, database), encoding="utf-8")
    return subprocess.run(
        [sys.executable, SCRIPT, "-c", str(path), "--check-config"],
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.fixture
def login():
    """A MySQL user of its own, password `right`, with every privilege the daemon needs but
    ALTER, on the test database: its settings, and a root session to grant with."""
    settings, db = empty_mysql(), mysql_connect()
    user = f"ab_{settings.database}"[:32]
    with db.cursor() as cursor:
        cursor.execute("DROP USER IF EXISTS %s@'%%'", (user,))
        cursor.execute("CREATE USER %s@'%%' IDENTIFIED BY 'right'", (user,))
        cursor.execute(
            f"GRANT SELECT, INSERT, UPDATE, DELETE, CREATE, INDEX ON `{settings.database}`.* "
            "TO %s@'%%'",
            (user,),
        )
    yield dataclasses.replace(settings, user=user, password="right"), db
    with db.cursor() as cursor:
        cursor.execute("DROP USER IF EXISTS %s@'%%'", (user,))
    db.close()


def test_check_config_logs_in_as_the_daemon_and_names_what_the_server_refuses(
    tmp_path, fake, login
):
    """A wrong password passed --check-config; then the daemon sent the operator to the grants."""
    settings, db = login
    where = f"history {settings.describe()}"
    wrong = check_config(tmp_path, fake, dataclasses.replace(settings, password="wrong"))
    assert wrong.returncode == 1 and "NOT OK" in wrong.stdout
    assert wrong.stderr == f"error: {where}: login refused: check [database] user and password\n"
    root = mysql_settings()
    missing = dataclasses.replace(root, database="ab_no_such_database")
    absent = check_config(tmp_path, fake, missing)
    assert absent.returncode == 1 and absent.stderr == (
        f"error: history {missing.describe()}: no database ab_no_such_database on the server: "
        f'create it (docs/operations.md, "History in MySQL")\n'
    )
    lacking = check_config(tmp_path, fake, settings)
    assert lacking.returncode == 1 and lacking.stderr == (
        f'error: {where}: the user lacks ALTER: grant what docs/operations.md, "History in '
        f'MySQL" lists\n'
    )
    with db.cursor() as cursor:
        cursor.execute(f"GRANT ALTER ON `{settings.database}`.* TO %s@'%%'", (settings.user,))
    granted = check_config(tmp_path, fake, settings)
    assert granted.returncode == 0 and granted.stderr == "", granted.stderr
    assert granted.stdout.startswith(f"config {tmp_path / 'config.ini'}: OK")
    with db.cursor() as cursor:
        cursor.execute("SHOW TABLES")
        assert cursor.fetchall() == ()  # the check changed nothing
    away = check_config(tmp_path, fake, dataclasses.replace(settings, port=free_port()))
    assert away.returncode == 0 and "cannot be reached now" in away.stdout  # paging goes on
    documented = re.search(r"^GRANT (.*) ON alertbridge", OPERATIONS, re.M).group(1).split(", ")
    assert [p for p, _ in alertbridge.S_PRIVILEGE_TRIALS] == documented


def test_a_refused_login_is_logged_as_the_password_not_as_a_grant(daemon, fake, login):
    settings, _ = login
    child = daemon(database=dataclasses.replace(settings, password="wrong"))
    child.wait_healthy()
    assert post(child.url, make_payload("dev", [make_alert()]))[0] == 200
    assert fake.wait_for(lambda f: len(f.delivered()) == 1)  # paging never waits for it
    child.wait_log("login refused: check [database] user and password")
    text = child.log.read_text(encoding="utf-8")
    assert "history store refuses alertbridge's login" in text and "Grant what" not in text
