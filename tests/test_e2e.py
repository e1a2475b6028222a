"""End to end with a real Alertmanager (Debian's prometheus-alertmanager) on loopback."""

import json
import pathlib
import re
import shutil
import subprocess
import urllib.parse
import urllib.request
from datetime import datetime, timedelta, timezone

import pytest

from tests.kit import DEV, IN_CI, OPS, app_config, free_port, history, settle, wait_until
from tests.test_pages import browser  # noqa: F401 (the fixture)

BINARY = shutil.which("prometheus-alertmanager") or shutil.which("alertmanager")
BEARER = "am-to-alertbridge-token"


@pytest.fixture
def alertmanager(tmp_path):
    """start(alertbridge_url, bearer=None) -> Alertmanager's base URL, routed like our users'
    setup."""
    if not BINARY:
        if IN_CI:
            pytest.fail("prometheus-alertmanager is required in CI (tests/run installs it)")
        pytest.skip("prometheus-alertmanager not installed")
    processes = []

    def start(alertbridge_url, bearer=None, paths=None):
        """`paths`: the webhook path of Alertmanager's receivers ops and dev (/alertmanager)."""
        paths = paths or {"ops": "/alertmanager", "dev": "/alertmanager"}
        http_config = (
            f"        http_config:\n          authorization:\n            credentials: {bearer}\n"
            if bearer
            else ""
        )
        receivers = "".join(
            f"""\
  - name: {name}
    webhook_configs:
      - url: {alertbridge_url}{path}
        send_resolved: true
{http_config}"""
            for name, path in paths.items()
        )
        config = tmp_path / "alertmanager.yml"
        config.write_text(
            f"""\
route:
  receiver: {list(paths)[0]}
  group_by: [alertname, job]
  group_wait: 1s
  group_interval: 1s
  repeat_interval: 1h
  routes:
    - receiver: {list(paths)[1]}
      matchers: ['team="dev"']
receivers:
{receivers}""",
            encoding="utf-8",
        )
        port = free_port()
        log = open(tmp_path / "alertmanager.log", "ab")
        process = subprocess.Popen(
            [
                BINARY,
                f"--config.file={config}",
                f"--storage.path={tmp_path / 'am-data'}",
                f"--web.listen-address=127.0.0.1:{port}",
                "--cluster.listen-address=",
                "--log.level=debug",
            ],
            stdout=log,
            stderr=log,
        )
        processes.append(process)
        url = f"http://127.0.0.1:{port}"

        def ready():
            try:
                with urllib.request.urlopen(url + "/-/ready", timeout=2) as response:
                    return response.status == 200
            except OSError:
                return False

        assert wait_until(ready, timeout=60), (tmp_path / "alertmanager.log").read_text()
        return url

    yield start
    for process in processes:
        process.terminate()
        process.wait(30)


def push(am_url, alerts):
    """POST /api/v2/alerts, as Prometheus does."""
    request = urllib.request.Request(
        am_url + "/api/v2/alerts",
        data=json.dumps(alerts).encode(),
        method="POST",
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        assert response.status == 200


def am_alert(name, instance, job, severity, team=None, ends=None, summary=""):
    labels = {"alertname": name, "instance": instance, "job": job, "severity": severity}
    if team:
        labels["team"] = team
    alert = {
        "labels": labels,
        "annotations": {"summary": summary or f"{name} on {instance}"},
        "generatorURL": f"http://prometheus:9090/graph?g0.expr={name}",
        # starting now: Alertmanager flushes a group at once for alerts older than group_wait
        "startsAt": datetime.now(timezone.utc).isoformat(),
    }
    if ends:
        alert["endsAt"] = ends.isoformat()
    return alert


def alerts():
    return [
        am_alert("DiskFull", "10.0.0.1:9100", "node", "critical", summary="磁盘将满"),
        am_alert("DiskFull", "10.0.0.2:9100", "node", "warning"),
        am_alert("HighLoad", "10.0.0.3:9100", "node", "warning"),
        am_alert("TargetDown", "p:9090", "prometheus", "critical", team="dev"),
    ]


def titles(fake, token=None):
    return sorted(m.body["markdown"]["title"] for m in fake.delivered(token))


@pytest.mark.parametrize("bearer", [None, BEARER], ids=["open", "bearer-auth"])
def test_real_alertmanager_fires_and_resolves(make_bridge, fake, database, alertmanager, bearer):
    extra = f"[auth]\nbearer_token = {BEARER}\n" if bearer else ""
    bridge = make_bridge(database, extra=extra)
    am = alertmanager(bridge.address, bearer)
    pushed = alerts()
    push(am, pushed)

    # Three groups (alertname, job): two for ops, one for dev. Each reaches its own group's robots,
    # DiskFull's in one message per severity.
    assert fake.wait_for(lambda f: len(f.delivered()) == 4, timeout=60), fake.requests
    assert titles(fake, DEV) == ["[CRITICAL · FIRING:1] TargetDown prometheus"]  # the group labels
    assert titles(fake) == [
        "[CRITICAL · FIRING:1] DiskFull node",
        "[CRITICAL · FIRING:1] TargetDown prometheus",
        "[WARNING · FIRING:1] DiskFull node",
        "[WARNING · FIRING:1] HighLoad node",
    ]
    ops_tokens = [m.token for m in fake.delivered() if m.token != DEV]
    assert ops_tokens == OPS  # ops robots in turn, signed/keyword checked
    disk = next(m for m in fake.delivered() if "磁盘将满" in m.text)
    assert "10.0.0.1:9100" in disk.text and "10.0.0.2:9100" not in disk.text
    assert "@13800000000" in disk.text  # critical firing: the on-call is @-ed
    assert "/#/silences/new?filter=" in disk.text  # a link back to this Alertmanager
    settle(bridge)
    rows = {r["instance"]: r for r in history(bridge)}
    assert set(rows) == {"10.0.0.1:9100", "10.0.0.2:9100", "10.0.0.3:9100", "p:9090"}
    assert rows["p:9090"]["receiver"] == "dev" and rows["10.0.0.1:9100"]["receiver"] == "ops"
    assert all(r["status"] == "firing" and r["notified_count"] == 1 for r in rows.values())
    assert json.loads(rows["p:9090"]["labels"])["team"] == "dev"

    ended = datetime.now(timezone.utc) - timedelta(seconds=1)
    push(am, [{**a, "endsAt": ended.isoformat()} for a in pushed[:2]])  # DiskFull resolves
    assert fake.wait_for(
        lambda f: sum("RESOLVED:1] DiskFull node" in t for t in titles(f)) == 2, timeout=60
    ), titles(fake)
    for resolved in (m for m in fake.delivered() if "RESOLVED" in m.body["markdown"]["title"]):
        assert "恢复：" in resolved.text and "@13800000000" not in resolved.text
    settle(bridge)
    rows = {r["instance"]: r for r in history(bridge)}
    assert rows["10.0.0.1:9100"]["status"] == "resolved" and rows["10.0.0.1:9100"]["ends_at"]
    assert rows["10.0.0.2:9100"]["status"] == "resolved"
    assert rows["10.0.0.3:9100"]["status"] == "firing" and rows["10.0.0.3:9100"]["ends_at"] is None
    assert len(history(bridge)) == 4  # same occurrences, updated
    assert all(s["errcode"] == 0 for s in history(bridge, "notifications"))


def test_alertmanager_with_wrong_credentials_is_refused(
    make_bridge, fake, sqlite_db, alertmanager, tmp_path
):
    bridge = make_bridge(sqlite_db, extra=f"[auth]\nbearer_token = {BEARER}\n")
    am = alertmanager(bridge.address, "not-the-token")
    push(am, alerts()[:1])
    log = tmp_path / "alertmanager.log"
    assert wait_until(lambda: "401" in log.read_text(errors="replace"), timeout=60)
    assert fake.delivered() == [] and bridge.journal.backlog()[2] == 0


def test_urls_of_prometheus_webhook_dingtalk_work_unchanged(
    make_bridge, fake, sqlite_db, alertmanager
):
    """Alertmanager configured the old way: receivers named freely, each posting to
    /dingtalk/<target>/send; only host and port changed. The target names the [receiver:NAME]."""
    bridge = make_bridge(sqlite_db)
    am = alertmanager(
        bridge.address,
        paths={"dingtalk": "/dingtalk/ops/send", "dingtalk-dev": "/dingtalk/dev/send"},
    )
    push(am, alerts())
    assert fake.wait_for(lambda f: len(f.delivered()) == 4, timeout=60), fake.requests
    assert titles(fake, DEV) == ["[CRITICAL · FIRING:1] TargetDown prometheus"]
    assert {m.token for m in fake.delivered() if m.token != DEV} <= set(OPS)
    settle(bridge)
    assert {r["instance"]: r["receiver"] for r in history(bridge)} == {
        "10.0.0.1:9100": "ops",
        "10.0.0.2:9100": "ops",
        "10.0.0.3:9100": "ops",
        "p:9090": "dev",
    }


def test_the_preview_takes_what_a_real_alertmanager_api_gives(
    make_bridge, fake, sqlite_db, alertmanager
):
    """What an SRE has at hand: `curl alertmanager/api/v2/alerts`, pasted into the preview."""
    bridge = make_bridge(sqlite_db)
    am = alertmanager(bridge.address)
    push(am, alerts())
    with urllib.request.urlopen(am + "/api/v2/alerts?receiver=dev", timeout=10) as response:
        api = response.read()
    assert [a["labels"]["alertname"] for a in json.loads(api)] == ["TargetDown"]
    form = urllib.parse.urlencode({"payload": api.decode(), "receiver": ""}).encode()
    request = urllib.request.Request(
        bridge.address + "/preview",
        data=form,
        method="POST",
        headers={"Content-Type": "application/x-www-form-urlencoded"},
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        page = response.read().decode()
    assert "Receiver dev → [receiver:dev]" in page and "TargetDown on p:9090" in page


def test_real_alertmanager_page_escalates_until_claimed_in_a_browser(
    make_bridge, fake, sqlite_db, alertmanager, browser
):
    """The on-call loop end to end: Alertmanager pages, nobody claims, the next step @-mentions
    the next person; a claim through the link in headless Chromium stops the chain and the
    group reads who took it."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    from tests.test_cluster import ON_CALL
    from tests.test_incidents import LINK
    from tests.test_pages import follow

    receivers = {
        "ops": {"robots": "ops-1", "claim_links": "true", "escalation": "fast"},
        "dev": {"robots": "dev-1"},
    }
    bridge = make_bridge(sqlite_db, receivers=receivers, extra=ON_CALL)
    am = alertmanager(bridge.address)
    push(am, [am_alert("DiskFull", "10.0.0.1:9100", "node", "critical", summary="磁盘将满")])
    assert fake.wait_for(lambda f: any("升级第 1 步" in m.text for m in f.delivered()), 60)
    [page] = [m for m in fake.delivered() if "磁盘将满" in m.text]
    [step] = [m for m in fake.delivered() if "升级第 1 步" in m.text]
    assert step.body["at"]["atMobiles"] == ["13800000002"]  # lisi, the step's person
    token = LINK.search(page.text).group(1)
    browser.execute_cdp_cmd("Network.setExtraHTTPHeaders", {"headers": {}})
    browser.get(f"{bridge.address}/incident/{token}")
    Select(browser.find_element(By.ID, "person")).select_by_visible_text("张三")
    follow(browser, browser.find_element(By.ID, "claim"))
    assert browser.find_element(By.TAG_NAME, "main").text.startswith("✅ 张三 已认领")
    assert fake.wait_for(lambda f: any("✅ 张三 认领了" in m.text for m in f.delivered()))
    history = rows_of(sqlite_db)
    assert [(i["state"], i["acknowledged_by"]) for i in history] == [("acknowledged", "zhangsan")]
    assert history[0]["events"] == ["opened", "escalated", "acknowledged"]


def make_silences(bridge, am, more=""):
    """The running bridge makes silences in this Alertmanager ([oncall] alertmanager_api, and
    `more` [oncall] lines), reloaded as an operator would."""
    config = pathlib.Path(bridge.config.path)
    config.write_text(
        config.read_text(encoding="utf-8").replace(
            "[oncall]\n", f"[oncall]\nalertmanager_api = {am}\n{more}"
        ),
        encoding="utf-8",
    )
    assert bridge.reload()[0]


def rows_of(database):
    import alertbridge

    store = alertbridge.Store(database)
    try:
        return store.incidents()
    finally:
        store.close()


def test_a_silence_from_the_page_is_made_in_alertmanager_and_expired_when_the_alert_ends(
    make_bridge, fake, sqlite_db, alertmanager
):
    """Silence links: 张三 silences the group for 1 h; Alertmanager has the silence, created by
    him; the alert ends, which a silenced alert's group never hears from Alertmanager: the
    bridge follows it through the API, resolves the incident and expires the silence early."""
    from tests.test_cluster import ON_CALL
    from tests.test_incidents import claim_request

    receivers = {"ops": {"robots": "ops-1", "claim_links": "true"}, "dev": {"robots": "dev-1"}}
    bridge = make_bridge(sqlite_db, receivers=receivers, extra=ON_CALL)
    am = alertmanager(bridge.address)
    make_silences(bridge, am, "follow_interval = 1\n")
    firing = am_alert("DiskFull", "10.0.0.1:9100", "node", "critical", summary="磁盘将满")
    push(am, [firing])
    assert fake.wait_for(lambda f: any("静默…" in m.text for m in f.delivered()), 60)
    [page] = [m for m in fake.delivered() if "磁盘将满" in m.text]
    token = re.search(r"\[静默…\]\(https://alertbridge\.example\.com/incident/([^)]+)\)", page.text)
    assert wait_until(lambda: rows_of(sqlite_db))
    _, html, cookies = claim_request(bridge, token.group(1))
    assert 'id="silence-4"' in html, page.text
    form = {"person": "zhangsan", "hours": "1", "csrf": cookies["alertbridge_csrf"]}
    status, html, _ = claim_request(bridge, token.group(1), "POST", form, cookies)
    assert status == 200 and "静默了 1 小时" in html
    with urllib.request.urlopen(am + "/api/v2/silences", timeout=10) as response:
        [silence] = json.loads(response.read())
    assert silence["createdBy"] == "张三" and silence["status"]["state"] == "active"
    assert sorted((m["name"], m["value"]) for m in silence["matchers"]) == [
        ("alertname", "DiskFull"),
        ("job", "node"),
    ]
    assert fake.wait_for(
        lambda f: any("🔕 张三 静默了 DiskFull node 1 小时" in m.text for m in f.delivered())
    )
    push(am, [{**firing, "endsAt": datetime.now(timezone.utc).isoformat()}])  # it ends

    def expired():
        with urllib.request.urlopen(am + "/api/v2/silences", timeout=10) as response:
            return json.loads(response.read())[0]["status"]["state"] == "expired"

    assert wait_until(expired, timeout=30)
    [incident] = rows_of(sqlite_db)
    assert incident["state"] == "resolved"
    assert incident["events"] == ["opened", "silenced", "resolved"]


def test_real_alertmanager_page_is_a_card_a_click_claims_it_and_a_command_silences(
    make_bridge, fake, sqlite_db, alertmanager, app
):
    """The app robot end to end: Alertmanager pages, the page is a card, nobody claims and the
    first escalation step goes out; 张三 taps Claim on the card (his DingTalk user id): the
    incident is his, its time to acknowledge measured, the card says so. Then he writes
    "静默 N 1h" to the robot about a second page: the silence is made in Alertmanager, by him,
    and that card shows it."""
    from tests.test_cluster import ON_CALL

    receivers = {
        "ops": {"robots": "ops-1", "app_group": "cid-ops", "escalation": "fast"},
        "dev": {"robots": "dev-1"},
    }
    people = ON_CALL.replace("mobile = 13800000001", "mobile = 13800000001\nuser_id = manager4321")
    bridge = make_bridge(sqlite_db, receivers=receivers, extra=people + app_config(app))
    am = alertmanager(bridge.address)
    make_silences(bridge, am)
    push(
        am,
        [am_alert("DiskFull", "10.0.0.1:9100", "node", "critical", summary="磁盘将满")],
    )
    assert wait_until(lambda: app.cards, timeout=60)
    [(track, card)] = app.cards.items()
    assert "磁盘将满" in card["params"]["markdown"] and card["params"]["state"] == "open"
    assert fake.wait_for(lambda f: any("升级第 1 步" in m.text for m in f.delivered()), 60)
    assert not any("磁盘将满" in m.text for m in fake.delivered())  # the page was the card

    assert wait_until(lambda: app.connections == 1)
    answer = app.click(track, "manager4321")["cardData"]["cardParamMap"]
    assert answer["state"] == "claimed" and answer["status"].startswith("✅ 张三 已认领")
    [incident] = rows_of(sqlite_db)
    assert (incident["state"], incident["acknowledged_by"]) == (
        "acknowledged",
        "zhangsan",
    )
    assert incident["events"] == ["opened", "escalated", "acknowledged"]
    with urllib.request.urlopen(bridge.address + "/metrics", timeout=10) as response:
        assert 'alertbridge_time_to_acknowledge_seconds_count{level="critical",route="ops"} 1' in (
            response.read().decode()
        )

    push(am, [am_alert("HighLoad", "10.0.0.3:9100", "node", "critical")])
    assert wait_until(lambda: len(rows_of(sqlite_db)) == 2, timeout=60)
    number = max(i["id"] for i in rows_of(sqlite_db))
    reply = app.reply_to(app.write(f"静默 {number} 1h", "manager4321"))["text"]["content"]
    assert f"#{number} 已静默 1h" in reply  # the route's language: zh
    with urllib.request.urlopen(am + "/api/v2/silences", timeout=10) as response:
        [silence] = json.loads(response.read())
    assert silence["createdBy"] == "张三" and silence["status"]["state"] == "active"
    assert sorted((m["name"], m["value"]) for m in silence["matchers"]) == [
        ("alertname", "HighLoad"),
        ("job", "node"),
    ]
    [second] = [c for t, c in app.cards.items() if t != track]
    assert wait_until(lambda: second["params"]["state"] == "silenced", timeout=10)


def test_silenced_incidents_whose_labels_hold_backslashes_and_quotes_are_followed(
    make_bridge, fake, sqlite_db, alertmanager
):
    """Group labels with a backslash and a quote (job="C:\\new", job='say "hi"'), both
    silenced: Alertmanager's own answer decides, no label value is written into a filter. The
    first still fires: its incident stays open and silenced; the second ends: its incident is
    resolved and its silence expired, though it comes after the first."""
    from tests.test_cluster import ON_CALL

    receivers = {"ops": {"robots": "ops-1", "claim_links": "true"}, "dev": {"robots": "dev-1"}}
    bridge = make_bridge(sqlite_db, receivers=receivers, extra=ON_CALL)
    am = alertmanager(bridge.address)
    make_silences(bridge, am, "follow_interval = 1\n")
    odd = [
        am_alert("DiskFull", "10.0.0.1:9100", "C:\\new", "critical"),
        am_alert("DiskFull", "10.0.0.2:9100", 'say "hi"', "critical"),
    ]
    push(am, odd)
    for alert in odd:  # a silence link's matchers, as Alertmanager's own parser reads them
        import alertbridge

        query = urllib.parse.urlencode(
            [("filter", alertbridge.matchers({k: v})[1:-1]) for k, v in alert["labels"].items()]
        )
        with urllib.request.urlopen(f"{am}/api/v2/alerts?{query}", timeout=10) as response:
            [found] = json.loads(response.read())
        assert found["labels"] == alert["labels"]
    assert wait_until(lambda: len(rows_of(sqlite_db)) == 2, timeout=60)
    for incident in sorted(rows_of(sqlite_db), key=lambda i: i["title"]):
        bridge.desk.silence("ops", incident["group_hash"], 1, "zhangsan", "张三", "link")
    push(am, [{**odd[1], "endsAt": datetime.now(timezone.utc).isoformat()}])

    def state(title):
        return next(i["state"] for i in rows_of(sqlite_db) if i["title"] == title)

    assert wait_until(lambda: state('DiskFull say "hi"') == "resolved", timeout=30)
    assert state("DiskFull C:\\new") == "open"
    with urllib.request.urlopen(am + "/api/v2/silences", timeout=10) as response:
        silences = json.loads(response.read())
    by_job = {[m["value"] for m in s["matchers"] if m["name"] == "job"][0]: s for s in silences}
    assert by_job["C:\\new"]["status"]["state"] == "active"
    assert by_job['say "hi"']["status"]["state"] == "expired"
