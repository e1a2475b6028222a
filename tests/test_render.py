"""Message rendering: templates, times, mentions, keyword, and DingTalk's size limit."""

import json
from datetime import timezone

import alertbridge
from alertbridge import Config, Delivery, Renderer, Robot, Route, render_template
from tests.kit import load_fixture

ROBOT = Robot("r1", "http://127.0.0.1:1/robot/send?access_token=t")
KEYWORD_ROBOT = Robot("r2", "http://127.0.0.1:1/robot/send?access_token=t2", keyword="告警")


def alerts_of(name):
    return alertbridge.parse_webhook(json.dumps(load_fixture(name)).encode()).alerts


def render(alerts, route=None, robot=ROBOT, max_bytes=20000, digest=False, **extra):
    config = Config(delivery=Delivery(max_message_bytes=max_bytes))
    route = route or Route("ops", (ROBOT, KEYWORD_ROBOT))
    return Renderer(config).body(route, robot, {"alerts": alerts, **extra}, digest)


def test_missing_labels_render_empty_and_empty_lines_are_dropped():
    fields = alertbridge.Blank(labels=alertbridge.Blank(team="sre"), alertname="X")
    template = "A {alertname}\nteam {labels[team]}\nowner {labels[owner]}\n{nosuch.attr} {x[1]}\nplain"
    assert render_template(template, fields) == "A X\nteam sre\nplain"


def test_firing_alert_layout_in_the_configured_zone():
    body = render(alerts_of("am025-ops-firing-group.json"))
    text = body["markdown"]["text"]
    assert text.startswith("#### [FIRING:2] DiskFull\n")
    assert "**🔥 DiskFull** · critical · FIRING" in text
    assert "- 开始 Started: 2026-11-25 05:47:13" in text
    assert "恢复 Resolved" not in text                   # no end time while firing
    assert "- 摘要 Summary: 磁盘将满" in text and "- 描述 Description: usage 95%" in text
    assert text.count("---") == 1                          # two alerts, one separator


def test_resolved_alert_shows_end_and_duration_and_no_silence_link():
    alerts = alerts_of("am025-ops-partly-resolved.json")
    text = render(alerts[:1])["markdown"]["text"]
    assert "- 恢复 Resolved: 2026-11-25 05:47:16 (持续 3s)" in text
    assert "silences" not in text
    utc = Config(tz=timezone.utc)
    text = Renderer(utc).body(Route("ops", (ROBOT,)), ROBOT, {"alerts": alerts[:1]})["markdown"]["text"]
    assert "2026-11-24 21:47:16" in text


def test_silence_link_matches_every_label():
    [alert] = alerts_of("am025-dev-firing.json")
    url = alertbridge.silence_url(alert)
    assert url.startswith("http://vm:19093/#/silences/new?filter=%7B")
    assert "alertname%3D%22TargetDown%22" in url and "job%3D%22prometheus%22" in url


def test_mentions_only_for_firing_alerts_of_listed_severity():
    route = Route("ops", (ROBOT,), at_mobiles=("13800000000",), at_severities=("critical",))
    firing = alerts_of("am025-ops-firing-group.json")
    body = render(firing, route)
    assert body["at"]["atMobiles"] == ["13800000000"] and "@13800000000" in body["markdown"]["text"]
    warning_only = [a for a in firing if a["labels"]["severity"] == "warning"]
    assert render(warning_only, route)["at"]["atMobiles"] == []
    resolved = alerts_of("am025-ops-partly-resolved.json")[:1]
    assert "@13800000000" not in render(resolved, route)["markdown"]["text"]


def test_keyword_robot_gets_its_keyword():
    alerts = alerts_of("am025-dev-firing.json")
    assert "告警" in render(alerts, robot=KEYWORD_ROBOT)["markdown"]["text"]
    assert "告警" not in render(alerts, robot=ROBOT)["markdown"]["text"]


def test_custom_templates_from_config(tmp_path):
    path = tmp_path / "c.ini"
    path.write_text("[receiver:ops]\nrobots = r\ntitle = {receiver}: {count} ({firing} firing)\n"
                    "alert = {alertname}@{instance} team={labels[team]} via {receiver}\n"
                    "[robot:r]\nurl = http://127.0.0.1:1/robot/send?access_token=t\n", encoding="utf-8")
    config = alertbridge.load_config(str(path))
    route = config.routes["ops"]
    body = Renderer(config).body(route, route.robots[0], {"alerts": alerts_of("am025-dev-firing.json")})
    # {receiver} is Alertmanager's receiver ("dev" in the payload) in the title and the block
    # alike, also when another section (here "ops") serves it
    assert body["markdown"]["title"] == "dev: 1 (1 firing)"
    assert "TargetDown@p:9090 team= via dev\n" in body["markdown"]["text"] + "\n"


def test_digest_groups_by_alertname_and_split_fits_the_limit():
    base = alerts_of("am025-ops-firing-group.json")[0]
    alerts = [{**base, "fingerprint": f"f{i}", "labels": {**base["labels"], "alertname": f"Rule{i % 3}",
                                                          "instance": f"10.0.{i}.1:9100"}} for i in range(300)]
    route = Route("ops", (ROBOT, KEYWORD_ROBOT))
    renderer = Renderer(Config())
    sizes = [renderer.block_size(route, a) for a in alerts]          # the estimates packing works on
    chunks = alertbridge.cut(alerts, alertbridge.chunk_lengths(sizes, renderer.room()))
    assert len(chunks) > 1 and sum(len(c) for c in chunks) == 300
    for i, chunk in enumerate(chunks):
        for robot in route.robots:
            body = renderer.body(route, robot, {"alerts": chunk, "part": [i + 1, len(chunks)]}, digest=True)
            assert len(renderer.encode(body)) <= 20000
            assert alertbridge.TRUNCATED_MARK not in body["markdown"]["text"]
    text = renderer.body(route, ROBOT, {"alerts": chunks[0], "part": [1, len(chunks)]}, True)["markdown"]
    assert f"(1/{len(chunks)})" in text["title"] and "##### Rule0 × " in text["text"]


def test_single_oversized_alert_is_cut_with_a_visible_mark():
    [alert] = alerts_of("am025-dev-firing.json")
    alert = {**alert, "annotations": {"description": "磁" * 20000, "summary": "huge"}}
    body = render([alert], max_bytes=5000, robot=KEYWORD_ROBOT)
    encoded = json.dumps(body, ensure_ascii=False).encode()
    assert len(encoded) <= 5000
    assert alertbridge.TRUNCATED_MARK in body["markdown"]["text"] and body["markdown"]["text"].endswith("告警")
