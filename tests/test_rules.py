"""alertbridge-rules.yml: valid for Prometheus, unit-tested with promtool, true to the daemon's
metrics, and every runbook_url pointing at an anchor the README has."""

import re
import shutil
import subprocess

import pytest
import yaml

from tests.kit import (
    DEV,
    IN_CI,
    ROOT,
    app_config,
    get,
    make_alert,
    make_payload,
    post,
    wait_until,
)

RULES = ROOT / "alertbridge-rules.yml"
PROMTOOL = shutil.which("promtool")


def rules():
    return [
        rule for group in yaml.safe_load(RULES.read_text())["groups"] for rule in group["rules"]
    ]


def promtool(*args):
    if not PROMTOOL:
        if IN_CI:
            pytest.fail("promtool is required in CI (tests/run installs Debian's prometheus)")
        pytest.skip("promtool not installed (Debian package prometheus)")
    return subprocess.run([PROMTOOL, *args], capture_output=True, text=True, cwd=ROOT, timeout=120)


def test_promtool_checks_the_rules():
    result = promtool("check", "rules", str(RULES))
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(rules())} rules found" in result.stdout


def test_promtool_unit_tests_each_rule():
    result = promtool("test", "rules", "tests/alertbridge-rules.test.yml")
    assert result.returncode == 0, result.stdout + result.stderr
    tested = set(
        re.findall(r"alertname: (\w+)", (ROOT / "tests/alertbridge-rules.test.yml").read_text())
    )
    assert tested == {rule["alert"] for rule in rules()}


def test_each_rule_has_a_severity_summary_description_and_a_runbook_in_both_readmes():
    anchors = {
        path: set(
            re.findall(r'<a id="(runbook-[a-z-]+)"></a>', (ROOT / path).read_text(encoding="utf-8"))
        )
        for path in ("README.md", "README.zh-CN.md")
    }
    for rule in rules():
        assert rule["labels"]["severity"] in ("critical", "warning"), rule["alert"]
        assert rule["annotations"]["summary"] and rule["annotations"]["description"], rule["alert"]
        url = rule["annotations"]["runbook_url"]
        assert url.startswith(
            "https://github.com/your-org/alertbridge/blob/main/README.md#runbook-"
        ), url
        for path, found in anchors.items():
            assert url.split("#")[1] in found, (
                f"{rule['alert']}: no anchor {url.split('#')[1]} in {path}"
            )


def series(metrics_text):
    """{metric name: set of label names of its samples} from the text format."""
    found = {}
    for line in metrics_text.splitlines():
        if line.startswith("# HELP "):
            found.setdefault(line.split()[2], set())
        elif line and not line.startswith("#"):
            name, _, labels = line.split(" ")[0].partition("{")
            found.setdefault(name, set()).update(re.findall(r'(\w+)="', labels))
    return found


def test_the_rules_use_the_metrics_and_labels_the_daemon_exposes(make_bridge, fake, sqlite_db, app):
    """A metric renamed, or a label dropped, would leave a rule silently never firing."""
    receivers = {"dev": {"robots": "dev-1"}, "stuck": {"robots": "unset"}}
    robots_extra = (
        "[robot:unset]\nurl = https://oapi.dingtalk.com/robot/send?access_token=CHANGE_ME\n"
    )
    bridge = make_bridge(
        sqlite_db,
        receivers=receivers,
        delivery={"max_age": "1"},
        extra=robots_extra + app_config(app),
    )
    assert post(bridge, make_payload("dev", [make_alert()]))[0] == 200
    assert post(bridge, make_payload("stuck", [make_alert()]))[0] == 200  # no robot: it expires
    assert wait_until(
        lambda: (
            'alertbridge_messages_expired_total{receiver="stuck"}' in bridge.probes.render_metrics()
        )
    )
    assert fake.wait_for(lambda f: len(f.delivered()) == 1)
    exposed = series(get(bridge.address, "/metrics")[1])
    for rule in rules():
        text = rule["expr"] + " ".join(rule["annotations"].values())
        for name in set(re.findall(r"\balertbridge_\w+", text)) - {"alertbridge_cluster_role"}:
            assert name in exposed, f"{rule['alert']}: the daemon has no metric {name}"
            used = set(re.findall(name + r"\{([^}]*)\}", rule["expr"]))
            used = {label for matchers in used for label in re.findall(r"(\w+)=", matchers)}
            used |= set(re.findall(r"\$labels\.(\w+)", text)) - {"instance", "job"}
            assert used <= exposed[name], (
                f"{rule['alert']}: {name} has no label {used - exposed[name]}"
            )


def scraped(text):
    """{series as promtool writes it: value} of a /metrics text, as Prometheus would store it
    (job and instance added); histograms left out, no rule uses them."""
    from prometheus_client.parser import text_string_to_metric_families

    found = {}
    for family in text_string_to_metric_families(text):
        if family.type == "histogram":
            continue
        for sample in family.samples:
            labels = {"job": "alertbridge", "instance": "bridge-1:9097", **sample.labels}
            matchers = ", ".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
            found[f"{sample.name}{{{matchers}}}"] = sample.value
    return found


def test_every_rule_fires_on_what_a_running_daemon_really_exposes(
    make_bridge, fake, sqlite_db, tmp_path
):
    """Rules checked on hand-written series alone missed that a counter first exposed at 1 has
    not increased: AlertbridgeMessagesExpired could not fire on the first lost page. Here every
    series is what the daemon exposed: absent before it ran, then as scraped at its start, then
    as scraped after a message expired and a robot was throttled twice."""
    receivers = {"dev": {"robots": "dev-1"}, "stuck": {"robots": "unset"}}
    robots_extra = (
        "[robot:unset]\nurl = https://oapi.dingtalk.com/robot/send?access_token=CHANGE_ME\n"
    )
    bridge = make_bridge(
        sqlite_db,
        receivers=receivers,
        extra=robots_extra,
        delivery={"max_age": "1", "rate_window": "0.2", "throttle_seconds": "1"},
    )
    at_start = scraped(get(bridge.address, "/metrics")[1])
    fake.fail_next(DEV, 410100, times=2)
    assert post(bridge, make_payload("dev", [make_alert()]))[0] == 200
    assert post(bridge, make_payload("stuck", [make_alert()]))[0] == 200  # no robot: it expires
    assert fake.wait_for(lambda f: len(f.delivered()) == 1, timeout=30)
    assert wait_until(
        lambda: (
            'alertbridge_messages_expired_total{receiver="stuck"} 1'
            in bridge.probes.render_metrics()
        )
    )
    after = scraped(get(bridge.address, "/metrics")[1])
    common = {"job": "alertbridge", "instance": "bridge-1:9097"}
    assert_rules_fire(
        at_start,
        after,
        {
            "AlertbridgeMessagesExpired": [{"severity": "critical", **common, "receiver": "stuck"}],
            "AlertbridgeRobotThrottled": [
                {
                    "severity": "warning",
                    **common,
                    "receiver": "dev",
                    "robot": "dev-1",
                    "kind": "dingtalk",
                }
            ],
            "AlertbridgeRobotDisabled": [
                {"severity": "warning", **common, "robot": "unset", "kind": "dingtalk"}
            ],
        },
        tmp_path,
    )


def test_the_app_rules_fire_on_what_a_daemon_with_a_broken_app_exposes(
    make_bridge, fake, sqlite_db, app, tmp_path
):
    """An app whose secret DingTalk refuses: no Stream connection is ever made and no card goes
    out. Its gauge was set only once connected, so the rule watching it could never fire."""
    receivers = {"ops": {"robots": "ops-1", "app_group": "cid-ops"}, "dev": {"robots": "dev-1"}}
    extra = app_config(app).replace(app.client_secret, "a-wrong-secret-0000")
    bridge = make_bridge(sqlite_db, receivers=receivers, extra=extra)
    at_start = scraped(get(bridge.address, "/metrics")[1])
    assert (
        at_start['alertbridge_app_stream_connected{instance="bridge-1:9097", job="alertbridge"}']
        == 0
    )
    assert post(bridge, make_payload("ops", [make_alert()]))[0] == 200
    assert fake.wait_for(lambda f: len(f.delivered()) == 1)  # through the robots: not lost
    after = scraped(get(bridge.address, "/metrics")[1])
    assert_rules_fire(
        at_start,
        after,
        {
            "AlertbridgeAppStreamDown": [{"severity": "warning", "job": "alertbridge"}],
            "AlertbridgeAppCardsRefused": [
                {
                    "severity": "warning",
                    "job": "alertbridge",
                    "instance": "bridge-1:9097",
                    "api": "token",
                    "outcome": "refused",
                }
            ],
        },
        tmp_path,
    )


def assert_rules_fire(at_start, after, firing, tmp_path):
    """promtool: given the series a daemon exposed (absent before it ran, then as scraped at its
    start for a few minutes, then as scraped later), the rules in `firing` fire with those
    labels at 10 minutes, and the others stay quiet."""

    def values(series):
        start = f"{at_start[series]:g}" if series in at_start else "_"
        return " ".join(["_", "_"] + [start] * 3 + [f"{after[series]:g}"] * 8)

    series = [{"series": s, "values": values(s)} for s in sorted(after)]
    series.append(
        {"series": 'up{instance="bridge-1:9097", job="alertbridge"}', "values": "_ _ 1x10"}
    )
    groups = yaml.safe_load(RULES.read_text())["groups"]
    for group in groups:  # the annotations are tested on hand-written series
        for rule in group["rules"]:
            rule.pop("annotations")
    (tmp_path / "rules.yml").write_text(yaml.safe_dump({"groups": groups}))
    test = {
        "rule_files": [str(tmp_path / "rules.yml")],
        "evaluation_interval": "1m",
        "tests": [
            {
                "interval": "1m",
                "input_series": series,
                "alert_rule_test": [
                    {
                        "eval_time": "10m",
                        "alertname": rule["alert"],
                        "exp_alerts": [
                            {"exp_labels": labels} for labels in firing.get(rule["alert"], [])
                        ],
                    }
                    for rule in rules()
                ],
            }
        ],
    }
    (tmp_path / "test.yml").write_text(yaml.safe_dump(test))
    result = promtool("test", "rules", str(tmp_path / "test.yml"))
    assert result.returncode == 0, result.stdout + result.stderr
