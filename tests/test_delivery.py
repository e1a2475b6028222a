"""Delivery that never loses a page: budgets, digests, failover, retries, expiry, outages, crashes."""

import concurrent.futures
import contextlib
import json
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest

import alertbridge
from conftest import (IN_CI, ROBOTS, ROOT, config_text, history, make_alert, make_payload, post, require_mysql,
                      settle)

OPS = [ROBOTS[f"ops-{i}"]["token"] for i in (1, 2, 3)]
FAST = {"rate_window": "1", "throttle_seconds": "600", "retry_base": "0.05", "retry_max": "0.2"}
STORM_ID = re.compile(r"storm-\d+-\d+")


def wait_until(predicate, timeout=30.0, every=0.02):
    """Poll a condition that has no event to wait on (a process's state, another database)."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(every)


def storm_payloads(groups, per_group, receiver="ops"):
    return [make_payload(receiver, [make_alert(f"Storm{g % 7}", f"storm-{g}-{i}", severity="warning",
                                               starts_at="2026-11-24T08:00:00Z")
                                    for i in range(per_group)]) for g in range(groups)]


def delivered_ids(fake):
    return {found for message in fake.delivered() for found in STORM_ID.findall(message.text)}


def post_all(target, payloads, workers=8):
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        return list(pool.map(lambda p: post(target, p)[0], payloads))


@pytest.fixture
def fast_fake(fake):
    fake.rate_window = 1.0          # the fake enforces 20 per window per token, like DingTalk per minute
    return fake


def test_storm_reaches_the_group_within_every_budget(make_daemon, fast_fake, database):
    daemon = make_daemon(database, delivery=FAST)
    payloads = storm_payloads(groups=200, per_group=10)
    assert post_all(daemon, payloads) == [200] * 200
    expected = {f"storm-{g}-{i}" for g in range(200) for i in range(10)}
    assert fast_fake.wait_for(lambda f: delivered_ids(f) >= expected, timeout=60)
    settle(daemon, timeout=60)

    assert [r for r in fast_fake.requests if r.errcode == 410100] == []
    assert all(fast_fake.max_per_window(token) <= 20 for token in OPS)
    assert len(fast_fake.delivered()) < 200                      # merged into digests
    assert any("##### Storm" in m.text for m in fast_fake.delivered())
    assert all(m.size <= 20000 for m in fast_fake.requests)
    rows = history(daemon)
    assert len(rows) == 2000 and min(r["notified_count"] for r in rows) >= 1


def test_budget_survives_a_restart(make_daemon, fake, sqlite_db):
    receivers = {"dev": {"robots": "dev-1"}}
    daemon = make_daemon(sqlite_db, receivers=receivers, delivery={"rate_limit": "3", "rate_window": "3600"})
    for i in range(3):
        post(daemon, make_payload("dev", [make_alert(instance=f"n{i}")]))
        settle(daemon)
    daemon.stop()
    again = make_daemon(sqlite_db, receivers=receivers, delivery={"rate_limit": "3", "rate_window": "3600"})
    receiver = again.config.receivers["dev"]
    assert again.pool.available(receiver, time.time()) == 0
    post(again, make_payload("dev", [make_alert(instance="n3")]))
    assert again.notifier.step() is False                     # nothing may go out: it waits
    assert again.journal.backlog()[0] == 1 and len(fake.requests) == 3


def test_throttled_robot_rests_and_others_take_over(make_daemon, fake, sqlite_db):
    daemon = make_daemon(sqlite_db)
    fake.fail_next(OPS[0], 410100)
    for i in range(4):
        post(daemon, make_payload("ops", [make_alert(instance=f"n{i}")]))
        settle(daemon)
    assert [(r.token, r.errcode) for r in fake.requests] == [
        (OPS[0], 410100), (OPS[1], 0), (OPS[2], 0), (OPS[1], 0), (OPS[2], 0)]
    metrics = daemon.render_metrics()
    assert 'alertbridge_robot_throttled{robot="ops-1"} 1' in metrics
    assert 'alertbridge_sends_total{errcode="410100",receiver="ops",robot="ops-1"} 1' in metrics


def test_misconfigured_robot_leaves_rotation_until_reload(make_daemon, fake, sqlite_db, caplog):
    caplog.set_level(logging.INFO, logger="alertbridge")
    wrong = {**ROBOTS, "ops-1": {**ROBOTS["ops-1"], "secret": "SECwrong"}}
    daemon = make_daemon(sqlite_db, robots=wrong)
    for i in range(3):
        post(daemon, make_payload("ops", [make_alert(instance=f"n{i}")]))
        settle(daemon)
    assert [(r.token, r.errcode) for r in fake.requests] == [(OPS[0], 310000), (OPS[1], 0), (OPS[2], 0), (OPS[1], 0)]
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert any("robot=ops-1" in e and "out of rotation" in e for e in errors)

    path = daemon.config.path                                   # the operator fixes the secret and reloads
    with open(path, "w", encoding="utf-8") as fh:
        fh.write(config_text(fake, sqlite_db, main={"state_dir": "state", "journal_sync": "normal"}))
    assert post(daemon, b"", path="/-/reload")[0] == 200
    for i in range(3):
        post(daemon, make_payload("ops", [make_alert(instance=f"m{i}")]))
        settle(daemon)
    assert OPS[0] in [r.token for r in fake.delivered()]


def test_every_robot_failing_is_retried_with_backoff(make_daemon, fake, database):
    receivers = {"dev": {"robots": "dev-1"}}
    daemon = make_daemon(database, receivers=receivers)
    token = ROBOTS["dev-1"]["token"]
    fake.fail_next(token, "http500", 2)
    fake.fail_next(token, -1)
    post(daemon, make_payload("dev", [make_alert()]))
    settle(daemon)
    assert [r.errcode for r in fake.requests] == [-1, -1, -1, 0]
    sends = history(daemon, "notifications")
    assert [(s["errcode"], s["errmsg"]) for s in sends][:2] == [(None, "HTTP 500")] * 2
    assert [s["errcode"] for s in sends][2:] == [-1, 0]
    assert history(daemon)[0]["notified_count"] == 1


def test_undeliverable_message_expires_but_is_kept(make_daemon, fake, sqlite_db, caplog):
    caplog.set_level(logging.ERROR, logger="alertbridge")
    robots = {**ROBOTS, "dev-1": {"token": "tok-not-registered"}}
    daemon = make_daemon(sqlite_db, robots=robots, receivers={"dev": {"robots": "dev-1"}},
                         delivery={"max_age": "1"})
    post(daemon, make_payload("dev", [make_alert()]))
    assert wait_until(lambda: daemon.journal.message_states().get("expired") == 1)
    assert "alertbridge_messages_expired_total{receiver=\"dev\"} 1" in daemon.render_metrics()
    assert any("expired" in r.getMessage() for r in caplog.records)
    assert daemon.recorder.wait_idle(10) and len(history(daemon)) == 1


def test_ack_does_not_wait_for_a_slow_dingtalk(make_daemon, fake, sqlite_db):
    fake.latency = 2.0
    daemon = make_daemon(sqlite_db)
    for i in range(5):
        status, _ = post(daemon, make_payload("ops", [make_alert(instance=f"n{i}")]))
        assert status == 200
    assert fake.delivered() == []           # five acks came back before DingTalk answered even once
    assert fake.wait_for(lambda f: len(f.delivered()) >= 1, timeout=10)


class TcpProxy:
    """A loopback TCP forwarder the test can cut, to make MySQL unreachable and come back."""

    def __init__(self, target_port):
        self.target_port = target_port
        self.port = None
        self.sockets = []
        self.listener = None

    def start(self):
        self.listener = socket.socket()
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listener.bind(("127.0.0.1", self.port or 0))
        self.listener.listen(16)
        self.port = self.listener.getsockname()[1]
        threading.Thread(target=self._accept, args=(self.listener,), daemon=True).start()
        return self

    def _accept(self, listener):
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", self.target_port))
            self.sockets += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(a, b):
        try:
            while data := a.recv(65536):
                b.sendall(data)
        except OSError:
            pass
        finally:
            for s in (a, b):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def cut(self):
        try:
            self.listener.shutdown(socket.SHUT_RDWR)   # wakes the blocked accept() so the port frees
        except OSError:
            pass
        self.listener.close()
        for s in self.sockets:
            try:
                s.shutdown(socket.SHUT_RDWR)
                s.close()
            except OSError:
                pass
        self.sockets = []


def test_mysql_outage_delays_history_not_paging(make_daemon, fake):
    require_mysql().close()
    from conftest import mysql_settings
    settings = mysql_settings()
    db = require_mysql()
    with db.cursor() as cursor:
        for table in ("alerts", "notifications", "recorder_progress"):
            cursor.execute(f"DROP TABLE IF EXISTS {table}")  # noqa: S608
    db.close()
    proxy = TcpProxy(settings["port"]).start()
    daemon = make_daemon({**settings, "port": str(proxy.port)}, delivery=FAST)
    post(daemon, make_payload("ops", [make_alert(instance="before")]))
    settle(daemon)

    proxy.cut()
    during = [make_payload("ops", [make_alert(instance=f"during-{i}")]) for i in range(5)]
    assert post_all(daemon, storm_payloads(groups=40, per_group=5) + during) == [200] * 45
    expected = {f"storm-{g}-{i}" for g in range(40) for i in range(5)}
    assert fake.wait_for(lambda f: delivered_ids(f) >= expected and "during-4" in "".join(
        m.text for m in f.delivered()), timeout=60)                # paging went on
    assert wait_until(lambda: daemon.recorder.store_ok is False)
    status, ready = post(daemon, None, path="/-/ready", method="GET")
    assert status == 200 and "unreachable" in ready["store"]
    assert "alertbridge_store_up 0" in daemon.render_metrics()
    assert [r["instance"] for r in history(daemon)] == ["before"]

    proxy.start()                                                  # MySQL is back on the same address
    settle(daemon, timeout=60)
    rows = history(daemon)
    assert len(rows) == 1 + 200 + 5
    assert {r["instance"] for r in rows} >= {"before"} | expected | {f"during-{i}" for i in range(5)}
    assert all(r["notified_count"] >= 1 for r in rows)
    sends = history(daemon, "notifications")
    assert sum(s["alerts"] for s in sends if s["errcode"] == 0) >= 206


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_process(config_path, log_path):
    process = subprocess.Popen([sys.executable, str(ROOT / "alertbridge.py"), "-c", str(config_path)],
                               stderr=open(log_path, "ab"), stdout=subprocess.DEVNULL)
    return process


def metric(url, name):
    status, text = post(url, None, path="/metrics", method="GET")
    match = re.search(rf"^{name} (\S+)$", text, re.M)
    return float(match.group(1))


def test_kill_9_mid_storm_loses_nothing(tmp_path, fast_fake, database):
    port = free_port()
    config_path = tmp_path / "config.ini"
    config_path.write_text(config_text(fast_fake, database, main={"port": str(port), "journal_sync": "full"},
                                       delivery=FAST), encoding="utf-8")
    url = f"http://127.0.0.1:{port}"
    log_path = tmp_path / "daemon.log"
    process = start_process(config_path, log_path)
    assert wait_until(lambda: _healthy(url), timeout=30)

    payloads = storm_payloads(groups=150, per_group=10)
    outcome = [None] * len(payloads)
    enough = threading.Event()

    def storm():
        for i, payload in enumerate(payloads):
            try:
                outcome[i] = post(url, payload)[0]
            except OSError:
                outcome[i] = "refused"
            if sum(o == 200 for o in outcome if o) >= 60:
                enough.set()
        enough.set()

    sender = threading.Thread(target=storm)
    sender.start()
    assert enough.wait(60)
    [store_process] = _children(process.pid)
    process.send_signal(signal.SIGKILL)
    process.wait()
    sender.join()
    assert wait_until(lambda: _gone(store_process))               # no orphan left writing the history
    accepted_before = sum(o == 200 for o in outcome)
    assert 60 <= accepted_before < 150                            # killed mid-storm

    process = start_process(config_path, log_path)
    try:
        assert wait_until(lambda: _healthy(url), timeout=30)
        for i, payload in enumerate(payloads):                   # Alertmanager retries what was not acked
            if outcome[i] != 200:
                assert post(url, payload)[0] == 200
        expected = {f"storm-{g}-{i}" for g in range(150) for i in range(10)}
        assert fast_fake.wait_for(lambda f: delivered_ids(f) >= expected, timeout=90), \
            sorted(expected - delivered_ids(fast_fake))[:5]
        assert wait_until(lambda: metric(url, "alertbridge_record_backlog_events") == 0, timeout=60)
    finally:
        process.send_signal(signal.SIGTERM)
        assert process.wait(30) == 0
    rows = _rows(database, tmp_path)
    assert {r for r in rows} >= expected and len(rows) == 1500
    assert [r for r in fast_fake.requests if r.errcode == 410100] == []


def _children(pid):
    import pathlib
    children = []
    for task in pathlib.Path(f"/proc/{pid}/task").iterdir():       # each thread's children
        try:
            children += [int(child) for child in (task / "children").read_text().split()]
        except FileNotFoundError:                                   # the thread ended meanwhile
            pass
    return children


def _gone(pid):
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] in ("Z", "X")   # exited, not yet reaped
    except FileNotFoundError:
        return True


def test_store_process_is_restarted_if_it_dies_and_ends_with_the_daemon(make_daemon, fake, database):
    daemon = make_daemon(database)
    post(daemon, make_payload("dev", [make_alert(instance="before")]))
    settle(daemon)
    first = daemon.store._child
    first.kill()                                                  # OOM killer, a stray kill -9...
    first.wait()
    post(daemon, make_payload("dev", [make_alert(instance="after")]))
    settle(daemon)
    assert {r["instance"] for r in history(daemon)} == {"before", "after"}
    second = daemon.store._child
    assert second.pid != first.pid and second.poll() is None
    daemon.stop()
    assert second.poll() is not None


def _healthy(url):
    try:
        return post(url, None, path="/-/healthy", method="GET")[0] == 200
    except OSError:
        return False


def _rows(database, tmp_path):
    """Instances recorded in the history the subprocess wrote."""
    if database["driver"] == "sqlite":
        import sqlite3
        db = sqlite3.connect(database["path"])
        rows = [r[0] for r in db.execute("SELECT instance FROM alerts")]
        db.close()
        return rows
    db = require_mysql()
    with db.cursor() as cursor:
        cursor.execute("SELECT instance FROM alerts")
        rows = [r[0] for r in cursor.fetchall()]
    db.close()
    return rows


def test_an_event_the_store_refuses_is_set_aside_and_recording_goes_on(make_daemon, fake, database):
    import json as _json
    import alertbridge
    daemon = make_daemon(database)
    with daemon.journal._writing() as db:              # an event no store can take (no received_at)
        daemon.journal._run(db, alertbridge.J_EVENT_ADD,
                            ("webhook", _json.dumps({"alerts": [{"receiver": "x"}]}), time.time()))
    post(daemon, make_payload("dev", [make_alert()]))
    settle(daemon)
    assert len(history(daemon)) == 1
    assert "alertbridge_record_failures_total 1" in daemon.render_metrics()
    assert daemon.journal._read("SELECT COUNT(*) FROM events WHERE recorded = 2") == [(1,)]


def test_dingtalk_down_for_a_while_loses_nothing(make_daemon, fast_fake, database):
    daemon = make_daemon(database, delivery=FAST)
    port = fast_fake.server.server_address[1]
    fast_fake.stop()                                               # DingTalk unreachable: refused
    payloads = storm_payloads(groups=30, per_group=5)
    assert post_all(daemon, payloads) == [200] * 30
    assert wait_until(lambda: "errcode=\"none\"" in daemon.render_metrics())   # sends are failing
    fast_fake.start(port)                                          # and back on the same address
    expected = {f"storm-{g}-{i}" for g in range(30) for i in range(5)}
    assert fast_fake.wait_for(lambda f: delivered_ids(f) >= expected, timeout=60)
    settle(daemon, timeout=60)
    rows = history(daemon)
    assert len(rows) == 150 and min(r["notified_count"] for r in rows) >= 1
    failures = [s for s in history(daemon, "notifications") if s["errcode"] is None]
    assert failures and all(s["errmsg"].startswith("network") for s in failures)


def test_a_send_cut_off_by_a_crash_still_counts_against_the_budget(make_daemon, fake, sqlite_db):
    options = {"receivers": {"dev": {"robots": "dev-1"}}, "delivery": {"rate_limit": "3", "rate_window": "3600"}}
    daemon = make_daemon(sqlite_db, **options)
    robot = daemon.config.receivers["dev"].robots[0]
    daemon.journal.begin_send(robot.name, robot.key, time.time() + 5)   # the request went out, then kill -9
    daemon.stop()
    again = make_daemon(sqlite_db, **options)
    assert again.pool.available(again.config.receivers["dev"], time.time()) == 2


# --- what DingTalk, the network or the disk may do: nothing of it wedges paging -----------------

DEV = ROBOTS["dev-1"]["token"]
ONE_ROBOT = {"dev": {"robots": "dev-1"}}


@pytest.mark.parametrize("broken", ["json-array", "json-null", "bad-status-line", "cut-chunked"])
def test_a_broken_answer_is_no_answer_and_gives_the_budget_slot_back(make_daemon, fake, sqlite_db, caplog, broken):
    caplog.set_level(logging.INFO, logger="alertbridge")
    fake.rate_window = 1.0
    daemon = make_daemon(sqlite_db, receivers=ONE_ROBOT,
                         delivery={"rate_limit": "2", "rate_window": "1", "retry_base": "0.05", "retry_max": "0.1"})
    fake.fail_next(DEV, broken, 4)          # twice the budget: each slot must come back
    post(daemon, make_payload("dev", [make_alert()]))
    assert fake.wait_for(lambda f: len(f.delivered()) == 1, timeout=30)
    settle(daemon)
    sends = history(daemon, "notifications")
    assert [s["errcode"] for s in sends] == [None] * 4 + [0]
    assert all(s["errmsg"] and "Traceback" not in s["errmsg"] for s in sends[:4])
    assert not [r for r in caplog.records if r.exc_info]     # a normal failure, not a crash
    assert daemon.pool.available(daemon.config.receivers["dev"], time.time() + 1.01) == 2


def test_retry_delay_stays_bounded_after_any_number_of_attempts():
    for attempts in (0, 1, 10, 1023, 1024, 10 ** 6):
        assert 0 < alertbridge.retry_delay(attempts, 2.0, 300.0) <= 300.0
    assert alertbridge.retry_delay(0, 2.0, 300.0, jitter=lambda a, b: b) == 2.0
    assert alertbridge.retry_delay(3, 2.0, 300.0, jitter=lambda a, b: b) == 16.0


def test_a_message_after_1024_failed_attempts_is_still_retried(make_daemon, fake, sqlite_db, caplog):
    caplog.set_level(logging.INFO, logger="alertbridge")
    daemon = make_daemon(sqlite_db, receivers=ONE_ROBOT, start=False)
    config = daemon.config
    webhook = alertbridge.parse_webhook(json.dumps(make_payload("dev", [make_alert()])).encode())
    daemon.journal.accept(webhook, config.receivers["dev"], "req-old")
    daemon.journal._writer.execute("UPDATE messages SET attempts = 1100")   # 13 hours of DingTalk outage
    fake.fail_next(DEV, -1)                                                # and one more failure
    daemon.start()
    assert fake.wait_for(lambda f: len(f.delivered()) == 1, timeout=30)
    assert [r.errcode for r in fake.requests] == [-1, 0]
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]   # a retry, not a crash


def test_a_trickled_answer_is_cut_at_the_timeout_and_the_next_robot_sends(make_daemon, fake, sqlite_db):
    daemon = make_daemon(sqlite_db, delivery={"timeout": "1"})
    fake.fail_next(OPS[0], "trickle")       # a byte every 0.1 s: no read ever times out
    post(daemon, make_payload("ops", [make_alert()]))
    assert fake.wait_for(lambda f: len(f.delivered(OPS[1])) == 1, timeout=30)
    assert not fake.release.is_set()        # ops-2 sent while ops-1 was still trickling
    settle(daemon)
    first = history(daemon, "notifications")[0]
    assert first["robot"] == "ops-1" and first["errcode"] is None and "within timeout (1s)" in first["errmsg"]


def test_a_hanging_robot_does_not_hold_up_another_receiver(make_daemon, fake, sqlite_db):
    daemon = make_daemon(sqlite_db, delivery={"timeout": "60"})
    fake.fail_next(OPS[0], "hang")
    post(daemon, make_payload("ops", [make_alert("Stuck")]))
    assert fake.wait_for(lambda f: [r.token for r in f.requests] == [OPS[0]])
    post(daemon, make_payload("dev", [make_alert("Other")]))
    assert fake.wait_for(lambda f: len(f.delivered(DEV)) == 1, timeout=30)   # while ops-1 hangs
    fake.release.set()
    assert fake.wait_for(lambda f: any("Stuck" in m.text for m in f.delivered()), timeout=30)


def test_two_robot_sections_with_one_token_share_one_budget(make_daemon, fake, sqlite_db):
    fake.rate_limit = 3
    twins = {**ROBOTS, "twin": dict(ROBOTS["dev-1"])}
    daemon = make_daemon(sqlite_db, robots=twins, receivers={"dev": {"robots": "dev-1, twin"}},
                         delivery={"rate_limit": "3", "rate_window": "3600"})
    for i in range(3):
        assert post(daemon, make_payload("dev", [make_alert(instance=f"n{i}")]))[0] == 200
        settle(daemon)
    assert [r.errcode for r in fake.requests] == [0, 0, 0]
    assert daemon.pool.available(daemon.config.receivers["dev"], time.time()) == 0   # not 3 more via twin
    assert "robots dev-1, twin have the same access_token" in alertbridge.check_config(daemon.config)


@pytest.fixture
def small_disk(tmp_path):
    """A real filesystem of 16 MiB that the test can fill up and free again."""
    mount = tmp_path / "disk"
    mount.mkdir()
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(mount)],
                            capture_output=True, text=True)
    if result.returncode != 0:
        if IN_CI:
            pytest.fail(f"the full-disk test needs to mount a tmpfs in CI: {result.stderr}")
        pytest.skip(f"cannot mount a tmpfs here: {result.stderr.strip()}")
    filler = mount / "filler"

    def fill():  # to the last byte: what is left would take a few more small writes
        with open(filler, "ab", buffering=0) as fh:
            for size in (1 << 20, 1 << 16, 1 << 12, 1 << 8, 1):
                with contextlib.suppress(OSError):
                    while fh.write(b"\0" * size):
                        pass

    def free():
        filler.unlink()
    yield mount, fill, free
    subprocess.run(["umount", "-l", str(mount)], capture_output=True)


def test_a_full_disk_neither_loses_nor_repeats_a_page(make_daemon, fake, sqlite_db, small_disk):
    mount, fill, free = small_disk
    daemon = make_daemon(sqlite_db, main={"state_dir": str(mount)}, receivers=ONE_ROBOT)
    full = threading.Event()
    fake.before_answer = lambda request: (fill(), full.set())   # the disk fills as DingTalk answers
    assert post(daemon, make_payload("dev", [make_alert("DiskFull")]))[0] == 200
    assert full.wait(30)
    fake.before_answer = None
    assert wait_until(lambda: daemon.journal.failed_at is not None)      # the answer could not be journaled
    assert post(daemon, make_payload("dev", [make_alert("Later")]))[0] == 503       # Alertmanager retries
    assert post(daemon, None, path="/-/ready", method="GET")[0] == 503
    free()
    assert wait_until(lambda: daemon.journal.backlog()[0] == 0)   # the held answer is journaled
    assert post(daemon, make_payload("dev", [make_alert("Later")]))[0] == 200
    assert fake.wait_for(lambda f: len(f.delivered()) == 2)
    settle(daemon)
    texts = [m.text for m in fake.delivered()]
    assert sum("DiskFull" in t for t in texts) == 1 and sum("Later" in t for t in texts) == 1
    assert daemon.pool.available(daemon.config.receivers["dev"], time.time()) == 18     # no slot lost
    assert post(daemon, None, path="/-/ready", method="GET")[0] == 200


def test_a_reload_that_removes_a_receiver_keeps_its_messages_for_it(make_daemon, fake, sqlite_db, caplog):
    caplog.set_level(logging.ERROR, logger="alertbridge")
    receivers = {"ops": {"robots": "ops-1"}, "dev": {"robots": "dev-1"}}
    daemon = make_daemon(sqlite_db, receivers=receivers, delivery={"rate_limit": "1", "rate_window": "3600"})
    post(daemon, make_payload("ops", [make_alert(instance="first")]))
    settle(daemon)                                           # ops-1 has used its one message
    post(daemon, make_payload("ops", [make_alert(instance="waiting")]))
    path = daemon.config.path
    original = open(path, encoding="utf-8").read()
    with open(path, "w", encoding="utf-8") as fh:
        fh.write(original.replace("[receiver:ops]\nrobots = ops-1\n", ""))
    assert post(daemon, b"", path="/-/reload")[0] == 200
    assert wait_until(lambda: any("which the config no longer has" in r.getMessage() for r in caplog.records))
    assert fake.delivered(DEV) == [] and daemon.journal.backlog()[0] == 1    # not sent to dev's group
    with open(path, "w", encoding="utf-8") as fh:            # the section is back, with another robot
        fh.write(original.replace("[receiver:ops]\nrobots = ops-1\n", "[receiver:ops]\nrobots = ops-2\n"))
    assert post(daemon, b"", path="/-/reload")[0] == 200
    assert fake.wait_for(lambda f: any("waiting" in m.text for m in f.delivered(OPS[1])))
