"""People and rotations: who is on call at any moment (hand-overs, overrides, the zone), who a
page mentions, and the mistakes refused at load. Time is simulated: each answer is a function
of the moment asked about."""

import json
import re
from datetime import datetime, timedelta, timezone

import pytest

import alertbridge
from tests.kit import get, make_alert, make_payload, post

SHANGHAI = alertbridge.load_timezone("Asia/Shanghai")
NEW_YORK = alertbridge.load_timezone("America/New_York")

PEOPLE = """
[person:zhangsan]
name = 张三
mobile = 13800000001

[person:lisi]
name = 李四
mobile = 13800000002
user_id = lisi01

[person:wangwu]
name = 王五
user_id = wangwu

[rotation:primary]
people = zhangsan, lisi, wangwu
shift = weekly
hand_over_at = 09:30
start = 2026-11-30
overrides =
    2026-12-24 .. 2026-12-25 = wangwu
    2026-12-31 18:00 .. 2027-01-01 09:30 = zhangsan

[rotation:nights]
people = lisi, zhangsan
shift = daily
hand_over_at = 20:00
start = 2026-11-30
"""

ROUTES = """
[robot:r]
url = https://oapi.dingtalk.com/robot/send?access_token=t

[receiver:ops]
robots = r
at_people = rotation:primary, wangwu
at_severities = critical
at_map_label = team
at_map =
    dba = rotation:nights, 13900000000
"""


def load(tmp_path, text=PEOPLE + ROUTES, zone="Asia/Shanghai"):
    path = tmp_path / "config.ini"
    path.write_text(f"[alertbridge]\ntimezone = {zone}\n" + text, encoding="utf-8")
    return alertbridge.load_config(str(path))


def at(text, tz=SHANGHAI):
    return datetime.fromisoformat(text).replace(tzinfo=tz).timestamp()


def who(config, rotation, moment, tz=SHANGHAI):
    person, until = alertbridge.on_call(config.rotations[rotation], at(moment, tz), config.tz)
    return person.handle, datetime.fromtimestamp(until, tz).strftime("%Y-%m-%d %H:%M")


def test_weekly_shifts_hand_over_at_the_time_of_day_in_the_zone(tmp_path):
    config = load(tmp_path)
    assert who(config, "primary", "2026-11-30 09:30") == ("zhangsan", "2026-12-07 09:30")
    assert who(config, "primary", "2026-12-07 09:29") == ("zhangsan", "2026-12-07 09:30")
    assert who(config, "primary", "2026-12-07 09:30") == ("lisi", "2026-12-14 09:30")
    assert who(config, "primary", "2026-12-14 10:00") == ("wangwu", "2026-12-21 09:30")
    assert who(config, "primary", "2026-12-21 09:30") == ("zhangsan", "2026-12-24 09:30")
    # before the start the turn goes on backwards: the shift before zhangsan's is wangwu's
    assert who(config, "primary", "2026-11-30 09:29") == ("wangwu", "2026-11-30 09:30")


def test_daily_shifts_hand_over_in_the_evening(tmp_path):
    config = load(tmp_path)
    assert who(config, "nights", "2026-11-30 19:59") == ("zhangsan", "2026-11-30 20:00")
    assert who(config, "nights", "2026-11-30 20:00") == ("lisi", "2026-12-01 20:00")
    assert who(config, "nights", "2026-12-01 03:00") == ("lisi", "2026-12-01 20:00")
    assert who(config, "nights", "2026-12-01 20:00") == ("zhangsan", "2026-12-02 20:00")


def test_overrides_take_the_shift_for_their_span(tmp_path):
    config = load(tmp_path)
    # zhangsan's week (12-21 to 12-28) is cut by wangwu's override: both dates' hand-over, the
    # second day included
    assert who(config, "primary", "2026-12-24 09:29") == ("zhangsan", "2026-12-24 09:30")
    assert who(config, "primary", "2026-12-24 09:30") == ("wangwu", "2026-12-26 09:30")
    assert who(config, "primary", "2026-12-26 09:30") == ("zhangsan", "2026-12-28 09:30")
    # a span given to the minute, inside lisi's week
    assert who(config, "primary", "2026-12-31 17:59") == ("lisi", "2026-12-31 18:00")
    assert who(config, "primary", "2026-12-31 18:00") == ("zhangsan", "2027-01-01 09:30")
    assert who(config, "primary", "2027-01-01 09:30") == ("lisi", "2027-01-04 09:30")


def test_hand_over_keeps_local_time_across_daylight_saving(tmp_path):
    config = load(tmp_path, zone="America/New_York")
    # 2027-03-14: New York moves from UTC-5 to UTC-4; the hand-over stays at 09:30 local
    before = who(config, "nights", "2027-03-13 20:00", NEW_YORK)
    after = who(config, "nights", "2027-03-14 20:00", NEW_YORK)
    assert before[1] == "2027-03-14 20:00" and after[1] == "2027-03-15 20:00"
    person, until = alertbridge.on_call(
        config.rotations["nights"], at("2027-03-14 20:00", NEW_YORK), config.tz
    )
    assert until - at("2027-03-14 20:00", NEW_YORK) == 86400  # a day after a 23-hour one


def test_the_report_gives_now_and_the_next_other_person(tmp_path):
    config = load(tmp_path)
    [(rotation, now, following), _] = alertbridge.on_call_report(
        [config.rotations["primary"], config.rotations["nights"]],
        at("2026-12-03 12:00"),
        config.tz,
    )
    assert rotation.name == "primary" and now[0].name == "张三"
    assert following[0].handle == "lisi" and following[1] == at("2026-12-14 09:30")


def test_a_page_mentions_whoever_is_on_call_when_it_is_sent(tmp_path):
    config = load(tmp_path)
    route = config.routes["ops"]
    alerts = alertbridge.parse_webhook(
        json.dumps(
            {
                "version": "4",
                "status": "firing",
                "receiver": "ops",
                "alerts": [make_alert("DiskFull", labels={"team": "dba"})],
            }
        ).encode()
    ).alerts
    first = alertbridge.Renderer.mentions(route, alerts, at("2026-12-01 12:00"), config.tz)
    assert first.mobiles == ("13800000001", "13900000000", "13800000002")  # zhangsan, lisi
    assert first.user_ids == ("wangwu", "lisi01")  # wangwu named, lisi on nights
    later = alertbridge.Renderer.mentions(route, alerts, at("2026-12-08 12:00"), config.tz)
    assert later.mobiles[0] == "13800000002" and later.user_ids[:2] == ("lisi01", "wangwu")
    warning = [{**alerts[0], "labels": {**alerts[0]["labels"], "severity": "warning"}}]
    assert alertbridge.Renderer.mentions(route, warning, at("2026-12-01 12:00"), config.tz) == (
        alertbridge.Mentions()
    )


@pytest.mark.parametrize(
    "text, message",
    [
        (
            PEOPLE.replace("people = zhangsan, lisi, wangwu", "people = zhangsan, bob"),
            "[rotation:primary] people: no section [person:bob]",
        ),
        (
            PEOPLE.replace("people = lisi, zhangsan", "people ="),
            "[rotation:nights] people: list at least one person (a rotation with nobody pages "
            "nobody)",
        ),
        (
            PEOPLE.replace("start = 2026-11-30\noverrides", "overrides"),
            "[rotation:primary] start: required, the date of the first shift (2026-12-01)",
        ),
        (
            PEOPLE.replace("hand_over_at = 20:00", "hand_over_at = 8pm"),
            "[rotation:nights] hand_over_at: not a time of day such as 09:30",
        ),
        (
            PEOPLE.replace("2026-12-24 .. 2026-12-25 = wangwu", "2026-12-24 .. 2026-12-25 = bob"),
            "[rotation:primary] overrides: entry 1: no section [person:bob]",
        ),
        (
            PEOPLE.replace("mobile = 13800000001\n", ""),
            "[person:zhangsan]: set mobile or feishu_id or user_id or wecom_id: a person nobody "
            "can @ cannot be paged",
        ),
    ],
)
def test_who_cannot_be_on_call_is_refused_at_load_naming_the_key(tmp_path, text, message):
    with pytest.raises(alertbridge.ConfigError) as error:
        load(tmp_path, text + ROUTES)
    assert str(error.value) == message


@pytest.mark.parametrize(
    "change, message",
    [
        ("at_people = rotation:primary, wangwu", "at_people = rotation:secondary"),
        ("at_people = rotation:primary, wangwu", "at_people = bob"),
    ],
)
def test_a_receiver_naming_a_missing_rotation_or_person_is_refused(tmp_path, change, message):
    with pytest.raises(alertbridge.ConfigError) as error:
        load(tmp_path, PEOPLE + ROUTES.replace(change, message))
    word = message.split("= ")[1]
    section = word if word.startswith("rotation:") else f"person:{word}"
    assert str(error.value) == f"[receiver:ops] at_people: no section [{section}]"


def test_now_plus_a_year_of_hand_overs_is_consistent(tmp_path):
    """Walking from one change to the next for a year: each `until` is a real change, every
    moment has someone, and the weekly turn returns every three weeks outside overrides."""
    config = load(tmp_path)
    rotation, moment, seen = config.rotations["primary"], at("2026-11-30 09:30"), []
    while moment < at("2027-11-30 09:30"):
        person, until = alertbridge.on_call(rotation, moment, config.tz)
        assert until > moment
        seen.append((moment, person.handle))
        moment = until
    assert {handle for _, handle in seen} == {"zhangsan", "lisi", "wangwu"}
    assert len(seen) == 53 + 4  # weekly hand-overs, and each override cuts a shift in three
    start = datetime.fromtimestamp(seen[0][0], timezone.utc)
    assert start + timedelta(weeks=3) == datetime.fromtimestamp(seen[3][0], timezone.utc)


def test_the_status_page_and_the_api_show_who_is_on_call_now_and_next(tmp_path):
    config = load(tmp_path)
    pages = alertbridge.StatusPage(
        lambda: config,
        None,
        None,
        None,
        None,
        None,
        {},
        clock=lambda: 0.0,
        wall=lambda: at("2026-12-03 12:00"),
    )
    assert pages.on_call() == {
        "rotations": [
            {
                "rotation": "nights",
                "now": {"person": "lisi", "name": "李四", "until": "2026-12-03T20:00:00+08:00"},
                "next": {
                    "person": "zhangsan",
                    "name": "张三",
                    "since": "2026-12-03T20:00:00+08:00",
                    "until": "2026-12-04T20:00:00+08:00",
                },
            },
            {
                "rotation": "primary",
                "now": {"person": "zhangsan", "name": "张三", "until": "2026-12-07T09:30:00+08:00"},
                "next": {
                    "person": "lisi",
                    "name": "李四",
                    "since": "2026-12-07T09:30:00+08:00",
                    "until": "2026-12-14T09:30:00+08:00",
                },
            },
        ]
    }
    section = pages._on_call_section()
    assert "<h2>On call</h2>" in section and section.count("<strong>张三</strong>") == 1


def test_the_docs_list_every_key_of_people_and_rotations():
    from tests.test_config import readme_table

    cells = readme_table("[person:HANDLE]")
    keys = {k.strip(" `") for cell in cells for k in cell.split(",")}
    assert keys == alertbridge.person_keys() | alertbridge.ROTATION_KEYS


def test_a_running_bridge_pages_whoever_is_on_call_and_says_who_over_http(
    make_bridge, sqlite_db, fake
):
    """Through a running bridge: the page DingTalk gets @-mentions the rotation's person of
    that moment, in atMobiles and in the text; GET /api/oncall says the same."""
    receivers = {
        "ops": {"robots": "ops-1", "at_people": "rotation:primary"},
        "dev": {"robots": "dev-1"},
    }
    bridge = make_bridge(
        sqlite_db, receivers=receivers, extra=PEOPLE.replace("2026-11-30", "2020-01-06")
    )
    assert post(bridge.address, make_payload("ops", [make_alert("DiskFull")]))[0] == 200
    assert fake.wait_for(lambda f: len(f.delivered()) == 1)
    [page] = fake.delivered()
    status, body = get(bridge.address, "/api/oncall")
    assert status == 200
    primary = next(r for r in body["rotations"] if r["rotation"] == "primary")
    mobile = {"zhangsan": "13800000001", "lisi": "13800000002"}.get(primary["now"]["person"])
    if mobile:  # wangwu has only a user id
        assert page.body["at"]["atMobiles"] == [mobile] and f"@{mobile}" in page.text
    else:
        assert page.body["at"]["atUserIds"] == ["wangwu"]


def test_the_readme_example_is_a_complete_config(tmp_path):
    from tests.test_readme import ROOT

    text = (ROOT / "README.md").read_text(encoding="utf-8")
    section = text.split("\n## On call: claims, escalation, rotations\n")[1].split("\n## ")[0]
    [example] = re.findall(r"```ini\n(.*?)```", section, re.S)
    (tmp_path / "link.secret").write_text("a-secret-of-32-characters-or-so\n")
    example = example.replace("/etc/alertbridge/link.secret", str(tmp_path / "link.secret"))
    config = load(tmp_path, example)
    ops = config.routes["ops"]
    assert ops.claim_links and ops.escalation.name == "critical-pages"
    assert [s.after for s in ops.escalation.steps] == [600, 1800]
    assert ops.escalation.steps[1].routes == ("leads",)
