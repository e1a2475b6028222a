"""What the benchmarks share: processes on loopback, a config, a small HTTP client, metrics."""

import http.client
import json
import pathlib
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parent.parent
PYTHON = sys.executable
MYSQL = {"host": "127.0.0.1", "port": 3306, "user": "root", "password": ""}


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(predicate, timeout=60.0, every=0.05):
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError("condition not met in time")
        time.sleep(every)


def fresh_database(name):
    import pymysql
    db = pymysql.connect(**MYSQL, autocommit=True)
    with db.cursor() as cursor:
        cursor.execute(f"DROP DATABASE IF EXISTS `{name}`")  # noqa: S608 (bench-owned name)
        cursor.execute(f"CREATE DATABASE `{name}` CHARACTER SET utf8mb4")  # noqa: S608
    db.close()
    return {**MYSQL, "database": name}


def count_rows(database, table="alerts"):
    import pymysql
    db = pymysql.connect(**database, autocommit=True)
    with db.cursor() as cursor:
        cursor.execute(f"SELECT COUNT(*) FROM {table}")  # noqa: S608
        n = cursor.fetchone()[0]
    db.close()
    return n


class Child:
    """A child process whose stderr goes to a log file."""

    def __init__(self, args, log_name):
        self.log = pathlib.Path(tempfile.gettempdir()) / log_name
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=open(self.log, "wb"))

    def peak_rss_mib(self):
        """Peak RSS of the process and of each of its children (alertbridge's store process)."""
        def peak(pid):
            with open(f"/proc/{pid}/status") as fh:
                return int(next(line for line in fh if line.startswith("VmHWM:")).split()[1]) / 1024
        children = []
        for task in pathlib.Path(f"/proc/{self.proc.pid}/task").iterdir():  # each thread's children
            try:
                children += [int(pid) for pid in (task / "children").read_text().split()]
            except FileNotFoundError:  # the thread ended meanwhile
                pass
        return [peak(self.proc.pid)] + [peak(pid) for pid in children]

    def describe_rss(self):
        own, *children = self.peak_rss_mib()
        return f"{own + sum(children):.0f} MiB" + (
            f" ({own:.0f} daemon + {' + '.join(f'{c:.0f}' for c in children)} store process)" if children else "")

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()


def start_fake(latency, rate_limit=20, rate_window=60.0, tokens=("bench-1", "bench-2", "bench-3")):
    port = free_port()
    child = Child([PYTHON, str(ROOT / "tests" / "fakedingtalk.py"), "--port", str(port), "--latency", str(latency),
                   "--rate-limit", str(rate_limit), "--rate-window", str(rate_window), "--tokens", ",".join(tokens)],
                  "bench-fake.log")
    child.url = f"http://127.0.0.1:{port}"
    wait_until(lambda: _answers(child.url + "/stats"))
    return child


def _answers(url):
    try:
        return get(url)[0] == 200
    except OSError:
        return False


def start_alertbridge(fake_url, database, tokens=("bench-1", "bench-2", "bench-3"), sync="full", extra=""):
    port = free_port()
    state = tempfile.mkdtemp(prefix="alertbridge-bench-")
    robots = "\n".join(f"[robot:r{i}]\nurl = {fake_url}/robot/send?access_token={t}\n" for i, t in enumerate(tokens))
    config = pathlib.Path(state) / "config.ini"
    config.write_text(f"""[alertbridge]
port = {port}
state_dir = {state}
journal_sync = {sync}
max_connections = 1024
[database]
driver = mysql
host = {database['host']}
port = {database['port']}
user = {database['user']}
password = {database['password']}
database = {database['database']}
[receiver:ops]
robots = {", ".join(f"r{i}" for i in range(len(tokens)))}
{robots}
{extra}""", encoding="utf-8")
    child = Child([PYTHON, str(ROOT / "alertbridge.py"), "-c", str(config), "--log-level", "warning"],
                  "bench-alertbridge.log")
    child.url = f"http://127.0.0.1:{port}"
    wait_until(lambda: _answers(child.url + "/-/healthy"))
    return child


def client(url):
    host, port = url.split("//")[1].split(":")
    return http.client.HTTPConnection(host, int(port), timeout=60)


def send(connection, body):
    """POST one webhook; the HTTP status."""
    connection.request("POST", "/alertmanager", body=body, headers={"Content-Type": "application/json"})
    response = connection.getresponse()
    response.read()
    return response.status


def get(url):
    host, port = url.split("//")[1].split("/")[0].split(":")
    path = "/" + url.split("//")[1].split("/", 1)[1]
    connection = http.client.HTTPConnection(host, int(port), timeout=60)
    connection.request("GET", path)
    response = connection.getresponse()
    body = response.read()
    connection.close()
    return response.status, body


def metric(url, name):
    text = get(url + "/metrics")[1].decode()
    match = re.search(rf"^{name} (\S+)$", text, re.M)
    return float(match.group(1)) if match else 0.0


def payload(group, per_group, receiver="ops"):
    alerts = [{"status": "firing",
               "labels": {"alertname": f"Bench{group % 20}", "instance": f"bench-{group}-{i}", "job": "node",
                          "severity": "warning"},
               "annotations": {"summary": f"load test alert {group}/{i}", "description": "generated by bench"},
               "startsAt": "2026-11-24T08:00:00.000Z", "endsAt": "0001-01-01T00:00:00Z",
               "generatorURL": "http://prometheus:9090/graph?g0.expr=up", "fingerprint": f"{group:08x}{i:08x}"}
              for i in range(per_group)]
    return json.dumps({"version": "4", "groupKey": f"{{}}:{{alertname=\"Bench{group}\"}}", "truncatedAlerts": 0,
                       "status": "firing", "receiver": receiver, "groupLabels": {}, "commonLabels": {},
                       "commonAnnotations": {}, "externalURL": "http://alertmanager:9093",
                       "alerts": alerts}).encode()


def percentile(values, p):
    values = sorted(values)
    return values[min(len(values) - 1, int(round(p / 100 * (len(values) - 1))))] if values else float("nan")
