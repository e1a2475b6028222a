"""Escalation in simulated time: the steps of a policy come due at their delays after the page,
go out once each (to the route's group and the receivers a step names, @-mentioning its people),
and stop at a claim, at a resolve, and after their repeats; a new leader goes on where the last
left off. The escalator is stepped by hand on a clock the test moves."""

import json

import pytest

import alertbridge
from tests.kit import make_alert, make_payload
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


def load(tmp_path, text=PEOPLE + ESCALATION):
    path = tmp_path / "config.ini"
    path.write_text("[alertbridge]\nstate_dir = state\n" + text, encoding="utf-8")
    return alertbridge.load_config(str(path))


class World:
    """A config, a journal, an SQLite history and an escalator, on a clock the test moves."""

    def __init__(self, tmp_path, cluster=None):
        self.now = OPENED
        self.config = load(tmp_path)
        self.journal = alertbridge.Journal(
            str(tmp_path / "journal.db"), "normal", lambda: self.now, lambda: self.now
        )
        self.store = alertbridge.Store(alertbridge.Database(path=str(tmp_path / "history.db")))
        self.metrics = alertbridge.Metrics()
        self.escalator = self.make_escalator(cluster or alertbridge.Solo())

    def make_escalator(self, cluster):
        return alertbridge.Escalator(
            lambda: self.config, self.store, self.journal, cluster, self.metrics, lambda: self.now
        )

    def page(self, severity="critical", status="firing", key="g-disk"):
        alerts = [
            make_alert(
                "DiskFull",
                "db-1",
                severity=severity,
                status=status,
                ends_at="2026-11-30T02:00:00Z" if status == "resolved" else "0001-01-01T00:00:00Z",
            )
        ]
        webhook = alertbridge.parse_webhook(
            json.dumps(make_payload("ops", alerts) | {"groupKey": key}).encode()
        )
        event = alertbridge.webhook_event(
            webhook,
            "r",
            alertbridge.datetime.fromtimestamp(self.now, alertbridge.timezone.utc),
            self.config.routes["ops"],
        )
        self.store.record("j", [(int(self.now), "webhook", json.dumps(event))])

    def at(self, seconds):
        """Move the clock to `seconds` after the page; step the escalator; what it journaled."""
        self.now = OPENED + seconds
        before = {r: len(self.notes(r)) for r in ("ops", "leads")}
        self.escalator.step()
        return {r: self.notes(r)[before[r] :] for r in ("ops", "leads")}

    def notes(self, route):
        return [m.body for m in self.journal.due_messages(route, self.now + 1)]


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
    assert note.note == "⏫ 升级第 1 步：DiskFull 已等待 10m，无人认领"
    assert note.mention.mobiles == ("13800000001",)  # zhangsan, on call in primary
    assert world.at(1199) == {"ops": [], "leads": []}
    second = world.at(1200)  # lisi, and the leads' group hears it too
    assert [n.mention.user_ids for n in second["ops"]] == [("lisi01",)]
    assert [n.note for n in second["leads"]] == ["⏫ 升级第 2 步：DiskFull 已等待 20m，无人认领"]
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
    assert len(world.notes("ops")) == 1  # the history had the step done: once


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


def test_a_silenced_incident_escalates_no_more(world):
    world.page()
    [incident] = world.store.incidents()
    world.store.silenced(
        incident["id"], "s-1", "2026-11-30 03:00:00", "zhangsan", "2026-11-30 02:01:00", 1
    )
    assert world.at(600) == {"ops": [], "leads": []}
    assert world.store.incidents()[0]["events"] == ["opened", "silenced"]


def test_the_history_away_is_a_warning_once_and_a_short_wait(world, caplog):
    down = alertbridge.StoreUnavailable("mysql://root@127.0.0.1:3306/test: Connection refused")
    waits = [world.escalator.failed(down, n) for n in (1, 2, 3)]
    assert all(0 < wait <= 10 for wait in waits)
    said = [r for r in caplog.records if "escalator" in r.getMessage()]
    assert [r.levelname for r in said] == ["WARNING"] and not said[0].exc_info
