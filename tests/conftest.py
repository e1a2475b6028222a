"""Shared fixtures: a fake DingTalk, history stores (SQLite and the real MariaDB), daemons."""

import http.client
import json
import os
import pathlib
import sys
import textwrap

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

import alertbridge  # noqa: E402
from fakedingtalk import FakeDingTalk  # noqa: E402

FIXTURES = ROOT / "tests" / "fixtures"
IN_CI = bool(os.environ.get("CI"))
MYSQL_DSN = os.environ.get("ALERTBRIDGE_TEST_MYSQL", "root:@127.0.0.1:3306/test")

# The robots every test config has. Tokens and secrets are distinctive so leak checks can grep.
ROBOTS = {
    "ops-1": {"token": "tok-ops-1-0123456789abcdef", "secret": "SECops1secretvalue"},
    "ops-2": {"token": "tok-ops-2-0123456789abcdef", "keyword": "告警"},
    "ops-3": {"token": "tok-ops-3-0123456789abcdef", "secret": "SECops3secretvalue", "keyword": "alert"},
    "dev-1": {"token": "tok-dev-1-0123456789abcdef", "secret": "SECdev1secretvalue"},
}
SECRETS = [v for r in ROBOTS.values() for k, v in r.items() if k in ("token", "secret")]


def mysql_settings():
    """ALERTBRIDGE_TEST_MYSQL is user:password@host:port/database."""
    creds, _, location = MYSQL_DSN.rpartition("@")
    user, _, password = creds.partition(":")
    hostport, _, database = location.partition("/")
    host, _, port = hostport.partition(":")
    return {"driver": "mysql", "host": host, "port": int(port or 3306), "user": user,
            "password": password, "database": database}


def mysql_connect():
    import pymysql
    s = mysql_settings()
    return pymysql.connect(host=s["host"], port=s["port"], user=s["user"], password=s["password"],
                           database=s["database"], charset="utf8mb4", autocommit=True)


def require_mysql():
    """Connect to the test MariaDB; skip outside CI when it is missing, fail in CI."""
    try:
        return mysql_connect()
    except Exception as exc:
        if IN_CI:
            pytest.fail(f"MySQL tests are required in CI and {MYSQL_DSN} is unreachable: {exc}")
        pytest.skip(f"MariaDB not reachable at {MYSQL_DSN}: {exc}")


@pytest.fixture
def fake():
    server = FakeDingTalk().start()
    for robot in ROBOTS.values():
        server.add_robot(robot["token"], robot.get("secret", ""), robot.get("keyword", ""))
    yield server
    server.stop()


@pytest.fixture(params=["sqlite", "mysql"])
def database(request, tmp_path):
    """History store settings, fresh for each test: an SQLite file, or the real MariaDB emptied."""
    if request.param == "sqlite":
        return {"driver": "sqlite", "path": str(tmp_path / "history.db")}
    db = require_mysql()
    with db.cursor() as cursor:
        for table in ("alerts", "notifications", "recorder_progress"):
            cursor.execute(f"DROP TABLE IF EXISTS {table}")  # noqa: S608 (fixed names)
    db.close()
    return mysql_settings()


@pytest.fixture
def sqlite_db(tmp_path):
    return {"driver": "sqlite", "path": str(tmp_path / "history.db")}


def config_text(fake, database, main=None, delivery=None, receivers=None, robots=None, extra=""):
    """A config.ini for tests, written the way an operator would."""
    main = {"listen": "127.0.0.1", "port": "0", "state_dir": "state", "default_receiver": "dev",
            "journal_sync": "normal", **(main or {})}
    delivery = {"retry_base": "0.05", "retry_max": "0.5", "timeout": "5", **(delivery or {})}
    receivers = receivers or {
        "ops": {"robots": "ops-1, ops-2, ops-3", "at_mobiles": "13800000000", "at_severities": "critical"},
        "dev": {"robots": "dev-1"},
    }
    robots = robots or ROBOTS
    lines = ["[alertbridge]"] + [f"{k} = {v}" for k, v in main.items()]
    lines += ["", "[database]"] + [f"{k} = {v}" for k, v in database.items()]
    lines += ["", "[delivery]"] + [f"{k} = {v}" for k, v in delivery.items()]
    for name, options in receivers.items():
        lines += ["", f"[receiver:{name}]"] + [f"{k} = {v}" for k, v in options.items()]
    for name, robot in robots.items():
        lines += ["", f"[robot:{name}]", f"url = {fake.url(robot['token'])}",
                  f"secret = {robot.get('secret', '')}", f"keyword = {robot.get('keyword', '')}"]
    return "\n".join(lines) + "\n" + textwrap.dedent(extra)


@pytest.fixture
def make_daemon(tmp_path, fake):
    """make_daemon(database, start=True, **config_text options) -> a Daemon on a free port."""
    daemons = []

    def make(database, start=True, **options):
        path = tmp_path / "config.ini"
        path.write_text(config_text(fake, database, **options), encoding="utf-8")
        daemon = alertbridge.Daemon(alertbridge.load_config(str(path)))
        daemons.append(daemon)
        return daemon.start() if start else daemon

    yield make
    for daemon in daemons:
        daemon.stop()


def load_fixture(name):
    return json.loads((FIXTURES / name).read_text(encoding="utf-8"))


def make_alert(alertname="HighLoad", instance="node-1:9100", severity="critical", status="firing",
               starts_at="2026-11-24T08:00:00.123Z", ends_at="0001-01-01T00:00:00Z", fingerprint=None,
               labels=None, annotations=None):
    all_labels = {"alertname": alertname, "instance": instance, "severity": severity, "job": "node",
                  **(labels or {})}
    return {"status": status, "labels": all_labels,
            "annotations": annotations if annotations is not None else {"summary": f"{alertname} on {instance}"},
            "startsAt": starts_at, "endsAt": ends_at, "generatorURL": "http://prom:9090/graph?g0.expr=up",
            "fingerprint": fingerprint or f"fp-{alertname}-{instance}"}


DELETE = object()


def set_at(payload, path, value):
    """Set the value at a path like ('alerts', 0, 'startsAt') in place; DELETE removes it."""
    target = payload
    for key in path[:-1]:
        target = target[key]
    if value is DELETE:
        del target[path[-1]]
    else:
        target[path[-1]] = value
    return payload


def make_payload(receiver, alerts, status=None):
    status = status or ("firing" if any(a["status"] == "firing" for a in alerts) else "resolved")
    return {"version": "4", "groupKey": "{}:{alertname=\"x\"}", "truncatedAlerts": 0, "status": status,
            "receiver": receiver, "groupLabels": {}, "commonLabels": {}, "commonAnnotations": {},
            "externalURL": "http://alertmanager:9093", "alerts": alerts}


def post(daemon_or_url, body, path="/alertmanager", headers=None, method="POST"):
    """(status, parsed JSON or text) of one request to the daemon."""
    base = daemon_or_url if isinstance(daemon_or_url, str) else daemon_or_url.address
    host, port = base.split("//")[1].split(":")
    data = body if isinstance(body, (bytes, type(None))) else json.dumps(body).encode()
    connection = http.client.HTTPConnection(host, int(port), timeout=30)
    try:
        connection.request(method, path, body=data,
                           headers={"Content-Type": "application/json", **(headers or {})})
        response = connection.getresponse()
        raw = response.read()
    finally:
        connection.close()
    try:
        return response.status, json.loads(raw)
    except ValueError:
        return response.status, raw.decode("utf-8", "replace")


def history(daemon, table="alerts", order="id"):
    """All rows of a history table as dicts, read through the daemon's own store settings."""
    settings = daemon.config.database
    if settings["driver"] == "sqlite":
        import sqlite3
        db = sqlite3.connect(settings["path"])
        cursor = db.execute(f"SELECT * FROM {table} ORDER BY {order}")  # noqa: S608 (fixed names)
        columns = [c[0] for c in cursor.description]
        rows = [dict(zip(columns, row)) for row in cursor.fetchall()]
        db.close()
        return rows
    db = mysql_connect()
    with db.cursor() as cursor:
        cursor.execute(f"SELECT * FROM {table} ORDER BY {order}")  # noqa: S608 (fixed names)
        columns = [c[0] for c in cursor.description]
        rows = [dict(zip(columns, row)) for row in cursor.fetchall()]
    db.close()
    for row in rows:  # DATETIME comes back as datetime: compare as the text SQLite keeps
        for key, value in row.items():
            if hasattr(value, "strftime"):
                row[key] = value.strftime("%Y-%m-%d %H:%M:%S.") + f"{value.microsecond // 1000:03d}"
    return rows


def settle(daemon, timeout=20):
    """Wait until every pending message is sent and every event recorded."""
    assert daemon.notifier.wait_idle(timeout), "messages still pending"
    assert daemon.recorder.wait_idle(timeout), "events still unrecorded"


SUPPORTED_PYTHONS = ("3.9", "3.10", "3.11", "3.12", "3.13")
OLD_PYTHONS = ("3.6", "3.7", "3.8")


def find_python(version):
    """The interpreter for version "3.X": pyenv's newest 3.X.*, else python3.X on PATH, else None."""
    import shutil
    import subprocess
    try:
        installed = subprocess.run(["pyenv", "versions", "--bare"], capture_output=True, text=True,
                                   timeout=30).stdout.split()
    except OSError:
        installed = []
    matches = sorted((v for v in installed if v.startswith(version + ".") and v[len(version) + 1:].isdigit()),
                     key=lambda v: int(v.rsplit(".", 1)[1]))
    if matches:
        prefix = subprocess.run(["pyenv", "prefix", matches[-1]], capture_output=True, text=True,
                                timeout=30).stdout.strip()
        return os.path.join(prefix, "bin", "python" + version)
    return shutil.which("python" + version)


def require_python(version):
    """The interpreter for version; skip outside CI when this machine lacks it, fail in CI."""
    python = find_python(version)
    if python is None:
        if IN_CI:
            pytest.fail(f"Python {version} is required in CI (pyenv install {version})")
        pytest.skip(f"Python {version} not installed")
    return python
