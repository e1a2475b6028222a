"""High availability: two instances on one MySQL, each page sent once, budgets shared, a dead
leader replaced, paging on while MySQL is away. Real processes, the real MariaDB."""

import collections
import dataclasses
import re
import signal
import time

import pytest

from tests.kit import (OPS, Daemon, TcpProxy, empty_mysql, get, history, make_alert, make_payload, post,
                       settle, storm_payloads, wait_until)

STORM_ID = re.compile(r"storm-\d+-\d+")
SMALL = {"rate_limit": "4", "rate_window": "2", "throttle_seconds": "600", "retry_base": "0.05",
         "retry_max": "0.2"}


def cluster(instance, lease=2, instances=2):
    return (f"\n[cluster]\nenabled = true\ninstance = {instance}\nlease = {lease:g}\n"
            f"instances = {instances}\n")


@pytest.fixture
def small_fake(fake):
    fake.rate_limit, fake.rate_window = 4, 2.0      # DingTalk's limit, scaled: 4 per 2 s per robot
    return fake


@pytest.fixture
def instances(tmp_path, small_fake):
    """instances(database) -> two alertbridge processes, "a" and "b", on one MySQL history."""
    started = []

    def start(database):
        for name in ("a", "b"):
            directory = tmp_path / name
            directory.mkdir()
            started.append(Daemon(directory, small_fake.url, database, delivery=SMALL, extra=cluster(name)))
        for child in started:
            child.wait_healthy()
        return started
    yield start
    for child in started:
        child.kill()


def role(child):
    try:
        text = get(child.url, "/metrics")[1]
    except OSError:
        return None
    found = re.findall(r'^alertbridge_cluster_role\{role="(\w+)"\} 1$', text, re.M)
    return found[0] if found else None


def leader_of(children):
    assert wait_until(lambda: [c for c in children if role(c) == "leader"], timeout=30)
    [leader] = [c for c in children if role(c) == "leader"]
    return leader


def accepted_ids(fake):
    """How many accepted messages named each storm alert."""
    return collections.Counter(i for m in fake.delivered() for i in set(STORM_ID.findall(m.text)))


def idle(fake, quiet=0.5):
    """No request has reached DingTalk for `quiet` seconds: nothing is in flight."""
    with fake.cond:
        last = max((r.at for r in fake.requests), default=0)
    return time.time() - last >= quiet


def test_two_instances_send_each_page_once_even_when_the_leader_dies(instances, small_fake):
    children = instances(empty_mysql())
    first = leader_of(children)
    payloads = storm_payloads(groups=150, per_group=10)
    for payload in payloads:                       # Alertmanager's webhook_configs list both
        assert [post(c.url, payload)[0] for c in children] == [200, 200]
    assert small_fake.wait_for(lambda f: len(f.delivered()) >= 12, timeout=30)
    assert wait_until(lambda: idle(small_fake), timeout=30)
    first.proc.send_signal(signal.SIGKILL)         # the leader dies between two windows
    first.proc.wait()
    survivor = next(c for c in children if c is not first)
    assert leader_of([survivor]) is survivor
    expected = {f"storm-{g}-{i}" for g in range(150) for i in range(10)}
    assert small_fake.wait_for(lambda f: set(accepted_ids(f)) >= expected, timeout=120)
    assert settle_process(survivor)
    counts = accepted_ids(small_fake)
    assert [i for i, n in counts.items() if n > 1] == []          # each alert in one accepted message
    assert [r for r in small_fake.requests if r.errcode == 410100] == []
    assert all(small_fake.max_per_window(token) <= 4 for token in OPS)
    rows = history(empty_settings())
    assert len(rows) == 1500 and all(r["notified_count"] == 1 for r in rows)


def settle_process(child):
    """Until the process has nothing left to send or record."""
    def quiet():
        text = get(child.url, "/metrics")[1]
        waiting = sum(float(v) for v in re.findall(r'^alertbridge_queue_messages\{[^}]*\} (\S+)$', text, re.M))
        backlog = float(re.search(r"^alertbridge_record_backlog_events (\S+)$", text, re.M).group(1))
        return waiting == 0 and backlog == 0
    return wait_until(quiet, timeout=60)


def empty_settings():
    from tests.kit import mysql_settings
    return mysql_settings()


def test_the_same_webhook_twice_is_sent_once(make_bridge, fake):
    bridge = make_bridge(empty_mysql(), extra=cluster("solo", lease=1, instances=1))
    assert wait_until(lambda: bridge.cluster.role == "leader", timeout=30)
    payload = make_payload("dev", [make_alert("Once", "o-1")])
    assert post(bridge, payload)[0] == 200
    assert fake.wait_for(lambda f: len(f.delivered()) == 1)
    settle(bridge)
    assert post(bridge, payload)[0] == 200               # Alertmanager retried: it had no answer
    settle(bridge)
    assert len(fake.delivered()) == 1 and bridge.journal.message_states() == {"sent": 1, "duplicate": 1}
    assert "alertbridge_duplicates_total 1" in bridge.render_metrics()
    [row] = history(bridge)
    assert (row["received_count"], row["notified_count"]) == (2, 1)


def test_paging_goes_on_while_mysql_is_away_and_no_robot_goes_over_budget(instances, small_fake):
    settings = empty_mysql()
    proxy = TcpProxy(settings.port).start()
    children = instances(dataclasses.replace(settings, port=proxy.port))
    leader_of(children)
    proxy.cut()                                          # MySQL unreachable for both instances
    payloads = storm_payloads(groups=40, per_group=5)
    for payload in payloads:
        assert [post(c.url, payload)[0] for c in children] == [200, 200]
    expected = {f"storm-{g}-{i}" for g in range(40) for i in range(5)}
    assert small_fake.wait_for(lambda f: set(accepted_ids(f)) >= expected, timeout=120)   # paging went on
    assert wait_until(lambda: all(role(c) == "alone" for c in children), timeout=30)
    assert all(small_fake.max_per_window(token) <= 4 for token in OPS)
    assert [r for r in small_fake.requests if r.errcode == 410100] == []
    proxy.start()                                        # MySQL is back: the history catches up
    assert all(settle_process(c) for c in children)
    assert wait_until(lambda: len(history(settings)) == 200, timeout=60)
    assert wait_until(lambda: sorted(role(c) for c in children) == ["leader", "standby"], timeout=30)
