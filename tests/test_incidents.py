"""Incidents in the history: one per route and Alertmanager group while it fires, opened by its
first firing notification, resolved when none of its alerts fires, with an event log; the same
whichever instances record the webhooks, in either store."""

import http.client
import http.cookies
import json
import re
import time
import urllib.parse

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import alertbridge
from tests.kit import (
    ONCALL, SECRET, get, load_fixture, make_alert, make_payload, post, wait_until)


def group(alerts, key='{}:{alertname="DiskFull"}', receiver="ops"):
    payload = make_payload(receiver, alerts)
    payload["groupKey"] = key
    payload["groupLabels"] = {"alertname": alerts[0]["labels"]["alertname"]}
    return alertbridge.parse_webhook(json.dumps(payload).encode())


FIRING = [make_alert("DiskFull", "db-1"), make_alert("DiskFull", "db-2", severity="warning")]
RESOLVED = [
    make_alert("DiskFull", "db-1", status="resolved", ends_at="2026-11-24T09:00:00Z"),
    make_alert(
        "DiskFull", "db-2", severity="warning", status="resolved", ends_at="2026-11-24T09:00:00Z"
    ),
]
ROUTE = alertbridge.Route("ops", ())


class Recorder:
    """Journal events as an instance's recorder hands them to the store: numbered, in order."""

    def __init__(self, store, journal_id="j1"):
        self.store, self.journal_id, self.number = store, journal_id, 0

    def webhook(self, webhook, received, route=ROUTE):
        self.number += 1
        event = alertbridge.webhook_event(
            webhook, f"r{self.number}", alertbridge.from_db_time(received), route
        )
        self.store.record(self.journal_id, [(self.number, "webhook", json.dumps(event))])


@pytest.fixture
def store(database):
    store = alertbridge.Store(database)
    yield store
    store.close()


def test_a_group_opens_one_incident_until_it_resolves(store):
    recorder = Recorder(store)
    recorder.webhook(group(FIRING), "2026-11-24 08:00:05")
    recorder.webhook(group(FIRING), "2026-11-24 12:00:05")  # repeat_interval: the same one
    recorder.webhook(group(RESOLVED), "2026-11-24 12:30:00")
    [incident] = store.incidents()
    assert incident["state"] == "resolved" and incident["level"] == "critical"
    assert (incident["route"], incident["title"]) == ("ops", "DiskFull")
    assert incident["opened_at"].startswith("2026-11-24 08:00:05")
    assert incident["resolved_at"].startswith("2026-11-24 12:30:00")
    assert incident["events"] == ["opened", "resolved"]
    recorder.webhook(group(FIRING), "2026-11-25 08:00:00")  # fires again: a new incident
    newest, first = store.incidents()
    assert (newest["state"], newest["events"], first["id"]) == ("open", ["opened"], incident["id"])


def test_groups_and_routes_have_incidents_of_their_own(store):
    recorder = Recorder(store)
    recorder.webhook(group(FIRING), "2026-11-24 08:00:05")
    recorder.webhook(
        group([make_alert("NodeDown")], key='{}:{alertname="NodeDown"}'), "2026-11-24 08:00:06"
    )
    recorder.webhook(group(FIRING), "2026-11-24 08:00:07", alertbridge.Route("dev", ()))
    assert sorted((i["route"], i["title"]) for i in store.incidents()) == [
        ("dev", "DiskFull"),
        ("ops", "DiskFull"),
        ("ops", "NodeDown"),
    ]


def test_two_instances_recording_the_same_webhooks_make_one_incident(store):
    """HA: each instance journals and records every webhook; their recorders interleave, and a
    late copy of a firing notification does not open the resolved incident again."""
    first, second = Recorder(store, "instance-a"), Recorder(store, "instance-b")
    first.webhook(group(FIRING), "2026-11-24 08:00:05")
    second.webhook(group(FIRING), "2026-11-24 08:00:05.020")
    first.webhook(group(RESOLVED), "2026-11-24 08:30:00")
    second.webhook(group(FIRING), "2026-11-24 08:20:00")  # its recorder was behind
    second.webhook(group(RESOLVED), "2026-11-24 08:30:00.010")
    [incident] = store.incidents()
    assert incident["state"] == "resolved" and incident["events"] == ["opened", "resolved"]


AGAIN = [make_alert("DiskFull", "db-1", starts_at="2026-11-24T10:00:00Z")]  # fires again
AGAIN_RESOLVED = [
    make_alert(
        "DiskFull", "db-1", status="resolved", starts_at="2026-11-24T10:00:00Z",
        ends_at="2026-11-24T10:40:00Z",
    )
]
KEY = alertbridge.group_hash('{}:{alertname="DiskFull"}')


def test_a_peers_late_copy_of_a_resolve_leaves_the_next_incident_and_its_claim(store):
    """An Alertmanager HA pair: one peer's resolve, the group's next incident claimed, then the
    other peer's copy of that resolve peer_timeout late, and its late firing copy of the next:
    the claimed incident stays open and claimed, and no third incident opens."""
    recorder = Recorder(store)
    recorder.webhook(group(FIRING), "2026-11-24 08:00:05")
    recorder.webhook(group(RESOLVED), "2026-11-24 09:00:05")
    recorder.webhook(group(AGAIN), "2026-11-24 10:00:05")
    assert store.claim("ops", KEY, "zhangsan", "2026-11-24 10:01:00")["claimed"]
    recorder.webhook(group(RESOLVED), "2026-11-24 10:01:20")  # the peer's copy, late
    recorder.webhook(group(AGAIN), "2026-11-24 10:01:21")
    newest, first = store.incidents()
    assert (newest["state"], newest["acknowledged_by"]) == ("acknowledged", "zhangsan")
    assert newest["events"] == ["opened", "acknowledged"]
    assert first["events"] == ["opened", "resolved"]
    recorder.webhook(group(AGAIN_RESOLVED), "2026-11-24 10:40:05")  # its own resolve does
    assert store.incidents()[0]["state"] == "resolved"


def test_a_late_firing_copy_does_not_open_the_incident_its_alerts_resolved(store):
    recorder = Recorder(store)
    recorder.webhook(group(FIRING), "2026-11-24 08:00:05")
    recorder.webhook(group(RESOLVED), "2026-11-24 09:00:05")
    recorder.webhook(group(FIRING), "2026-11-24 09:00:20")  # a peer's copy of the firing, late
    [incident] = store.incidents()
    assert incident["state"] == "resolved" and incident["events"] == ["opened", "resolved"]
    recorder.webhook(group(FIRING), "2026-11-24 11:00:00")  # the same alerts, hours later:
    assert store.incidents()[0]["state"] == "open"  # Prometheus back after resolve_timeout


def test_a_recorder_replaying_its_journal_late_changes_no_incident_the_other_recorded(store):
    """Two instances; one is cut off from MySQL for an hour, then its recorder replays what it
    journaled meanwhile: the group's first incident, resolved, and its next, claimed."""
    live, late = Recorder(store, "instance-a"), Recorder(store, "instance-b")
    for recorder in (live, late):
        recorder.webhook(group(FIRING), "2026-11-24 08:00:05")
    for at, alerts in (("09:00:05", RESOLVED), ("10:00:05", AGAIN)):
        live.webhook(group(alerts), f"2026-11-24 {at}")
    assert store.claim("ops", KEY, "zhangsan", "2026-11-24 10:01:00")["claimed"]
    late.webhook(group(RESOLVED), "2026-11-24 09:00:05.030")  # replayed at 10:30
    late.webhook(group(AGAIN), "2026-11-24 10:00:05.040")
    newest, first = store.incidents()
    assert (newest["state"], newest["acknowledged_by"]) == ("acknowledged", "zhangsan")
    assert [first["state"], len(store.incidents())] == ["resolved", 2]


def test_an_event_recorded_twice_changes_nothing(store):
    """The recorder's progress is kept with the rows: a batch sent again after a crash is
    skipped, incidents included."""
    recorder = Recorder(store)
    recorder.webhook(group(FIRING), "2026-11-24 08:00:05")
    event = alertbridge.webhook_event(
        group(RESOLVED), "r2", alertbridge.from_db_time("2026-11-24 08:30:00"), ROUTE
    )
    batch = [(2, "webhook", json.dumps(event))]
    store.record("j1", batch)
    store.record("j1", batch)
    [incident] = store.incidents()
    assert incident["events"] == ["opened", "resolved"]


def test_events_journaled_before_incidents_existed_are_recorded_without_one(store):
    old = alertbridge.webhook_event(
        group(FIRING), "r1", alertbridge.from_db_time("2026-11-24 08:00:05")
    )
    assert "incident" not in old
    store.record("j1", [(1, "webhook", json.dumps(old))])
    assert store.incidents() == []


def test_retention_purges_incidents_resolved_before_the_cutoff_with_their_events(store):
    recorder = Recorder(store)
    recorder.webhook(group(FIRING), "2026-01-01 08:00:00")
    recorder.webhook(group(RESOLVED), "2026-01-01 09:00:00")
    recorder.webhook(group(FIRING), "2026-11-24 08:00:00")  # open: kept whatever its age
    while store.purge("2026-06-01 00:00:00", 1):
        pass
    [kept] = store.incidents()
    assert (kept["state"], kept["events"]) == ("open", ["opened"])


def test_the_first_claim_acknowledges_the_open_incident_and_a_second_changes_nothing(store):
    recorder = Recorder(store)
    recorder.webhook(group(FIRING), "2026-11-24 08:00:05")
    key = alertbridge.group_hash('{}:{alertname="DiskFull"}')
    taken = store.claim("ops", key, "zhangsan", "2026-11-24 08:03:17")
    assert taken["claimed"] and taken["acknowledged_by"] == "zhangsan"
    assert taken["acknowledged_at"].startswith("2026-11-24 08:03:17")
    again = store.claim("ops", key, "lisi", "2026-11-24 08:04:00")  # shows who has it
    assert not again["claimed"] and again["acknowledged_by"] == "zhangsan"
    assert again["id"] == taken["id"]
    recorder.webhook(group(RESOLVED), "2026-11-24 08:30:00")
    [incident] = store.incidents()
    assert (incident["state"], incident["events"]) == (
        "resolved",
        ["opened", "acknowledged", "resolved"],
    )
    assert store.claim("ops", key, "lisi", "2026-11-24 08:31:00") is None  # nothing open


def test_a_link_acts_only_as_signed_and_until_it_expires():
    token = alertbridge.sign_link("s3cret", "ops", "ab" * 32, "claim", 1_000)
    assert alertbridge.read_link("s3cret", token, 999) == ("ops", "ab" * 32, "claim", 1_000)
    with pytest.raises(alertbridge.LinkRefused, match="expired"):
        alertbridge.read_link("s3cret", token, 1_000)
    with pytest.raises(alertbridge.LinkRefused, match="not made by this alertbridge"):
        alertbridge.read_link("another", token, 999)
    fields, mac = token.split(".")
    forged = alertbridge.sign_link("guess", "ops", "ab" * 32, "claim", 10**10).split(".")[0]
    for bad in (forged + "." + mac, fields, fields + "." + mac[:-2], "", "..", "é.é"):
        with pytest.raises(alertbridge.LinkRefused):
            alertbridge.read_link("s3cret", bad, 999)
    assert "=" not in token and "/" not in token and "+" not in token  # fits in a URL path


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=200))
def test_any_text_as_a_link_is_refused_in_words_never_with_an_error(text):
    try:
        alertbridge.read_link("s3cret", text, 0)
    except alertbridge.LinkRefused:
        pass


# --- claim links, through a running bridge --------------------------------------------------

CLAIMING = {"ops": {"robots": "ops-1", "claim_links": "true"}, "dev": {"robots": "dev-1"}}
LINK = re.compile(
    r"👉 \[我来处理\]\(https://alertbridge\.example\.com/incident/([A-Za-z0-9_.-]+)\)"
)


def claim_request(bridge, token, method="GET", form=None, cookies=None):
    headers = {"Cookie": "; ".join(f"{k}={v}" for k, v in (cookies or {}).items())}
    body = b""
    if form is not None:
        body = urllib.parse.urlencode(form).encode()
        headers["Content-Type"] = "application/x-www-form-urlencoded"
    url = bridge.url if hasattr(bridge, "url") else bridge.address  # a child process, a Bridge
    connection = http.client.HTTPConnection(url.split("//")[1], timeout=10)
    try:
        connection.request(method, f"/incident/{token}", body=body, headers=headers)
        response = connection.getresponse()
        jar = http.cookies.SimpleCookie()
        for value in response.headers.get_all("Set-Cookie") or ():
            jar.load(value)
        return response.status, response.read().decode(), {k: m.value for k, m in jar.items()}
    finally:
        connection.close()


def paged(bridge, fake, sqlite_db, headers=None):
    """A firing DiskFull group paged and recorded: the token of its Claim link."""
    payload = make_payload("ops", FIRING) | {"groupKey": "g-disk"}
    assert post(bridge, payload, headers=headers)[0] == 200
    assert fake.wait_for(lambda f: len(f.delivered()) == 2)  # the critical page, the warning
    history = alertbridge.Store(sqlite_db)
    assert wait_until(lambda: history.incidents() != [])
    history.close()
    return LINK.search(fake.delivered()[0].text).group(1)


def test_a_firing_page_carries_a_claim_link_that_claims_once_on_confirmation(
    make_bridge, sqlite_db, fake
):
    bridge = make_bridge(sqlite_db, receivers=CLAIMING, extra=ONCALL)
    token = paged(bridge, fake, sqlite_db)
    assert alertbridge.read_link(SECRET, token, time.time())[:3] == (
        "ops",
        alertbridge.group_hash("g-disk"),
        "claim",
    )

    status, html, cookies = claim_request(bridge, token)  # what a link previewer does
    assert status == 200 and 'id="claim"' in html and "DiskFull" in html
    assert alertbridge.Store(sqlite_db).incidents()[0]["state"] == "open"  # GET never acts

    form = {"person": "zhangsan", "csrf": cookies["alertbridge_csrf"]}
    status, html, _ = claim_request(bridge, token, "POST", form)  # no cookie: from elsewhere
    assert status == 403 and "什么都没有改变" in html  # the route's language: zh
    status, html, remembered = claim_request(bridge, token, "POST", form, cookies)
    assert status == 200 and "✅ 张三 已认领" in html
    assert remembered["alertbridge_person"] == "zhangsan"
    again = {"person": "lisi", "csrf": cookies["alertbridge_csrf"]}
    status, html, _ = claim_request(bridge, token, "POST", again, cookies)  # a second claim
    assert status == 200 and "张三 已认领" in html and "✅" not in html
    [incident] = alertbridge.Store(sqlite_db).incidents()
    assert (incident["state"], incident["acknowledged_by"]) == ("acknowledged", "zhangsan")
    assert incident["events"] == ["opened", "acknowledged"]
    # the group hears it once, through the route's queue
    assert fake.wait_for(lambda f: len(f.delivered()) == 3)
    note = fake.delivered()[2]
    assert note.body["msgtype"] == "markdown" and "at" not in note.body
    assert re.fullmatch(r"✅ 张三 认领了 DiskFull（告警后 \d+(ms|s)）", note.text), note.text
    assert all("认领了" not in m.text for m in fake.delivered()[:2])


def test_a_forged_or_foreign_link_gets_a_clear_page_and_changes_nothing(
    make_bridge, sqlite_db, fake
):
    bridge = make_bridge(sqlite_db, receivers=CLAIMING, extra=ONCALL)
    token = paged(bridge, fake, sqlite_db)
    forged = alertbridge.sign_link(
        "not-the-secret-at-all",
        "ops",
        alertbridge.group_hash("g-disk"),
        "claim",
        time.time() + 3600,
    )
    for bad in (forged, token[:-3], "nonsense"):
        status, html, cookies = claim_request(bridge, bad)
        assert status == 403 and ("什么都不做" in html or "已损坏" in html)
        assert cookies == {}
    assert alertbridge.Store(sqlite_db).incidents()[0]["state"] == "open"


def test_claim_links_need_a_base_url_and_a_secret(tmp_path):
    path = tmp_path / "config.ini"
    path.write_text(
        "[receiver:ops]\nrobots = r\nclaim_links = true\n"
        "[robot:r]\nurl = https://x/?access_token=t\n"
    )
    with pytest.raises(alertbridge.ConfigError) as error:
        alertbridge.load_config(str(path))
    assert str(error.value).startswith("[receiver:ops] claim_links: set [oncall] base_url")


def test_a_claim_is_measured_and_open_incidents_are_counted(make_bridge, sqlite_db, fake):
    bridge = make_bridge(sqlite_db, receivers=CLAIMING, extra=ONCALL)
    token = paged(bridge, fake, sqlite_db)

    def exposed():
        return get(bridge.address, "/metrics")[1]

    assert wait_until(lambda: 'alertbridge_incidents_open{state="open"} 1' in exposed())
    _, _, cookies = claim_request(bridge, token)
    form = {"person": "lisi", "csrf": cookies["alertbridge_csrf"]}
    assert claim_request(bridge, token, "POST", form, cookies)[0] == 200
    text = exposed()
    assert re.search(
        r'^alertbridge_time_to_acknowledge_seconds_count\{level="critical",route="ops"\} 1$',
        text,
        re.M,
    )
    assert wait_until(lambda: 'alertbridge_incidents_open{state="acknowledged"} 1' in exposed())
    assert 'alertbridge_incidents_open{state="open"} 0' in exposed()


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=40), st.sampled_from(alertbridge.LINK_ACTIONS), st.integers(1, 2**40))
def test_every_link_made_is_read_back(route, action, expires):
    """Whatever the route's name and the length of the fields (base64 padding or none)."""
    group = alertbridge.group_hash(route)
    token = alertbridge.sign_link("s3cret", route, group, action, expires)
    assert alertbridge.read_link("s3cret", token, 0) == (route, group, action, expires)


def test_two_recorders_at_once_on_mariadb_make_one_incident_per_group(tmp_path):
    """Two instances' recorders write the same webhooks at the same moment: InnoDB may find
    them in each other's way (a deadlock); the loser tries again, nothing is reported down, and
    each group has one incident."""
    import threading

    from tests.kit import empty_mysql

    settings = empty_mysql()
    groups = 60
    failures = []

    def recorder(journal_id):
        store = alertbridge.Store(settings)
        try:
            for start in range(0, groups, 5):
                batch = []
                for n in range(start, start + 5):
                    webhook = group([make_alert(f"G{n}", "db-1")], key=f"k{n}")
                    event = alertbridge.webhook_event(
                        webhook, f"r{n}", alertbridge.from_db_time("2026-11-24 08:00:00"), ROUTE
                    )
                    batch.append((n + 1, "webhook", json.dumps(event)))
                store.record(journal_id, batch)
        except Exception as exc:  # noqa: BLE001 (reported below)
            failures.append(exc)
        finally:
            store.close()

    threads = [threading.Thread(target=recorder, args=(f"j{i}",)) for i in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert failures == []
    store = alertbridge.Store(settings)
    incidents = store.incidents(1000)
    store.close()
    assert len(incidents) == groups and {i["events"][0] for i in incidents} == {"opened"}


def test_the_incidents_still_open_and_one_by_its_number(store):
    recorder = Recorder(store)
    recorder.webhook(group(FIRING, key="a"), "2026-11-24 08:00:00")
    recorder.webhook(group(FIRING, key="b"), "2026-11-24 08:01:00")
    recorder.webhook(group(RESOLVED, key="a"), "2026-11-24 08:02:00")
    [b, a] = store.incidents()
    assert [i["id"] for i in store.open_incidents(10)] == [b["id"]]
    assert store.open_incidents(10, "ops") == [{k: v for k, v in b.items() if k != "events"}]
    assert store.open_incidents(10, "dev") == []
    assert store.incident(a["id"])["state"] == "resolved"
    assert store.incident(b["id"]) == b
    assert store.incident(b["id"] + 1) is None


def test_a_conflict_is_tried_again_and_then_reported(store, monkeypatch):
    calls = []

    def conflicting(journal_id, events):
        calls.append(1)
        raise alertbridge.StoreConflict("Deadlock found when trying to get lock")

    monkeypatch.setattr(store, "_record", conflicting)
    with pytest.raises(alertbridge.StoreUnavailable, match="Deadlock"):
        store.record("j", [])
    assert len(calls) == alertbridge.Store.CONFLICT_RETRIES


def test_the_silence_page_offers_what_silence_max_allows_and_refuses_anything_else(
    make_bridge, sqlite_db, fake
):
    """[oncall] silence_max = 4h: the page offers 1 h and 4 h; a form saying 24, ², or a
    number it never offered changes nothing, with a clear page (no error in the log)."""
    oncall = ONCALL.replace("[oncall]\n", "[oncall]\nsilence_max = 4h\n")
    bridge = make_bridge(sqlite_db, receivers=CLAIMING, extra=oncall)
    token = paged(bridge, fake, sqlite_db)
    route, group, _, expires = alertbridge.read_link(SECRET, token, time.time())
    link = alertbridge.sign_link(SECRET, route, group, "silence", expires)
    status, html, cookies = claim_request(bridge, link)
    assert status == 200 and 'id="silence-4"' in html and 'id="silence-24"' not in html
    for hours in ("24", "²", "1e9", ""):
        form = {"person": "zhangsan", "hours": hours, "csrf": cookies["alertbridge_csrf"]}
        status, html, _ = claim_request(bridge, link, "POST", form, cookies)
        assert status == 400 and "什么都没有改变" in html
    with pytest.raises(alertbridge.DeskRefused, match="4h at most"):
        bridge.desk.silence(route, group, 24, "zhangsan", "张三", "dingtalk")
    assert alertbridge.Store(sqlite_db).incidents()[0]["events"] == ["opened"]


HOSTILE = "C:\\new \" ' ) ] \n < & \u2028 end"


def test_the_silence_page_shows_what_it_silences_and_a_page_has_one_silence_link(
    make_bridge, sqlite_db, fake
):
    """One silence muted every instance of the alert and the page never said so; with
    alertmanager_api a page had two Silence links (Alertmanager's and alertbridge's)."""
    oncall = ONCALL.replace("[oncall]\n", "[oncall]\nalertmanager_api = http://127.0.0.1:9\n")
    receivers = {**CLAIMING, "ops": {**CLAIMING["ops"], "message_type": "actionCard"}}
    bridge = make_bridge(sqlite_db, receivers=receivers, extra=oncall)
    payload = make_payload("ops", [make_alert("DiskFull", "db-1")]) | {
        "groupKey": "g-hostile", "groupLabels": {"alertname": "DiskFull", "team": HOSTILE}}
    assert post(bridge, payload)[0] == 200
    assert fake.wait_for(lambda f: len(f.delivered()) == 1)
    card = fake.delivered()[0].body["actionCard"]
    silences = [b for b in card["btns"] if "静默" in b["title"]] + re.findall(
        r"\[[^\]]*静默[^\]]*\]\(([^)]*)\)", card["text"])
    assert len(silences) == 1 and "/incident/" in str(silences)  # alertbridge's, not /#/silences
    assert "#/silences" not in json.dumps(card)
    history = alertbridge.Store(sqlite_db)
    assert wait_until(lambda: history.incidents() != [])
    history.close()
    [incident] = alertbridge.Store(sqlite_db).incidents()
    link = alertbridge.sign_link(SECRET, "ops", incident["group_hash"], "silence",
                                 time.time() + 600)
    status, html, _ = claim_request(bridge, link)
    assert status == 200 and "将静默带有以下标签的所有告警：" in html
    listed = re.findall(r"<li><code>(.*?)</code></li>", html, re.S)
    assert listed == ['alertname=&quot;DiskFull&quot;',
                      'team=&quot;C:\\\\new \\&quot; &#x27; ) ] \\n &lt; &amp; \u2028 end&quot;']
    assert html.index("将静默") < html.index('id="silence-1"')


def test_the_pages_in_any_language_escape_what_alerts_and_people_bring(
    make_bridge, sqlite_db, fake
):
    """FAULTS 6 on the pages of language = both: a group label with `\\ " ' ) ] \\n < &` and
    U+2028 in the title and the matchers, a person's name with them and braces (an INI value
    holds no newline) in the form and in what the claim answers: escaped once, the field once,
    the words' own braces never the values'."""
    name = "C:\\new {x} \" ' ) ] < & \u2028 end"
    oncall = ONCALL.replace("name = 李四", f"name = {name}").replace(
        "[oncall]\n", "[oncall]\nalertmanager_api = http://127.0.0.1:9\n")
    receivers = {**CLAIMING, "ops": {**CLAIMING["ops"], "language": "both"}}
    bridge = make_bridge(sqlite_db, receivers=receivers, extra=oncall)
    payload = make_payload("ops", [make_alert("DiskFull", "db-1")]) | {
        "groupKey": "g-hostile", "groupLabels": {"alertname": "DiskFull", "team": HOSTILE}}
    assert post(bridge, payload)[0] == 200
    history = alertbridge.Store(sqlite_db)
    assert wait_until(lambda: history.incidents() != [])
    [incident] = history.incidents()
    history.close()
    token = alertbridge.sign_link(SECRET, "ops", incident["group_hash"], "claim",
                                  time.time() + 600)
    status, html, cookies = claim_request(bridge, token)
    assert status == 200 and "我是" in html and "I am" in html and "open since" in html
    assert html.count('id="person"') == 1   # the field once, whatever the language
    assert "C:\\new" in incident["title"]    # the title is the group's labels
    assert f"<h2>{alertbridge.esc(incident['title'])}</h2>" in html
    assert f">{alertbridge.esc(name)}</option>" in html and "< &" not in html
    silence = alertbridge.sign_link(SECRET, "ops", incident["group_hash"], "silence",
                                    time.time() + 600)
    listed = re.findall(r"<li><code>(.*?)</code></li>", claim_request(bridge, silence)[1], re.S)
    assert listed[1] == ('team=&quot;C:\\\\new \\&quot; &#x27; ) ] \\n &lt; &amp; \u2028 '
                         'end&quot;')
    form = {"person": "lisi", "csrf": cookies["alertbridge_csrf"]}
    status, html, _ = claim_request(bridge, token, "POST", form, cookies)
    shown = re.search(r"<section><p>(.*?)</p>", html, re.S).group(1)
    assert status == 200 and shown.startswith(f"✅ {alertbridge.esc(name)} 已认领，自 "), shown
    assert f"{alertbridge.esc(name)} has it, since " in shown and "< &" not in html


def test_a_page_of_grafana_alerts_keeps_grafanas_silence_not_alertbridges(
    make_bridge, sqlite_db, fake
):
    """alertbridge's Silence makes a silence in Alertmanager, which never holds Grafana's
    alerts: their page keeps Grafana's silence link and the claim link, and no other."""
    oncall = ONCALL.replace("[oncall]\n", "[oncall]\nalertmanager_api = http://127.0.0.1:9\n")
    receivers = {**CLAIMING, "ops": {**CLAIMING["ops"], "message_type": "actionCard"}}
    bridge = make_bridge(sqlite_db, receivers=receivers, extra=oncall)
    grafana = load_fixture("grafana-notifier-one-alert.json")
    assert post(bridge, grafana, path="/alertmanager/ops")[0] == 200
    assert fake.wait_for(lambda f: len(f.delivered()) == 1)
    card = fake.delivered()[0].body["actionCard"]
    grafanas = grafana["alerts"][0]["silenceURL"]
    silences = [b["actionURL"] for b in card["btns"] if "静默" in b["title"]] + re.findall(
        r"\[[^\]]*静默[^\]]*\]\(([^)]*)\)", card["text"])
    assert silences == [grafanas, grafanas]     # the button and the alert's link: Grafana's
    assert "/incident/" in card["btns"][0]["actionURL"]    # the claim is still alertbridge's


@pytest.mark.parametrize("language, words", [
    ("zh", ["我是", "开始于", "接收者", "🔕 1 小时", "将静默带有以下标签的所有告警："]),
    ("en", ["I am", "open since", "receiver", "🔕 1 h", "It silences every alert that has these"]),
])
def test_the_claim_and_silence_pages_speak_the_routes_language(
    make_bridge, sqlite_db, fake, language, words
):
    """With language = zh the pages said `I am`, `open since`, `张三 has it, since ...`."""
    receivers = {name: {**r, "language": language} for name, r in CLAIMING.items()}
    oncall = ONCALL.replace("[oncall]\n", "[oncall]\nalertmanager_api = http://127.0.0.1:9\n")
    bridge = make_bridge(sqlite_db, receivers=receivers, extra=oncall)
    payload = make_payload("ops", FIRING) | {"groupKey": "g-disk",
                                             "groupLabels": {"alertname": "DiskFull"}}
    assert post(bridge, payload)[0] == 200
    history = alertbridge.Store(sqlite_db)
    assert wait_until(lambda: history.incidents() != [])
    history.close()
    group = alertbridge.group_hash("g-disk")
    claim = alertbridge.sign_link(SECRET, "ops", group, "claim", time.time() + 600)
    silence = alertbridge.sign_link(SECRET, "ops", group, "silence", time.time() + 600)
    status, claim_html, cookies = claim_request(bridge, claim)
    silence_html = claim_request(bridge, silence)[1]
    assert status == 200 and all(w in claim_html + silence_html for w in words)
    form = {"person": "zhangsan", "csrf": cookies["alertbridge_csrf"]}
    done = claim_request(bridge, claim, "POST", form, cookies)[1]
    assert ("✅ 张三 已认领" if language == "zh" else "✅ 张三 has it, since") in done
    refused = claim_request(bridge, claim, "POST", {"person": "zhangsan"}, cookies)[1]
    assert ("什么都没有改变" if language == "zh" else "nothing was changed") in refused
    titles = {"zh": ("alertbridge：认领", "alertbridge：静默"),
              "en": ("alertbridge: claim", "alertbridge: silence")}[language]
    for html, title in zip((claim_html, silence_html), titles):  # it read "claim" in English
        assert f"<title>{title}</title>" in html and f"<h1>{title}</h1>" in html
    assert f"<title>{titles[0]}</title>" in done + refused
    button = re.search(r'<button type="submit" id="claim">(.*?)</button>', claim_html).group(1)
    assert button == {"zh": "我来处理", "en": "Claim"}[language]   # it was both, everywhere
