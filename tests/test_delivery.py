"""Delivery that never loses a page: budgets, digests, failover, retries, expiry, outages,
crashes."""

import concurrent.futures
import contextlib
import itertools
import json
import logging
import re
import sqlite3
import subprocess
import threading
import time

import pytest

import alertbridge
from tests.kit import (
    DEV,
    IN_CI,
    OPS,
    ROBOTS,
    ROOT,
    Clock,
    config_text,
    delivered_ids,
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

FAST = {"rate_window": "1", "throttle_seconds": "600", "retry_base": "0.05", "retry_max": "0.2"}


def post_all(target, payloads, workers=8):
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        return list(pool.map(lambda p: post(target, p)[0], payloads))


def test_storm_reaches_the_group_within_every_budget(make_bridge, fast_fake, database):
    bridge = make_bridge(database, delivery=FAST)
    payloads = storm_payloads(groups=200, per_group=10)
    assert post_all(bridge, payloads) == [200] * 200
    expected = {f"storm-{g}-{i}" for g in range(200) for i in range(10)}
    assert fast_fake.wait_for(lambda f: delivered_ids(f) >= expected, timeout=60)
    settle(bridge, timeout=60)

    assert [r for r in fast_fake.requests if r.errcode == 410100] == []
    assert all(fast_fake.max_per_window(token) <= 20 for token in OPS)
    assert len(fast_fake.delivered()) < 200  # merged into digests
    assert any("##### Storm" in m.text for m in fast_fake.delivered())
    assert all(m.size <= 20000 for m in fast_fake.requests)
    rows = history(bridge)
    assert len(rows) == 2000 and min(r["notified_count"] for r in rows) >= 1


def test_budget_survives_a_restart(make_bridge, fake, sqlite_db):
    receivers = {"dev": {"robots": "dev-1"}}
    bridge = make_bridge(
        sqlite_db, receivers=receivers, delivery={"rate_limit": "3", "rate_window": "3600"}
    )
    for i in range(3):
        post(bridge, make_payload("dev", [make_alert(instance=f"n{i}")]))
        settle(bridge)
    bridge.stop()
    again = make_bridge(
        sqlite_db, receivers=receivers, delivery={"rate_limit": "3", "rate_window": "3600"}
    )
    receiver = again.config.routes["dev"]
    assert again.pool.available(receiver, time.time()) == 0
    post(again, make_payload("dev", [make_alert(instance="n3")]))
    assert again.notifier.step() is False  # nothing may go out: it waits
    assert again.journal.backlog()[0] == 1 and len(fake.requests) == 3


def test_throttled_robot_rests_and_others_take_over(make_bridge, fake, sqlite_db):
    bridge = make_bridge(sqlite_db)
    fake.fail_next(OPS[0], 410100)
    for i in range(4):
        post(bridge, make_payload("ops", [make_alert(instance=f"n{i}")]))
        settle(bridge)
    assert [(r.token, r.errcode) for r in fake.requests] == [
        (OPS[0], 410100),
        (OPS[1], 0),
        (OPS[2], 0),
        (OPS[1], 0),
        (OPS[2], 0),
    ]
    metrics = bridge.probes.render_metrics()
    assert 'alertbridge_robot_throttled{kind="dingtalk",robot="ops-1"} 1' in metrics
    assert (
        'alertbridge_sends_total{errcode="410100",kind="dingtalk",receiver="ops",robot="ops-1"} 1'
        in metrics
    )
    assert 'alertbridge_robot_throttles_total{kind="dingtalk",receiver="ops",robot="ops-1"} 1' in (
        metrics
    )


def test_misconfigured_robot_leaves_rotation_until_reload(make_bridge, fake, sqlite_db, caplog):
    caplog.set_level(logging.INFO, logger="alertbridge")
    wrong = {**ROBOTS, "ops-1": {**ROBOTS["ops-1"], "secret": "SECwrong"}}
    bridge = make_bridge(sqlite_db, robots=wrong)
    for i in range(3):
        post(bridge, make_payload("ops", [make_alert(instance=f"n{i}")]))
        settle(bridge)
    assert [(r.token, r.errcode) for r in fake.requests] == [
        (OPS[0], 310000),
        (OPS[1], 0),
        (OPS[2], 0),
        (OPS[1], 0),
    ]
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert any(
        "robot=ops-1" in e
        and "robot disabled until the config is reloaded; fix: the signature does not match: set "
        "[robot:ops-1] secret to" in e
        for e in errors
    )

    path = bridge.config.path  # the operator fixes the secret and reloads
    with open(path, "w", encoding="utf-8") as fh:
        fh.write(
            config_text(fake.url, sqlite_db, main={"state_dir": "state", "journal_sync": "normal"})
        )
    assert post(bridge, b"", path="/-/reload")[0] == 200
    for i in range(3):
        post(bridge, make_payload("ops", [make_alert(instance=f"m{i}")]))
        settle(bridge)
    assert OPS[0] in [r.token for r in fake.delivered()]


def test_every_robot_failing_is_retried_with_backoff(make_bridge, fake, database):
    receivers = {"dev": {"robots": "dev-1"}}
    bridge = make_bridge(database, receivers=receivers)
    token = ROBOTS["dev-1"]["token"]
    fake.fail_next(token, "http500", 2)
    fake.fail_next(token, -1)
    post(bridge, make_payload("dev", [make_alert()]))
    settle(bridge)
    assert [r.errcode for r in fake.requests] == [-1, -1, -1, 0]
    sends = history(bridge, "notifications")
    assert [(s["errcode"], s["errmsg"]) for s in sends][:2] == [(None, "HTTP 500")] * 2
    assert [s["errcode"] for s in sends][2:] == [-1, 0]
    assert history(bridge)[0]["notified_count"] == 1


def test_undeliverable_message_expires_but_is_kept(make_bridge, fake, sqlite_db, caplog):
    caplog.set_level(logging.ERROR, logger="alertbridge")
    robots = {**ROBOTS, "dev-1": {"token": "tok-not-registered"}}
    bridge = make_bridge(
        sqlite_db, robots=robots, receivers={"dev": {"robots": "dev-1"}}, delivery={"max_age": "1"}
    )
    post(bridge, make_payload("dev", [make_alert()]))
    assert wait_until(lambda: bridge.journal.message_states().get("expired") == 1)
    assert 'alertbridge_messages_expired_total{receiver="dev"} 1' in bridge.probes.render_metrics()
    assert any("expired" in r.getMessage() for r in caplog.records)
    assert bridge.recorder.wait_idle(10) and len(history(bridge)) == 1


def test_ack_does_not_wait_for_a_slow_dingtalk(make_bridge, fake, sqlite_db):
    fake.latency = 2.0
    bridge = make_bridge(sqlite_db)
    for i in range(5):
        status, _ = post(bridge, make_payload("ops", [make_alert(instance=f"n{i}")]))
        assert status == 200
    assert fake.delivered() == []  # five acks came back before DingTalk answered even once
    assert fake.wait_for(lambda f: len(f.delivered()) >= 1, timeout=10)


def test_kill_9_mid_storm_loses_nothing(tmp_path, fast_fake, database, daemon):
    child = daemon(database=database, main={"journal_sync": "full"}, delivery=FAST)
    child.wait_healthy()
    payloads = storm_payloads(groups=150, per_group=10)
    outcome = kill_mid_storm(child, payloads, after=60)
    accepted_before = sum(o == 200 for o in outcome)
    assert 60 <= accepted_before < 150  # killed mid-storm

    again = daemon(
        database=database, main={"journal_sync": "full", "port": str(child.port)}, delivery=FAST
    )
    try:
        again.wait_healthy()
        for i, payload in enumerate(payloads):  # Alertmanager retries what was not acked
            if outcome[i] != 200:
                assert post(again.url, payload)[0] == 200
        expected = {f"storm-{g}-{i}" for g in range(150) for i in range(10)}
        assert fast_fake.wait_for(lambda f: delivered_ids(f) >= expected, timeout=90), sorted(
            expected - delivered_ids(fast_fake)
        )[:5]
        assert wait_until(
            lambda: metric(again.url, "alertbridge_record_backlog_events") == 0, timeout=60
        )
    finally:
        assert again.stop() == 0
    instances = [r["instance"] for r in rows(database, "SELECT instance FROM alerts")]
    assert set(instances) >= expected and len(instances) == 1500
    assert [r for r in fast_fake.requests if r.errcode == 410100] == []


def test_dingtalk_down_for_a_while_loses_nothing(make_bridge, fast_fake, database):
    bridge = make_bridge(database, delivery=FAST)
    port = fast_fake.server.server_address[1]
    fast_fake.stop()  # DingTalk unreachable: refused
    payloads = storm_payloads(groups=30, per_group=5)
    assert post_all(bridge, payloads) == [200] * 30
    assert wait_until(
        lambda: 'errcode="none"' in bridge.probes.render_metrics()
    )  # sends are failing
    fast_fake.start(port)  # and back on the same address
    expected = {f"storm-{g}-{i}" for g in range(30) for i in range(5)}
    assert fast_fake.wait_for(lambda f: delivered_ids(f) >= expected, timeout=60)
    settle(bridge, timeout=60)
    rows = history(bridge)
    assert len(rows) == 150 and min(r["notified_count"] for r in rows) >= 1
    failures = [s for s in history(bridge, "notifications") if s["errcode"] is None]
    assert failures and all(s["errmsg"].startswith("network") for s in failures)


def test_a_send_cut_off_by_a_crash_still_counts_against_the_budget(make_bridge, fake, sqlite_db):
    options = {
        "receivers": {"dev": {"robots": "dev-1"}},
        "delivery": {"rate_limit": "3", "rate_window": "3600"},
    }
    bridge = make_bridge(sqlite_db, **options)
    robot = bridge.config.routes["dev"].robots[0]
    bridge.journal.begin_send(
        robot.name, robot.key, time.time() + 5
    )  # the request went out, then kill -9
    bridge.stop()
    again = make_bridge(sqlite_db, **options)
    assert again.pool.available(again.config.routes["dev"], time.time()) == 2


# --- what DingTalk, the network or the disk may do: nothing of it wedges paging -----------------

ONE_ROBOT = {"dev": {"robots": "dev-1"}}


@pytest.mark.parametrize("broken", ["json-array", "json-null", "bad-status-line", "cut-chunked"])
def test_a_broken_answer_is_no_answer_and_gives_the_budget_slot_back(
    make_bridge, fake, sqlite_db, caplog, broken
):
    caplog.set_level(logging.INFO, logger="alertbridge")
    fake.rate_window = 1.0
    bridge = make_bridge(
        sqlite_db,
        receivers=ONE_ROBOT,
        delivery={"rate_limit": "2", "rate_window": "1", "retry_base": "0.05", "retry_max": "0.1"},
    )
    fake.fail_next(DEV, broken, 4)  # twice the budget: each slot must come back
    post(bridge, make_payload("dev", [make_alert()]))
    assert fake.wait_for(lambda f: len(f.delivered()) == 1, timeout=30)
    settle(bridge)
    sends = history(bridge, "notifications")
    assert [s["errcode"] for s in sends] == [None] * 4 + [0]
    assert all(s["errmsg"] and "Traceback" not in s["errmsg"] for s in sends[:4])
    assert not [r for r in caplog.records if r.exc_info]  # a normal failure, not a crash
    assert bridge.pool.available(bridge.config.routes["dev"], time.time() + 1.01) == 2


def test_a_message_after_1024_failed_attempts_is_still_retried(
    make_bridge, fake, sqlite_db, caplog
):
    caplog.set_level(logging.INFO, logger="alertbridge")
    bridge = make_bridge(sqlite_db, receivers=ONE_ROBOT, start=False)
    config = bridge.config
    webhook = alertbridge.parse_webhook(json.dumps(make_payload("dev", [make_alert()])).encode())
    bridge.journal.add_webhook(webhook, config.routes["dev"], "req-old")
    with sqlite3.connect(bridge.journal.path) as db:  # 13 hours of DingTalk outage
        db.execute("UPDATE messages SET attempts = 1100")
    fake.fail_next(DEV, -1)  # and one more failure
    bridge.start()
    assert fake.wait_for(lambda f: len(f.delivered()) == 1, timeout=30)
    assert [r.errcode for r in fake.requests] == [-1, 0]
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]  # a retry, not a crash


def test_a_trickled_answer_is_cut_at_the_timeout_and_the_next_robot_sends(
    make_bridge, fake, sqlite_db
):
    bridge = make_bridge(sqlite_db, delivery={"timeout": "1"})
    fake.fail_next(OPS[0], "trickle")  # a byte every 0.1 s: no read ever times out
    post(bridge, make_payload("ops", [make_alert()]))
    assert fake.wait_for(lambda f: len(f.delivered(OPS[1])) == 1, timeout=30)
    assert not fake.release.is_set()  # ops-2 sent while ops-1 was still trickling
    settle(bridge)
    first = history(bridge, "notifications")[0]
    assert (
        first["robot"] == "ops-1"
        and first["errcode"] is None
        and "within timeout (1s)" in first["errmsg"]
    )


def test_a_hanging_robot_does_not_hold_up_another_receiver(make_bridge, fake, sqlite_db):
    bridge = make_bridge(sqlite_db, delivery={"timeout": "60"})
    fake.fail_next(OPS[0], "hang")
    post(bridge, make_payload("ops", [make_alert("Stuck")]))
    assert fake.wait_for(lambda f: [r.token for r in f.requests] == [OPS[0]])
    post(bridge, make_payload("dev", [make_alert("Other")]))
    assert fake.wait_for(lambda f: len(f.delivered(DEV)) == 1, timeout=30)  # while ops-1 hangs
    fake.release.set()
    assert fake.wait_for(lambda f: any("Stuck" in m.text for m in f.delivered()), timeout=30)


def test_two_robot_sections_with_one_token_share_one_budget(make_bridge, fake, sqlite_db):
    fake.rate_limit = 3
    twins = {**ROBOTS, "twin": dict(ROBOTS["dev-1"])}
    bridge = make_bridge(
        sqlite_db,
        robots=twins,
        receivers={"dev": {"robots": "dev-1, twin"}},
        delivery={"rate_limit": "3", "rate_window": "3600"},
    )
    for i in range(3):
        assert post(bridge, make_payload("dev", [make_alert(instance=f"n{i}")]))[0] == 200
        settle(bridge)
    assert [r.errcode for r in fake.requests] == [0, 0, 0]
    assert (
        bridge.pool.available(bridge.config.routes["dev"], time.time()) == 0
    )  # not 3 more via twin
    assert "robots dev-1, twin have the same credential" in alertbridge.check_config(
        bridge.config
    )


@pytest.fixture
def small_disk(tmp_path):
    """A real filesystem of 16 MiB that the test can fill up and free again."""
    mount = tmp_path / "disk"
    mount.mkdir()
    result = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(mount)],
        capture_output=True,
        text=True,
    )
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


def test_a_full_disk_neither_loses_nor_repeats_a_page(make_bridge, fake, sqlite_db, small_disk):
    mount, fill, free = small_disk
    bridge = make_bridge(sqlite_db, main={"state_dir": str(mount)}, receivers=ONE_ROBOT)
    full = threading.Event()
    fake.before_answer = lambda request: (fill(), full.set())  # the disk fills as DingTalk answers
    assert post(bridge, make_payload("dev", [make_alert("DiskFull")]))[0] == 200
    assert full.wait(30)
    fake.before_answer = None
    assert wait_until(
        lambda: bridge.journal.failed_at is not None
    )  # the answer could not be journaled
    assert (
        post(bridge, make_payload("dev", [make_alert("Later")]))[0] == 503
    )  # Alertmanager retries
    assert post(bridge, None, path="/-/ready", method="GET")[0] == 503
    assert (
        "\nalertbridge_journal_writable 0\n" in bridge.probes.render_metrics()
    )  # AlertbridgeJournalNotWritable
    free()
    assert wait_until(lambda: bridge.journal.backlog()[0] == 0)  # the held answer is journaled
    assert post(bridge, make_payload("dev", [make_alert("Later")]))[0] == 200
    assert fake.wait_for(lambda f: len(f.delivered()) == 2)
    settle(bridge)
    texts = [m.text for m in fake.delivered()]
    assert sum("DiskFull" in t for t in texts) == 1 and sum("Later" in t for t in texts) == 1
    assert bridge.pool.available(bridge.config.routes["dev"], time.time()) == 18  # no slot lost
    assert post(bridge, None, path="/-/ready", method="GET")[0] == 200
    assert "\nalertbridge_journal_writable 1\n" in bridge.probes.render_metrics()


def test_a_reload_that_removes_a_receiver_keeps_its_messages_for_it(
    make_bridge, fake, sqlite_db, caplog
):
    caplog.set_level(logging.ERROR, logger="alertbridge")
    receivers = {"ops": {"robots": "ops-1"}, "dev": {"robots": "dev-1"}}
    bridge = make_bridge(
        sqlite_db, receivers=receivers, delivery={"rate_limit": "1", "rate_window": "3600"}
    )
    post(bridge, make_payload("ops", [make_alert(instance="first")]))
    settle(bridge)  # ops-1 has used its one message
    post(bridge, make_payload("ops", [make_alert(instance="waiting")]))
    path = bridge.config.path
    original = open(path, encoding="utf-8").read()
    with open(path, "w", encoding="utf-8") as fh:
        fh.write(original.replace("[receiver:ops]\nrobots = ops-1\n", ""))
    assert post(bridge, b"", path="/-/reload")[0] == 200
    assert wait_until(
        lambda: any("which the config no longer has" in r.getMessage() for r in caplog.records)
    )
    assert fake.delivered(DEV) == [] and bridge.journal.backlog()[0] == 1  # not sent to dev's group
    with open(path, "w", encoding="utf-8") as fh:  # the section is back, with another robot
        fh.write(
            original.replace("[receiver:ops]\nrobots = ops-1\n", "[receiver:ops]\nrobots = ops-2\n")
        )
    assert post(bridge, b"", path="/-/reload")[0] == 200
    assert fake.wait_for(lambda f: any("waiting" in m.text for m in f.delivered(OPS[1])))


# --- the sender in simulated time: no threads, no servers, no waiting --------------------------


class Simulated:
    """A bridge that is not started, its clock simulated and its DingTalk a function: the test
    accepts webhooks and turns the route's Sender by hand."""

    def __init__(
        self, tmp_path, answer=lambda robot, body: alertbridge.SendResult(0, "ok"), **options
    ):
        self.clock, self.sent, self.answer = Clock(), [], answer
        options.setdefault("delivery", {})
        options.setdefault(
            "extra", "[templates]\ncompact_after = 0\n"
        )  # the budgets, not the layout
        path = tmp_path / "config.ini"
        database = alertbridge.Database(driver="sqlite", path=str(tmp_path / "history.db"))
        path.write_text(
            config_text(
                lambda token: f"http://127.0.0.1:9/robot/send?access_token={token}",
                database,
                **options,
            ),
            encoding="utf-8",
        )
        self.bridge = alertbridge.Bridge(
            alertbridge.load_config(str(path)), clock=self.clock, post=self.post
        )
        self.sender = self.bridge.senders.ensure("ops")

    def sender_of(self, route):
        return self.bridge.senders.ensure(route)

    def texts(self):
        return [body["markdown"]["text"] for _, _, body in self.sent]

    def post(self, robot, payload, timeout):
        body = json.loads(payload)
        self.sent.append((self.clock(), robot.name, body))
        return self.answer(robot, body)

    def accept(self, payload):
        webhook = alertbridge.parse_webhook(json.dumps(payload).encode())
        assert self.bridge.intake.accept(webhook, "req")[0] == 200

    def run(self, route="ops"):
        """Turn the route's sender until it has nothing it may send now."""
        while self.sender_of(route).step():
            pass

    def most_in_a_window(self, name, window=60.0):
        times = sorted(at for at, robot, _ in self.sent if robot == name)
        return max(
            (sum(1 for t in times if start <= t < start + window) for start in times), default=0
        )


@pytest.fixture
def simulated(tmp_path):
    made = []

    def make(**options):
        made.append(Simulated(tmp_path, **options))
        return made[-1]

    yield make
    for sim in made:
        sim.bridge.stop()


def test_a_storm_goes_out_in_digests_within_every_budget_in_simulated_time(simulated):
    sim = simulated()
    for payload in storm_payloads(groups=300, per_group=10):
        sim.accept(payload)
    windows = 0
    while sim.bridge.journal.pending_count("ops"):
        sim.run()
        sim.clock.advance(60)
        windows += 1
    delivered = {
        i for _, _, body in sim.sent for i in re.findall(r"storm-\d+-\d+", body["markdown"]["text"])
    }
    assert delivered == {f"storm-{g}-{i}" for g in range(300) for i in range(10)}
    assert (
        max(sim.most_in_a_window(name) for name in ("ops-1", "ops-2", "ops-3")) == 18
    )  # 2 reserved
    assert len(sim.sent) < 300 and windows <= 2  # 3,000 alerts in digests, within two minutes
    assert all(
        len(json.dumps(body, ensure_ascii=False).encode()) <= 20000 for _, _, body in sim.sent
    )


def test_a_storm_renders_each_alert_about_once_not_at_every_digest(
    simulated, monkeypatch
):
    """Sizing a digest, checking it fits and sending it share the alerts' rendered blocks, also
    across digests (the journal hands out the same bodies): the sender shares the interpreter
    with the webhooks, and a storm's 2,000 alerts/s each rendered at every digest cost the
    intake's p99 a factor of four."""
    calls = itertools.count()
    sim = simulated(  # the default page (compact lines after the first five); every 3rd throttled
        extra="",
        answer=lambda robot, body: alertbridge.SendResult(
            410100 if next(calls) % 3 == 2 else 0, "too fast"
        ),
    )
    rendered = []
    real = alertbridge.alert_fields
    monkeypatch.setattr(
        alertbridge,
        "alert_fields",
        lambda alert, *a, **k: rendered.append(alert) or real(alert, *a, **k),
    )
    for payload in storm_payloads(groups=100, per_group=10):
        sim.accept(payload)
    while sim.bridge.journal.pending_count("ops"):
        sim.run()
        sim.clock.advance(60)
    names = [a["labels"]["instance"] for a in rendered]
    assert (
        len(set(names)) == 1000 and len(names) <= 1100
    )  # once; a digest's first five in full too


def test_a_digest_is_rendered_once_though_it_is_checked_planned_and_sent(simulated, monkeypatch):
    """Checked against each robot, planned, then sent: each of those asks the renderer for the
    same digest, which renders it once."""
    sim = simulated(extra="")
    renders = []
    real = alertbridge.Renderer._render
    monkeypatch.setattr(
        alertbridge.Renderer, "_render", lambda self, *a: renders.append(1) or real(self, *a)
    )
    for payload in storm_payloads(groups=100, per_group=10):
        sim.accept(payload)
    while sim.bridge.journal.pending_count("ops"):
        sim.run()
        sim.clock.advance(60)
    assert len(renders) <= len(sim.sent) + 2


def test_a_throttled_robot_rests_one_window_not_ten_minutes_in_simulated_time(simulated):
    answers = iter([alertbridge.SendResult(410100, "too fast")])
    sim = simulated(
        answer=lambda robot, body: next(answers, alertbridge.SendResult(0, "ok")),
        receivers={"ops": {"robots": "ops-1, ops-2"}, "dev": {"robots": "dev-1"}},
    )
    for i in range(3):
        sim.accept(make_payload("ops", [make_alert(instance=f"n{i}")]))
        sim.run()
        sim.clock.advance(20)
    assert [robot for _, robot, _ in sim.sent] == ["ops-1", "ops-2", "ops-2", "ops-2"]
    sim.clock.advance(1)  # 61 s after the 410100: back in turn
    for i in range(2):
        sim.accept(make_payload("ops", [make_alert(instance=f"later-{i}")]))
        sim.run()
    assert [robot for _, robot, _ in sim.sent[-2:]] == ["ops-1", "ops-2"]


def test_retries_back_off_in_simulated_time(simulated):
    sim = simulated(
        answer=lambda robot, body: alertbridge.SendResult(-1, "busy"),
        delivery={"retry_base": "10", "retry_max": "60"},
    )
    sim.accept(make_payload("ops", [make_alert()]))
    delays = []
    for _ in range(5):
        sim.run()
        delays.append(sim.bridge.journal.next_due_at("ops") - sim.clock())
        sim.clock.advance(delays[-1])
    assert [5 <= d <= 10 for d in delays[:1]] == [True]  # 10 s, with jitter down to half
    assert all(10 <= d <= 20 for d in delays[1:2]) and all(30 <= d <= 60 for d in delays[3:])
    assert len(sim.sent) == 5 * 3  # each round tried every robot once


def severities(text):
    return set(re.findall(r"· (critical|warning|info|error|none|\w*) · (?:FIRING|RESOLVED)", text))


def test_a_critical_after_a_storm_goes_out_in_the_next_request_alone(simulated):
    sim = simulated()
    for payload in storm_payloads(groups=300, per_group=10):
        sim.accept(payload)
    sim.run()
    assert len(sim.sent) == 3 * 18  # the storm used all but the reserve
    sim.clock.advance(1)
    sim.accept(make_payload("ops", [make_alert("DatacenterDown", "dc-1", severity="critical")]))
    sim.run()
    at, robot, body = sim.sent[-1]
    assert at == sim.clock() and len(sim.sent) == 3 * 18 + 1  # at once, before the window ends
    assert "DatacenterDown" in body["markdown"]["text"] and "storm-" not in body["markdown"]["text"]
    assert max(sim.most_in_a_window(name) for name in ("ops-1", "ops-2", "ops-3")) <= 20


def test_no_digest_mixes_priority_levels(simulated):
    sim = simulated()
    for g in range(150):  # groups mixing three levels
        sim.accept(
            make_payload(
                "ops",
                [
                    make_alert(f"Mixed{g}", f"i-{g}-{i}", severity=level)
                    for i, level in enumerate(("warning", "critical", "info"))
                ],
            )
        )
    while sim.bridge.journal.pending_count("ops"):
        sim.run()
        sim.clock.advance(60)
    assert all(len(severities(text)) == 1 for text in sim.texts())
    digests = [
        body["markdown"]["title"] for _, _, body in sim.sent if "汇总" in body["markdown"]["title"]
    ]
    assert digests and all(t.split(" ")[0] in ("CRITICAL", "WARNING", "INFO") for t in digests)
    first_levels = [severities(text).pop() for text in sim.texts()]
    assert first_levels.index("warning") > max(
        i for i, v in enumerate(first_levels) if v == "critical"
    )


def test_firing_and_resolved_waiting_together_go_out_once_resolved(simulated):
    sim = simulated(
        delivery={"rate_limit": "1", "reserve": "0"},
        receivers={"ops": {"robots": "ops-1"}, "dev": {"robots": "dev-1"}},
    )
    sim.accept(make_payload("ops", [make_alert("Busy", "b")]))
    sim.run()  # the one slot of this window is used
    down = make_alert("NodeDown", "n-1", severity="warning", starts_at="2026-11-24T08:00:00Z")
    sim.accept(make_payload("ops", [down]))
    sim.accept(make_payload("ops", [down]))  # Alertmanager's repeat_interval
    resolved = {**down, "status": "resolved", "endsAt": "2026-11-24T08:07:00Z"}
    sim.accept(make_payload("ops", [resolved]))
    sim.clock.advance(61)
    sim.run()
    [text] = [t for t in sim.texts() if "NodeDown" in t]
    assert text.count("**✅ NodeDown**") == 1 and "FIRING" not in text and "持续 7m" in text
    assert sim.bridge.journal.message_states() == {"sent": 2, "merged": 2}


def test_a_storm_on_one_receiver_does_not_starve_another_on_the_same_robot(simulated):
    sim = simulated(
        delivery={"rate_limit": "4", "reserve": "0"},
        receivers={"ops": {"robots": "ops-1"}, "dev": {"robots": "ops-1"}},
    )
    for payload in storm_payloads(groups=1000, per_group=1):  # five windows of digests
        sim.accept(payload)
    sim.run("ops")
    arrived = sim.clock()
    sim.accept(make_payload("dev", [make_alert("TheirPage", "t-1", severity="warning")]))
    for _ in range(130):  # both senders, as their threads would
        sim.clock.advance(1)
        for route in ("ops", "dev"):  # the storm's sender always first
            sim.run(route)
    [page] = [at for at, _, body in sim.sent if "TheirPage" in body["markdown"]["text"]]
    assert page <= arrived + 61  # in the first window with a free slot
    assert sim.most_in_a_window("ops-1") <= 4
    assert len(sim.sent) == 4 + 4 + 4  # every slot used, by one or the other


def test_metrics_show_the_queue_and_delivery_time_per_priority(simulated):
    sim = simulated()
    sim.accept(
        make_payload(
            "ops",
            [
                make_alert("Page", "p", severity="critical"),
                make_alert("Note", "n", severity="info"),
            ],
        )
    )
    metrics = sim.bridge.probes.render_metrics()
    assert 'alertbridge_queue_messages{priority="critical"} 1' in metrics
    assert 'alertbridge_queue_messages{priority="warning"} 0' in metrics
    sim.clock.advance(2)
    sim.run()
    metrics = sim.bridge.probes.render_metrics()
    assert 'alertbridge_queue_messages{priority="critical"} 0' in metrics
    assert 'alertbridge_delivery_seconds_bucket{le="3",priority="critical"} 1' in metrics
    assert 'alertbridge_delivery_seconds_bucket{le="1",priority="info"} 0' in metrics


def test_a_critical_during_a_storm_reaches_dingtalk_alone_and_nothing_is_throttled(
    make_bridge, fast_fake, sqlite_db
):
    bridge = make_bridge(sqlite_db, delivery=FAST)
    assert post_all(bridge, storm_payloads(groups=200, per_group=10)) == [200] * 200
    assert fast_fake.wait_for(lambda f: len(f.delivered()) >= 10)  # the storm has the robots
    post(bridge, make_payload("ops", [make_alert("DatacenterDown", "dc-1", severity="critical")]))
    assert fast_fake.wait_for(
        lambda f: any("DatacenterDown" in m.text for m in f.delivered()), timeout=30
    )
    [page] = [m for m in fast_fake.delivered() if "DatacenterDown" in m.text]
    assert (
        "storm-" not in page.text
        and page.body["markdown"]["title"] == "[CRITICAL · FIRING:1] DatacenterDown"
    )
    expected = {f"storm-{g}-{i}" for g in range(200) for i in range(10)}
    assert fast_fake.wait_for(lambda f: delivered_ids(f) >= expected, timeout=60)
    assert [r for r in fast_fake.requests if r.errcode == 410100] == []
    assert all(fast_fake.max_per_window(token) <= 20 for token in OPS)


# --- the wall clock steps (NTP, a VM restore, a hand-set date): budgets and retries hold -------

STEP = 1800.0  # within DingTalk's one hour for a signature's timestamp
TIGHT = {
    "rate_limit": "4",
    "rate_window": "2",
    "reserve": "1",
    "retry_base": "0.05",
    "retry_max": "0.2",
}
DEV_ONLY = {"dev": {"robots": "dev-1"}}


@pytest.fixture
def tight_fake(fake):
    fake.rate_limit, fake.rate_window = 4, 2.0  # DingTalk's 20 per 60 s, scaled
    return fake


@pytest.fixture
def stepped(tmp_path):
    """stepped(seconds): step the wall clock of daemons started with stepped.env."""
    path = tmp_path / "clock-step"
    path.write_text("0")

    def step(seconds):
        path.write_text(f"{seconds}")

    step.env = {
        "PYTHONPATH": str(ROOT / "tests" / "steppedclock"),
        "ALERTBRIDGE_TEST_CLOCK_STEP": str(path),
    }
    return step


def fill_the_budget(url, fake):
    """Four sends in a row: the robot's whole window (the last one from the critical reserve)."""
    for i, severity in enumerate(["warning"] * 3 + ["critical"]):
        assert (
            post(url, make_payload("dev", [make_alert("Fill", f"fill-{i}", severity=severity)]))[0]
            == 200
        )
        assert fake.wait_for(lambda f: len(f.delivered()) == i + 1)


def delivered_instances(fake, prefix):
    return {i for m in fake.delivered() for i in re.findall(prefix + r"-\d+", m.text)}


@pytest.mark.parametrize("seconds", [-STEP, STEP], ids=["back", "forward"])
def test_a_wall_clock_step_neither_holds_a_page_nor_overruns_a_robot(
    daemon, tight_fake, sqlite_db, stepped, seconds
):
    """Back: budgets dated by the wall clock stayed spent for the length of the step, and a
    critical page waited with them. Forward: the robot forgot its window and went over it."""
    child = daemon(receivers=DEV_ONLY, delivery=TIGHT, env=stepped.env)
    child.wait_healthy()
    fill_the_budget(child.url, tight_fake)
    stepped(seconds)
    for i in range(4):
        assert (
            post(
                child.url,
                make_payload("dev", [make_alert("After", f"after-{i}", severity="critical")]),
            )[0]
            == 200
        )
    expected = {f"after-{i}" for i in range(4)}
    assert tight_fake.wait_for(lambda f: delivered_instances(f, "after") == expected, timeout=20)
    assert [r.errcode for r in tight_fake.requests if r.errcode] == []
    assert tight_fake.max_per_window(DEV) <= 4
    assert wait_until(lambda: len(history(sqlite_db, "notifications")) == len(tight_fake.requests))
    last = max(history(sqlite_db, "notifications"), key=lambda r: r["id"])
    stored = alertbridge.from_db_time(last["sent_at"]).timestamp()
    assert abs(stored - (time.time() + seconds)) < 60  # what is stored: the wall clock


def test_times_an_earlier_run_wrote_ahead_of_a_stepped_back_clock_do_not_hold_messages(
    daemon, fake, sqlite_db, stepped
):
    fake.fail_next(DEV, "http500", times=1000)
    first = daemon(
        receivers=DEV_ONLY, delivery={"retry_base": "30", "retry_max": "60"}, env=stepped.env
    )
    first.wait_healthy()
    assert post(first.url, make_payload("dev", [make_alert("Retried")]))[0] == 200
    assert fake.wait_for(lambda f: len(f.requests) == 1)
    assert first.stop() == 0  # the message waits for its retry
    fake.clear_script()
    stepped(-STEP)  # the clock steps back between the two runs
    again = daemon(
        receivers=DEV_ONLY, delivery={"retry_base": "30", "retry_max": "60"}, env=stepped.env
    )
    again.wait_healthy()
    assert fake.wait_for(lambda f: len(f.delivered()) == 1, timeout=90)


def test_a_step_waits_for_the_next_window_while_a_new_critical_page_takes_the_reserve(
    simulated,
):
    """The robots' reserve is for new critical pages: after a storm that used all but the
    reserve, a critical escalation step waits for the next window; a critical page that comes
    after it goes out at once, from the reserve."""
    sim = simulated()
    for payload in storm_payloads(groups=300, per_group=10):
        sim.accept(payload)
    sim.run()
    assert len(sim.sent) == 3 * 18
    sim.bridge.journal.note(
        "ops", "⏫ 升级第 1 步", "⏫ 升级第 1 步：DiskFull 已等待 10m，无人认领", 0.5, ["k" * 64],
        "critical", request_id="notes:escalated", reserve=False, relayed=True,
    )
    sim.run()
    assert len(sim.sent) == 3 * 18  # no reserve for it
    sim.accept(make_payload("ops", [make_alert("DatacenterDown", "dc-1", severity="critical")]))
    sim.run()
    assert len(sim.sent) == 3 * 18 + 1 and "DatacenterDown" in sim.sent[-1][2]["markdown"]["text"]
    sim.clock.advance(61)
    sim.run()
    assert any("升级第 1 步" in body["markdown"]["text"] for _, _, body in sim.sent[3 * 18 + 1:])
