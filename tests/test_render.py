"""Message rendering: templates, times, mentions, keyword, and DingTalk's size limit."""

import json
import re
from datetime import timezone

import pytest

import alertbridge
from alertbridge import Config, Delivery, Renderer, Robot, Route, render_template
from tests.kit import load_fixture, make_alert, make_payload, post

ROBOT = Robot("r1", "http://127.0.0.1:1/robot/send?access_token=t")
KEYWORD_ROBOT = Robot("r2", "http://127.0.0.1:1/robot/send?access_token=t2", keyword="告警")


def alerts_of(name):
    return alertbridge.parse_webhook(json.dumps(load_fixture(name)).encode()).alerts


def body_of(alerts, digest=False, part=None, **extra):
    return alertbridge.Body(
        alerts=tuple(alerts), digest=digest, part=tuple(part) if part else None, **extra
    )


def renderer_and_channels(config, history=None):
    return Renderer(lambda: config, history), alertbridge.Channels(lambda: config)


def draw(config, route, robot, body, history=None):
    """The request `robot` gets for `body`: rendered, then written by the channel."""
    renderer, channels = renderer_and_channels(config, history)
    return alertbridge.request_body(renderer, channels, route, body, robot)


def render(alerts, route=None, robot=ROBOT, max_bytes=20000, digest=False, **extra):
    config = Config(delivery=Delivery(max_message_bytes=max_bytes))
    route = route or Route("ops", (ROBOT, KEYWORD_ROBOT))
    return draw(config, route, robot, body_of(alerts, digest, **extra))


def test_missing_labels_render_empty_and_empty_lines_are_dropped():
    fields = alertbridge.Blank(labels=alertbridge.Blank(team="sre"), alertname="X")
    template = (
        "A {alertname}\nteam {labels[team]}\nowner {labels[owner]}\n{nosuch.attr} {x[1]}\nplain"
    )
    assert render_template(template, fields) == "A X\nteam sre\nplain"


def test_firing_alert_layout_in_the_configured_zone():
    body = render(alerts_of("am025-ops-firing-group.json"))
    text = body["markdown"]["text"]
    assert text.startswith(
        "#### [CRITICAL · FIRING:2] DiskFull\n"
    )  # the level, in the chat list too
    assert "**🔥 DiskFull** · critical · FIRING" in text
    assert "- 开始：2026-11-25 05:47:13 UTC+8" in text  # the time says its zone
    assert "恢复" not in text  # no end time while firing
    assert "- 摘要：磁盘将满" in text and "- 描述：usage 95%" in text
    assert text.count("---") == 1  # two alerts, one separator


def test_resolved_alert_shows_end_and_duration_and_no_silence_link():
    alerts = alerts_of("am025-ops-partly-resolved.json")
    text = render(alerts[:1])["markdown"]["text"]
    assert "- 恢复：2026-11-25 05:47:16 (持续 3s)" in text
    assert "silences" not in text
    utc = Config(tz=timezone.utc)
    text = draw(utc, Route("ops", (ROBOT,)), ROBOT, body_of(alerts[:1]))["markdown"]["text"]
    assert "2026-11-24 21:47:16" in text


def test_silence_link_matches_every_label():
    [alert] = alerts_of("am025-dev-firing.json")
    url = alertbridge.silence_url(alert["external_url"], alert["labels"])
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
    path.write_text(
        "[receiver:ops]\nrobots = r\ntitle = {receiver}: {count} ({firing} firing)\n"
        "alert = {alertname}@{instance} team={labels[team]} via {receiver}\n"
        "[robot:r]\nurl = http://127.0.0.1:1/robot/send?access_token=t\n",
        encoding="utf-8",
    )
    config = alertbridge.load_config(str(path))
    route = config.routes["ops"]
    body = draw(config, route, route.robots[0], body_of(alerts_of("am025-dev-firing.json")))
    # {receiver} is Alertmanager's receiver ("dev" in the payload) in the title and the block
    # alike, also when another section (here "ops") serves it
    assert body["markdown"]["title"] == "dev: 1 (1 firing)"
    assert "TargetDown@p:9090 team= via dev\n" in body["markdown"]["text"] + "\n"


def test_digest_groups_by_alertname_and_split_fits_the_limit():
    base = alerts_of("am025-ops-firing-group.json")[0]
    alerts = [
        {
            **base,
            "fingerprint": f"f{i}",
            "labels": {
                **base["labels"],
                "alertname": f"Rule{i % 3}",
                "instance": f"10.0.{i}.1:9100",
            },
        }
        for i in range(300)
    ]
    route = Route("ops", (ROBOT, KEYWORD_ROBOT))
    renderer, channels = renderer_and_channels(Config())
    sizes = [renderer.block_size(route, a) for a in alerts]  # the estimates packing works on
    room = renderer.room(route, channels)
    chunks = alertbridge.cut(alerts, alertbridge.chunk_lengths(sizes, room))
    assert len(chunks) > 1 and sum(len(c) for c in chunks) == 300
    for i, chunk in enumerate(chunks):
        for robot in route.robots:
            body = draw(Config(), route, robot, body_of(chunk, True, part=[i + 1, len(chunks)]))
            assert len(channels.encode(robot, body)) <= 20000
            assert alertbridge.TRUNCATED_MARK not in body["markdown"]["text"]
    text = draw(Config(), route, ROBOT, body_of(chunks[0], True, part=[1, len(chunks)]))["markdown"]
    assert f"(1/{len(chunks)})" in text["title"] and "##### Rule0 × " in text["text"]


def test_single_oversized_alert_is_cut_with_a_visible_mark():
    [alert] = alerts_of("am025-dev-firing.json")
    alert = {**alert, "annotations": {"description": "磁" * 20000, "summary": "huge"}}
    body = render([alert], max_bytes=5000, robot=KEYWORD_ROBOT)
    encoded = json.dumps(body, ensure_ascii=False).encode()
    assert len(encoded) <= 5000
    assert alertbridge.TRUNCATED_MARK in body["markdown"]["text"] and body["markdown"][
        "text"
    ].endswith("告警")


# --- issue 17: escaping, links, mentions from alerts, actionCard, group fields, history ----------


def alert(labels=None, annotations=None, status="firing", **extra):
    base = {
        "fingerprint": "f1",
        "status": status,
        "starts_at": "2026-11-25 05:47:13.000",
        "ends_at": "2026-11-25 05:53:13.000" if status == "resolved" else None,
        "labels": {
            "alertname": "NodeDown",
            "severity": "critical",
            "instance": "n1:9100",
            **(labels or {}),
        },
        "annotations": annotations or {},
        "generator_url": "http://prometheus-0:9090/graph?g0.expr=up",
        "external_url": "http://alertmanager-0:9093",
        "receiver": "ops",
    }
    return {**base, **extra}


def test_label_and_annotation_values_are_escaped_for_markdown_unless_raw():
    hostile = alert(
        labels={"exporter": "node_exporter_*x*"},
        annotations={"summary": "see [here](http://x) `now`"},
    )
    text = render([hostile])["markdown"]["text"]
    assert r"node\_exporter\_\*x\*" in text and r"\[here\](http://x) \`now\`" in text
    assert (
        "[Prometheus](http://prometheus-0:9090/graph?g0.expr=up)" in text
    )  # our own links stay links
    raw = Route(
        "ops", (ROBOT,), alert="{summary:raw} | {labels[exporter]:raw} | {labels[exporter]}"
    )
    assert render([hostile], raw)["markdown"]["text"].endswith(
        "see [here](http://x) `now` | node_exporter_*x* | node\\_exporter\\_\\*x\\*"
    )
    title = render([alert(labels={"alertname": "Disk_full_*x*"})])["markdown"]
    assert title["title"] == "[CRITICAL · FIRING:1] Disk_full_*x*"  # the chat list: plain text
    assert title["text"].startswith("#### [CRITICAL · FIRING:1] Disk\\_full\\_\\*x\\*\n")


def test_links_are_rebased_for_phones():
    route = Route(
        "ops",
        (ROBOT,),
        prometheus_url="https://prom.example.com/p",
        alertmanager_url="https://am.example.com",
    )
    text = render([alert()], route)["markdown"]["text"]
    assert "[Prometheus](https://prom.example.com/p/graph?g0.expr=up)" in text
    assert (
        "(https://am.example.com/#/silences/new?filter=%7B" in text and "alertmanager-0" not in text
    )
    assert alertbridge.rebase_url("http://a:9090/x?y=1#z", "https://b") == "https://b/x?y=1#z"


def routed(**options):
    return Route("ops", (ROBOT,), **options)


def test_mentions_come_from_labels_annotations_and_the_team_map():
    route = routed(
        at_mobiles=("13800000000",),
        at_mobiles_from=("owner_mobile",),
        at_user_ids_from=("oncall",),
        at_map_label="team",
        at_map=(("dba", ("13900000000",), ("dba-lead",), ()),),
    )
    who = Renderer(Config()).mentions(
        route,
        [
            alert(
                {"owner_mobile": "13700000000, 13600000000", "team": "dba"},
                {"oncall": "manager7021"},
            )
        ],
    )
    assert who.mobiles == ("13800000000", "13900000000", "13700000000", "13600000000")
    assert who.user_ids == ("dba-lead", "manager7021") and not who.all
    body = render(
        [alert({"owner_mobile": "13700000000"})], routed(at_mobiles_from=("owner_mobile",))
    )
    assert body["at"] == {"atMobiles": ["13700000000"], "isAtAll": False}
    assert body["markdown"]["text"].endswith("\n\n@13700000000")


def test_a_hostile_label_cannot_mention_everyone_or_a_crowd():
    route = routed(at_mobiles_from=("owner",), at_user_ids_from=("oncall",))
    crowd = " ".join(str(13000000000 + i) for i in range(50))
    hostile = alert(
        {"owner": "@all all <script>x</script> 1380000000x " + crowd},
        {"oncall": "all ALL @all $$$ ok_user"},
    )
    who = Renderer(Config()).mentions(route, [hostile])
    assert not who.all and "all" not in [u.lower() for u in who.user_ids]
    assert len(who.mobiles) + len(who.user_ids) == alertbridge.MENTIONS_FROM_ALERTS
    assert all(m.isdigit() for m in who.mobiles)
    assert (
        Renderer(Config()).mentions(route, [alert({"owner": "13700000000"}, status="resolved")])
        == alertbridge.Mentions()
    )  # only firing alerts @
    severe = routed(at_mobiles_from=("owner",), at_severities=("critical",))
    assert not Renderer(Config()).mentions(
        severe, [alert({"owner": "13700000000", "severity": "warning"})]
    )


def test_an_action_card_has_buttons_and_its_mention_goes_apart():
    route = routed(
        message_type="actionCard",
        at_mobiles=("13800000000",),
        dashboard_url="https://grafana/d/x?var-instance={instance}&var-job={job}",
    )
    firing = alert({"job": "a b"}, {"runbook_url": "https://wiki/runbooks/node-down"})
    body = render([firing], route)
    assert body["msgtype"] == "actionCard" and "at" not in body
    card = body["actionCard"]
    assert card["title"] == "[CRITICAL · FIRING:1] NodeDown" and "@13800000000" not in card["text"]
    assert [b["title"] for b in card["btns"]] == ["静默", "手册", "Prometheus", "仪表盘"]
    assert card["btnOrientation"] == "0"
    assert card["btns"][0]["actionURL"].startswith(
        "http://alertmanager-0:9093/#/silences/new?filter=%7Balertname"
    )
    assert (
        card["btns"][3]["actionURL"] == "https://grafana/d/x?var-instance=n1%3A9100&var-job=a%20b"
    )
    renderer, channels = renderer_and_channels(Config())
    card, mention = renderer.plan(route, body_of([firing]), channels)
    assert card.kind == alertbridge.CARD and mention.kind == alertbridge.MENTION
    assert draw(Config(), route, KEYWORD_ROBOT, mention) == {
        "msgtype": "text",
        "text": {"content": "@13800000000 [CRITICAL · FIRING:1] NodeDown\n告警"},
        "at": {"atMobiles": ["13800000000"], "isAtAll": False},
    }
    assert renderer.plan(route, card, channels) == [card]  # its @ is apart already
    assert renderer.plan(route, body_of([firing], part=[1, 2]), channels) == [
        body_of([firing], part=[1, 2])
    ]
    resolved = render([alert(status="resolved")], route)["actionCard"]["btns"]
    assert [b["title"] for b in resolved] == [
        "Prometheus",
        "仪表盘",
    ]  # nothing to silence


def test_group_labels_common_labels_and_external_url_in_titles():
    group = [
        alert({"job": "node"}),
        alert({"job": "node", "instance": "n2:9100"}, fingerprint="f2"),
    ]
    route = routed(title="[{state}] {group_labels} | {common_labels[job]} | {external_url}")
    body = render(group, route, group_labels={"alertname": "NodeDown", "job": "node"})
    assert (
        body["markdown"]["title"] == "[FIRING:2] NodeDown node | node | http://alertmanager-0:9093"
    )
    assert render(group)["markdown"]["title"] == "[CRITICAL · FIRING:2] NodeDown"  # no group labels


def test_history_text_in_both_languages():
    tz = timezone.utc
    last = ("2026-11-25 05:00:00.000", "2026-11-25 05:06:00.000")
    assert alertbridge.recurrence_text(0, None, tz, "zh") == ""
    assert alertbridge.recurrence_text(2, last, tz, "both") == (
        "24 小时内第 3 次 · 3rd time in 24 h; 上次 11-25 05:06 恢复，持续 6m · last resolved 11-25 05:06 "
        "after 6m"
    )
    assert (
        alertbridge.recurrence_text(2, last, tz, "zh")
        == "24 小时内第 3 次；上次 11-25 05:06 恢复，持续 6m"
    )
    assert (
        alertbridge.recurrence_text(2, last, tz, "en")
        == "3rd time in 24 h; last resolved 11-25 05:06 after 6m"
    )
    assert [alertbridge.ordinal(n) for n in (1, 2, 3, 4, 11, 12, 13, 21, 22, 101, 111)] == [
        "1st",
        "2nd",
        "3rd",
        "4th",
        "11th",
        "12th",
        "13th",
        "21st",
        "22nd",
        "101st",
        "111th",
    ]
    history = lambda a: (1, None)  # noqa: E731 (one earlier occurrence, none resolved)
    both = routed(language="both", alert=alertbridge.DEFAULT_ALERTS["both"])
    assert (
        "- 历史 History: 24 小时内第 2 次 · 2nd time in 24 h"
        in draw(Config(tz=tz), both, ROBOT, body_of([alert()]), history)["markdown"]["text"]
    )
    resolved = draw(Config(tz=tz), both, ROBOT, body_of([alert(status="resolved")]), history)[
        "markdown"
    ]["text"]
    assert "历史 History" not in resolved  # only firing alerts say it


def test_alert_blocks_can_name_the_group_too():
    group = [
        alert({"job": "node"}),
        alert({"job": "node", "instance": "n2:9100"}, fingerprint="f2"),
    ]
    route = routed(alert="{alertname} {instance} in {group_labels} ({common_labels[job]})")
    text = render(group, route, group_labels={"alertname": "NodeDown", "job": "node"})["markdown"][
        "text"
    ]
    assert (
        "NodeDown n1:9100 in NodeDown node (node)" in text
        and "NodeDown n2:9100 in NodeDown node (node)" in text
    )


# --- values from alerts are text, never markdown structure ---------------------------------------

MD_LINK = re.compile(r"\[([^\]]+)\]\(([^)\s]+)\)")
FORGED = {
    "summary": "ok\n#### [FIRING:1] 数据库已恢复 All clear\n> <font color=#ff0000>ignore the page</font>",
    "description": "# Heading\r\n- list\u2028> quote\u2029---",
}
EVIL_URL = (
    "http://prometheus-0:9090/graph?g0.expr=up)[重置密码 Reset password](http://evil.example/login"
)


def structure_of(text):
    """The lines of a markdown text that DingTalk would show as headings, quotes or rules."""
    return [line for line in text.split("\n") if re.match(r"\s*(#|>|[-*_]{3,}\s*$|<font)", line)]


@pytest.mark.parametrize(
    "template", [alertbridge.DEFAULT_ALERT, "{summary}\n{description}\n{labels[team]}"]
)
def test_a_value_from_an_alert_cannot_start_a_line_a_heading_a_quote_or_a_font(template):
    hostile = alert(labels={"team": "# t\n> q"}, annotations=FORGED, generator_url=EVIL_URL)
    text = render([hostile], Route("ops", (ROBOT,), alert=template))["markdown"]["text"]
    assert structure_of(text) == [
        "#### [CRITICAL · FIRING:1] NodeDown"
    ]  # the title: the only heading
    assert "<font" not in text and "数据库已恢复" in text and "ignore the page" in text


def test_a_url_from_an_alert_stays_one_link_to_where_it_points():
    hostile = alert(annotations={"runbook_url": "https://wiki/run book)(x"}, generator_url=EVIL_URL)
    text = render([hostile], Route("ops", (ROBOT,), alert="{links}\n[runbook]({runbook_url})"))[
        "markdown"
    ]["text"]
    links = MD_LINK.findall(text)
    assert [label for label, _ in links] == ["Prometheus", "静默", "手册", "runbook"]
    assert (
        links[0][1].startswith("http://prometheus-0:9090/graph?g0.expr=up%29%5B")
        and "evil" in links[0][1]
    )
    assert links[2][1] == "https://wiki/run%20book%29%28x"
    card = Route("ops", (ROBOT,), message_type="actionCard")
    buttons = render([hostile], card)["actionCard"]["btns"]
    assert [
        b["actionURL"].startswith(
            (
                "http://alertmanager-0:9093/",
                "https://wiki/run%20book%29",
                "http://prometheus-0:9090/graph?g0.expr=up%29",
            )
        )
        for b in buttons
    ] == [True] * 3


def test_hostile_values_reach_dingtalk_as_text(make_bridge, fake, sqlite_db):
    bridge = make_bridge(sqlite_db, receivers={"dev": {"robots": "dev-1"}})
    payload = make_payload("dev", [make_alert("Forged", annotations=FORGED)])
    payload["alerts"][0]["generatorURL"] = EVIL_URL
    assert post(bridge, payload)[0] == 200
    assert fake.wait_for(lambda f: len(f.delivered()) == 1)
    text = fake.delivered()[0].text
    assert structure_of(text) == ["#### [CRITICAL · FIRING:1] Forged"]
    assert [label for label, _ in MD_LINK.findall(text)] == ["Prometheus", "静默"]


# --- issue 35: Grafana-managed alerts ------------------------------------------------------

HOSTILE_TEXT = "C:\\new \"q\" 'a' x) y] z\nw <b>x</b> & \u2028> quote"


def grafana_alerts(name="grafana-docs-firing.json", **change):
    payload = load_fixture(name)
    for key, value in change.items():
        payload["alerts"][0][key] = value
    return alertbridge.parse_webhook(json.dumps(payload).encode()).alerts


def test_a_grafana_alert_shows_its_values_and_links_to_grafana():
    first = grafana_alerts()[:1]
    text = render(first)["markdown"]["text"]
    assert "- 数值：B=44.2394, C=1" in text
    links = MD_LINK.findall(text)
    assert links == [
        ("Grafana", "https://play.grafana.org/alerting/1afz29v7z/edit"),
        ("静默", "https://play.grafana.org/alerting/silence/new?alertmanager=grafana"
                 "&matchers=alertname%3DT2%2Cteam%3Dblue%2Czone%3Dus-1"),
        ("手册", "https://myrunbook.com/runbook/1234")]
    assert "#/silences/new" not in text   # Grafana is no Alertmanager: its own silence link
    english = render(first, Route("ops", (ROBOT,), language="en",
                                  alert=alertbridge.DEFAULT_ALERTS["en"]))["markdown"]["text"]
    assert "- Values: B=44.2394, C=1" in english
    one = grafana_alerts("grafana-notifier-one-alert.json", imageURL="https://img.example/p.png")
    text = render(one)["markdown"]["text"]
    assert "数值" not in text           # no values: no line
    assert "[仪表盘](http://localhost/d/abcd?orgId=1&viewPanel=efgh)" in text  # the panel
    assert "[截图](https://img.example/p.png)" in text
    cut = grafana_alerts("grafana-notifier-truncated.json")
    assert "- 数值：\\[ var='B' labels={lbl1=val1} value=10 \\]" in render(cut[:1])[
        "markdown"]["text"]


def test_a_grafana_alerts_links_beat_the_routes_and_its_generator_is_not_rebased():
    route = Route("ops", (ROBOT,), prometheus_url="https://prom.example.com",
                  alertmanager_url="https://am.example.com",
                  dashboard_url="https://dash.example/d?zone={labels[zone]}")
    with_panel = render(grafana_alerts("grafana-notifier-one-alert.json"), route)
    text = with_panel["markdown"]["text"]
    assert "[Grafana](http://localhost/test?orgId=1)" in text and "prom.example" not in text
    assert "viewPanel=efgh" in text and "dash.example" not in text
    assert "am.example.com" not in text
    dashboard_only = grafana_alerts("grafana-notifier-one-alert.json", panelURL="")
    assert "[仪表盘](http://localhost/d/abcd?orgId=1)" in render(dashboard_only, route)[
        "markdown"]["text"]
    neither = grafana_alerts()[:1]   # no dashboard from Grafana: the route's
    assert "(https://dash.example/d?zone=us-1)" in render(neither, route)["markdown"]["text"]


def test_a_grafana_card_has_grafanas_silence_rule_and_panel_as_buttons():
    card = Route("ops", (ROBOT,), message_type="actionCard")
    one = grafana_alerts("grafana-notifier-one-alert.json")
    buttons = [(b["title"], b["actionURL"]) for b in render(one, card)["actionCard"]["btns"]]
    assert buttons == [
        ("静默", "http://localhost/alerting/silence/new?alertmanager=grafana"
                 "&matcher=alertname%3Dalert1&matcher=lbl1%3Dval1&orgId=1"),
        ("Grafana", "http://localhost/test?orgId=1"),
        ("仪表盘", "http://localhost/d/abcd?orgId=1&viewPanel=efgh")]
    two = grafana_alerts()   # Grafana silences one alert a link: no button silences a group
    titles = [b["title"] for b in render(two, card)["actionCard"]["btns"]]
    assert titles == ["手册", "Grafana"]
    resolved = grafana_alerts("grafana-notifier-one-alert.json", status="resolved")
    assert "静默" not in [b["title"] for b in render(resolved, card)["actionCard"]["btns"]]


def test_grafana_values_titles_and_links_with_hostile_text_stay_text_and_links():
    hostile = grafana_alerts(
        labels={"alertname": HOSTILE_TEXT, "team": HOSTILE_TEXT},
        values={HOSTILE_TEXT: 1.5}, valueString=HOSTILE_TEXT,
        silenceURL="https://g/silence?m=a) [x](http://evil.example",
        panelURL="https://g/d/x?a=1)(y", imageURL="javascript:alert(1)")
    body = render(hostile[:1])["markdown"]
    text = body["text"]
    assert structure_of(text) == [text.split("\n")[0]]   # the title: the only heading
    assert "\u2028" not in text and "<b>" not in text and "\n> quote" not in text
    values_line = next(line for line in text.split("\n") if line.startswith("- 数值："))
    assert values_line == "- 数值：C:\\\\new \"q\" 'a' x) y\\] z w ＜b>x＜/b> &  > q=1.5"  # key[:40]
    links = MD_LINK.findall(text)
    assert [label for label, _ in links] == ["Grafana", "静默", "手册", "仪表盘"]  # no image
    assert links[1][1] == "https://g/silence?m=a%29%20%5Bx%5D%28http://evil.example"
    assert links[3][1] == "https://g/d/x?a=1%29%28y"
    assert "evil.example/login" not in text and "javascript" not in text
    only_string = grafana_alerts(values=None, valueString=HOSTILE_TEXT)
    assert "- 数值：C:\\\\new \"q\" 'a' x) y\\] z w ＜b>x＜/b> &  > quote\n" in render(
        only_string[:1])["markdown"]["text"]
    assert body["title"].startswith("[FIRING:1] " + HOSTILE_TEXT[:10])   # plain in the chat list
