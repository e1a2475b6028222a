"""The status page, the preview and the dry run (--render): what they show, that they escape
every outside value, sit behind [auth], and never send. The page itself is checked in a real
headless Chromium (Debian's chromium and chromium-driver, driven by selenium)."""

import base64
import json
import re
import os
import pathlib
import shutil
import subprocess
import sys
import urllib.parse

import pytest

import alertbridge
from alertbridge import ALERT_FIELDS, TITLE_FIELDS, markdown_html, template_errors
from tests.kit import (
    FIXTURES,
    IN_CI,
    OPS,
    ROBOTS,
    SCRIPT,
    SECRETS,
    config_text,
    connect,
    empty_mysql,
    free_port,
    load_fixture,
    make_alert,
    make_payload,
    metric,
    post,
    storm_payloads,
    wait_until,
)

AUTH = "[auth]\nusername = oncall\npassword = pa55word\n"
CREDENTIALS = {"Authorization": "Basic " + base64.b64encode(b"oncall:pa55word").decode()}
SCRIPT_LABEL = "<script>window.__pwned = 1</script>"
IMG_SUMMARY = '"><img src=x onerror="window.__pwned = 2">'
FIXTURE_NAMES = sorted(p.name for p in FIXTURES.glob("am025-*.json")) + [
    "grafana-docs-firing.json"]  # Grafana's, as its docs show it (its tests' start at "now")


def shown(text):
    """Alert text as the group sees it: a `<` that would open a tag is full-width."""
    return text.replace("<", "＜")


def hostile_payload():
    alert = make_alert(
        "DatacenterDown",
        "dc-1",
        severity="critical",
        labels={"team": SCRIPT_LABEL},
        annotations={"summary": IMG_SUMMARY, "description": "[click](javascript:alert(1))"},
    )
    return make_payload("ops", [alert])


def robot_state(bridge, name):
    return {r.name: r for r in bridge.pool.report(bridge.config.robots, bridge.clock())}[name]


def request(bridge, method, path, body=b"", headers=None):
    """(status, body bytes, headers) of one request to the bridge."""
    connection = connect(bridge.address)
    try:
        connection.request(method, path, body=body, headers=headers or {})
        response = connection.getresponse()
        return response.status, response.read(), response.headers
    finally:
        connection.close()


# --- rendering DingTalk's markdown as HTML ------------------------------------------------------


@pytest.mark.parametrize(
    "markdown, html",
    [
        ("#### [FIRING:1] Disk", "<h4>[FIRING:1] Disk</h4>"),
        ("**🔥 Disk** · critical", "<p><strong>🔥 Disk</strong> · critical</p>"),
        ("- 实例 Instance: a:9100", "<ul><li>实例 Instance: a:9100</li></ul>"),
        ("> quoted", "<blockquote>quoted</blockquote>"),
        ("a\nb", "<p>a<br>b</p>"),
        ("---", "<hr>"),
        (
            "[Prometheus](http://prom:9090/graph?a=1&b=2)",
            '<p><a href="http://prom:9090/graph?a=1&amp;b=2" rel="noopener noreferrer" '
            'target="_blank">Prometheus</a></p>',
        ),
        ('<font color="#FF0000">red</font>', '<p><span style="color:#FF0000">red</span></p>'),
        # what comes from outside stays text
        (SCRIPT_LABEL, "<p>&lt;script&gt;window.__pwned = 1&lt;/script&gt;</p>"),
        (IMG_SUMMARY, "<p>&quot;&gt;&lt;img src=x onerror=&quot;window.__pwned = 2&quot;&gt;</p>"),
        ("[x](javascript:alert(1))", "<p>[x](javascript:alert(1))</p>"),
        (
            '[x](http://a/"onmouseover="alert(1))',
            '<p><a href="http://a/&quot;onmouseover=&quot;alert(1" '
            'rel="noopener noreferrer" target="_blank">x</a>)</p>',
        ),
        ("![i](http://evil/x.png)", '<p><span class="dim">[image i]</span></p>'),
        (
            '<font color="red" onclick="x">t</font>',
            "<p>&lt;font color=&quot;red&quot; onclick=&quot;x&quot;&gt;t&lt;/font&gt;</p>",
        ),
        (
            "[a*b*](http://h/*c*)",
            '<p><a href="http://h/*c*" rel="noopener noreferrer" target="_blank">a*b*</a></p>',
        ),
        # escaped label values (md_escape) show as written, as DingTalk shows them
        ("node\\_exporter\\_\\*x\\* \\[a\\](http://h)", "<p>node_exporter_*x* [a](http://h)</p>"),
    ],
)
def test_dingtalk_markdown_becomes_safe_html(markdown, html):
    assert markdown_html(markdown) == html


# --- template problems --------------------------------------------------------------------------


def test_template_errors_name_the_line_and_the_field():
    assert template_errors("a\n{summary}\n{labels[team]:raw}\n{status!r:>8}", ALERT_FIELDS) == []
    [typo] = template_errors("x\n- {sumary}", ALERT_FIELDS)
    assert typo.startswith(
        "line 2: {sumary} is not a field; did you mean {summary}? (fields: alertname, "
    )
    [spec] = template_errors("{starts_at:%H:%M}", ALERT_FIELDS)
    assert spec.startswith("line 1: {starts_at}: format '%H:%M' does not apply to text")
    assert template_errors("{count:d} {firing:>3}", TITLE_FIELDS) == []
    assert template_errors("ok\n{broken", ALERT_FIELDS) == [
        "line 2: expected '}' before end of string"
    ]
    assert template_errors("{labels}", ALERT_FIELDS) == [
        "line 1: {labels} needs a key, such as {labels[team]}"
    ]
    assert template_errors("{alertname[0]}", ALERT_FIELDS)[0].endswith("take a [key]")


@pytest.mark.parametrize(
    "field",
    [
        "labels.__missing__.__globals__[CONFIG]",
        "labels[a][b]",
        "0",
        "labels[x].y",
        "alertname.__class__",
        "",
        "labels[{x}]",
    ],
)
def test_a_field_is_a_name_and_at_most_one_key(field):
    """Attribute access or deeper indexing would walk from a label map to the module's globals."""
    [error] = template_errors("{" + field + "}", ALERT_FIELDS)
    assert error.startswith("line 1: {") and (
        "a field is a name" in error or "name the field" in error or "expected" in error
    )


@pytest.mark.parametrize("spec", [">10000000", ".100000", "0>201", "{x}"])
def test_a_format_width_is_bounded(spec):
    [error] = template_errors("{alertname:" + spec + "}", ALERT_FIELDS)
    assert "at most 200" in error or "expected" in error or "does not apply" in error


def test_a_malformed_template_in_the_config_names_its_line(tmp_path, fake, sqlite_db):
    path = tmp_path / "config.ini"
    path.write_text(
        config_text(
            fake.url, sqlite_db, receivers={"ops": {"robots": "ops-1", "alert": "\n  a\n  {b"}}
        )
    )
    with pytest.raises(
        alertbridge.ConfigError, match=r"\[receiver:ops\] alert: bad template: line 2: "
    ):
        alertbridge.load_config(str(path))


def check_config(path):
    return subprocess.run(
        [sys.executable, SCRIPT, "-c", str(path), "--check-config"],
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_check_config_refuses_fields_that_do_not_exist_and_names_the_section(
    tmp_path, fake, sqlite_db
):
    path = tmp_path / "config.ini"
    path.write_text(
        config_text(
            fake.url,
            sqlite_db,
            receivers={
                "ops": {"robots": "ops-1", "title": "{alertnames} {recevier}"},
                "dev": {"robots": "dev-1"},
            },
        )
    )
    done = check_config(path)
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.startswith(
        "config error: [receiver:ops] title: bad template: line 1: {recevier} is not a "
        "field; did you mean {receiver}?"
    )
    inherited = "[templates]\nalert = **{alertname}**\n  {sumary}\n"  # every receiver inherits it
    path.write_text(config_text(fake.url, sqlite_db, extra=inherited))
    done = check_config(path)
    assert done.returncode == 2
    assert done.stderr.startswith(
        "config error: [templates] alert: bad template: line 2: {sumary} is not a field"
    )


@pytest.mark.parametrize(
    "template", ["{labels.__missing__.__globals__[ROBOTS]}", "{alertname:>10000000}"]
)
def test_a_template_that_reads_beyond_its_fields_or_grows_unbounded_is_refused_at_load(
    tmp_path, fake, sqlite_db, template
):
    path = tmp_path / "config.ini"
    path.write_text(
        config_text(fake.url, sqlite_db, receivers={"dev": {"robots": "dev-1", "alert": template}})
    )
    with pytest.raises(
        alertbridge.ConfigError, match=r"^\[receiver:dev\] alert: bad template: line 1: "
    ):
        alertbridge.load_config(str(path))


# --- the dry run --------------------------------------------------------------------------------


def render(config_path, payload_path):
    return subprocess.run(
        [sys.executable, SCRIPT, "-c", str(config_path), "--render", str(payload_path)],
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.mark.parametrize("name", FIXTURE_NAMES)
def test_render_prints_exactly_what_the_daemon_sends(name, make_bridge, fake, sqlite_db, tmp_path):
    """Each captured Alertmanager payload: --render's bodies are byte for byte the ones DingTalk
    gets."""
    bridge = make_bridge(sqlite_db)
    done = render(bridge.config.path, FIXTURES / name)
    assert done.returncode == 0, done.stderr
    rendered = done.stdout.splitlines()
    notes = [line for line in done.stderr.splitlines() if line.startswith("# message")]
    assert len(notes) == len(rendered) and all("of 20,000 bytes" in n for n in notes)

    assert post(bridge, load_fixture(name))[0] == 200
    messages = len({n.split(", robots")[0] for n in notes})
    assert fake.wait_for(lambda f: len(f.delivered()) == messages)
    sent = [r.raw.decode() for r in fake.delivered()]
    assert all(body in rendered for body in sent), (sent, rendered)


def test_render_shows_every_robots_body_when_keywords_differ(make_bridge, sqlite_db):
    bridge = make_bridge(sqlite_db, start=False)
    done = render(bridge.config.path, FIXTURES / "am025-ops-firing-group.json")
    bodies = [json.loads(line) for line in done.stdout.splitlines()]
    # ops-1 has no keyword, ops-2 "告警", ops-3 "alert": three bodies per message, two messages
    assert len(bodies) == 6 and sum(b["markdown"]["text"].endswith("\n\n告警") for b in bodies) == 2
    assert done.stderr.count("robots ops-1:") == 2


def test_render_reports_bad_payloads(make_bridge, sqlite_db, tmp_path):
    bridge = make_bridge(sqlite_db, start=False)
    bad = tmp_path / "bad.json"
    bad.write_text('{"version": "3"}')
    done = render(bridge.config.path, bad)
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.strip() == f"{bad}: version: expected \"4\", got '3'"
    done = render(bridge.config.path, tmp_path / "missing.json")
    assert done.returncode == 2 and "cannot read" in done.stderr
    done = render(bridge.config.path, FIXTURES / "am025-dev-firing.json")
    assert done.returncode == 0 and len(done.stdout.splitlines()) == 1
    assert not bridge.journal.backlog()[0]  # nothing queued, nothing sent


def test_render_and_check_config_agree_on_a_template_typo(tmp_path, fake, sqlite_db):
    path = tmp_path / "config.ini"
    path.write_text(
        config_text(
            fake.url, sqlite_db, receivers={"dev": {"robots": "dev-1", "alert": "{sumary}"}}
        )
    )
    rendered, checked = render(path, FIXTURES / "am025-dev-firing.json"), check_config(path)
    assert rendered.returncode == checked.returncode == 2 and rendered.stderr == checked.stderr
    assert "{sumary} is not a field" in checked.stderr


def test_render_reads_stdin(make_bridge, sqlite_db):
    bridge = make_bridge(sqlite_db, start=False)
    done = subprocess.run(
        [sys.executable, SCRIPT, "-c", bridge.config.path, "--render", "-"],
        timeout=60,
        input=(FIXTURES / "am025-dev-firing.json").read_bytes(),
        capture_output=True,
    )
    assert done.returncode == 0 and json.loads(done.stdout)["msgtype"] == "markdown"


# --- the pages over HTTP ------------------------------------------------------------------------


def test_pages_need_the_credentials_and_a_browser_is_asked_for_them(make_bridge, sqlite_db):
    bridge = make_bridge(sqlite_db, extra=AUTH + "bearer_token = for-alertmanager\n")
    for method, path in (
        ("GET", "/"),
        ("GET", "/status"),
        ("GET", "/preview"),
        ("POST", "/preview"),
    ):
        status, body, headers = request(bridge, method, path)
        assert status == 401 and json.loads(body)["error"].startswith(
            "missing or wrong credentials"
        )
        assert (
            headers["WWW-Authenticate"] == 'Basic realm="alertbridge"'
        )  # a browser prompts for Basic
    status, body, headers = request(bridge, "GET", "/", headers=CREDENTIALS)
    assert status == 200 and headers["Content-Type"] == "text/html; charset=utf-8"
    assert headers["Content-Security-Policy"].startswith("default-src 'none';")
    assert "script-src" not in headers["Content-Security-Policy"]  # no script may run at all
    assert b'<meta http-equiv="refresh" content="10">' in body
    bearer = {"Authorization": "Bearer for-alertmanager"}
    assert request(bridge, "GET", "/status", headers=bearer)[0] == 200
    assert (
        request(
            bridge,
            "POST",
            "/alertmanager",
            json.dumps(load_fixture("am025-dev-firing.json")).encode(),
        )[0]
        == 401
    )


def test_the_status_page_shows_queues_robots_sends_and_what_fires(make_bridge, sqlite_db, fake):
    robots = {**ROBOTS, "ops-3": {**ROBOTS["ops-3"], "secret": "not-the-secret"}}
    bridge = make_bridge(
        sqlite_db,
        robots=robots,
        delivery={"rate_limit": "1"},
        extra="[templates]\ncompact_after = 0\n",
    )  # every robot's turn comes
    assert post(bridge, hostile_payload())[0] == 200
    for payload in storm_payloads(groups=30, per_group=2):
        assert post(bridge, payload)[0] == 200
    assert wait_until(lambda: robot_state(bridge, "ops-3").disabled)
    assert wait_until(lambda: metric(bridge.address, "alertbridge_alerts_recorded_total") == 61)
    status, body, _ = request(bridge, "GET", "/")
    text = body.decode()
    assert status == 200
    assert "<h2>receiver ops</h2>" in text and "waiting</strong> (warning " in text
    assert "errcode 310000: sign not match" in text  # ops-3, disabled, and what to do
    assert "set [robot:ops-3] secret to the robot&#x27;s 加签 secret" in text
    assert "then reload" in text and "fix the config and reload" not in text
    assert "<h2>Firing now: 61, the newest 50 shown</h2>" in text and "DatacenterDown" in text
    assert (
        "&lt;script&gt;window.__pwned = 1&lt;/script&gt;" not in text
    )  # labels are not on the page...
    assert "&quot;&gt;&lt;img src=x onerror=" in text  # ...the summary is, as text
    assert "<img" not in text and "<script" not in text
    for secret in (r["token"] for r in ROBOTS.values()):
        assert secret not in text


def test_the_status_page_names_which_placeholder_a_robot_still_has(make_bridge, sqlite_db):
    """A robot with the README's example secret is out of use for its secret, not its token:
    the page says which, and what to put there."""
    robots = {**ROBOTS, "ops-3": {**ROBOTS["ops-3"], "secret": "SEC_YOUR_SIGNING_SECRET"}}
    bridge = make_bridge(sqlite_db, robots=robots)
    text = request(bridge, "GET", "/")[1].decode()
    assert "placeholder secret: put the robot&#x27;s 加签 secret (SEC...) into config.ini" in text
    assert "placeholder token" not in text and "SEC_YOUR_SIGNING_SECRET" not in text


def test_the_status_page_says_when_the_history_is_down_and_paging_goes_on(make_bridge, fake):
    nowhere = alertbridge.Database(driver="mysql", host="127.0.0.1", port=free_port(), user="root")
    bridge = make_bridge(nowhere)
    assert post(bridge, load_fixture("am025-dev-firing.json"))[0] == 200
    assert wait_until(
        lambda: bridge.recorder.store_ok is False and bridge.journal.backlog()[2] == 2
    )
    text = request(bridge, "GET", "/status")[1].decode()
    assert "DOWN: alerts wait in the journal" in text and "backlog 2 events" in text
    assert "the history store is unreachable" in text
    sends = re.findall(r"<tr>(.*?)</tr>", text.split("<h2>Last ")[1])[1:]
    assert [re.findall(r">([^<>]*)</(?:span></)?td>", row)[1:6] for row in sends] == [
        ["dev", "critical", "dev-1", "1", "0"]  # the page went out all the same
    ]


def test_the_status_page_shows_messages_kept_for_a_receiver_no_longer_configured(
    make_bridge, sqlite_db
):
    bridge = make_bridge(sqlite_db)
    webhook = alertbridge.parse_webhook(json.dumps(load_fixture("am025-dev-firing.json")).encode())
    gone = alertbridge.Route("old-team", bridge.config.routes["dev"].robots)
    bridge.journal.add_webhook(webhook, gone, "r1")  # journaled before a reload removed it
    text = request(bridge, "GET", "/")[1].decode()
    assert '<h2>receiver old-team <span class="bad">(not in the config)</span></h2>' in text
    assert (
        "<strong>1 waiting</strong> (critical 1)" in text and "[receiver:old-team] is back" in text
    )


def test_the_preview_renders_without_sending_and_has_a_size_limit(make_bridge, sqlite_db, fake):
    bridge = make_bridge(sqlite_db, main={"max_body_bytes": "2048"})
    form = urllib.parse.urlencode(
        {"payload": json.dumps(hostile_payload()), "receiver": ""}
    ).encode()
    headers = {"Content-Type": "application/x-www-form-urlencoded"}
    status, body, _ = request(bridge, "POST", "/preview", form, headers)
    text = body.decode()
    assert status == 200, text
    assert "Message 1 of 1" in text and "priority level <strong>critical</strong>" in text
    assert "@-mentions: @13800000000" in text
    assert "of 20,000 bytes" in text and "the request body (JSON)" in text
    assert "<img" not in text and "<script" not in text and 'href="javascript' not in text
    assert fake.requests == [] and bridge.journal.backlog()[0] == 0

    bad = urllib.parse.urlencode({"payload": '{"version": "4", "status": "firing"}'}).encode()
    status, body, _ = request(bridge, "POST", "/preview", bad, headers)
    assert status == 422 and "receiver: required" in body.decode()
    status, body, _ = request(bridge, "POST", "/preview", b"payload=" + b"x" * 7000, headers)
    assert status == 413 and json.loads(body)["error"].startswith(
        "body of 7008 bytes exceeds the limit of 6144"
    )
    assert request(bridge, "POST", "/preview", form, {"Content-Type": "application/json"})[0] == 415
    assert request(bridge, "PUT", "/preview")[0] == 405


def test_the_preview_takes_the_last_webhook_of_a_receiver(make_bridge, sqlite_db, fake):
    bridge = make_bridge(sqlite_db)
    assert "preview its last webhook" not in request(bridge, "GET", "/")[1].decode()
    assert post(bridge, load_fixture("am025-ops-firing-group.json"))[0] == 200
    assert "/preview?last=ops" in request(bridge, "GET", "/")[1].decode()
    status, body, _ = request(bridge, "GET", "/preview?last=ops")
    text = body.decode()
    assert status == 200 and "Message 2 of 2" in text and "DiskFull" in text


def test_a_template_tried_in_the_preview_is_used_and_its_problems_refused(make_bridge, sqlite_db):
    bridge = make_bridge(sqlite_db)
    headers = {"Content-Type": "application/x-www-form-urlencoded"}
    payload = json.dumps(load_fixture("am025-dev-firing.json"))
    form = urllib.parse.urlencode(
        {"payload": payload, "alert": "NEW {alertname}\n{summary}"}
    ).encode()
    status, body, _ = request(bridge, "POST", "/preview", form, headers)
    assert status == 200 and "NEW TargetDown" in body.decode()
    form = urllib.parse.urlencode(
        {"payload": payload, "alert": "NEW {alertname}\n{sumary}"}
    ).encode()
    status, body, _ = request(bridge, "POST", "/preview", form, headers)
    assert (
        status == 422
        and "alert template: line 2: {sumary} is not a field; did you mean {summary}?"
        in body.decode()
    )
    form = urllib.parse.urlencode({"payload": payload, "title": "{oops"}).encode()
    status, body, _ = request(bridge, "POST", "/preview", form, headers)
    assert (
        status == 422
        and "title template: line 1: expected &#x27;}&#x27; before end of string" in body.decode()
    )


@pytest.mark.parametrize(
    "key, template",
    [
        ("alert", "{labels.__missing__.__globals__}"),
        ("alert", "{labels.__missing__.__globals__[ROBOTS]}"),
        ("title", "{common_labels.__missing__.__globals__[Bridge].__init__.__globals__[log]}"),
        ("alert", "{annotations.__class__.__mro__[1].__subclasses__}"),
        ("alert", "{alertname:>10000000}"),
        ("title", "{count:.100000f}"),
    ],
)
def test_the_preview_never_reads_beyond_the_fields_nor_grows_unbounded(
    make_bridge, sqlite_db, key, template
):
    """Unauthenticated by default: a template field that walked attributes reached every robot
    URL and secret through the module's globals; a huge width grew the daemon by 150 MB."""
    bridge = make_bridge(sqlite_db)
    headers = {"Content-Type": "application/x-www-form-urlencoded"}
    payload = json.dumps(load_fixture("am025-dev-firing.json"))
    form = urllib.parse.urlencode({"payload": payload, key: template}).encode()
    status, body, _ = request(bridge, "POST", "/preview", form, headers)
    text = body.decode()
    assert status == 422 and f"{key} template: line 1: " in text and len(body) < 20000
    assert not [secret for secret in SECRETS if secret in text]


# --- in a real browser --------------------------------------------------------------------------

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"


@pytest.fixture
def browser(tmp_path):
    """Headless Chromium under selenium; skipped outside CI when it is not installed."""
    missing = [p for p in (CHROMIUM, CHROMEDRIVER) if not os.access(p, os.X_OK)]
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        missing.append("selenium")
    if missing:
        message = f"browser tests need {', '.join(missing)} (bash tests/run installs them)"
        if IN_CI:
            pytest.fail(message)
        pytest.skip(message)
    os.environ["SE_OFFLINE"] = "true"  # selenium must not look for drivers online
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--window-size=1100,1500",
        f"--user-data-dir={tmp_path / 'chromium'}",
    ):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.execute_cdp_cmd("Network.enable", {})
    driver.execute_cdp_cmd("Network.setExtraHTTPHeaders", {"headers": CREDENTIALS})
    yield driver
    driver.quit()


def keep_screenshot(driver, tmp_path, name):
    """Into the test's directory; also into $ALERTBRIDGE_SCREENSHOTS, which is how docs/ gets
    its PNG."""
    path = tmp_path / name
    assert driver.save_screenshot(str(path))
    target = os.environ.get("ALERTBRIDGE_SCREENSHOTS")
    if target:
        shutil.copy(path, pathlib.Path(target) / name)
    return path


def follow(driver, element):
    """Click a link or button that loads a page, and wait until the page it was on is gone."""
    from selenium.webdriver.support import expected_conditions
    from selenium.webdriver.support.ui import WebDriverWait

    element.click()
    WebDriverWait(driver, 30).until(expected_conditions.staleness_of(element))


def pwned(driver):
    return driver.execute_script("return window.__pwned === undefined ? null : window.__pwned")


def test_in_a_browser_during_a_storm_with_a_disabled_robot(
    browser, make_bridge, sqlite_db, fake, tmp_path
):
    from selenium.webdriver.common.by import By

    robots = {**ROBOTS, "ops-3": {**ROBOTS["ops-3"], "secret": "not-the-secret"}}
    bridge = make_bridge(sqlite_db, robots=robots, delivery={"rate_limit": "1"}, extra=AUTH)
    assert post(bridge, hostile_payload(), headers=CREDENTIALS)[0] == 200
    for payload in storm_payloads(groups=60, per_group=5):
        assert post(bridge, payload, headers=CREDENTIALS)[0] == 200
    assert wait_until(lambda: robot_state(bridge, "ops-3").disabled)
    assert wait_until(lambda: len(fake.delivered()) >= 2)
    assert wait_until(lambda: metric(bridge.address, "alertbridge_alerts_recorded_total") == 301)

    browser.get(bridge.address + "/")
    assert browser.title == f"alertbridge {alertbridge.VERSION}"
    ops = browser.find_element(By.XPATH, "//section[h2='receiver ops']")
    assert "waiting (warning" in ops.text
    robot_rows = {
        row.find_element(By.TAG_NAME, "td").text: row.text
        for row in ops.find_elements(By.XPATH, ".//tr[td]")
    }
    assert set(robot_rows) == {"ops-1", "ops-2", "ops-3"}
    assert "errcode 310000: sign not match" in robot_rows["ops-3"]
    assert "0 of 1" in robot_rows["ops-1"] and "ago" in robot_rows["ops-1"]
    sends = browser.find_element(By.XPATH, "//section[starts-with(h2, 'Last')]").text
    assert "310000" in sends and "sign not match" in sends and "critical" in sends
    firing = browser.find_element(By.XPATH, "//section[starts-with(h2, 'Firing now')]")
    assert firing.find_element(By.TAG_NAME, "h2").text == "Firing now: 301, the newest 50 shown"
    page_text = browser.find_element(By.TAG_NAME, "body").text
    assert "history up" in page_text.replace("\n", " ") and "Asia/Shanghai" in page_text
    for token in OPS:
        assert token not in browser.page_source
    assert pwned(browser) is None
    browser.set_window_size(390, 844)  # a phone, hostile text and all: nothing sideways
    browser.refresh()
    assert overflowing(browser) == []
    browser.set_window_size(1100, 1500)

    # the hostile alert, from the last webhook of the receiver: shown as text, run never
    hostile = make_payload("ops", hostile_payload()["alerts"])
    assert post(bridge, hostile, headers=CREDENTIALS)[0] == 200
    browser.get(bridge.address + "/")
    follow(browser, browser.find_element(By.LINK_TEXT, "preview its last webhook"))
    card = browser.find_element(By.CLASS_NAME, "dingtalk")
    assert shown(IMG_SUMMARY) in card.text and "team=" + shown(SCRIPT_LABEL) in card.text
    assert card.find_elements(By.TAG_NAME, "img") == [] and pwned(browser) is None
    assert card.find_element(By.TAG_NAME, "a").get_attribute("href").startswith("http://prom:9090/")


# What sticks out of the viewport, or scrolls sideways inside a box: [(tag, class, text)].
OVERFLOWING = """
const width = document.documentElement.clientWidth, found = [];
if (document.documentElement.scrollWidth > width) found.push(["html", "", "page scrolls"]);
for (const e of document.querySelectorAll("body *")) {
  const box = e.getBoundingClientRect();
  if (box.width && (box.right > width + 0.5 || box.left < -0.5 || e.scrollWidth > e.clientWidth + 1
                    && getComputedStyle(e).overflowX !== "visible"))
    found.push([e.tagName, e.className, e.textContent.slice(0, 60)]);
}
return found;
"""

# Times and levels that a line break cuts: [text], from the number of line boxes each has.
BROKEN = """
return [...document.querySelectorAll(".t, .w")]
  .filter(e => e.getClientRects().length > 1).map(e => e.textContent);
"""


def overflowing(driver):
    return driver.execute_script(OVERFLOWING)


def realistic_payloads():
    """A morning on call: a database disk, web nodes down, a slow API, a dev target down."""
    ops = [
        make_payload(
            "ops",
            [
                make_alert(
                    "DiskFull",
                    "db-3.prod.example.com:9100",
                    "critical",
                    labels={"mountpoint": "/data"},
                    annotations={"summary": "/data on db-3 is 95% full, full in 40 minutes"},
                )
            ],
        ),
        make_payload(
            "ops",
            [
                make_alert(
                    "NodeDown",
                    f"web-{n:02d}.prod.example.com:9100",
                    "warning",
                    annotations={"summary": f"web-{n:02d} does not answer its scrape"},
                )
                for n in range(1, 8)
            ],
        ),
        make_payload(
            "ops",
            [
                make_alert(
                    "HighLatency",
                    "api-gateway-1:8080",
                    "warning",
                    annotations={"summary": "p99 latency of /v1/orders is 2.4 s (over 1 s)"},
                )
            ],
        ),
    ]
    dev = make_payload(
        "dev",
        [
            make_alert(
                "TargetDown",
                "staging-prometheus:9090",
                "info",
                labels={"team": "dev"},
                annotations={"summary": "1 of 12 staging targets is down"},
            )
        ],
    )
    return ops + [dev]


@pytest.mark.parametrize("width", [390, 1280])
def test_in_a_browser_the_status_page_reads_on_a_phone_and_a_desktop(
    browser, make_bridge, fake, tmp_path, width
):
    """At 390 px (a phone) and 1280 px: nothing scrolls sideways, the robots that cannot send
    come first with their errcode in view, no time or level breaks across lines. The README's
    pictures are these pages (ALERTBRIDGE_SCREENSHOTS=docs)."""
    from selenium.webdriver.common.by import By

    robots = {**ROBOTS, "ops-3": {**ROBOTS["ops-3"], "secret": "SECnot-the-signing-secret"}}
    bridge = make_bridge(empty_mysql(), robots=robots, extra=AUTH)  # as in production
    for payload in realistic_payloads():
        assert post(bridge, payload, headers=CREDENTIALS)[0] == 200
    assert wait_until(lambda: robot_state(bridge, "ops-3").disabled)
    assert wait_until(lambda: metric(bridge.address, "alertbridge_alerts_recorded_total") == 10)
    assert wait_until(lambda: len(fake.delivered()) >= 4)

    browser.set_window_size(width, 900 if width == 390 else 1000)
    browser.get(bridge.address + "/")
    assert overflowing(browser) == [], "\n".join(map(str, overflowing(browser)))
    assert browser.execute_script(BROKEN) == []
    sections = browser.find_elements(By.TAG_NAME, "section")
    assert sections[0].find_element(By.TAG_NAME, "h2").text == "Needs attention"
    errcode = sections[0].find_element(By.XPATH, ".//li[strong='ops-3']/span[@class='bad']")
    assert errcode.text == "disabled, errcode 310000: sign not match"
    box = browser.execute_script(
        "const b = arguments[0].getBoundingClientRect();"
        "return [b.left, b.right, b.top, b.bottom, innerWidth, innerHeight];",
        errcode,
    )
    left, right, top, bottom, view_width, view_height = box
    assert 0 <= left and right <= view_width and 0 <= top and bottom <= view_height  # in view
    ops = browser.find_element(By.XPATH, "//section[h2='receiver ops']")
    names = [
        row.find_element(By.TAG_NAME, "td").text for row in ops.find_elements(By.XPATH, ".//tr[td]")
    ]
    assert names == ["ops-3", "ops-1", "ops-2"]  # disabled first
    name = "status-page-phone.png" if width == 390 else "status-page.png"
    keep_screenshot(browser, tmp_path, name)

    # the preview, from its sample: what it shows fits too (the docs' picture, at 1280 px)
    browser.get(bridge.address + "/preview")
    follow(browser, browser.find_element(By.ID, "sample"))
    follow(browser, browser.find_element(By.ID, "render"))
    assert browser.find_elements(By.CLASS_NAME, "dingtalk") and overflowing(browser) == []
    if width == 1280:
        keep_screenshot(browser, tmp_path, "preview.png")


def test_in_a_browser_the_preview_form(browser, make_bridge, sqlite_db, fake, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    bridge = make_bridge(sqlite_db, extra=AUTH)
    browser.get(bridge.address + "/preview")
    payload = make_payload(
        "anything",
        [
            make_alert(
                "DiskFull",
                "db-1",
                severity="critical",
                labels={"team": SCRIPT_LABEL},
                annotations={"summary": IMG_SUMMARY},
            ),
            make_alert("DiskSlow", "db-1", severity="warning"),
        ],
    )
    textarea = browser.find_element(By.ID, "payload")
    textarea.send_keys(json.dumps(payload, indent=1))  # typed, as an operator pastes it
    Select(browser.find_element(By.ID, "receiver")).select_by_visible_text("ops")
    follow(browser, browser.find_element(By.ID, "render"))
    sections = browser.find_elements(By.XPATH, "//section[starts-with(h2, 'Message')]")
    assert [s.find_element(By.TAG_NAME, "h2").text for s in sections] == [
        "Message 1 of 2",
        "Message 2 of 2",
    ]
    first = sections[0]
    assert "priority level critical" in first.text and "@-mentions: @13800000000" in first.text
    cards = first.find_elements(By.CLASS_NAME, "dingtalk")
    assert len(cards) == 3  # three robots, three keywords: three bodies
    assert "🔥 DiskFull" in cards[0].text and shown(IMG_SUMMARY) in cards[0].text
    assert first.find_elements(By.TAG_NAME, "img") == []
    assert "@-mentions: nobody" in sections[1].text  # at_severities = critical
    assert json.loads(browser.find_element(By.ID, "payload").get_attribute("value")) == payload
    assert pwned(browser) is None
    assert fake.requests == [] and bridge.journal.backlog()[0] == 0


CARD = {
    "robots": "ops-1, ops-2",
    "message_type": "actionCard",
    "at_mobiles": "13800000000",
    "at_severities": "critical",
    "dashboard_url": "https://grafana/d/x?var-instance={instance}",
}


def test_the_preview_and_the_dry_run_show_an_action_card_and_its_mention(
    make_bridge, sqlite_db, fake, tmp_path
):
    bridge = make_bridge(sqlite_db, receivers={"ops": CARD, "dev": {"robots": "dev-1"}})
    payload = make_payload(
        "ops", [make_alert("DiskFull", annotations={"runbook_url": "https://wiki/disk"})]
    )
    form = urllib.parse.urlencode({"payload": json.dumps(payload), "receiver": ""}).encode()
    status, body, _ = request(
        bridge, "POST", "/preview", form, {"Content-Type": "application/x-www-form-urlencoded"}
    )
    text = body.decode()
    assert status == 200, text
    assert "actionCard to robot ops-1" in text and "the @ message, text to robot ops-1" in text
    assert ">手册</a>" in text and 'href="https://grafana/d/x?var-instance=node-1%3A9100"' in text
    assert "in a text message after the card" in text and fake.requests == []

    path = tmp_path / "payload.json"
    path.write_text(json.dumps(payload), encoding="utf-8")
    done = render(bridge.config.path, path)
    assert done.returncode == 0, done.stderr
    card, mention = [json.loads(line) for line in done.stdout.splitlines()][
        ::2
    ]  # ops-2's keyword differs
    assert card["msgtype"] == "actionCard" and len(card["actionCard"]["btns"]) == 4
    assert mention == {
        "msgtype": "text",
        "text": {"content": "@13800000000 [CRITICAL · FIRING:1] DiskFull"},
        "at": {"atMobiles": ["13800000000"], "isAtAll": False},
    }


FORM = {"Content-Type": "application/x-www-form-urlencoded"}


def textarea(html_text, name="payload"):
    import html as html_module

    found = re.search(rf'<textarea name="{name}"[^>]*>(.*?)</textarea>', html_text, re.S)
    return html_module.unescape(found.group(1))


def test_the_preview_starts_from_a_sample_or_the_last_webhook_of_a_receiver(make_bridge, sqlite_db):
    bridge = make_bridge(sqlite_db)
    status, body, _ = request(bridge, "GET", "/preview")
    assert status == 200 and 'href="/preview?sample"' in body.decode()
    assert "last webhook of receiver" not in body.decode()  # none came yet

    sample = textarea(request(bridge, "GET", "/preview?sample")[1].decode())
    form = urllib.parse.urlencode({"payload": sample, "receiver": "ops"}).encode()
    status, body, _ = request(bridge, "POST", "/preview", form, FORM)
    assert status == 200 and "Message 1 of 2" in body.decode()  # critical, then warning
    assert "DiskFull" in body.decode() and "db-3:9100" in body.decode()

    assert post(bridge, load_fixture("am025-dev-firing.json"))[0] == 200
    form_page = request(bridge, "GET", "/preview")[1].decode()
    assert 'last webhook of receiver <a href="/preview?last=dev">dev</a>' in form_page
    last = textarea(request(bridge, "GET", "/preview?last=dev")[1].decode())
    assert json.loads(last) == load_fixture("am025-dev-firing.json")


def api_alerts(receiver="ops"):
    """Alerts as Alertmanager's GET /api/v2/alerts gives them."""
    return [
        {
            "annotations": {"summary": f"{name} on db-1"},
            "endsAt": "2999-01-01T00:00:00.000Z",
            "fingerprint": f"{n:016x}",
            "receivers": [{"name": receiver}],
            "startsAt": "2026-11-30T02:00:00.000Z",
            "status": {"inhibitedBy": [], "silencedBy": [], "state": "active"},
            "updatedAt": "2026-11-30T02:00:30.000Z",
            "generatorURL": "http://prometheus:9090/graph?g0.expr=up",
            "labels": {"alertname": name, "instance": "db-1:9100", "severity": severity},
        }
        for n, (name, severity) in enumerate([("DiskFull", "critical"), ("DiskSlow", "warning")])
    ]


def test_the_preview_and_the_dry_run_take_the_alerts_of_alertmanagers_api(
    make_bridge, sqlite_db, fake, tmp_path
):
    bridge = make_bridge(sqlite_db)
    form = urllib.parse.urlencode({"payload": json.dumps(api_alerts()), "receiver": ""}).encode()
    status, body, _ = request(bridge, "POST", "/preview", form, FORM)
    text = body.decode()
    assert status == 200, text
    assert "Receiver ops → [receiver:ops]" in text and "Message 1 of 2" in text
    assert "DiskFull on db-1" in text and "DiskSlow on db-1" in text

    nameless = [{k: v for k, v in a.items() if k != "receivers"} for a in api_alerts()]
    form = urllib.parse.urlencode({"payload": json.dumps(nameless), "receiver": ""}).encode()
    status, body, _ = request(bridge, "POST", "/preview", form, FORM)
    assert status == 422 and "these alerts name none, choose one" in body.decode()

    path = tmp_path / "alerts.json"
    path.write_text(json.dumps(api_alerts("dev")), encoding="utf-8")
    done = render(bridge.config.path, path)
    assert done.returncode == 0, done.stderr
    assert "robots dev-1" in done.stderr and "DiskFull on db-1" in done.stdout
    assert fake.requests == []


def test_in_a_browser_a_claim_link_on_a_phone(browser, make_bridge, sqlite_db, fake, tmp_path):
    """What on-call does from the group on a phone: open the link, choose who they are, claim;
    the page fits a 390 px screen and the choice is remembered for the next link."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    from tests.test_incidents import CLAIMING, ONCALL, paged

    bridge = make_bridge(sqlite_db, receivers=CLAIMING, extra=ONCALL + AUTH)
    token = paged(bridge, fake, sqlite_db, headers=CREDENTIALS)
    browser.execute_cdp_cmd("Network.setExtraHTTPHeaders", {"headers": {}})  # no credentials
    browser.set_window_size(390, 844)
    browser.get(f"{bridge.address}/incident/{token}")
    assert overflowing(browser) == [] and "DiskFull" in browser.find_element(By.TAG_NAME, "h2").text
    Select(browser.find_element(By.ID, "person")).select_by_visible_text("李四")
    keep_screenshot(browser, tmp_path, "claim-page-phone.png")
    follow(browser, browser.find_element(By.ID, "claim"))
    text = browser.find_element(By.TAG_NAME, "main").text
    assert text.startswith("✅ 李四 已认领") and overflowing(browser) == []
    assert alertbridge.Store(sqlite_db).incidents()[0]["acknowledged_by"] == "lisi"
    browser.get(f"{bridge.address}/incident/{token}")  # opened again: who has it, no form
    assert "李四 已认领" in browser.find_element(By.TAG_NAME, "main").text
    assert browser.find_elements(By.ID, "claim") == []
    browser.get(f"{bridge.address}/incident/{token[:-4]}")  # a cut link: says so
    assert "什么都不做" in browser.find_element(By.TAG_NAME, "main").text
    assert pwned(browser) is None


def test_the_claim_pages_cookies_are_secure_when_phones_reach_them_over_https(
    make_bridge, sqlite_db, fake
):
    """[oncall] base_url https: the phones reach the pages over TLS (a proxy's, perhaps), and
    the form's CSRF cookie and the remembered name must never travel without it; over http a
    Secure cookie would never come back, so it is not Secure there."""
    import http.client
    import time

    from tests.test_incidents import CLAIMING, FIRING, ONCALL, paged

    def cookies(bridge, token, form=None, sent=""):
        connection = http.client.HTTPConnection(bridge.address.split("//")[1], timeout=10)
        body = urllib.parse.urlencode(form).encode() if form else None
        headers = {"Content-Type": "application/x-www-form-urlencoded", "Cookie": sent}
        try:
            connection.request("POST" if form else "GET", f"/incident/{token}", body, headers)
            response = connection.getresponse()
            response.read()
            return response.headers.get_all("Set-Cookie") or []
        finally:
            connection.close()

    def both(bridge, token):
        [csrf] = cookies(bridge, token)
        value = csrf.split(";")[0]
        form = {"person": "zhangsan", "csrf": value.partition("=")[2]}
        return [csrf] + cookies(bridge, token, form, sent=value)

    bridge = make_bridge(sqlite_db, receivers=CLAIMING, extra=ONCALL)
    token = paged(bridge, fake, sqlite_db)
    secure = both(bridge, token)
    assert [c.split("=")[0] for c in secure] == ["alertbridge_csrf", "alertbridge_person"]
    assert all(c.endswith("; Secure") and "HttpOnly" in c for c in secure), secure

    path = pathlib.Path(bridge.config.path)
    text = path.read_text(encoding="utf-8")
    path.write_text(text.replace("https://alertbridge.example.com", "http://10.0.0.5:9097"))
    assert bridge.reload()[0]
    assert post(bridge, make_payload("ops", FIRING) | {"groupKey": "g-other"})[0] == 200
    assert wait_until(lambda: len(bridge.store.incidents(10)) == 2)
    group = alertbridge.group_hash("g-other")
    link = alertbridge.claim_link(bridge.config.oncall, "ops", group, time.time())
    plain = both(bridge, link.rpartition("/")[2])
    assert len(plain) == 2 and not any("Secure" in c for c in plain), plain


ESCALATING = """
[escalation:slow]
steps =
    1h = lisi
    2h = zhangsan, receiver:dev
"""


@pytest.mark.parametrize("language", ["zh", "en"])
def test_the_status_page_shows_each_open_incident_claimed_or_not_and_its_next_step(
    make_bridge, sqlite_db, fake, language
):
    """The page showed who is on call and what fires, not whether an incident was claimed,
    by whom, or when it escalates next."""
    from tests.kit import ONCALL

    receivers = {"ops": {"robots": "ops-1", "escalation": "slow", "language": language},
                 "dev": {"robots": "dev-1", "language": language}}
    bridge = make_bridge(sqlite_db, receivers=receivers, extra=ONCALL + ESCALATING)
    for key in ("Waiting<b>&", "Taken"):
        payload = make_payload("ops", [make_alert(key)])
        payload |= {"groupKey": key, "groupLabels": {"alertname": key}}
        assert post(bridge, payload)[0] == 200
    assert wait_until(lambda: len(bridge.store.open_incidents(10)) == 2
                      and all(i["next_step_at"] > "1971" for i in bridge.store.open_incidents(10)))
    bridge.desk.claim("ops", alertbridge.group_hash("Taken"), "zhangsan", "张三", "link")
    text = request(bridge, "GET", "/")[1].decode()
    part = text[text.index({"zh": "未结束的事件", "en": "Open incidents"}[language]):]
    part = part[: part.index("</section>")]
    rows = {re.search(r"(Waiting|Taken)", row).group(1): row
            for row in re.findall(r"<tr>(.*?)</tr>", part)[1:]}
    waiting, taken = rows["Waiting"], rows["Taken"]
    if language == "zh":
        assert "尚无人认领" in waiting and re.search(r"第 1 步，\d{4}-\d\d-\d\d [\d:]{8}：李四", waiting)
        assert "张三，" in taken and "无：已认领" in taken
    else:
        assert "nobody yet" in waiting and re.search(r"step 1 at [\d: -]{19}: 李四", waiting)
        assert "张三, " in taken and "none: claimed" in taken
    assert "<b>" not in part and "Waiting&lt;b&gt;&amp;" in part
