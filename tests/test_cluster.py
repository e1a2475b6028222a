"""High availability: two instances on one MySQL, each page sent once, budgets shared, a dead
leader replaced, paging on while MySQL is away. Real processes, the real MariaDB."""

import collections
import dataclasses
import json
import re
import signal

import pytest

import alertbridge

from tests.fakedingtalk import REAL_TIME
from tests.kit import (
    APP_PEOPLE,
    ONCALL,
    OPS,
    Daemon,
    TcpProxy,
    app_config,
    empty_mysql,
    get,
    history,
    make_alert,
    make_payload,
    mysql_settings,
    post,
    settle,
    storm_payloads,
    wait_until,
)

STORM_ID = re.compile(r"storm-\d+-\d+")
SMALL = {
    "rate_limit": "4",
    "rate_window": "2",
    "throttle_seconds": "600",
    "retry_base": "0.05",
    "retry_max": "0.2",
}


def cluster(instance, lease=2, instances=2):
    # Full pages only (no compact layout): a storm's digests stay as large as before, so a storm
    # of 150 groups outlasts DingTalk's first window.
    return (
        f"\n[cluster]\nenabled = true\ninstance = {instance}\nlease = {lease:g}\n"
        f"instances = {instances}\n\n[templates]\ncompact_after = 0\n"
    )


@pytest.fixture
def small_fake(fake):
    fake.rate_limit, fake.rate_window = 4, 2.0  # DingTalk's limit, scaled: 4 per 2 s per robot
    return fake


@pytest.fixture
def instances(tmp_path, small_fake):
    """instances(database, names=("a", "b")) -> alertbridge processes on one MySQL history, in
    directories of their own; `database` may be a list, one settings per instance."""
    started = []

    def start(database, names=("a", "b")):
        databases = database if isinstance(database, list) else [database] * len(names)
        children = []
        for number, (name, settings) in enumerate(zip(names, databases)):
            directory = tmp_path / f"{number}-{name}"
            directory.mkdir()
            children.append(
                Daemon(directory, small_fake.url, settings, delivery=SMALL, extra=cluster(name))
            )
        started.extend(children)
        for child in children:
            child.wait_healthy()
        return children

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
    return REAL_TIME() - last >= quiet


def test_two_instances_send_each_page_once_even_when_the_leader_dies(instances, small_fake):
    children = instances(empty_mysql())
    first = leader_of(children)
    payloads = storm_payloads(groups=150, per_group=10)
    for payload in payloads:  # Alertmanager's webhook_configs list both
        assert [post(c.url, payload)[0] for c in children] == [200, 200]
    assert small_fake.wait_for(lambda f: len(f.delivered()) >= 12, timeout=30)
    # the leader dies between two windows: nothing in flight, every answer it got marked sent
    assert wait_until(lambda: idle(small_fake) and answered(first, small_fake), timeout=30)
    first.proc.send_signal(signal.SIGKILL)
    first.proc.wait()
    survivor = next(c for c in children if c is not first)
    assert leader_of([survivor]) is survivor
    expected = {f"storm-{g}-{i}" for g in range(150) for i in range(10)}
    assert small_fake.wait_for(lambda f: set(accepted_ids(f)) >= expected, timeout=120)
    assert settle_process(survivor)
    counts = accepted_ids(small_fake)
    assert [i for i, n in counts.items() if n > 1] == []  # each alert in one accepted message
    assert [r for r in small_fake.requests if r.errcode == 410100] == []
    assert all(small_fake.max_per_window(token) <= 4 for token in OPS)
    # The dead leader's last sends are in its journal, and perhaps not yet in the history (its
    # recorder writes them a moment after DingTalk took them): they are recorded when it starts
    # again, and it sends nothing the survivor sent.
    delivered = len(small_fake.delivered())
    name = first.config.parent.name.split("-", 1)[1]
    again = Daemon(
        first.config.parent, small_fake.url, empty_settings(), delivery=SMALL, extra=cluster(name)
    )
    try:
        again.wait_healthy()
        assert settle_process(again)
        rows = history(empty_settings())
        assert len(rows) == 1500 and all(r["notified_count"] == 1 for r in rows)
        assert len(small_fake.delivered()) == delivered
    finally:
        again.kill()


def answered(child, fake):
    """The instance has handled the answer of every request DingTalk got (a notification it
    sent is marked sent in MySQL before its answer is counted)."""
    text = get(child.url, "/metrics")[1]
    counted = sum(
        float(v) for v in re.findall(r"^alertbridge_sends_total\{[^}]*\} (\S+)$", text, re.M)
    )
    with fake.cond:
        return counted == len(fake.requests)


def settle_process(child):
    """Until the process has nothing left to send or record."""

    def quiet():
        text = get(child.url, "/metrics")[1]
        waiting = sum(
            float(v) for v in re.findall(r"^alertbridge_queue_messages\{[^}]*\} (\S+)$", text, re.M)
        )
        backlog = float(
            re.search(r"^alertbridge_record_backlog_events (\S+)$", text, re.M).group(1)
        )
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
    assert post(bridge, payload)[0] == 200  # Alertmanager retried: it had no answer
    settle(bridge)
    assert len(fake.delivered()) == 1 and bridge.journal.message_states() == {
        "sent": 1,
        "duplicate": 1,
    }
    assert "alertbridge_duplicates_total 1" in bridge.probes.render_metrics()
    [row] = history(bridge)
    assert (row["received_count"], row["notified_count"]) == (2, 1)


def test_paging_goes_on_while_mysql_is_away_and_no_robot_goes_over_budget(instances, small_fake):
    settings = empty_mysql()
    proxy = TcpProxy(settings.port).start()
    children = instances(dataclasses.replace(settings, port=proxy.port))
    leader_of(children)
    proxy.cut()  # MySQL unreachable for both instances
    payloads = storm_payloads(groups=40, per_group=5)
    for payload in payloads:
        assert [post(c.url, payload)[0] for c in children] == [200, 200]
    expected = {f"storm-{g}-{i}" for g in range(40) for i in range(5)}
    assert small_fake.wait_for(
        lambda f: set(accepted_ids(f)) >= expected, timeout=120
    )  # paging went on
    assert wait_until(lambda: all(role(c) == "alone" for c in children), timeout=30)
    assert all(small_fake.max_per_window(token) <= 4 for token in OPS)
    assert [r for r in small_fake.requests if r.errcode == 410100] == []
    proxy.start()  # MySQL is back: the history catches up
    assert all(settle_process(c) for c in children)
    assert wait_until(lambda: len(history(settings)) == 200, timeout=60)
    assert wait_until(
        lambda: sorted(role(c) for c in children) == ["leader", "standby"], timeout=30
    )


# --- the second hostile pass: pages lost or held, budgets overrun, two processes with one name ---


def storm_ids(groups, per_group):
    return {f"storm-{g}-{i}" for g in range(groups) for i in range(per_group)}


def test_a_page_each_instance_got_twice_is_sent_once(instances, small_fake):
    """An Alertmanager HA pair sends each notification from both peers: each instance journals
    it twice. The older copy was superseded and marked sent, so the newer one was a duplicate."""
    children = instances(empty_mysql())
    leader_of(children)
    payloads = [make_payload("ops", [make_alert("Twice", f"storm-{g}-0")]) for g in range(3)]
    for payload in payloads:
        for _ in range(2):
            assert [post(c.url, payload)[0] for c in children] == [200, 200]
    assert small_fake.wait_for(lambda f: set(accepted_ids(f)) == storm_ids(3, 1), timeout=30)
    assert all(settle_process(c) for c in children)
    assert accepted_ids(small_fake) == {i: 1 for i in storm_ids(3, 1)}


def test_a_group_repeated_while_dingtalk_fails_is_sent_once_it_recovers(make_bridge, fake):
    bridge = make_bridge(
        empty_mysql(),
        extra=cluster("solo", lease=1, instances=1),
        delivery={"retry_base": "0.05", "retry_max": "0.1"},
    )
    assert wait_until(lambda: bridge.cluster.role == "leader", timeout=30)
    fake.fail_next(OPS[0], "http500", times=1000)
    fake.fail_next(OPS[1], "http500", times=1000)
    fake.fail_next(OPS[2], "http500", times=1000)
    payload = make_payload("ops", [make_alert("Repeated", "r-1")])
    for _ in range(3):  # repeat_interval, or Alertmanager's retries
        assert post(bridge, payload)[0] == 200
        assert fake.wait_for(lambda f: len(f.requests) >= 3, timeout=30)
    fake.clear_script()
    assert fake.wait_for(lambda f: len(f.delivered()) == 1, timeout=30)
    settle(bridge)
    assert len(fake.delivered()) == 1 and "Repeated" in fake.delivered()[0].text


def test_a_webhook_only_the_standby_got_is_sent_by_the_leader(instances, small_fake):
    """Alertmanager reached only the standby (the leader answered 503, or a network path)."""
    children = instances(empty_mysql())
    leader = leader_of(children)
    standby = next(c for c in children if c is not leader)
    assert post(standby.url, make_payload("ops", [make_alert("OnlyHere", "storm-0-0")]))[0] == 200
    assert small_fake.wait_for(lambda f: accepted_ids(f) == {"storm-0-0": 1}, timeout=30)
    standby.wait_log("handed to the leader")
    leader.wait_log("adopted a message of route=ops")
    assert all(settle_process(c) for c in children)
    assert accepted_ids(small_fake) == {"storm-0-0": 1}
    assert "alertbridge_cluster_handoffs_total 1" in get(standby.url, "/metrics")[1]


def test_an_instance_cut_off_from_mysql_and_the_leader_stay_within_each_budget_together(
    instances, small_fake
):
    """The cut-off instance sends alone with half of each budget; the leader, seeing it go
    silent, presumes so and keeps to its half too."""
    settings = empty_mysql()
    proxies = [TcpProxy(settings.port).start() for _ in range(2)]
    children = instances([dataclasses.replace(settings, port=p.port) for p in proxies])
    leader = leader_of(children)
    cut = children.index(next(c for c in children if c is not leader))
    proxies[cut].cut()  # the standby's MySQL path only
    payloads = storm_payloads(groups=60, per_group=5)
    for payload in payloads[:10]:
        assert [post(c.url, payload)[0] for c in children] == [200, 200]
    assert wait_until(lambda: role(children[cut]) == "alone", timeout=30)
    for payload in payloads[10:]:  # both send now: the leader, and alone the other
        assert [post(c.url, payload)[0] for c in children] == [200, 200]
    assert small_fake.wait_for(lambda f: set(accepted_ids(f)) >= storm_ids(60, 5), timeout=120)
    assert wait_until(lambda: idle(small_fake, quiet=3), timeout=60)
    assert [r for r in small_fake.requests if r.errcode == 410100] == []
    assert all(small_fake.max_per_window(token) <= 4 for token in OPS)
    assert "alertbridge_cluster_missing_instances 1" in get(leader.url, "/metrics")[1]


def test_a_leader_paused_past_its_lease_does_not_send_as_leader_when_it_resumes(
    instances, small_fake
):
    children = instances(empty_mysql())
    first = leader_of(children)
    for payload in storm_payloads(groups=200, per_group=5):
        assert [post(c.url, payload)[0] for c in children] == [200, 200]
    assert small_fake.wait_for(lambda f: len(f.delivered()) >= 4, timeout=30)
    first.proc.send_signal(signal.SIGSTOP)  # a long GC, a frozen VM
    other = next(c for c in children if c is not first)
    assert leader_of([other]) is other
    sent = len(small_fake.delivered())
    assert small_fake.wait_for(lambda f: len(f.delivered()) >= sent + 3, timeout=60)
    first.proc.send_signal(signal.SIGCONT)  # it still has messages it would send
    assert wait_until(lambda: role(first) == "standby", timeout=30)
    assert small_fake.wait_for(lambda f: set(accepted_ids(f)) >= storm_ids(200, 5), timeout=120)
    assert [r for r in small_fake.requests if r.errcode == 410100] == []
    assert all(small_fake.max_per_window(token) <= 4 for token in OPS)


def test_two_processes_with_one_instance_name_do_not_both_lead(instances, small_fake):
    children = instances(empty_mysql(), names=("twin", "twin"))
    assert wait_until(lambda: [role(c) for c in children].count("leader") == 1, timeout=30)
    leader = next(c for c in children if role(c) == "leader")
    namesake = next(c for c in children if c is not leader)
    namesake.wait_log(f"another process checks in as instance=twin (pid {leader.pid} on ")
    for payload in storm_payloads(groups=20, per_group=3):
        assert [post(c.url, payload)[0] for c in children] == [200, 200]
    assert small_fake.wait_for(lambda f: set(accepted_ids(f)) >= storm_ids(20, 3), timeout=120)
    assert all(settle_process(c) for c in children)
    assert [i for i, n in accepted_ids(small_fake).items() if n > 1] == []
    assert all(small_fake.max_per_window(token) <= 4 for token in OPS)
    assert role(namesake) == "standby"


ON_CALL = (
    ONCALL
    + """
[escalation:fast]
steps =
    2s = lisi
    60s = zhangsan
"""
)


def two_instances(tmp_path, fake, receivers, extra):
    """Instances a and b on one MariaDB (emptied first), healthy; the caller kills them."""
    children = []
    for name in ("a", "b"):
        directory = tmp_path / name
        directory.mkdir()
        children.append(
            Daemon(
                directory,
                fake.url,
                empty_mysql() if name == "a" else mysql_settings(),
                receivers=receivers,
                extra=cluster(name) + extra,
            )
        )
    try:
        for child in children:
            child.wait_healthy()
    except BaseException:
        for child in children:
            child.kill()
        raise
    return children


def test_two_instances_one_page_one_escalation_and_a_claim_served_by_either(tmp_path, fake):
    """On one MariaDB: the page goes out once, its first escalation step once (from the leader),
    and a claim served by the standby ends the chain and is announced once."""
    from tests.test_incidents import LINK, claim_request

    receivers = {
        "ops": {"robots": "ops-1", "claim_links": "true", "escalation": "fast"},
        "dev": {"robots": "dev-1"},
    }
    children = two_instances(tmp_path, fake, receivers, ON_CALL)
    try:
        leader = leader_of(children)
        standby = next(c for c in children if c is not leader)
        page = make_payload("ops", [make_alert("DiskFull")]) | {"groupKey": "g-1"}
        assert [post(c.url, page)[0] for c in children] == [200, 200]
        assert fake.wait_for(lambda f: any("升级第 1 步" in m.text for m in f.delivered()))
        token = LINK.search(fake.delivered()[0].text).group(1)
        _, _, cookies = claim_request(standby, token)
        form = {"person": "zhangsan", "csrf": cookies["alertbridge_csrf"]}
        assert "✅ 张三 已认领" in claim_request(standby, token, "POST", form, cookies)[1]
        assert fake.wait_for(lambda f: any("认领了" in m.text for m in f.delivered()))
        for child in children:
            assert settle_process(child)
        texts = [m.text for m in fake.delivered()]
        assert sum("DiskFull on node-1" in t and "升级" not in t for t in texts) == 1  # the page
        assert sum("升级第 1 步" in t for t in texts) == 1
        assert sum("认领了" in t for t in texts) == 1
        [escalated] = [m for m in fake.delivered() if "升级第 1 步" in m.text]
        assert escalated.body["at"]["atMobiles"] == ["13800000002"]  # lisi
    finally:
        for child in children:
            child.kill()


def test_only_the_leader_holds_the_app_stream_and_a_new_leader_serves_clicks(tmp_path, fake, app):
    """The DingTalk app on two instances: one Stream connection, the leader's; the standby
    says who holds it. kill -9 the leader: the other takes the lease, opens its own connection
    with a fresh ticket and serves a click on the card the first one sent."""
    receivers = {
        "ops": {"robots": "ops-1", "app_group": "cid-ops"},
        "dev": {"robots": "dev-1"},
    }
    children = two_instances(tmp_path, fake, receivers, app_config(app) + APP_PEOPLE)
    try:
        leader = leader_of(children)
        standby = next(c for c in children if c is not leader)
        assert wait_until(lambda: app.connections == 1)
        assert wait_until(lambda: "held by the cluster" in get(standby.url, "/")[1])
        assert app.connections == 1  # the standby looked, and left the connection to the leader
        page = make_payload("ops", [make_alert("DiskFull")]) | {"groupKey": "g-1"}
        assert [post(c.url, page)[0] for c in children] == [200, 200]
        assert wait_until(lambda: app.cards, timeout=30)
        [track] = app.cards
        store = alertbridge.Store(mysql_settings())
        try:
            assert wait_until(lambda: store.open_incident("ops", track.split(".")[1]), timeout=30)
        finally:
            store.close()

        leader.kill()  # SIGKILL: its socket dies with it, its lease runs out
        assert wait_until(lambda: app.connections == 2, timeout=60), standby.log.read_text()
        answer = app.click(track, "manager4321")["cardData"]["cardParamMap"]
        assert answer["state"] == "claimed" and "张三" in answer["status"]
        assert len(app.cards) == 1 and fake.delivered() == []  # one card, no robot message
    finally:
        for child in children:
            child.kill()


def test_a_handoff_the_leader_died_before_adopting_is_sent_by_the_standby_that_made_it(tmp_path):
    """A standby hands the leader a message only it got, and finishes its own copy as handed
    off; the leader dies before adopting it. The standby, leading now, finds its own handoff in
    MySQL: it held the claim only in that handed-off copy, took it as held, and dropped the
    handoff. The page was never sent."""
    empty_mysql()
    now = [1000.0]
    journal = alertbridge.Journal(
        str(tmp_path / "journal.db"), "normal", lambda: now[0], lambda: now[0]
    )
    route = alertbridge.Route("ops", ())
    webhook = alertbridge.parse_webhook(json.dumps(make_payload("ops", [make_alert()])).encode())
    journal.add_webhook(webhook, route, "only-here")
    [(message_id, claims)] = journal.pending_send_keys()
    coordinator = alertbridge.Coordinator(
        alertbridge.Cluster(enabled=True, instance="b", lease=2),
        alertbridge.Delivery,
        empty_settings(),
        journal,
        None,
        alertbridge.Metrics(),
        clock=lambda: now[0],
    )
    now[0] += 3  # older than a lease, its claims unknown to the leader: handed off
    coordinator._stand_by()
    assert journal.pending_send_keys() == []
    coordinator._lead()  # the leader died; this instance leads and finds its own handoff
    [(adopted, again)] = journal.pending_send_keys()
    assert again == claims and adopted != message_id


def test_escalation_steps_a_dying_leader_took_are_sent_by_the_next_leader_once(tmp_path, fake):
    """Five critical groups unclaimed; their first steps come due while DingTalk refuses the
    leader's requests: the history has every step marked done, and the leader is killed -9
    with none of them sent. The next leader sends each once (folded: due together)."""
    receivers = {"ops": {"robots": "ops-1", "escalation": "fast"}, "dev": {"robots": "dev-1"}}
    children = two_instances(tmp_path, fake, receivers, ON_CALL)
    try:
        leader = leader_of(children)
        heir = next(c for c in children if c is not leader)
        names = [f"Disk{n}" for n in range(5)]
        for name in names:
            page = make_payload("ops", [make_alert(name)]) | {"groupKey": f"g-{name}"}
            assert [post(c.url, page)[0] for c in children] == [200, 200]
        assert fake.wait_for(lambda f: sum("升级" not in m.text for m in f.delivered()) >= 5, 30)
        fake.fail_next(OPS[0], "http500", times=100_000)  # nothing the leader sends gets through
        store = alertbridge.Store(mysql_settings())
        try:
            def taken():
                return sum(i["events"].count("escalated") for i in store.incidents())

            assert wait_until(lambda: taken() == 5, timeout=60)
        finally:
            store.close()
        leader.kill()
        fake.clear_script()
        steps = [m.text for m in fake.delivered() if "升级第 1 步" in m.text]
        assert steps == []  # the leader died with every step taken and none sent
        assert fake.wait_for(
            lambda f: all(any(f"升级第 1 步：{n} " in m.text for m in f.delivered()) for n in names),
            timeout=60,
        ), heir.log.read_text()
        assert settle_process(heir)
        texts = [m.text for m in fake.delivered()]
        assert all(sum(f"升级第 1 步：{n} " in t for t in texts) == 1 for n in names)
    finally:
        for child in children:
            child.kill()
