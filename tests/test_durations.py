"""Durations: one reader (alertbridge.duration_seconds) for every duration a user writes, so a
config key, an escalation step and a command all take 90, 90s, 10m, 4h, 1d and 1h30m, and
refuse anything else with the key and the forms named."""

import dataclasses

import pytest

import alertbridge
from tests.test_config import config_error, documented, readme_table

# Every duration key of config.ini, written out: a key that stopped reading durations fails.
DURATION_KEYS = [
    ("alertbridge", "request_timeout"),
    ("delivery", "rate_window"),
    ("delivery", "throttle_seconds"),
    ("delivery", "max_age"),
    ("delivery", "timeout"),
    ("delivery", "retry_base"),
    ("delivery", "retry_max"),
    ("cluster", "lease"),
    ("cluster", "duplicate_window"),
    ("cluster", "presumed_alone"),
    ("oncall", "link_ttl"),
    ("oncall", "follow_interval"),
    ("oncall", "silence_max"),
    ("app", "timeout"),
]
SECTIONS = {
    "alertbridge": ("service", alertbridge.Service),
    "delivery": ("delivery", alertbridge.Delivery),
    "cluster": ("cluster", alertbridge.Cluster),
    "oncall": ("oncall", alertbridge.OnCall),
    "app": ("app", alertbridge.App),
}
FORMS = [("90", 90), ("90s", 90), ("10m", 600), ("4h", 4 * 3600), ("1d", 86400), ("1h30m", 5400)]
MINIMAL = "[receiver:ops]\nrobots = r\n\n[robot:r]\nurl = https://x/?access_token=t\n"
APP = "client_id = ding-app\nclient_secret = app-secret-123456\n"


def loaded(tmp_path, section, key, value):
    path = tmp_path / "config.ini"
    extra = APP if section == "app" else ""
    path.write_text(f"[{section}]\n{key} = {value}\n{extra}\n{MINIMAL}", encoding="utf-8")
    config = alertbridge.load_config(str(path))
    return getattr(getattr(config, SECTIONS[section][0]), key)


@pytest.mark.parametrize("section, key", DURATION_KEYS)
def test_every_duration_key_takes_seconds_units_and_days(tmp_path, section, key):
    assert {w: loaded(tmp_path, section, key, w) for w, _ in FORMS} == dict(FORMS)


def test_the_keys_read_as_durations_are_every_duration_key():
    read = {
        (name, f.name)
        for name, (_, cls) in SECTIONS.items()
        for f in dataclasses.fields(cls)
        if f.metadata.get("duration")
    }
    assert read == set(DURATION_KEYS)


@pytest.mark.parametrize(
    "written", ["1.2.3s", "ten", "1y", "-5", "5 m", "1D", "1e3", "²", "٣s", "inf", "9" * 400, ""]
)
def test_what_is_no_duration_is_refused_naming_the_key_and_the_forms(tmp_path, written):
    message = config_error(tmp_path, f"[delivery]\nmax_age = {written}\n{MINIMAL}")
    assert message == "[delivery] max_age: not a duration (write 90, 90s, 10m, 4h or 1d)"


def test_a_duration_under_the_keys_minimum_says_so_in_seconds(tmp_path):
    message = config_error(tmp_path, f"[oncall]\nsilence_max = 30s\n{MINIMAL}")
    assert message == "[oncall] silence_max: must be at least 60 seconds"


def test_the_one_reader_of_durations():
    forms = FORMS + [("0.05", 0.05), ("1.5h", 5400), ("1d12h", 129600), ("500ms", 0.5),
                     (" 2d ", 172800)]
    assert {w: alertbridge.duration_seconds(w) for w, _ in forms} == pytest.approx(dict(forms))
    nothing = ["1.2.3s", "²", "1e3", "9" * 400 + "d", "h", "1h 30m", "1d-1h", None, 5]
    assert [w for w in nothing if alertbridge.duration_seconds(w) is not None] == []


ESCALATION = """
[person:lisi]
name = 李四
mobile = 13800000002

[escalation:slow]
steps =
    {first} = lisi
    {second} = lisi

[receiver:ops]
robots = r
escalation = slow

[robot:r]
url = https://x/?access_token=t
"""


def test_escalation_steps_take_the_same_forms(tmp_path):
    path = tmp_path / "config.ini"
    path.write_text(ESCALATION.format(first="600", second="1d"), encoding="utf-8")
    steps = alertbridge.load_config(str(path)).routes["ops"].escalation.steps
    assert [step.after for step in steps] == [600, 86400]


def test_an_escalation_step_no_duration_reads_is_a_config_error_not_a_crash(tmp_path):
    message = config_error(tmp_path, ESCALATION.format(first="1.2.3m", second="1d"))
    assert message.startswith("[escalation:slow] steps: entry 1: write AFTER = ")


def test_the_oncall_table_documents_every_key_with_the_default_the_code_has():
    table = readme_table("[oncall]")
    assert set(table) == {f.name for f in dataclasses.fields(alertbridge.OnCall)}
    for f in dataclasses.fields(alertbridge.OnCall):
        assert table[f.name] == documented(f.default), f.name
