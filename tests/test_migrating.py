"""--import-webhook-dingtalk: a prometheus-webhook-dingtalk config.yml becomes the config.ini that
does the same, and what cannot be converted is named, not dropped."""

import os
import pathlib
import subprocess
import sys

import pytest

import alertbridge
from tests.kit import ROOT, SCRIPT

# Its documented format, every key (config/config.go of timonwong/prometheus-webhook-dingtalk).
CONFIG_YML = """\
timeout: 1m30s
templates:
  - /etc/prometheus-webhook-dingtalk/templates/ours.tmpl
targets:
  ops:
    url: https://oapi.dingtalk.com/robot/send?access_token=ops-token
    secret: SECops
    mention:
      all: true
  dba:
    url: https://oapi.dingtalk.com/robot/send?access_token=dba-token
    mention:
      mobiles: ['13800000000', '139xxxx0000']
    message:
      title: '{{ template "ours.title" . }}'
      text: '{{ template "ours.content" . }}'
"""

# The upstream repository, as the search tool's fetch brings it (not committed here).
UPSTREAM = pathlib.Path(
    os.environ.get(
        "ALERTBRIDGE_WEBHOOK_DINGTALK_REPO",
        "/work/.mirror/timonwong+prometheus-webhook-dingtalk/repo",
    )
)


def imported(path):
    return subprocess.run(
        [sys.executable, SCRIPT, "--import-webhook-dingtalk", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
    )


def check_config(path):
    return subprocess.run(
        [sys.executable, SCRIPT, "-c", str(path), "--check-config"],
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_each_target_becomes_a_receiver_and_a_robot_of_its_name(tmp_path):
    source = tmp_path / "config.yml"
    source.write_text(CONFIG_YML, encoding="utf-8")
    done = imported(source)
    assert done.returncode == 0, done.stderr
    converted = tmp_path / "config.ini"
    converted.write_text(done.stdout, encoding="utf-8")
    config = alertbridge.load_config(str(converted))
    # its /dingtalk/NAME/send URLs, on its port: Alertmanager's config stays as it is
    assert (config.service.listen, config.service.port) == ("0.0.0.0", 8060)
    assert config.delivery.timeout == 90
    ops, dba = config.routes["ops"], config.routes["dba"]
    assert [r.name for r in ops.robots] == ["ops"] and ops.at_all
    assert (ops.robots[0].token, ops.robots[0].secret) == ("ops-token", "SECops")
    assert dba.robots[0].token == "dba-token" and dba.at_mobiles == ("13800000000",)
    assert done.stderr.splitlines() == [
        "needs a human: templates: Go templates are not converted: alertbridge's [templates] "
        "(docs/configuration.md) has the fields; the built-in page is already in Chinese",
        "needs a human: [receiver:dba] at_mobiles: '139xxxx0000' is not a phone number; write "
        "the real one",
        "needs a human: [receiver:dba]: its message templates (Go) are not converted; the "
        "receiver uses [templates]",
    ]
    assert done.stdout.count("; NEEDS A HUMAN: ") == 3  # in the file too
    assert check_config(converted).returncode == 0


@pytest.mark.parametrize("example", ["config.example.yml", "contrib/k8s/config/config.yaml"])
def test_its_own_example_configs_convert_and_pass_check_config(tmp_path, example):
    if not (UPSTREAM / "HEAD").exists() and not (UPSTREAM / ".git").exists():
        pytest.skip(f"no copy of timonwong/prometheus-webhook-dingtalk at {UPSTREAM}")
    shown = subprocess.run(
        ["git", "--git-dir", str(UPSTREAM), "show", f"HEAD:{example}"],
        capture_output=True,
        text=True,
    )
    assert shown.returncode == 0, shown.stderr
    source = tmp_path / "config.yml"
    source.write_text(shown.stdout, encoding="utf-8")
    done = imported(source)
    assert done.returncode == 0, done.stderr
    converted = tmp_path / "config.ini"
    converted.write_text(done.stdout, encoding="utf-8")
    checked = check_config(converted)
    assert checked.returncode == 0, checked.stderr
    config = alertbridge.load_config(str(converted))
    assert set(config.routes) == {
        "webhook1",
        "webhook2",
        "webhook_legacy",
        "webhook_mention_all",
        "webhook_mention_users",
    }
    assert config.routes["webhook1"].robots[0].secret == "SEC000000000000000000000"
    assert config.routes["webhook_mention_all"].at_all


def test_without_pyyaml_the_command_says_what_to_install_and_the_daemon_needs_none(tmp_path):
    source = tmp_path / "config.yml"
    source.write_text(CONFIG_YML, encoding="utf-8")
    no_yaml = (
        "import runpy, sys; sys.modules['yaml'] = None; "
        f"sys.argv = ['alertbridge.py', '--import-webhook-dingtalk', {str(source)!r}]; "
        f"runpy.run_path({SCRIPT!r}, run_name='__main__')"
    )
    done = subprocess.run([sys.executable, "-c", no_yaml], capture_output=True, text=True)
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.startswith("--import-webhook-dingtalk reads YAML with PyYAML, which is not")
    assert "yaml" not in (ROOT / "alertbridge.py").read_text().split("def import_webhook")[0]


def test_what_is_not_its_config_is_refused_in_one_line(tmp_path):
    source = tmp_path / "config.yml"
    source.write_text("route:\n  receiver: x\n", encoding="utf-8")  # an alertmanager.yml
    done = imported(source)
    assert done.returncode == 2
    assert done.stderr == f"{source}: no targets: not a prometheus-webhook-dingtalk config\n"
