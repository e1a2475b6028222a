"""The test kit: what tests/ and bench/ share. Robots and configs, payloads, HTTP helpers,
alertbridge and other programs as child processes, the history as rows, waiting without sleeps.

    from tests.kit import make_payload, post, ...      (pytest, and python3 -m bench.NAME)
"""

import http.client
import json
import os
import pathlib
import re
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import textwrap
import threading
import time

import alertbridge

ROOT = pathlib.Path(__file__).resolve().parent.parent
SCRIPT = str(ROOT / "alertbridge.py")
FIXTURES = ROOT / "tests" / "fixtures"
IN_CI = bool(os.environ.get("CI"))
MYSQL_DSN = os.environ.get("ALERTBRIDGE_TEST_MYSQL", "root:@127.0.0.1:3306/test")
SUPPORTED_PYTHONS = ("3.9", "3.10", "3.11", "3.12", "3.13")
OLD_PYTHONS = ("3.6", "3.7", "3.8")

# The robots every test config has. Tokens and secrets are distinctive so leak checks can grep.
ROBOTS = {
    "ops-1": {"token": "tok-ops-1-0123456789abcdef", "secret": "SECops1secretvalue"},
    "ops-2": {"token": "tok-ops-2-0123456789abcdef", "keyword": "告警"},
    "ops-3": {
        "token": "tok-ops-3-0123456789abcdef",
        "secret": "SECops3secretvalue",
        "keyword": "alert",
    },
    "dev-1": {"token": "tok-dev-1-0123456789abcdef", "secret": "SECdev1secretvalue"},
}
SECRETS = [v for r in ROBOTS.values() for k, v in r.items() if k in ("token", "secret")]
OPS = [ROBOTS[f"ops-{i}"]["token"] for i in (1, 2, 3)]
DEV = ROBOTS["dev-1"]["token"]


# --- waiting and ports ----------------------------------------------------------------------


def wait_until(predicate, timeout=30.0, every=0.02):
    """Poll a condition that has no event to wait on (a process's state, another database)."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(every)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Clock:
    """Simulated time for a Bridge (Bridge(config, clock=Clock())): it moves only when told."""

    def __init__(self, now=1_000_000_000.0):
        self.now = now

    def __call__(self):
        return self.now

    def advance(self, seconds):
        self.now += seconds


# --- the history's databases ------------------------------------------------------------------


def mysql_settings():
    """ALERTBRIDGE_TEST_MYSQL is user:password@host:port/database."""
    creds, _, location = MYSQL_DSN.rpartition("@")
    user, _, password = creds.partition(":")
    hostport, _, database = location.partition("/")
    host, _, port = hostport.partition(":")
    return alertbridge.Database(
        driver="mysql",
        host=host,
        port=int(port or 3306),
        user=user,
        password=password,
        database=database,
    )


def mysql_connect(database=None):
    import pymysql

    s = mysql_settings()
    return pymysql.connect(
        host=s.host,
        port=s.port,
        user=s.user,
        password=s.password,
        database=database or s.database,
        charset="utf8mb4",
        autocommit=True,
    )


def require_mysql():
    """Connect to the test MariaDB; skip outside CI when it is missing, fail in CI."""
    import pytest

    try:
        return mysql_connect()
    except Exception as exc:
        if IN_CI:
            pytest.fail(f"MySQL tests are required in CI and {MYSQL_DSN} is unreachable: {exc}")
        pytest.skip(f"MariaDB not reachable at {MYSQL_DSN}: {exc}")


def empty_mysql():
    """The test database without alertbridge's tables; its settings."""
    db = require_mysql()
    with db.cursor() as cursor:
        for table in (
            "alerts",
            "notifications",
            "recorder_progress",
            "cluster_leader",
            "cluster_claims",
            "cluster_sends",
            "cluster_members",
            "cluster_handoff",
            "incidents",
            "incident_events",
            "incident_notes",
        ):
            cursor.execute(f"DROP TABLE IF EXISTS {table}")  # noqa: S608 (fixed names)
    db.close()
    return mysql_settings()


def rows(settings, sql):
    """Rows of a query on a history database, as dicts; DATETIMEs as the text SQLite keeps."""
    if settings.driver == "sqlite":
        db = sqlite3.connect(settings.path)
        cursor = db.execute(sql)
        columns = [c[0] for c in cursor.description]
        found = [dict(zip(columns, row)) for row in cursor.fetchall()]
        db.close()
        return found
    db = mysql_connect()
    with db.cursor() as cursor:
        cursor.execute(sql)
        columns = [c[0] for c in cursor.description]
        found = [dict(zip(columns, row)) for row in cursor.fetchall()]
    db.close()
    for row in found:
        for key, value in row.items():
            if hasattr(value, "strftime"):
                row[key] = value.strftime("%Y-%m-%d %H:%M:%S.") + f"{value.microsecond // 1000:03d}"
    return found


def history(bridge_or_settings, table="alerts", order="id"):
    """All rows of a history table, read through a bridge's store settings (or settings)."""
    settings = getattr(getattr(bridge_or_settings, "config", None), "database", bridge_or_settings)
    return rows(settings, f"SELECT * FROM {table} ORDER BY {order}")  # noqa: S608 (fixed names)


# --- configs and payloads ---------------------------------------------------------------------


def database_lines(settings):
    keys = (
        ("driver", "path")
        if settings.driver == "sqlite"
        else ("driver", "host", "port", "user", "password", "database")
    )
    return [f"{k} = {getattr(settings, k)}" for k in keys]


# [oncall] with claim links, and two people: what the on-call tests and benchmarks share
SECRET = "0123456789abcdef-link-secret"
ONCALL = f"""
[oncall]
base_url = https://alertbridge.example.com
link_secret = {SECRET}

[person:zhangsan]
name = 张三
mobile = 13800000001

[person:lisi]
name = 李四
mobile = 13800000002
"""


APP_PEOPLE = """
[person:zhangsan]
name = 张三
user_id = manager4321
"""


def app_config(app):
    """The [app] section for a tests.fakeapp.FakeApp."""
    return (
        f"\n[app]\nclient_id = {app.client_id}\nclient_secret = {app.client_secret}\n"
        f"card_template = alerts.schema\napi_url = {app.url}\ntimeout = 5\n"
    )


def config_text(
    fake_url, database, main=None, delivery=None, receivers=None, robots=None, extra=""
):
    """A config.ini for tests, written the way an operator would. `fake_url(token)` is a robot
    URL."""
    main = {
        "listen": "127.0.0.1",
        "port": "0",
        "state_dir": "state",
        "default_receiver": "dev",
        "journal_sync": "normal",
        **(main or {}),
    }
    delivery = {"retry_base": "0.05", "retry_max": "0.5", "timeout": "5", **(delivery or {})}
    receivers = receivers or {
        "ops": {
            "robots": "ops-1, ops-2, ops-3",
            "at_mobiles": "13800000000",
            "at_severities": "critical",
        },
        "dev": {"robots": "dev-1"},
    }
    robots = robots or ROBOTS
    lines = ["[alertbridge]"] + [f"{k} = {v}" for k, v in main.items()]
    lines += ["", "[database]"] + database_lines(database)
    lines += ["", "[delivery]"] + [f"{k} = {v}" for k, v in delivery.items()]
    for name, options in receivers.items():
        lines += ["", f"[receiver:{name}]"] + [f"{k} = {v}" for k, v in options.items()]
    for name, robot in robots.items():
        lines += [
            "",
            f"[robot:{name}]",
            f"url = {robot.get('url') or fake_url(robot['token'])}",  # url: another channel's
            f"secret = {robot.get('secret', '')}",
            f"keyword = {robot.get('keyword', '')}",
        ] + [f"{key} = {robot[key]}" for key in ("kind", "rate_limit") if key in robot]
    return "\n".join(lines) + "\n" + textwrap.dedent(extra)


def load_fixture(name):
    return json.loads((FIXTURES / name).read_text(encoding="utf-8"))


def make_alert(
    alertname="HighLoad",
    instance="node-1:9100",
    severity="critical",
    status="firing",
    starts_at="2026-11-24T08:00:00.123Z",
    ends_at="0001-01-01T00:00:00Z",
    fingerprint=None,
    labels=None,
    annotations=None,
):
    all_labels = {
        "alertname": alertname,
        "instance": instance,
        "severity": severity,
        "job": "node",
        **(labels or {}),
    }
    return {
        "status": status,
        "labels": all_labels,
        "annotations": annotations
        if annotations is not None
        else {"summary": f"{alertname} on {instance}"},
        "startsAt": starts_at,
        "endsAt": ends_at,
        "generatorURL": "http://prom:9090/graph?g0.expr=up",
        "fingerprint": fingerprint or f"fp-{alertname}-{instance}",
    }


def make_payload(receiver, alerts, status=None):
    status = status or ("firing" if any(a["status"] == "firing" for a in alerts) else "resolved")
    return {
        "version": "4",
        "groupKey": '{}:{alertname="x"}',
        "truncatedAlerts": 0,
        "status": status,
        "receiver": receiver,
        "groupLabels": {},
        "commonLabels": {},
        "commonAnnotations": {},
        "externalURL": "http://alertmanager:9093",
        "alerts": alerts,
    }


def storm_payloads(groups, per_group, receiver="ops"):
    """Alerts named storm-G-I, warnings, in `groups` webhooks of `per_group`."""
    return [
        make_payload(
            receiver,
            [
                make_alert(
                    f"Storm{g % 7}",
                    f"storm-{g}-{i}",
                    severity="warning",
                    starts_at="2026-11-24T08:00:00Z",
                )
                for i in range(per_group)
            ],
        )
        for g in range(groups)
    ]


TEST_ID = re.compile(r"(?:storm|during)-\d+(?:-\d+)?")


def delivered_ids(fake):
    """The storm-G-I and during-I instances in every message DingTalk accepted."""
    return {found for message in fake.delivered() for found in TEST_ID.findall(message.text)}


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


# --- HTTP -------------------------------------------------------------------------------------


def connect(url, timeout=30):
    host, port = url.split("//")[1].split("/")[0].split(":")
    return http.client.HTTPConnection(host, int(port), timeout=timeout)


def post(bridge_or_url, body, path="/alertmanager", headers=None, method="POST"):
    """(status, parsed JSON or text) of one request to alertbridge."""
    url = bridge_or_url if isinstance(bridge_or_url, str) else bridge_or_url.address
    data = body if isinstance(body, (bytes, type(None))) else json.dumps(body).encode()
    connection = connect(url)
    try:
        connection.request(
            method, path, body=data, headers={"Content-Type": "application/json", **(headers or {})}
        )
        response = connection.getresponse()
        raw = response.read()
    finally:
        connection.close()
    try:
        return response.status, json.loads(raw)
    except ValueError:
        return response.status, raw.decode("utf-8", "replace")


def get(url, path):
    return post(url, None, path=path, method="GET")


def healthy(url):
    try:
        return get(url, "/-/healthy")[0] == 200
    except OSError:
        return False


def metric(url, name):
    """The value of an unlabelled metric, from /metrics."""
    for line in get(url, "/metrics")[1].splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    return 0.0


def settle(bridge, timeout=20):
    """Wait until every pending message is sent and every event recorded."""
    assert bridge.notifier.wait_idle(timeout), "messages still pending"
    assert bridge.recorder.wait_idle(timeout), "events still unrecorded"


# --- processes --------------------------------------------------------------------------------


def child_pids(pid):
    """The children of a process, from /proc (each thread's)."""
    found = []
    for task in pathlib.Path(f"/proc/{pid}/task").iterdir():
        try:
            found += [int(child) for child in (task / "children").read_text().split()]
        except FileNotFoundError:  # the thread ended meanwhile
            pass
    return found


def store_processes():
    """The pids of the store processes of the bridges running in this process."""
    return [
        pid
        for pid in child_pids(os.getpid())
        if not gone(pid) and b"--store-process" in pathlib.Path(f"/proc/{pid}/cmdline").read_bytes()
    ]


class Child:
    """A program as a child process, its stderr in a log file."""

    def __init__(self, args, log, env=None):
        self.log = pathlib.Path(log)
        self.proc = subprocess.Popen(
            args,
            stdout=subprocess.DEVNULL,
            stderr=open(self.log, "ab"),
            env={**os.environ, **(env or {})},
        )

    @property
    def pid(self):
        return self.proc.pid

    def children(self):
        """Its children (alertbridge's store process), from /proc."""
        return child_pids(self.proc.pid)

    def peak_rss_mib(self):
        """Peak RSS of the process and of each of its children."""

        def peak(pid):
            with open(f"/proc/{pid}/status") as fh:
                return int(next(line for line in fh if line.startswith("VmHWM:")).split()[1]) / 1024

        return [peak(self.proc.pid)] + [peak(pid) for pid in self.children()]

    def wait_log(self, text, timeout=30):
        assert wait_until(lambda: text in self.log.read_text(encoding="utf-8"), timeout), (
            self.log.read_text()
        )

    def kill(self):
        """SIGKILL if still running (a test's clean-up)."""
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def stop(self, timeout=30):
        """SIGTERM, then the exit status (killed if it does not exit in time)."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()


class Daemon(Child):
    """alertbridge.py as systemd would run it, on a free port, with a config written here."""

    def __init__(
        self, directory, fake_url, database, env=None, args=(), python=sys.executable, **options
    ):
        self.port = int(options.get("main", {}).get("port", 0)) or free_port()
        self.config = pathlib.Path(directory) / "config.ini"
        self.fake_url, self.database, self.options = fake_url, database, options
        self.write_config()
        self.url = f"http://127.0.0.1:{self.port}"
        super().__init__(
            [python, SCRIPT, "-c", str(self.config), *args],
            pathlib.Path(directory) / "daemon.log",
            env,
        )

    def write_config(self, text=None, **changes):
        options = {**self.options, **changes}
        main = {"port": str(self.port), **options.pop("main", {})}
        self.config.write_text(
            text
            if text is not None
            else config_text(self.fake_url, self.database, main=main, **options),
            encoding="utf-8",
        )

    def wait_healthy(self):
        assert wait_until(lambda: healthy(self.url), timeout=30), self.log.read_text()


def gone(pid):
    """Whether a process has exited (or is a zombie not yet reaped)."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except FileNotFoundError:
        return True


def kill_mid_storm(child, payloads, after):
    """Post `payloads` to a daemon in turn from a thread, and kill -9 it once `after` of them
    were accepted; each one's outcome (its HTTP status, "refused", or None: not posted),
    once its store process is gone too."""
    outcome = [None] * len(payloads)
    enough = threading.Event()

    def storm():
        for i, payload in enumerate(payloads):
            try:
                outcome[i] = post(child.url, payload)[0]
            except OSError:
                outcome[i] = "refused"
            if sum(o == 200 for o in outcome if o) >= after:
                enough.set()
        enough.set()

    sender = threading.Thread(target=storm)
    sender.start()
    assert enough.wait(60)
    [store_process] = child.children()
    child.proc.send_signal(signal.SIGKILL)
    child.proc.wait()
    sender.join()
    assert wait_until(lambda: gone(store_process))  # no orphan left writing the history
    return outcome


# --- Python interpreters ----------------------------------------------------------------------


def find_python(version):
    """The interpreter for version "3.X": pyenv's newest 3.X.*, else python3.X on PATH, else
    None."""
    try:
        installed = subprocess.run(
            ["pyenv", "versions", "--bare"], capture_output=True, text=True, timeout=30
        ).stdout.split()
    except OSError:
        installed = []
    matches = sorted(
        (v for v in installed if v.startswith(version + ".") and v[len(version) + 1 :].isdigit()),
        key=lambda v: int(v.rsplit(".", 1)[1]),
    )
    if matches:
        prefix = subprocess.run(
            ["pyenv", "prefix", matches[-1]], capture_output=True, text=True, timeout=30
        ).stdout.strip()
        return os.path.join(prefix, "bin", "python" + version)
    return shutil.which("python" + version)


def require_python(version):
    """The interpreter for version; skip outside CI when this machine lacks it, fail in CI."""
    import pytest

    python = find_python(version)
    if python is None:
        if IN_CI:
            pytest.fail(f"Python {version} is required in CI (pyenv install {version})")
        pytest.skip(f"Python {version} not installed")
    return python


# --- a network to cut ----------------------------------------------------------------------


class TcpProxy:
    """A loopback TCP forwarder the test can cut, to make MySQL unreachable and come back, or
    freeze: while `frozen` is set no byte goes either way and nothing is closed (a half-open
    connection, as a NAT that forgot it leaves one)."""

    def __init__(self, target_port):
        self.target_port = target_port
        self.frozen = threading.Event()
        self.port = None
        self.sockets = []
        self.listener = None

    def start(self):
        self.listener = socket.socket()
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listener.bind(("127.0.0.1", self.port or 0))
        self.listener.listen(16)
        self.port = self.listener.getsockname()[1]
        threading.Thread(target=self._accept, args=(self.listener,), daemon=True).start()
        return self

    def _accept(self, listener):
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            self._serve(client)

    def _serve(self, client):
        self._splice(client, socket.create_connection(("127.0.0.1", self.target_port)))

    def _splice(self, client, upstream):
        self.sockets += [client, upstream]
        for a, b in ((client, upstream), (upstream, client)):
            threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    def _pipe(self, a, b):
        try:
            while data := a.recv(65536):
                while self.frozen.is_set():
                    time.sleep(0.01)
                b.sendall(data)
        except OSError:
            pass
        finally:
            for s in (a, b):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def cut(self):
        try:
            self.listener.shutdown(socket.SHUT_RDWR)  # wakes the blocked accept() so the port frees
        except OSError:
            pass
        self.listener.close()
        for s in self.sockets:
            try:
                s.shutdown(socket.SHUT_RDWR)
                s.close()
            except OSError:
                pass
        self.sockets = []


class ConnectProxy(TcpProxy):
    """An HTTP proxy on loopback, CONNECT only (how HTTPS goes through a proxy): it tunnels to
    the host and port asked for, and remembers them in `tunnels`."""

    def __init__(self):
        super().__init__(None)
        self.tunnels = []

    def _serve(self, client):
        threading.Thread(target=self._tunnel, args=(client,), daemon=True).start()

    def _tunnel(self, client):
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = client.recv(4096)
            if not chunk:
                return client.close()
            head += chunk
        method, target = head.split(b" ")[:2]
        if method != b"CONNECT":
            client.sendall(b"HTTP/1.1 405 Method Not Allowed\r\nContent-Length: 0\r\n\r\n")
            return client.close()
        host, port = target.decode().rsplit(":", 1)
        self.tunnels.append(f"{host}:{port}")
        upstream = socket.create_connection((host, int(port)))
        client.sendall(b"HTTP/1.1 200 Connection established\r\n\r\n")
        self._splice(client, upstream)
