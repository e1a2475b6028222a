"""alertbridge-rules.yml: valid for Prometheus, unit-tested with promtool, true to the daemon's
metrics, and every runbook_url pointing at an anchor the README has."""

import re
import shutil
import subprocess

import pytest
import yaml

from tests.kit import IN_CI, ROOT, get, make_alert, make_payload, post, wait_until

RULES = ROOT / "alertbridge-rules.yml"
PROMTOOL = shutil.which("promtool")


def rules():
    return [rule for group in yaml.safe_load(RULES.read_text())["groups"] for rule in group["rules"]]


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
    tested = set(re.findall(r"alertname: (\w+)", (ROOT / "tests/alertbridge-rules.test.yml").read_text()))
    assert tested == {rule["alert"] for rule in rules()}


def test_each_rule_has_a_severity_summary_description_and_a_runbook_in_both_readmes():
    anchors = {path: set(re.findall(r'<a id="(runbook-[a-z-]+)"></a>', (ROOT / path).read_text(encoding="utf-8")))
               for path in ("README.md", "README.zh-CN.md")}
    for rule in rules():
        assert rule["labels"]["severity"] in ("critical", "warning"), rule["alert"]
        assert rule["annotations"]["summary"] and rule["annotations"]["description"], rule["alert"]
        url = rule["annotations"]["runbook_url"]
        assert url.startswith("https://github.com/your-org/alertbridge/blob/main/README.md#runbook-"), url
        for path, found in anchors.items():
            assert url.split("#")[1] in found, f"{rule['alert']}: no anchor {url.split('#')[1]} in {path}"


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


def test_the_rules_use_the_metrics_and_labels_the_daemon_exposes(make_bridge, fake, sqlite_db):
    """A metric renamed, or a label dropped, would leave a rule silently never firing."""
    receivers = {"dev": {"robots": "dev-1"}, "stuck": {"robots": "unset"}}
    robots_extra = "[robot:unset]\nurl = https://oapi.dingtalk.com/robot/send?access_token=CHANGE_ME\n"
    bridge = make_bridge(sqlite_db, receivers=receivers, delivery={"max_age": "1"}, extra=robots_extra)
    assert post(bridge, make_payload("dev", [make_alert()]))[0] == 200
    assert post(bridge, make_payload("stuck", [make_alert()]))[0] == 200     # no robot: it expires
    assert wait_until(lambda: 'alertbridge_messages_expired_total{receiver="stuck"}' in bridge.render_metrics())
    assert fake.wait_for(lambda f: len(f.delivered()) == 1)
    exposed = series(get(bridge.address, "/metrics")[1])
    for rule in rules():
        text = rule["expr"] + " ".join(rule["annotations"].values())
        for name in set(re.findall(r"\balertbridge_\w+", text)) - {"alertbridge_cluster_role"}:
            assert name in exposed, f"{rule['alert']}: the daemon has no metric {name}"
            used = set(re.findall(name + r"\{([^}]*)\}", rule["expr"]))
            used = {label for matchers in used for label in re.findall(r"(\w+)=", matchers)}
            used |= set(re.findall(r"\$labels\.(\w+)", text)) - {"instance", "job"}
            assert used <= exposed[name], f"{rule['alert']}: {name} has no label {used - exposed[name]}"
