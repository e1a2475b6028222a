"""config.ini: the shipped file works, every key is documented, mistakes are named."""

import configparser
import dataclasses
import re
import subprocess
import sys

import pytest

import alertbridge
from tests.kit import ROOT

README = (ROOT / "docs" / "configuration.md").read_text(encoding="utf-8")


def test_shipped_config_runs_on_the_embedded_default():
    config = alertbridge.load_config(str(ROOT / "config.ini"))
    assert config.database.driver == "sqlite"
    assert config.routes["default"].robots[0].placeholder
    assert (
        config.service.default_receiver == "default" and config.service.timezone == "Asia/Shanghai"
    )


def config_error(tmp_path, text):
    """What load_config says of a config.ini with this text."""
    path = tmp_path / "config.ini"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(alertbridge.ConfigError) as error:
        alertbridge.load_config(str(path))
    return str(error.value)


def readme_table(heading):
    """{key: default cell} of the README's table under ### `heading`."""
    text = README[README.index(f"### `{heading}`") :]
    table = text[text.index("| key |") :].split("\n\n")[0]
    cells = [[c.strip() for c in line.strip("|").split("|")] for line in table.splitlines()[2:]]
    return {key.strip("`"): default for key, default, *_ in cells}


def documented(value):
    if isinstance(value, bool):
        return f"`{str(value).lower()}`"
    if isinstance(value, float):
        return f"`{value:g}`"
    if isinstance(value, tuple):  # a list of words, as config.ini writes it
        return f"`{', '.join(value)}`"
    return f"`{value}`" if value != "" else "*(none)*"


@pytest.mark.parametrize(
    "heading, section",
    [
        ("[alertbridge]", alertbridge.Service),
        ("[database]", alertbridge.Database),
        ("[auth]", alertbridge.Auth),
        ("[delivery]", alertbridge.Delivery),
        ("[cluster]", alertbridge.Cluster),
        ("[app]", alertbridge.App),
    ],
)
def test_the_readme_documents_every_key_with_the_default_the_code_has(heading, section):
    table = readme_table(heading)
    assert set(table) == {f.name for f in dataclasses.fields(section)}
    for f in dataclasses.fields(section):
        if f.default == "" and ("STATE_DIR" in table[f.name] or table[f.name].startswith("*(the")):
            continue  # derived: from state_dir, the host
        assert table[f.name] == documented(f.default), f.name


def test_the_readme_documents_every_key_of_robots_and_receivers():
    robot_keys = {f.name for f in dataclasses.fields(alertbridge.Robot)} - {"name"}
    assert set(readme_table("[robot:NAME]")) == robot_keys | {"token"}  # the url's, or apart
    route_keys = {f.name for f in dataclasses.fields(alertbridge.Route)} - {"name"}
    documented_keys = {
        k for cell in readme_table("[receiver:NAME]") for k in cell.replace("`", "").split(", ")
    }
    assert documented_keys == route_keys
    assert readme_table("[templates]")["title"] == f"`{alertbridge.Templates.title}`"


def test_the_readme_gives_each_receiver_key_the_default_the_code_has():
    """A receiver's defaults: literal ones as Route has them, the others from [delivery] and
    [templates], whose defaults Route takes."""
    route, table = alertbridge.Route("x", ()), readme_table("[receiver:NAME]")
    for cell, default in table.items():
        for key in cell.replace("`", "").split(", "):
            value = getattr(route, key)
            if default == "from `[delivery]`":
                wanted = getattr(alertbridge.Delivery, key)
                assert value == (
                    alertbridge._words(wanted) if isinstance(value, tuple) else wanted
                ), key
            elif default == "from `[templates]`":  # an alert block unset: the language's
                wanted = getattr(alertbridge.Templates, key)
                assert value == (wanted or alertbridge.DEFAULT_ALERTS[route.language]), key
            elif default == "*required*":
                assert value == (), key
            elif default in ("*(none)*", "*(any)*"):
                assert value in ((), "", None), key
            else:
                assert default == documented(value), key


def test_every_shipped_key_is_documented_in_the_readme():
    parser = configparser.ConfigParser(interpolation=None)
    parser.read(ROOT / "config.ini", encoding="utf-8")
    text = (ROOT / "config.ini").read_text(encoding="utf-8")
    commented = set(re.findall(r"^; (\w+) =", text, re.M))
    readme = README
    keys = {k for s in parser.sections() for k in parser[s]} | commented
    missing = sorted(k for k in keys if f"`{k}`" not in readme)
    assert missing == []


def test_schema_sql_is_what_the_daemon_creates():
    shipped = (ROOT / "schema.sql").read_text(encoding="utf-8")
    assert alertbridge.MYSQL_SCHEMA in shipped


@pytest.mark.parametrize(
    "text, message",
    [
        ("[receiver:a]\nrobots = x\n", "[receiver:a] robots: no section [robot:x]"),
        ("[receiver:a]\nrobots =\n", "[receiver:a] robots: list at least one robot"),
        ("[robot:x]\nurl = ftp://x\n[receiver:a]\nrobots = x\n", "[robot:x] url"),
        (
            "[robot:x]\nurl = https://oapi.dingtalk.com/robot/send\n[receiver:a]\nrobots = x\n",
            "access_token",
        ),
        (
            "[robot:x]\nurl = https://oapi.dingtalk.com/robot/send?access_token=t\nkind = pager\n"
            "[receiver:a]\nrobots = x\n",
            "[robot:x] kind: one of dingtalk",
        ),
        ("[alertbridge]\nport = eighty\n", "[alertbridge] port: not an integer"),
        ("[alertbridge]\ntimezone = Mars/Base\n", "unknown time zone"),
        (
            "[alertbridge]\ndefault_receiver = nope\n[robot:x]\nurl = https://h/r?access_token=t\n"
            "[receiver:a]\nrobots = x\n",
            "default_receiver",
        ),
        ("[database]\ndriver = oracle\n", "[database] driver"),
        (
            "[receiver:a]\nrobots = x\nat_all = maybe\n[robot:x]\nurl = "
            "https://h/r?access_token=t\n",
            "at_all",
        ),
        (
            "[receiver:a]\nrobots = x\nat_mobiles = call-me\n[robot:x]\nurl = "
            "https://h/r?access_token=t\n",
            "at_mobiles",
        ),
        (
            "[receiver:a]\nrobots = x\nalert = {unclosed\n[robot:x]\nurl = "
            "https://h/r?access_token=t\n",
            "bad template",
        ),
        ("[reciever:a]\nrobots = x\n", "unknown section"),
        ("not an ini file", "line 1: a setting before any [section] header"),
    ],
)
def test_config_errors_name_the_section_and_key(tmp_path, text, message):
    error = config_error(tmp_path, text)
    assert message in error


def test_robot_repr_and_redaction_hide_secrets():
    robot = alertbridge.Robot("r", "https://h/robot/send?access_token=abc123tok", secret="SECxyz")
    assert "abc123tok" not in repr(robot) and "SECxyz" not in repr(robot)
    assert (
        robot.redact("url ...access_token=abc123tok sign with SECxyz")
        == "url ...access_token=*** sign with ***"
    )


@pytest.mark.parametrize(
    "url, message",
    [
        (
            "https://oapi.dingtalk.com/robot/send?access_token=tok-leak-1234 ; the ops group",
            "contains a space",
        ),
        (
            "https://oapi.dingtalk.com:44x/robot/send?access_token=tok-leak-1234",
            "port is not a number",
        ),
        (
            "https://oapi.dingtalk.com:99999/robot/send?access_token=tok-leak-1234",
            "port is not a number",
        ),
        ("https:///robot/send?access_token=tok-leak-1234", "webhook URL"),
    ],
)
def test_a_robot_url_that_cannot_work_is_refused_at_load_without_quoting_it(tmp_path, url, message):
    error = config_error(tmp_path, f"[robot:x]\nurl = {url}\n[receiver:a]\nrobots = x\n")
    assert message in error and "[robot:x] url" in error
    assert "tok-leak" not in error


def test_a_secret_with_a_comment_after_it_is_refused(tmp_path):
    error = config_error(
        tmp_path,
        "[robot:x]\nurl = https://h/r?access_token=t\nsecret = SECabc123 ; old one\n"
        "[receiver:a]\nrobots = x\n",
    )
    assert "[robot:x] secret: contains a space" in error and "SECabc" not in error


@pytest.mark.parametrize(
    "text, where",
    [
        ("[robot:x]\nurl = https://h/r?access_token=t\nSECsupersecret-on-its-own\n", "line 3"),
        ("secret = SECsupersecret-first\n[robot:x]\n", "line 1"),
        (
            "[robot:x]\nsecret = SECsupersecret-a\nsecret = SECsupersecret-b\n",
            "line 3: [robot:x] secret is set twice",
        ),
    ],
)
def test_a_syntax_error_names_the_line_but_never_quotes_it(tmp_path, text, where):
    error = config_error(tmp_path, text)
    assert where in error and "SECsupersecret" not in error


def test_timezone_works_without_a_time_zone_database(tmp_path):
    """A minimal container has no tzdata: China's zone (the default) still loads, as +08:00."""
    script = (
        "import alertbridge; tz = alertbridge.load_timezone('Asia/Shanghai'); "
        "print(tz.utcoffset(None))"
    )
    result = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
        env={"PYTHONTZPATH": str(tmp_path), "PATH": "/usr/bin:/bin"},
    )
    assert result.returncode == 0 and result.stdout.strip() == "8:00:00", result.stderr


ROBOT_X = "[robot:x]\nurl = https://oapi.dingtalk.com/robot/send?access_token=t\n"


def test_a_receivers_mentions_buttons_and_links_are_read(tmp_path):
    path = tmp_path / "config.ini"
    path.write_text(
        ROBOT_X
        + """[receiver:ops]
robots = x
at_user_ids = manager7021
at_mobiles_from = owner_mobile, phone
at_user_ids_from = oncall
at_map_label = team
at_map =
    dba = 13800000000, manager01, id:0123
    web = +86-13900000000
message_type = ActionCard
send_resolved = false
dashboard_url = https://grafana/d/x?var-instance={instance}
prometheus_url = https://prom.example.com/
alertmanager_url = https://am.example.com/am
""",
        encoding="utf-8",
    )
    route = alertbridge.load_config(str(path)).routes["ops"]
    assert route.at_map == (
        ("dba", ("13800000000",), ("manager01", "0123"), ()),
        ("web", ("+86-13900000000",), (), ()),
    )
    assert (route.at_user_ids, route.at_mobiles_from, route.at_user_ids_from) == (
        ("manager7021",),
        ("owner_mobile", "phone"),
        ("oncall",),
    )
    assert (route.message_type, route.send_resolved) == ("actionCard", False)
    assert (route.prometheus_url, route.alertmanager_url) == (
        "https://prom.example.com",
        "https://am.example.com/am",
    )


@pytest.mark.parametrize(
    "lines, message",
    [
        ("at_map_label = team\nat_map =\n    dba 13800000000\n", "at_map: entry 1: write VALUE ="),
        (
            "at_map_label = team\nat_map =\n    dba = @all\n",
            "at_map: entry 1: not a list of phone numbers",
        ),
        ("at_map =\n    dba = 13800000000\n", "at_map: set at_map_label"),
        ("at_user_ids = all\n", "at_user_ids: not a list of DingTalk user ids"),
        ("message_type = feedCard\n", "message_type: must be markdown or actionCard"),
        ("prometheus_url = prometheus-0:9090\n", "prometheus_url: not an http(s) URL"),
        ("alertmanager_url = https://am/?x=1\n", "alertmanager_url: not an http(s) URL"),
        ("dashboard_url = https://g/{instance\n", "dashboard_url: bad template"),
    ],
)
def test_bad_mention_button_and_link_settings_are_named(tmp_path, lines, message):
    assert message in config_error(tmp_path, ROBOT_X + "[receiver:ops]\nrobots = x\n" + lines)


CLUSTERED = (
    "[database]\ndriver = mysql\n[receiver:x]\nrobots = r\n[robot:r]\n"
    "url = https://oapi.dingtalk.com/robot/send?access_token=t\n[cluster]\nenabled = true\n"
)


@pytest.mark.parametrize("instance", ["a" * 65, "two words", "ops/1", "-x", "名字"])
def test_a_cluster_instance_name_is_one_word_that_fits_its_columns(tmp_path, instance):
    """A name longer than the columns made every statement fail: the instance never led."""
    assert config_error(tmp_path, CLUSTERED + f"instance = {instance}\n") == (
        "[cluster] instance: 1 to 64 letters, digits, dots, dashes or underscores, unique to each "
        "instance"
    )


def test_a_host_name_that_cannot_name_an_instance_asks_for_one(tmp_path, monkeypatch):
    monkeypatch.setattr(
        alertbridge.socket, "gethostname", lambda: "node-" + "x" * 70 + ".example.com"
    )
    assert config_error(tmp_path, CLUSTERED).startswith(
        "[cluster] instance (unset: the host's name): 1 to 64 "
    )
    path = tmp_path / "ok.ini"
    path.write_text(CLUSTERED + "instance = alertbridge-0.prod_1\n")
    assert alertbridge.load_config(str(path)).cluster.instance == "alertbridge-0.prod_1"


ROBOT_APART = """
[receiver:default]
robots = r
[robot:r]
url = https://oapi.dingtalk.com/robot/send
token_file = ${CREDENTIALS_DIRECTORY}/r.token
secret_file = ${CREDENTIALS_DIRECTORY}/r.secret
[auth]
bearer_token = ${AM_TOKEN}
[database]
password_file = db.password
"""


def test_secrets_come_from_files_and_the_environment(tmp_path, monkeypatch):
    """As systemd's LoadCredential= gives them: files in $CREDENTIALS_DIRECTORY; or variables."""
    credentials = tmp_path / "credentials"
    credentials.mkdir()
    (credentials / "r.token").write_text("tok123\n")
    (credentials / "r.secret").write_text("SECabc\n")
    (tmp_path / "db.password").write_text("pw\n")
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(credentials))
    monkeypatch.setenv("AM_TOKEN", "bearer-xyz")
    path = tmp_path / "config.ini"
    path.write_text(ROBOT_APART)
    config = alertbridge.load_config(str(path))
    robot = config.routes["default"].robots[0]
    assert robot.url == "https://oapi.dingtalk.com/robot/send?access_token=tok123"
    assert (robot.token, robot.secret) == ("tok123", "SECabc")
    assert config.auth.bearer_token == "bearer-xyz" and config.database.password == "pw"
    checked = subprocess.run(
        [sys.executable, str(ROOT / "alertbridge.py"), "-c", str(path), "--check-config"],
        capture_output=True,
        text=True,
    )
    assert checked.returncode == 0, checked.stderr
    for secret in ("tok123", "SECabc", "bearer-xyz"):
        assert secret not in checked.stdout + checked.stderr


@pytest.mark.parametrize(
    "change, message",
    [
        ({}, "[robot:r] secret_file: the environment has no CREDENTIALS_DIRECTORY"),
        (
            {"CREDENTIALS_DIRECTORY": "/nonexistent"},
            "[robot:r] secret_file: cannot read /nonexistent/r.secret: No such file or directory",
        ),
    ],
)
def test_a_secret_that_cannot_be_read_is_named_not_left_empty(
    tmp_path, monkeypatch, change, message
):
    monkeypatch.delenv("CREDENTIALS_DIRECTORY", raising=False)
    monkeypatch.setenv("AM_TOKEN", "bearer-xyz")
    (tmp_path / "db.password").write_text("pw\n")
    for name, value in change.items():
        monkeypatch.setenv(name, value)
    assert config_error(tmp_path, ROBOT_APART) == message


def test_a_secret_set_twice_or_a_token_in_both_places_is_refused(tmp_path):
    both = "[receiver:default]\nrobots = r\n[robot:r]\nurl = https://x/robot/send?access_token=a\n"
    assert config_error(tmp_path, both + "secret = s\nsecret_file = f\n") == (
        "[robot:r] secret, secret_file: set one of them, not both"
    )
    assert config_error(tmp_path, both + "token = b\n") == (
        "[robot:r] url: has an access_token and the token is set apart: one"
    )


@pytest.mark.parametrize(
    "text, message",
    [
        (
            "[receiver:default]\nrobots = r\nat_mobile = 13800000000\n",
            "[receiver:default] at_mobile: unknown key (did you mean at_mobiles?)",
        ),
        (
            "[receiver:default]\nrobots = r\n[robot:r]\nurl = https://x/?access_token=t\n"
            "secret_flie = s\n",
            "[robot:r] secret_flie: unknown key (did you mean secret_file?)",
        ),
        (
            "[delivery]\nrate_limits = 10\n",
            "[delivery] rate_limits: unknown key (did you mean rate_limit?)",
        ),
        (
            "[auth]\nbearer_token_fil = x\n",
            "[auth] bearer_token_fil: unknown key (did you mean bearer_token_file?)",
        ),
    ],
)
def test_a_key_no_section_has_is_refused_not_ignored(tmp_path, text, message):
    """A typo would leave its setting silently not in effect: nobody @-mentioned, no signing."""
    robot = "[robot:r]\nurl = https://x/?access_token=t\n" if "[robot:r]" not in text else ""
    receiver = "[receiver:default]\nrobots = r\n" if "[receiver:" not in text else ""
    assert config_error(tmp_path, text + robot + receiver) == message


def test_keys_of_the_default_section_are_not_judged(tmp_path):
    path = tmp_path / "config.ini"
    path.write_text(
        "[DEFAULT]\nteam = sre\n[receiver:default]\nrobots = r\n"
        "[robot:r]\nurl = https://x/?access_token=t\n",
        encoding="utf-8",
    )
    assert alertbridge.load_config(str(path)).routes["default"].robots[0].token == "t"


def test_the_docs_placeholders_are_flagged_as_change_me_is(tmp_path):
    """A robot pasted from the README (YOUR_ACCESS_TOKEN, SEC_YOUR_SIGNING_SECRET) checked
    `OK ... (signed)`; every example token and secret of README.md and docs/ is a placeholder."""
    docs = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    text = "\n".join(p.read_text(encoding="utf-8") for p in docs)
    tokens = set(re.findall(r"access_token=([A-Z_]+)\b", text))
    secrets = set(re.findall(r"(?:secret = |-secret: )(SEC_[A-Z_]+)", text))
    assert "YOUR_ACCESS_TOKEN" in tokens
    assert {"SEC_YOUR_SIGNING_SECRET", "SEC_CHANGE_ME"} <= secrets
    robots = [("token", f"access_token={t}", "") for t in sorted(tokens)]
    robots += [("secret", "access_token=tok-real-0123456789", s) for s in sorted(secrets)]
    shipped = (ROOT / "config.ini").read_text(encoding="utf-8")
    for key, query, secret in robots:
        path = tmp_path / "config.ini"
        path.write_text(
            shipped.replace("access_token=CHANGE_ME", query).replace(
                "\nsecret =\n", f"\nsecret = {secret}\n", 1
            ),
            encoding="utf-8",
        )
        config = alertbridge.load_config(str(path))
        robot = config.routes["default"].robots[0]
        assert robot.placeholder_key == key, (query, secret)
        summary = alertbridge.check_config(config)
        assert f"PLACEHOLDER {key.upper()}: not used" in summary


PERSON_A = "[person:a]\nmobile = 13800000002\n"


def test_a_file_from_windows_notepad_is_read_and_one_in_gbk_is_named_by_line(tmp_path):
    """A UTF-8 BOM was "line 1: a setting before any [section] header"; a file saved as GBK
    was "'utf-8' codec can't decode byte 0xd5 in position 118"."""
    path = tmp_path / "config.ini"
    text = "[receiver:default]\nrobots = x\n" + ROBOT_X + "[person:a]\nname = 张三\nmobile = 13800\n"
    path.write_bytes(b"\xef\xbb\xbf" + text.encode("utf-8"))
    config = alertbridge.load_config(str(path))
    assert config.people["a"].name == "张三" and "default" in config.routes
    path.write_bytes(text.encode("gbk"))
    with pytest.raises(alertbridge.ConfigError) as error:
        alertbridge.load_config(str(path))
    assert str(error.value) == f"{path}: line 6 is not UTF-8 (saved as GBK?): save the file as " \
        "UTF-8"


@pytest.mark.parametrize(
    "text, message",
    [
        ("[alertbrige]\nport = 1\n", "[alertbrige]: unknown section (did you mean [alertbridge]?)"),
        ("[robto:y]\nurl = z\n", "[robto:y]: unknown section (did you mean [robot:y]?)"),
        ("[oncal]\n", "[oncal]: unknown section (did you mean [oncall]?)"),
        (
            ROBOT_X.replace("[robot:x]", "[robot:y]") + "  secret = SECx\n",
            "[robot:y] url: an indented line below it was read as part of url",
        ),
        (PERSON_A.replace("13800000002", "138-0000-0002"), "write its digits alone (13800000001)"),
        (
            PERSON_A + "[rotation:primary]\npeople = a\nstart = 2026/11/30\n",
            "[rotation:primary] start: not a date (YYYY-MM-DD, such as 2026-12-01)",
        ),
        (PERSON_A + "[rotation:primary]\npeople = a\n", "[rotation:primary] start: required"),
        (
            PERSON_A + "[rotation:primary]\npeople = a\nstart = 2026-11-30\n"
            "[receiver:ops]\nrobots = x\nat_people = primary\n",
            "no section [person:primary] (did you mean rotation:primary?)",
        ),
    ],
)
def test_config_errors_say_what_was_meant(tmp_path, text, message):
    """Errors as people really make them: a typo in a section name, an indented key, a date
    written with slashes, a phone number with dashes, a rotation named as a person."""
    assert message in config_error(tmp_path, "[receiver:default]\nrobots = x\n" + ROBOT_X + text)


@pytest.mark.parametrize("value, seconds", [("90", 90), ("90s", 90), ("10m", 600), ("4h", 14400),
                                            ("1d", 86400)])
def test_every_duration_key_takes_the_forms_escalation_steps_take(tmp_path, value, seconds):
    path = tmp_path / "config.ini"
    path.write_text(f"[delivery]\nmax_age = {value}\n[oncall]\nlink_ttl = {value}\n"
                    f"[receiver:default]\nrobots = x\n" + ROBOT_X, encoding="utf-8")
    config = alertbridge.load_config(str(path))
    assert config.delivery.max_age == config.oncall.link_ttl == seconds


@pytest.mark.parametrize("page", ["docs/configuration.md", "docs/configuration.zh-CN.md"])
def test_the_docs_give_every_duration_keys_minimum_as_the_code_has_it(page):
    """link_ttl had a minimum of 60 that the docs did not state."""
    text = (ROOT / page).read_text(encoding="utf-8")
    stated = {f"[{section}] {key}": float(n)
              for section, key, n in re.findall(r"`\[(\w+)\] (\w+)` ([0-9.]+) s", text)}
    sections = {"alertbridge": alertbridge.Service, "delivery": alertbridge.Delivery,
                "cluster": alertbridge.Cluster, "oncall": alertbridge.OnCall,
                "app": alertbridge.App, "database": alertbridge.Database}
    minimums = {f"[{name}] {f.name}": f.metadata["min"] for name, cls in sections.items()
                for f in dataclasses.fields(cls) if f.metadata.get("duration")
                and f.metadata["min"] > 0}
    assert stated == minimums


def test_a_missing_or_short_link_secret_says_how_to_make_one(tmp_path):
    text = "[receiver:default]\nrobots = x\nclaim_links = true\n" + ROBOT_X
    made = "python3 -c 'import secrets; print(secrets.token_urlsafe(32))'"
    assert made in config_error(tmp_path, text + "[oncall]\nbase_url = https://a.example\n")
    assert made in config_error(tmp_path, text + "[oncall]\nlink_secret = short\n")


def test_a_robots_own_rate_limit_is_read_and_a_wrong_one_named(tmp_path):
    path = tmp_path / "config.ini"
    path.write_text(
        ROBOT_X
        + "rate_limit = 5/1s, 100/1m\n[receiver:ops]\nrobots = x, y\n"
        + "[robot:y]\nurl = https://oapi.dingtalk.com/robot/send?access_token=u\n",
        encoding="utf-8",
    )
    config = alertbridge.load_config(str(path))
    x, y = config.routes["ops"].robots
    assert x.rate_limit == ((100, 60.0), (5, 1.0))  # longest first
    assert config.budget_windows(x.key) == ((100, 60.0), (5, 1.0))
    assert config.budget_windows(y.key) == ((20, 60.0),)  # [delivery]'s, DingTalk's
    assert config.longest_window == 60.0 and config.send_log_span == 600.0
    assert "100 msgs/60s and 5 msgs/1s per robot" in alertbridge.check_config(config)
    for wrong in ("100", "0/1m", "5/soon", "5/0s"):
        text = ROBOT_X + f"rate_limit = {wrong}\n[receiver:ops]\nrobots = x\n"
        message = config_error(tmp_path, text)
        assert "[robot:x] rate_limit: write COUNT/DURATION" in message, wrong
