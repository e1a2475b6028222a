"""Escalation in simulated time: the steps of a policy come due at their delays after the page,
go out once each (to the route's group and the receivers a step names, @-mentioning its people),
and stop at a claim, at a resolve, and after their repeats; a new leader goes on where the last
left off. The escalator is stepped by hand on a clock the test moves."""

import json
import logging
import threading

import pytest

import alertbridge
from tests.fakealertmanager import FakeAlertmanager
from tests.kit import (
    config_text,
    empty_mysql,
    load_fixture,
    make_alert,
    make_payload,
    post,
    wait_until,
)
from tests.test_oncall import PEOPLE

ESCALATION = """
[escalation:critical-pages]
steps =
    10m = rotation:primary
    20m = lisi, receiver:leads
repeat = 1

[robot:r]
url = https://oapi.dingtalk.com/robot/send?access_token=t

[robot:l]
url = https://oapi.dingtalk.com/robot/send?access_token=l

[receiver:ops]
robots = r
escalation = critical-pages

[receiver:leads]
robots = l
"""
OPENED = 1_796_004_000.0  # 2026-11-30 10:00 in Shanghai: zhangsan's week on primary
GROUP = alertbridge.group_hash("g-disk")
Desk = alertbridge.Desk


def load(tmp_path, text=PEOPLE + ESCALATION):
    path = tmp_path / "config.ini"
    path.write_text("[alertbridge]\nstate_dir = state\n" + text, encoding="utf-8")
    return alertbridge.load_config(str(path))


class World:
    """A config, a journal, an SQLite history and an escalator, on a clock the test moves."""

    def __init__(self, tmp_path, cluster=None, store=None):
        self.now = OPENED  # the steady clock
        self.skew = 0.0  # how far the wall clock was stepped from it (NTP, a hand-set date)
        self.config = load(tmp_path)
        self.journal = alertbridge.Journal(
            str(tmp_path / "journal.db"), "normal", lambda: self.now, self.wall
        )
        self.store = store or alertbridge.Store(
            alertbridge.Database(path=str(tmp_path / "history.db"))
        )
        self.metrics = alertbridge.Metrics()
        self.escalator = self.make_escalator(cluster or alertbridge.Solo())
        self.events = 0

    def wall(self):
        return self.now + self.skew

    def make_escalator(self, cluster):
        config = lambda: self.config  # noqa: E731
        relay = alertbridge.NoteRelay(config, self.store, self.journal, cluster, self.wall)
        return alertbridge.Escalator(
            config, self.store, cluster, self.metrics, lambda: self.now, self.wall, relay
        )

    def page(self, severity="critical", status="firing", key="g-disk", instance="db-1"):
        """Alertmanager's notification of a group, recorded in the history now."""
        alerts = [
            make_alert(
                "DiskFull",
                instance,
                severity=severity,
                status=status,
                ends_at="2026-11-30T02:00:00Z" if status == "resolved" else "0001-01-01T00:00:00Z",
            )
        ]
        payload = make_payload("ops", alerts) | {
            "groupKey": key,
            "groupLabels": {"alertname": "DiskFull", "instance": instance},
        }
        webhook = alertbridge.parse_webhook(json.dumps(payload).encode())
        event = alertbridge.webhook_event(
            webhook,
            "r",
            alertbridge.datetime.fromtimestamp(self.wall(), alertbridge.timezone.utc),
            self.config.routes["ops"],
        )
        self.events += 1
        self.store.record("j", [(self.events, "webhook", json.dumps(event))])

    def at(self, seconds):
        """Move the clock to `seconds` after the page; step the escalator; what it journaled,
        sent at once (as a sender with budget to spare would)."""
        self.now = OPENED + seconds
        self.escalator.step()
        return {r: self.sent(r) for r in ("ops", "leads")}

    def desk(self, am):
        """A Desk on this world's history, making silences in `am`."""
        self.config = alertbridge.replace(
            self.config, oncall=alertbridge.replace(self.config.oncall, alertmanager_api=am.url)
        )
        return alertbridge.Desk(lambda: self.config, self.store, self.metrics, self.wall)

    def follower(self):
        return alertbridge.Follower(
            lambda: self.config, self.store, alertbridge.Solo(), self.wall
        )

    def silence(self, am, hours, desk=None):
        """张三 silences the group's incident for `hours` (it may be a fraction)."""
        return (desk or self.desk(am)).silence(
            "ops", alertbridge.group_hash("g-disk"), hours, "zhangsan", "张三", "link"
        )

    def sent(self, route):
        """The messages waiting for a route, then sent."""
        messages = self.journal.due_messages(route, self.now + 1)
        self.journal.finish([m.id for m in messages], "sent")
        return [m.body for m in messages]


@pytest.fixture
def am():
    server = FakeAlertmanager().start()
    yield server
    server.stop()


@pytest.fixture
def world(tmp_path):
    world = World(tmp_path)
    yield world
    world.store.close()
    world.journal.close()


def test_steps_come_due_at_their_delays_and_repeat_then_stop(world):
    world.page()
    assert world.at(599) == {"ops": [], "leads": []}
    first = world.at(600)
    [note] = first["ops"]
    assert note.kind == alertbridge.NOTE and first["leads"] == []
    assert note.note == "⏫ 升级第 1 步：DiskFull db-1 已等待 10m，无人认领"
    assert note.mention.mobiles == ("13800000001",)  # zhangsan, on call in primary
    assert world.at(1199) == {"ops": [], "leads": []}
    second = world.at(1200)  # lisi, and the leads' group hears it too
    assert [n.mention.user_ids for n in second["ops"]] == [("lisi01",)]
    assert [n.note for n in second["leads"]] == ["⏫ 升级第 2 步：DiskFull db-1 已等待 20m，无人认领"]
    assert len(world.at(1800)["ops"]) == 1  # the second round: step 1 again, 10m after 20m
    assert len(world.at(2400)["ops"]) == 1  # step 2 again
    assert world.at(99_999) == {"ops": [], "leads": []}  # repeat = 1: over
    [incident] = world.store.incidents()
    assert incident["events"] == ["opened"] + ["escalated"] * 4
    exposed = world.metrics.render([])
    assert 'alertbridge_escalations_total{receiver="ops"} 4' in exposed


def test_a_claim_stops_the_chain(world):
    world.page()
    world.at(600)
    group = alertbridge.group_hash("g-disk")
    world.store.claim(
        "ops",
        group,
        "zhangsan",
        alertbridge.db_time(
            alertbridge.datetime.fromtimestamp(OPENED + 700, alertbridge.timezone.utc)
        ),
    )
    assert world.at(1200) == {"ops": [], "leads": []}


def test_a_resolve_stops_the_chain(world):
    world.page()
    world.now = OPENED + 300
    world.page(status="resolved")
    assert world.at(600) == {"ops": [], "leads": []}


def test_levels_not_listed_do_not_escalate(world):
    world.page(severity="warning")
    assert world.at(3600) == {"ops": [], "leads": []}


def test_after_a_long_outage_only_the_latest_due_step_goes_out(world):
    world.page()
    assert [n.note[:10] for n in world.at(1500)["ops"]] == ["⏫ 升级第 2 步："]
    assert world.at(1500) == {"ops": [], "leads": []}


def test_a_standby_does_not_escalate_and_a_new_leader_goes_on_once(world, tmp_path):
    class Standby(alertbridge.Solo):
        def may_send(self):
            return False

    world.page()
    world.escalator = world.make_escalator(Standby())
    assert world.at(700) == {"ops": [], "leads": []}
    world.escalator = world.make_escalator(alertbridge.Solo())  # it leads now
    assert len(world.at(700)["ops"]) == 1
    other = world.make_escalator(alertbridge.Solo())  # an old leader, still stepping
    world.now = OPENED + 701
    other.step()
    assert world.sent("ops") == []  # the history had the step done: once


@pytest.mark.parametrize(
    "change, message",
    [
        ("    20m = lisi, receiver:leads", "    5m = lisi"),
        ("    10m = rotation:primary", "    10m = rotation:nobody"),
        ("    20m = lisi, receiver:leads", "    20m = receiver:bosses"),
        ("    10m = rotation:primary", "    soon = rotation:primary"),
        ("escalation = critical-pages", "escalation = gentle"),
    ],
)
def test_a_policy_that_cannot_work_is_refused_at_load(tmp_path, change, message):
    expected = {
        "    5m = lisi": "[escalation:critical-pages] steps: entry 2: comes no later than the "
        "step before it",
        "    10m = rotation:nobody": "[escalation:critical-pages] steps: no section "
        "[rotation:nobody]",
        "    20m = receiver:bosses": "[escalation:critical-pages] steps: no section "
        "[receiver:bosses]",
        "    soon = rotation:primary": "[escalation:critical-pages] steps: entry 1: write AFTER "
        "= people, rotation:NAME, receiver:NAME (AFTER such as 10m)",
        "escalation = gentle": "[receiver:ops] escalation: no section [escalation:gentle]",
    }[message]
    with pytest.raises(alertbridge.ConfigError) as error:
        load(tmp_path, PEOPLE + ESCALATION.replace(change, message))
    assert str(error.value) == expected


def test_a_silenced_incident_escalates_no_more_while_its_silence_holds(world, am):
    world.page()
    world.now = OPENED + 300
    world.silence(am, hours=1)
    assert [n.note for n in world.at(301)["ops"]] == ["🔕 张三 静默了 DiskFull db-1 1 小时"]
    assert world.at(600) == {"ops": [], "leads": []}
    assert world.at(3599 + 300) == {"ops": [], "leads": []}
    assert world.store.incidents()[0]["events"] == ["opened", "silenced"]


def test_the_history_away_is_a_warning_once_and_a_short_wait(world, caplog):
    down = alertbridge.StoreUnavailable("mysql://root@127.0.0.1:3306/test: Connection refused")
    waits = [world.escalator.failed(down) for _ in range(3)]
    assert all(0 < wait <= 10 for wait in waits)
    said = [r for r in caplog.records if "escalator" in r.getMessage()]
    assert [r.levelname for r in said] == ["WARNING"] and not said[0].exc_info


def two_worlds(tmp_path, database):
    """Two instances, each its journal, on one history."""
    worlds = []
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        worlds.append(World(tmp_path / name, store=alertbridge.Store(database)))
    return worlds


def steps_of(sent):
    """The escalation steps among what a round sent, by route: their first lines."""
    return {
        route: [n.note.split("\n")[0] for n in notes if n.note.startswith("⏫")]
        for route, notes in sent.items()
    }


FIRST_STEP = ["⏫ 升级第 1 步：DiskFull db-1 已等待 10m，无人认领"]
FIRING_NOW = {"alertname": "DiskFull", "instance": "db-1", "severity": "critical"}


def test_a_silence_that_ends_while_the_alert_fires_starts_the_chain_again(world, am):
    """Silenced for a minute at 5 min, the alert still firing: nothing while it holds; when
    Alertmanager says it expired, the chain starts again (its first step 10 min later), and a
    new silence can be made."""
    world.page()
    world.now = OPENED + 300
    world.silence(am, hours=1 / 60)
    am.fire(FIRING_NOW)
    assert steps_of(world.at(359)) == {"ops": [], "leads": []}
    world.now = OPENED + 361
    [silence] = am.made()
    am.expire(silence["id"])  # its end: Alertmanager has it expired
    world.follower().step()
    assert Desk.silenced_now(world.store.open_incident("ops", GROUP), world.wall()) is False
    assert steps_of(world.at(361 + 599)) == {"ops": [], "leads": []}
    assert steps_of(world.at(361 + 600)) == {"ops": FIRST_STEP, "leads": []}
    _, again = world.silence(am, hours=1)  # not "silenced already"
    assert [s["id"] for s in am.made()][-1] == again and len(am.made()) == 2
    assert world.store.incidents()[0]["events"] == [
        "opened", "silenced", "unsilenced", "escalated", "silenced"
    ]


def test_a_silence_ends_at_its_end_when_alertmanager_cannot_say(world, am):
    """Alertmanager away: a little after its end (two follow intervals), a silence is over."""
    world.page()
    world.now = OPENED + 300
    world.silence(am, hours=1 / 60)
    grace = alertbridge.silence_grace(world.config)
    assert steps_of(world.at(360 + grace - 1)) == {"ops": [], "leads": []}
    world.at(360 + grace)
    assert world.store.open_incident("ops", GROUP)["silence_id"] is None
    assert steps_of(world.at(360 + grace + 600)) == {"ops": FIRST_STEP, "leads": []}


def test_a_silence_extended_in_alertmanager_holds_the_incident_until_its_new_end(world, am):
    """Alertmanager keeps a silence's id when its end is moved: the old end is not its end."""
    world.page()
    world.now = OPENED + 300
    world.silence(am, hours=1 / 60)
    am.fire(FIRING_NOW)
    [silence] = am.made()
    later = alertbridge.datetime.fromtimestamp(OPENED + 4 * 3600, alertbridge.timezone.utc)
    am.extend(silence["id"], later)
    world.follower().step()
    assert steps_of(world.at(2 * 3600)) == {"ops": [], "leads": []}
    assert world.store.open_incident("ops", GROUP)["silence_id"] == silence["id"]


def test_a_silence_expired_in_alertmanager_before_its_end_lets_the_incident_escalate(
    world, am
):
    world.page()
    world.now = OPENED + 300
    _, silence = world.silence(am, hours=4)
    am.fire(FIRING_NOW)
    follower = world.follower()
    world.now = OPENED + 400
    follower.step()  # active in Alertmanager: nothing changes
    assert world.store.open_incident("ops", GROUP)["silence_id"] == silence
    am.expire(silence)  # someone expires it in Alertmanager's UI
    follower.step()
    assert world.store.open_incident("ops", GROUP)["silence_id"] is None
    assert steps_of(world.at(400 + 600))["ops"] == FIRST_STEP


def test_an_alertmanager_just_restarted_resolves_no_silenced_incident(world, am):
    """Alertmanager keeps its silences across a restart, not its alerts, until Prometheus sends
    them again: an empty answer then is no news that they are gone."""
    world.page()
    _, silence = world.silence(am, hours=4)
    am.restart()
    world.follower().step()
    incident = world.store.open_incident("ops", GROUP)
    assert incident["silence_id"] == silence and incident["state"] == "open"
    assert am.silences[silence]["status"]["state"] == "active"


def test_an_alert_alertmanager_garbles_does_not_stop_the_following(world, am):
    world.page()
    world.silence(am, hours=4)
    am.alerts.append({"labels": ["not", "a", "map"], "receivers": "ops"})
    am.alerts.append("not an alert at all")
    world.follower().step()  # no alert of the incident's: its alerts are gone
    assert world.store.incidents()[0]["state"] == "resolved"


def test_a_resolve_while_the_silence_is_being_made_keeps_no_silence(world, am):
    """The alerts resolve while Alertmanager makes the silence: the resolved incident keeps
    none, and Alertmanager's is expired again (it would mute the group's next incident)."""
    world.page()
    am.holding = True
    refused = []

    def tap():
        try:
            world.silence(am, hours=4)
        except alertbridge.DeskRefused as exc:
            refused.append(str(exc))

    tapping = threading.Thread(target=tap)
    tapping.start()
    assert am.waiting.acquire(timeout=10)
    world.page(status="resolved")
    am.holding = False
    am.hold.set()
    tapping.join(10)
    assert refused and "resolved meanwhile" in refused[0]
    [silence] = am.made()
    assert silence["status"]["state"] == "expired"
    assert world.store.incidents()[0]["events"] == ["opened", "resolved"]


def test_a_silence_made_as_its_maker_died_is_kept(world, am):
    """Killed after Alertmanager made the silence, before the history kept its id: the next
    look at Alertmanager finds it by its marker and keeps it (it was asked for)."""
    world.page()
    [incident] = world.store.incidents()
    marker = alertbridge.TAKING + "0123456789abcdef"
    at = alertbridge.epoch_db_time
    assert world.store.take_silence(
        incident["id"], marker, at(world.wall() + 60), at(world.wall() + 130), at(world.wall())
    )
    made = alertbridge.AlertmanagerAPI(am.url).silence(
        {"alertname": "DiskFull"}, world.wall(), world.wall() + 3600, "张三",
        f"alertbridge: from DingTalk, incident {incident['id']} ({marker})",
    )
    am.fire(FIRING_NOW)
    world.desk(am)  # [oncall] alertmanager_api
    world.follower().step()
    kept = world.store.open_incident("ops", GROUP)
    assert kept["silence_id"] == made
    assert world.store.incidents()[0]["events"] == ["opened", "silenced"]


def test_a_receiver_named_twice_in_a_step_hears_it_once(tmp_path):
    world = World(tmp_path)
    world.config = load(tmp_path, PEOPLE + ESCALATION.replace(
        "20m = lisi, receiver:leads", "20m = lisi, receiver:leads, receiver:leads, receiver:ops"))
    world.page()
    world.at(600)
    assert [len(v) for v in steps_of(world.at(1200)).values()] == [1, 1]
    world.store.close()
    world.journal.close()


def test_one_routes_notes_waiting_never_keep_anothers_from_their_turn(world, monkeypatch):
    """The relay reads a batch of notes at a time: the ops group's robot down, its notes wait
    (the first in the journal, the others in the history); the leads group's steps still go."""
    monkeypatch.setattr(alertbridge.NoteRelay, "BATCH", 3)
    for n in range(5):
        world.page(key=f"g-{n}", instance=f"db-{n}")
    world.now = OPENED + 600
    world.escalator.step()  # step 1, to ops only: one message that is never sent
    world.now = OPENED + 1200
    world.escalator.step()  # step 2, to ops and to leads
    world.escalator.step()
    [leads] = world.journal.due_messages("leads", world.now + 1)
    assert leads.body.note.count("升级第 2 步") == 3  # a batch: the others in the next
    world.journal.finish([leads.id], "sent")
    world.escalator.step()
    [more] = world.journal.due_messages("leads", world.now + 1)
    assert more.body.note.count("升级第 2 步") == 2
    assert len(world.journal.due_messages("ops", world.now + 1)) == 1  # still the first


def test_a_double_tap_on_silence_makes_one_silence_even_on_two_instances(tmp_path, database, am):
    """Two taps at once, served by two instances on one history: Alertmanager gets one
    silence; the other tap hears that it is being made, and once made, that it is made."""
    first, other = two_worlds(tmp_path, database)
    try:
        first.page()
        am.holding = True  # Alertmanager answers the first tap's request only when released
        answers = []
        tap = threading.Thread(target=lambda: answers.append(first.silence(am, hours=1)))
        tap.start()
        assert am.waiting.acquire(timeout=10)  # the first tap's silence is being made
        with pytest.raises(alertbridge.DeskRefused, match="Someone is silencing this just now"):
            other.silence(am, hours=4)
        am.hold.set()
        tap.join(10)
        [(_, made)] = answers
        with pytest.raises(alertbridge.DeskRefused, match=f"Silenced already \\(silence {made}"):
            other.silence(am, hours=4)
        assert [s["id"] for s in am.made()] == [made]
        assert [r[0] for r in am.requests].count("POST") == 1
    finally:
        first.store.close()
        other.store.close()


def test_alertmanager_refusing_a_silence_leaves_the_incident_as_it_was(world, am):
    world.page()
    am.server.shutdown()  # nobody answers at that address any more
    am.server.server_close()
    with pytest.raises(alertbridge.DeskRefused, match="Alertmanager did not take the silence"):
        world.silence(am, hours=1)
    incident = world.store.open_incident("ops", GROUP)
    assert incident["silence_id"] is None
    assert steps_of(world.at(600))["ops"] == ["⏫ 升级第 1 步：DiskFull db-1 已等待 10m，无人认领"]


@pytest.mark.parametrize("step", [-600, 3600])
def test_a_wall_clock_step_neither_holds_a_step_nor_sends_them_early(world, step):
    """Steps are timed by the steady clock: the wall clock stepped back 10 min (NTP) or
    forward an hour (a VM restored) at 5 min changes nothing: step 1 at 10 min, step 2 at 20."""
    world.page()
    world.at(60)  # looked at: its chain counts from the page
    world.now = OPENED + 300
    world.skew = step
    assert steps_of(world.at(599)) == {"ops": [], "leads": []}
    assert steps_of(world.at(600))["ops"] == ["⏫ 升级第 1 步：DiskFull db-1 已等待 10m，无人认领"]
    assert steps_of(world.at(1199)) == {"ops": [], "leads": []}
    assert len(steps_of(world.at(1200))["ops"]) == 1


def test_steps_due_together_go_out_as_one_message_after_new_pages_of_their_level(world):
    """An outage: 12 groups unclaimed at once. Their steps are one message for the group (10
    listed, the rest counted, every link and mention in it), ranked after new critical pages
    and kept out of the robots' reserve, which new critical pages need."""
    for n in range(12):
        world.page(key=f"g-{n}", instance=f"db-{n}")
    world.now = OPENED + 600
    world.escalator.step()
    [step] = world.journal.due_messages("ops", world.now + 1)
    assert step.rank == 0.5 and step.level == "critical" and step.reserve is False
    assert len(step.send_keys) == 12
    text = step.body.note
    assert text.count("⏫ 升级第 1 步") == 10 and text.endswith("…另有 2 条")
    assert step.body.mention.mobiles == ("13800000001",)
    page = alertbridge.parse_webhook(json.dumps(make_payload("ops", [make_alert()])).encode())
    world.journal.add_webhook(page, world.config.routes["ops"], "new-page")
    first, second = world.journal.due_messages("ops", world.now + 1)
    assert (first.request_id, first.reserve) == ("new-page", True) and second.id == step.id


def test_a_step_taken_by_a_leader_that_died_is_sent_by_the_next(tmp_path):
    """On one MariaDB: the leader marks the step done and dies before sending it (its note only
    in the history); the instance that leads next sends it, once."""
    dead, heir = two_worlds(tmp_path, empty_mysql())
    try:
        dead.page()
        dead.now = heir.now = OPENED + 600
        dead.escalator.escalate(dead.config)  # the step is taken; the instance dies here
        assert dead.store.incidents()[0]["events"] == ["opened", "escalated"]
        assert steps_of(heir.at(601))["ops"] == ["⏫ 升级第 1 步：DiskFull db-1 已等待 10m，无人认领"]
        assert steps_of(heir.at(602)) == {"ops": [], "leads": []}
        assert dead.store.incidents()[0]["events"] == ["opened", "escalated"]
    finally:
        dead.store.close()
        heir.store.close()


def test_a_hanging_alertmanager_holds_no_escalation_step(make_bridge, sqlite_db, fake, am):
    """Silenced incidents are followed on a worker of their own: while Alertmanager hangs on
    that request, another incident's step goes out when due, before the request's deadline."""
    from tests.test_cluster import ON_CALL

    receivers = {"ops": {"robots": "ops-1", "escalation": "fast"}, "dev": {"robots": "dev-1"}}
    oncall = ON_CALL.replace(
        "[oncall]\n", f"[oncall]\nalertmanager_api = {am.url}\nfollow_interval = 1\n"
    )
    bridge = make_bridge(sqlite_db, receivers=receivers, extra=oncall)

    def page(key):
        payload = make_payload("ops", [make_alert(key)])
        return payload | {"groupKey": key, "groupLabels": {"alertname": key}}

    for name in ("Silenced1", "Silenced2"):
        assert post(bridge.address, page(name))[0] == 200
    assert wait_until(lambda: len(bridge.store.open_incidents(10)) == 2)
    for name in ("Silenced1", "Silenced2"):
        bridge.desk.silence("ops", alertbridge.group_hash(name), 1, "zhangsan", "张三", "link")
    am.fire({"alertname": "Silenced1"})
    am.holding = True
    assert am.waiting.acquire(timeout=30)  # the follower waits for Alertmanager from now on
    assert post(bridge.address, page("DiskFull"))[0] == 200
    assert fake.wait_for(
        lambda f: any("升级第 1 步：DiskFull" in m.text for m in f.delivered()), timeout=30
    )
    assert am.abandoned == 0  # the follower still waits: it held nothing up
    am.hold.set()


def test_a_wall_clock_wrong_at_the_start_and_set_right_later_shifts_no_step_after_a_restart(world):
    """Started with the wall clock 10 min fast, set right by NTP 5 min later, then restarted:
    the history keeps wall-clock times, moved with the step, so the next process (or leader)
    reads them as they are: step 1 still 10 min after the page."""
    world.skew = 600
    world.page()
    world.at(1)  # looked at: its chain counts from the page, as the (fast) wall clock had it
    world.skew = 0
    world.at(300)  # NTP: the escalator sees the step and moves the times with it
    world.escalator = world.make_escalator(alertbridge.Solo())  # a restart, or a new leader
    assert steps_of(world.at(599)) == {"ops": [], "leads": []}
    assert steps_of(world.at(600))["ops"] == FIRST_STEP


def test_a_group_that_turns_critical_escalates_from_then(world):
    """An incident opened as a warning (which does not escalate) whose group turns critical
    takes the higher level, and its chain starts then: step 1 10 min after."""
    world.page(severity="warning")
    assert world.at(3000) == {"ops": [], "leads": []}
    world.page(severity="critical")  # the same group, at 50 min
    [incident] = world.store.incidents()
    assert incident["level"] == "critical" and incident["events"] == ["opened", "raised"]
    assert steps_of(world.at(3000 + 599)) == {"ops": [], "leads": []}
    assert steps_of(world.at(3000 + 600))["ops"] == FIRST_STEP
    world.page(severity="warning")  # a level lower again changes nothing
    assert world.store.incidents()[0]["level"] == "critical"


def test_an_escalation_nobody_can_claim_is_named_at_check_and_at_start(
    make_bridge, sqlite_db, fake, tmp_path, caplog
):
    """An escalation without claim links was taken silently: nobody could claim, only a resolve
    stopped it."""
    from tests.test_cluster import ON_CALL

    receivers = {"ops": {"robots": "ops-1", "escalation": "fast"}, "dev": {"robots": "dev-1"}}
    warning = (
        "receiver ops escalates ([escalation:fast]) but nobody can claim its pages: set "
        "claim_links = true in [receiver:ops]{}; until then only a resolve ends its chain"
    )
    without_oncall = ON_CALL[ON_CALL.index("[person:") :]
    bridge = make_bridge(sqlite_db, receivers=receivers, extra=without_oncall, start=False)
    expected = warning.format(" (and [oncall] base_url and link_secret)")
    assert f"note: {expected}" in alertbridge.check_config(bridge.config).splitlines()
    with caplog.at_level(logging.WARNING, logger="alertbridge"):
        bridge.start()
    assert expected in [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]

    def checked():
        path = tmp_path / "other.ini"
        text = config_text(fake.url, sqlite_db, receivers=receivers, extra=ON_CALL)
        path.write_text(text, encoding="utf-8")
        return alertbridge.check_config(alertbridge.load_config(str(path)))

    assert f"note: {warning.format('')}" in checked().splitlines()  # [oncall] alone is no claim
    receivers["ops"]["claim_links"] = "true"
    assert "nobody can claim" not in checked()


def test_a_grafana_incident_is_not_silenced_in_alertmanager_and_goes_on_escalating(world, am):
    """FAULTS 10: an app card's or a command's silence of an incident of Grafana-managed alerts
    made an Alertmanager silence that silences nothing of Grafana's, marked the incident
    silenced, and stopped its escalation while Grafana went on paging. It is refused instead,
    pointing to Grafana's own silence, and the chain goes on."""
    payload = load_fixture("grafana-docs-firing.json") | {
        "receiver": "ops", "groupKey": "g-disk", "groupLabels": {"alertname": "DiskFull"}}
    for alert in payload["alerts"]:
        alert["labels"]["severity"] = "critical"
    webhook = alertbridge.parse_webhook(json.dumps(payload).encode())
    event = alertbridge.webhook_event(
        webhook, "r", alertbridge.datetime.fromtimestamp(world.wall(), alertbridge.timezone.utc),
        world.config.routes["ops"])
    world.store.record("j", [(1, "webhook", json.dumps(event))])
    world.now = OPENED + 300
    with pytest.raises(alertbridge.DeskRefused) as refused:
        world.silence(am, hours=1)
    assert refused.value.key == "grafana_silence"
    assert "在 Grafana 中静默" in refused.value.say("zh")
    assert am.silences == {}
    [incident] = world.store.incidents()
    assert incident["events"] == ["opened"] and incident["silence_id"] is None
    assert [n.note for n in world.at(600)["ops"]]  # the first step, as if no one had tapped
