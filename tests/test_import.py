"""--import-webhook-dingtalk writes YAML values into config.ini: each stays one value, which
config.ini reads back as exactly what the YAML said, or the import refuses it naming its key
(line breaks, U+2028, numbers, lists, booleans where text is meant), and writes nothing."""

import io

import pytest

import alertbridge

TARGET = """\
targets:
  ops:
    url: {url}
    secret: {secret}
"""
URL = "https://oapi.dingtalk.com/robot/send?access_token=tok-ops&x=[robot:evil]&k=v;#%"


def imported(tmp_path, text, name="config.yml"):
    """(exit status, config.ini written, stderr) of importing this YAML."""
    source = tmp_path / name
    source.write_text(text, encoding="utf-8")
    out, err = io.StringIO(), io.StringIO()
    status = alertbridge.import_webhook_dingtalk(str(source), out, err)
    return status, out.getvalue(), err.getvalue(), source


def read_back(tmp_path, ini):
    path = tmp_path / "config.ini"
    path.write_text(ini, encoding="utf-8")
    return alertbridge.load_config(str(path))


def test_values_and_the_files_name_read_back_exactly_as_the_yaml_says(tmp_path):
    """Brackets, `k=v`, `;`, `#`, `%`, quotes and backslashes stay inside their value; the
    file's name, in the header comment, keeps its line break escaped."""
    secret = "SEC;#%'\\\"[receiver:evil]k=v张"
    yaml_text = TARGET.format(url=URL, secret="'" + secret.replace("'", "''") + "'")
    yaml_text += "timeout: 1m30s\n"
    status, ini, err, _ = imported(tmp_path, yaml_text, name="conf\n[robot:evil].yml")
    assert status == 0, err
    config = read_back(tmp_path, ini)
    [robot] = config.routes["ops"].robots
    assert (robot.url, robot.secret) == (URL, secret)
    assert set(config.routes) == {"ops"} and config.delivery.timeout == 90
    assert ini.splitlines()[0].endswith("/conf\\n[robot:evil].yml.")


@pytest.mark.parametrize(
    "field, message",
    [
        ('secret: "SEC\\n[robot:evil]\\nurl = https://evil.example"', "targets.ops.secret: holds "
         "a line break or another control character"),
        ('secret: "SEC\\rurl = x"', "targets.ops.secret: holds a line break or another control "
         "character"),
        ('secret: "SEC\\u2028[receiver:evil]"', "targets.ops.secret: holds a line break or "
         "another control character"),
        ("secret: 12345", "targets.ops.secret: is a number in YAML, not text (quote it)"),
        ("secret: 0x1F", "targets.ops.secret: is a number in YAML, not text (quote it)"),
        ("secret: 1.5", "targets.ops.secret: is a number in YAML, not text (quote it)"),
        ("secret: [a, b]", "targets.ops.secret: is a list in YAML, not text (quote it)"),
        ("secret: yes", "targets.ops.secret: is true or false in YAML, not text (quote it)"),
        ("secret: ' SEC '", "targets.ops.secret: begins or ends with a space"),
        ("secret: '${HOME}'", "targets.ops.secret: holds ${, which config.ini reads as an "
         "environment variable"),
        ("mention: {all: 'false'}", "targets.ops.mention.all: is text in YAML, not true or "
         "false"),
        ("mention: {mobiles: '13800000000'}", "targets.ops.mention.mobiles: is text in YAML, "
         "not a list"),
        ("mention: [all]", "targets.ops.mention: is a list in YAML, not a mapping (all, "
         "mobiles)"),
    ],
)
def test_a_value_config_ini_cannot_hold_is_refused_naming_its_key(tmp_path, field, message):
    text = f"targets:\n  ops:\n    url: {URL}\n    {field}\n"
    status, ini, err, source = imported(tmp_path, text)
    assert (status, ini) == (2, "")
    assert err == f"{source}: {message}: nothing was converted\n"
    assert "SEC" not in err and "12345" not in err  # a secret is never echoed


@pytest.mark.parametrize(
    "text, message",
    [
        ('targets:\n  "ops\\n[robot:evil]": {url: x}\n', "targets: 'ops\\n[robot:evil]' is not "
         "a target name"),
        ("targets:\n  1: {url: x}\n", "targets: '1' is not a target name"),
        ("targets:\n  true: {url: x}\n", "targets: 'True' is not a target name"),
        ("targets:\n  ops: https://x\n", "targets.ops: is text in YAML, not a mapping (url, "
         "secret, mention, message)"),
        ("timeout: 5\ntargets:\n  ops: {url: x}\n", "timeout: not a duration (write 5s or "
         "1m30s, as Go does)"),
        ("timeout: soon\ntargets:\n  ops: {url: x}\n", "timeout: not a duration (write 5s or "
         "1m30s, as Go does)"),
    ],
)
def test_names_targets_and_the_timeout_that_config_ini_cannot_hold_are_refused(
    tmp_path, text, message
):
    status, ini, err, source = imported(tmp_path, text)
    assert (status, ini) == (2, "")
    assert err.startswith(f"{source}: {message}") and err.endswith(": nothing was converted\n")


def test_null_is_unset_and_a_mobile_written_as_a_number_is_left_to_a_human(tmp_path):
    """YAML reads 13800000000 as a number (0755 as 493): the digits as written are gone, so it
    is not guessed at; false stays false, null is unset."""
    text = (
        f"timeout: null\ntargets:\n  ops:\n    url: {URL}\n    secret: null\n"
        "    mention: {all: false, mobiles: [13800000000, '13900000000']}\n  dev:\n"
    )
    status, ini, err, _ = imported(tmp_path, text)
    assert status == 0, err
    assert "needs a human: [receiver:ops] at_mobiles: mobile 1 is a number in YAML" in err
    assert "needs a human: [robot:dev] url: the target has none" in err
    with_url = ini.replace("[robot:dev]\nurl = \n", "[robot:dev]\nurl = " + URL + "\n")
    config = read_back(tmp_path, with_url)
    ops = config.routes["ops"]
    assert ops.at_mobiles == ("13900000000",) and not ops.at_all
    assert ops.robots[0].secret == "" and config.delivery.timeout == alertbridge.Delivery.timeout
