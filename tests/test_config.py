"""config.ini: the shipped file works, every key is documented, mistakes are named."""

import configparser
import re

import pytest

import alertbridge
from conftest import ROOT


def test_shipped_config_runs_on_the_embedded_default():
    config = alertbridge.load_config(str(ROOT / "config.ini"))
    assert config.database["driver"] == "sqlite"
    assert config.receivers["default"].robots[0].placeholder
    assert config.default_receiver == "default" and config.timezone_name == "Asia/Shanghai"


def test_every_shipped_key_is_documented_in_the_readme():
    parser = configparser.ConfigParser(interpolation=None)
    parser.read(ROOT / "config.ini", encoding="utf-8")
    text = (ROOT / "config.ini").read_text(encoding="utf-8")
    commented = set(re.findall(r"^; (\w+) =", text, re.M))
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    keys = {k for s in parser.sections() for k in parser[s]} | commented
    missing = sorted(k for k in keys if f"`{k}`" not in readme)
    assert missing == []


def test_schema_sql_is_what_the_daemon_creates():
    shipped = (ROOT / "schema.sql").read_text(encoding="utf-8")
    assert alertbridge.MYSQL_SCHEMA in shipped


@pytest.mark.parametrize("text, message", [
    ("[receiver:a]\nrobots = x\n", "[receiver:a] robots: no section [robot:x]"),
    ("[receiver:a]\nrobots =\n", "[receiver:a] robots: list at least one robot"),
    ("[robot:x]\nurl = ftp://x\n[receiver:a]\nrobots = x\n", "[robot:x] url"),
    ("[robot:x]\nurl = https://oapi.dingtalk.com/robot/send\n[receiver:a]\nrobots = x\n", "access_token"),
    ("[alertbridge]\nport = eighty\n", "[alertbridge] port: not an integer"),
    ("[alertbridge]\ntimezone = Mars/Base\n", "unknown time zone"),
    ("[alertbridge]\ndefault_receiver = nope\n[robot:x]\nurl = https://h/r?access_token=t\n"
     "[receiver:a]\nrobots = x\n", "default_receiver"),
    ("[database]\ndriver = oracle\n", "[database] driver"),
    ("[receiver:a]\nrobots = x\nat_all = maybe\n[robot:x]\nurl = https://h/r?access_token=t\n", "at_all"),
    ("[receiver:a]\nrobots = x\nat_mobiles = call-me\n[robot:x]\nurl = https://h/r?access_token=t\n", "at_mobiles"),
    ("[receiver:a]\nrobots = x\nalert = {unclosed\n[robot:x]\nurl = https://h/r?access_token=t\n", "bad template"),
    ("[reciever:a]\nrobots = x\n", "unknown section"),
    ("not an ini file", "line 1: a setting before any [section] header"),
])
def test_config_errors_name_the_section_and_key(tmp_path, text, message):
    path = tmp_path / "config.ini"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(alertbridge.ConfigError) as error:
        alertbridge.load_config(str(path))
    assert message in str(error.value)


def test_robot_repr_and_redaction_hide_secrets():
    robot = alertbridge.Robot("r", "https://h/robot/send?access_token=abc123tok", secret="SECxyz")
    assert "abc123tok" not in repr(robot) and "SECxyz" not in repr(robot)
    assert robot.redact("url ...access_token=abc123tok sign with SECxyz") == "url ...access_token=*** sign with ***"


@pytest.mark.parametrize("url, message", [
    ("https://oapi.dingtalk.com/robot/send?access_token=tok-leak-1234 ; the ops group", "contains a space"),
    ("https://oapi.dingtalk.com:44x/robot/send?access_token=tok-leak-1234", "port is not a number"),
    ("https://oapi.dingtalk.com:99999/robot/send?access_token=tok-leak-1234", "port is not a number"),
    ("https:///robot/send?access_token=tok-leak-1234", "webhook URL"),
])
def test_a_robot_url_that_cannot_work_is_refused_at_load_without_quoting_it(tmp_path, url, message):
    path = tmp_path / "config.ini"
    path.write_text(f"[robot:x]\nurl = {url}\n[receiver:a]\nrobots = x\n", encoding="utf-8")
    with pytest.raises(alertbridge.ConfigError) as error:
        alertbridge.load_config(str(path))
    assert message in str(error.value) and "[robot:x] url" in str(error.value)
    assert "tok-leak" not in str(error.value)


def test_a_secret_with_a_comment_after_it_is_refused(tmp_path):
    path = tmp_path / "config.ini"
    path.write_text("[robot:x]\nurl = https://h/r?access_token=t\nsecret = SECabc123 ; old one\n"
                    "[receiver:a]\nrobots = x\n", encoding="utf-8")
    with pytest.raises(alertbridge.ConfigError) as error:
        alertbridge.load_config(str(path))
    assert "[robot:x] secret: contains a space" in str(error.value) and "SECabc" not in str(error.value)


@pytest.mark.parametrize("text, where", [
    ("[robot:x]\nurl = https://h/r?access_token=t\nSECsupersecret-on-its-own\n", "line 3"),
    ("secret = SECsupersecret-first\n[robot:x]\n", "line 1"),
    ("[robot:x]\nsecret = SECsupersecret-a\nsecret = SECsupersecret-b\n", "line 3: [robot:x] secret is set twice"),
])
def test_a_syntax_error_names_the_line_but_never_quotes_it(tmp_path, text, where):
    path = tmp_path / "config.ini"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(alertbridge.ConfigError) as error:
        alertbridge.load_config(str(path))
    assert where in str(error.value) and "SECsupersecret" not in str(error.value)


def test_a_failed_exchange_never_carries_the_url_or_raises():
    robot = alertbridge.Robot("r", "http://127.0.0.1:9/robot/send?access_token=tok-leak x", secret="SECleak")
    result = alertbridge.post_to_dingtalk(robot, b"{}", 2)          # a URL load would have refused
    assert result.errcode is None and result.outcome == alertbridge.FAILED
    assert "tok-leak" not in result.errmsg and "SECleak" not in result.errmsg
