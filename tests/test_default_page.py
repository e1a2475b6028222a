"""The default page, exactly: what a DingTalk group gets for a firing page, a resolved one, an
alert without a level and a 60-alert group, in each `language`. The expected texts live in
tests/pages/, and a doc may show one (a block marked `<!-- page: CASE.LANGUAGE -->`):
ALERTBRIDGE_REGENERATE=1 writes both from the code, and without it the test fails on any
difference, so such examples are always what is sent. (The README's quick start shows the page
of its own alert and config instead: tests/test_readme.py renders it.)"""

import json
import os
import pathlib
import re
from datetime import timezone

import pytest

import alertbridge
from tests.kit import make_alert, make_payload

ROOT = pathlib.Path(__file__).resolve().parent.parent
PAGES = ROOT / "tests" / "pages"
REGENERATE = os.environ.get("ALERTBRIDGE_REGENERATE") == "1"
EXAMPLE = re.compile(r"(<!-- page: (\S+) -->\n```text\n)(.*?)(^```)", re.S | re.M)

CONFIG = """\
[alertbridge]
timezone = Asia/Shanghai

[templates]
language = {language}

[robot:ops-1]
url = https://oapi.dingtalk.com/robot/send?access_token=0123456789abcdef

[receiver:ops]
robots = ops-1
dashboard_url = https://grafana.example.com/d/node?var-instance={{instance}}
alertmanager_url = https://alertmanager.example.com
prometheus_url = https://prometheus.example.com
"""


def disk_full(status="firing"):
    alert = make_alert(
        "DiskFull",
        "db-3:9100",
        "critical",
        status=status,
        starts_at="2026-11-30T02:13:05Z",
        ends_at="2026-11-30T02:31:47Z" if status == "resolved" else "0001-01-01T00:00:00Z",
        labels={"mountpoint": "/data"},
        annotations={
            "summary": "/data on db-3 is 95% full",
            "description": "At this rate it is full in 40 minutes.",
            "runbook_url": "https://wiki.example.com/runbooks/disk-full",
        },
    )
    alert["generatorURL"] = "http://prometheus-0:9090/graph?g0.expr=disk_used_ratio"
    return alert


def no_level():
    alert = make_alert(
        "Watchdog",
        "",
        "",
        starts_at="2026-11-30T00:00:00Z",
        annotations={"summary": "The alerting pipeline is alive."},
    )
    del alert["labels"]["severity"], alert["labels"]["instance"]
    return alert


def large_group():
    return [
        make_alert(
            "NodeDown",
            f"web-{n:02d}:9100",
            "warning",
            starts_at=f"2026-11-30T03:{n % 60:02d}:00Z",
            annotations={"summary": f"web-{n:02d} does not answer"},
        )
        for n in range(1, 61)
    ]


def webhook(alerts):
    payload = make_payload("ops", alerts)
    payload["externalURL"] = "http://alertmanager-0:9093"
    payload["groupLabels"] = {"alertname": alerts[0]["labels"]["alertname"]}
    return json.dumps(payload).encode()


CASES = {
    "firing": lambda: [disk_full()],
    "resolved": lambda: [disk_full("resolved")],
    "no-level": lambda: [no_level()],
    "group-of-60": large_group,
}


def history(alert):
    """What the history knows of DiskFull: twice before today, resolved after 6 minutes."""
    if alert["labels"].get("alertname") == "DiskFull":
        return 2, ("2026-11-29 13:02:00", "2026-11-29 13:08:00")
    return None


def sent(tmp_path, case, language):
    """What the robot gets for the case: the markdown of each request, with its title."""
    path = tmp_path / "config.ini"
    path.write_text(CONFIG.format(language=language), encoding="utf-8")
    config = alertbridge.load_config(str(path))
    route = config.routes["ops"]
    renderer = alertbridge.Renderer(lambda: config, history)
    channels = alertbridge.Channels(lambda: config)
    hook = alertbridge.parse_webhook(webhook(CASES[case]()))
    pages = []
    for _, _, bodies in alertbridge.dry_run(renderer, channels, route, hook):
        for _, [(_, request)] in bodies:
            pages.append(f"title: {request['markdown']['title']}\n\n{request['markdown']['text']}")
    return "\n\n======\n\n".join(pages)


@pytest.mark.parametrize("language", alertbridge.LANGUAGES)
@pytest.mark.parametrize("case", CASES)
def test_the_default_page_is_exactly(tmp_path, case, language):
    text = sent(tmp_path, case, language)
    expected = PAGES / f"{case}.{language}.md"
    if REGENERATE:
        PAGES.mkdir(exist_ok=True)
        expected.write_text(text + "\n", encoding="utf-8")
    assert text + "\n" == expected.read_text(encoding="utf-8")


def test_the_readme_examples_are_the_pages_sent():
    """Each README block marked `<!-- page: CASE.LANGUAGE -->` is that page, as tested above."""
    stale = []
    for readme in sorted(ROOT.glob("README*.md")) + sorted((ROOT / "docs").glob("*.md")):
        text = readme.read_text(encoding="utf-8")

        def current(match):
            page = (PAGES / f"{match.group(2)}.md").read_text(encoding="utf-8")
            return match.group(1) + page + match.group(4)

        fresh = EXAMPLE.sub(current, text)
        if REGENERATE and fresh != text:
            readme.write_text(fresh, encoding="utf-8")
        elif fresh != text:
            stale.append(readme.name)
    assert stale == [], "an example page is not what is sent"


def test_what_the_pages_promise():
    """Beyond the exact texts, what each property of the default page means, for zh."""
    read = {p.stem: p.read_text(encoding="utf-8") for p in PAGES.glob("*.md")}
    firing, resolved = read["firing.zh"], read["resolved.zh"]
    assert firing.startswith("title: [CRITICAL · FIRING:1] DiskFull")  # the level, in the list
    assert "[手册](https://wiki.example.com/runbooks/disk-full)" in firing
    assert "[仪表盘](https://grafana.example.com/d/node?var-instance=db-3%3A9100)" in firing
    assert "[静默](https://alertmanager.example.com/#/silences/new?filter=" in firing
    assert "[Prometheus](https://prometheus.example.com/graph?" in firing
    assert "2026-11-30 10:13:05 UTC+8" in firing  # the zone, said
    assert "静默" not in resolved and "持续 18m42s" in resolved
    assert "**🔥 Watchdog** · FIRING" in read["no-level.zh"]  # no empty level between dots
    assert "实例 Instance" not in firing and "实例 Instance" in read["firing.both"]
    group = read["group-of-60.zh"]
    assert group.count("title: ") == 1 and "FIRING:60" in group.splitlines()[0]
    assert group.count("**🔥 NodeDown**") == 5 and group.count("- 🔥 **NodeDown**") == 55
    for text in read.values():
        for block in text.split("\n---\n"):  # no alert says a thing twice
            lines = [line.split("：")[0].split(":")[0] for line in block.splitlines() if line]
            assert len(lines) == len(set(lines)) or block.startswith("\n- 🔥"), block


def test_every_time_field_is_in_the_configured_zone():
    alert = alertbridge.parse_webhook(webhook([disk_full()])).alerts[0]
    fields = alertbridge.alert_fields(alert, timezone.utc)
    assert (fields["starts_at"], fields["zone"]) == ("2026-11-30 02:13:05", "UTC")
