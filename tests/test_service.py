"""Running as a real service: sd_notify, reload, shutdown, health, metrics, auth, CLI, retention."""

import base64
import json
import logging
import os
import pathlib
import re
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time

import pytest
from prometheus_client.parser import text_string_to_metric_families

import alertbridge
from tests.fakedingtalk import FakeDingTalk
from tests.kit import (
    IN_CI,
    ConnectProxy,
    Daemon,
    ROBOTS,
    ROOT,
    SCRIPT,
    SECRETS,
    config_text,
    empty_mysql,
    free_port,
    gone,
    history,
    make_alert,
    make_payload,
    metric,
    mysql_connect,
    mysql_settings,
    post,
    settle,
    wait_until,
)


def test_sd_notify_ready_watchdog_reload_stopping(daemon, tmp_path):
    path = str(tmp_path / "notify.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.settimeout(30)
    p = daemon(env={"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "200000"})

    def next_message():
        return sock.recv(4096).decode()

    assert next_message().startswith("READY=1")
    assert next_message() == "WATCHDOG=1"
    p.proc.send_signal(signal.SIGHUP)
    while (message := next_message()) == "WATCHDOG=1":
        pass
    assert message.startswith("RELOADING=1\nMONOTONIC_USEC=")
    while (message := next_message()) == "WATCHDOG=1":
        pass
    assert message.startswith("READY=1")
    assert p.stop() == 0
    messages = []
    sock.settimeout(0.5)
    while True:
        try:
            messages.append(next_message())
        except socket.timeout:
            break
    assert "STOPPING=1" in messages
    sock.close()


def test_sd_notify_is_silent_without_notify_socket(monkeypatch):
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert alertbridge.sd_notify("READY=1") is False
    monkeypatch.setenv("WATCHDOG_USEC", "30000000")
    monkeypatch.setenv("WATCHDOG_PID", "1")  # another process's watchdog
    assert alertbridge.watchdog_interval() is None


def test_sighup_reloads_and_broken_config_is_rejected(daemon, fake):
    p = daemon(args=["--log-level", "debug"])
    p.wait_healthy()
    receivers = {"ops": {"robots": "ops-1"}, "dev": {"robots": "dev-1"}, "sre": {"robots": "ops-3"}}
    p.write_config(receivers=receivers)
    p.proc.send_signal(signal.SIGHUP)
    p.wait_log("config reloaded")
    assert post(p.url, make_payload("sre", [make_alert("Reloaded")]))[0] == 200
    assert fake.wait_for(lambda f: [m.token for m in f.delivered()] == [ROBOTS["ops-3"]["token"]])

    p.write_config(text="[receiver:broken]\nrobots = nothing\n")
    p.proc.send_signal(signal.SIGHUP)
    p.wait_log("reload rejected, keeping the running config: [receiver:broken] robots")
    assert post(p.url, make_payload("sre", [make_alert("StillRunning")]))[0] == 200
    assert fake.wait_for(lambda f: len(f.delivered(ROBOTS["ops-3"]["token"])) == 2)
    assert "DEBUG" in p.log.read_text()  # --log-level debug took effect
    assert p.stop() == 0


def test_json_logs_carry_each_field_whole_and_no_secret(daemon, fake):
    p = daemon(main={"log_format": "json"})
    p.wait_healthy()
    receiver = 'blue "team"\nINFO forged=1'  # free text, routed by default_receiver
    assert post(p.url, make_payload(receiver, [make_alert()]))[0] == 200
    assert post(p.url, b"{not json")[0] == 400
    assert fake.wait_for(lambda f: len(f.delivered()) == 1)
    p.wait_log('"robot": "dev-1"')
    entries = [json.loads(line) for line in p.log.read_text(encoding="utf-8").splitlines()]
    accepted = next(e for e in entries if " accepted " in e["message"])
    assert (
        accepted["receiver"] == receiver
        and accepted["route"] == "dev"
        and accepted["alerts"] == "1"
    )
    assert (
        "forged" not in accepted and accepted["level"] == "info" and accepted["time"].endswith("Z")
    )
    rejected = next(e for e in entries if " rejected " in e["message"])
    assert rejected["status"] == "400" and rejected["reason"].startswith("body is not valid JSON")
    sent = next(e for e in entries if e["message"].startswith("send "))
    assert sent["robot"] == "dev-1" and sent["errcode"] == "0" and sent["errmsg"] == "ok"
    assert sent["request_id"] == accepted["request_id"]
    assert not [s for s in SECRETS if s in p.log.read_text(encoding="utf-8")]
    store = p.children()[0]  # the store process logs the same way: a fork, with its handler
    assert open(f"/proc/{store}/cmdline").read() == open(f"/proc/{p.pid}/cmdline").read()

    p.write_config(main={"port": str(p.port), "log_format": "text"})
    p.proc.send_signal(signal.SIGHUP)
    p.wait_log("INFO alertbridge config reloaded")
    assert p.stop() == 0
    assert p.log.read_text(encoding="utf-8").splitlines()[-1].split()[3:] == [
        "alertbridge",
        "stopped",
    ]


@pytest.fixture
def https_fake(tmp_path):
    """A fake DingTalk serving HTTPS with a certificate for 127.0.0.1, and that certificate's
    file."""
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "2",
            "-subj",
            "/CN=127.0.0.1",
            "-addext",
            "subjectAltName=IP:127.0.0.1",
            "-keyout",
            str(key),
            "-out",
            str(cert),
        ],
        check=True,
        capture_output=True,
    )
    server = FakeDingTalk()
    server.tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server.tls.load_cert_chain(cert, key)
    server.start()
    for robot in ROBOTS.values():
        server.add_robot(robot["token"], robot.get("secret", ""), robot.get("keyword", ""))
    yield server, cert
    server.stop()


def test_the_daemons_store_process_is_a_fork_and_a_new_one_replaces_it_if_it_dies(daemon, fake):
    """The store process the daemon starts shares its memory (a fork made before any thread,
    with only the pipe and stdio open: not the port, not the journal); killed, the next is a
    process of its own (a threaded process does not fork), and no event is lost."""
    p = daemon()
    p.wait_healthy()
    [store] = p.children()
    assert open(f"/proc/{store}/cmdline").read() == open(f"/proc/{p.pid}/cmdline").read()
    held = [os.readlink(f"/proc/{store}/fd/{fd}") for fd in os.listdir(f"/proc/{store}/fd")]
    assert sum(h.startswith("socket:") for h in held) == 1  # the pipe, not the daemon's port
    assert not [h for h in held if "journal" in h]
    assert post(p.url, make_payload("dev", [make_alert("BeforeTheKill")]))[0] == 200
    assert wait_until(lambda: metric(p.url, "alertbridge_alerts_recorded_total") == 1)
    os.kill(store, signal.SIGKILL)
    assert post(p.url, make_payload("dev", [make_alert("AfterTheKill")]))[0] == 200
    assert wait_until(lambda: metric(p.url, "alertbridge_alerts_recorded_total") == 2, timeout=60)
    [again] = [pid for pid in p.children() if pid != store]
    assert b"--store-process" in pathlib.Path(f"/proc/{again}/cmdline").read_bytes()
    assert p.stop() == 0
    assert wait_until(lambda: gone(again))


@pytest.mark.parametrize(
    "no_proxy", ["", "localhost,127.0.0.1"], ids=["through-the-proxy", "no-proxy"]
)
def test_https_proxy_and_no_proxy_are_honoured(tmp_path, https_fake, sqlite_db, no_proxy):
    """Servers that reach DingTalk only through a proxy set HTTPS_PROXY (NO_PROXY for exceptions):
    urllib tunnels HTTPS through it with CONNECT, certificate checked end to end."""
    fake, cert = https_fake
    proxy = ConnectProxy().start()
    env = {
        "HTTPS_PROXY": f"http://127.0.0.1:{proxy.port}",
        "NO_PROXY": no_proxy,
        "SSL_CERT_FILE": str(cert),
    }
    daemon = Daemon(tmp_path, fake.url, sqlite_db, env=env)
    try:
        daemon.wait_healthy()
        assert post(daemon.url, make_payload("dev", [make_alert("ViaProxy")]))[0] == 200
        assert fake.wait_for(lambda f: len(f.delivered()) == 1), daemon.log.read_text()
        assert "ViaProxy" in fake.delivered()[0].text
        fake_address = f"127.0.0.1:{fake.server.server_address[1]}"
        assert proxy.tunnels == ([] if no_proxy else [fake_address])
    finally:
        daemon.stop()
        proxy.cut()


def test_json_log_formatter_takes_quoted_and_bare_fields():
    record = logging.LogRecord(
        "alertbridge",
        logging.WARNING,
        __file__,
        1,
        "route=%s: message=%d request_id=%s errmsg=%s (x=%s)",
        None,
        None,
    )
    record.args = (
        "ops",
        7,
        "abc",
        alertbridge.logfmt('send too fast, "exceed" 20\u2028\u2029\x85'),
        "y",
    )
    line = alertbridge.JsonLogFormatter().format(record)
    assert not re.search(
        "[\u2028\u2029\x85\n]", line
    )  # line breaks to JavaScript and to Unicode readers
    entry = json.loads(line)
    assert entry["route"] == "ops" and entry["message"].startswith("route=ops: message=7")
    assert entry["message_id"] == "7"
    assert entry["errmsg"] == 'send too fast, "exceed" 20\u2028\u2029\x85' and entry["x"] == "y"
    assert entry["level"] == "warning" and entry["logger"] == "alertbridge"
    assert alertbridge.logfmt("ops-1") == "ops-1" and alertbridge.logfmt("") == '""'


def test_reload_endpoint_keeps_waiting_messages_and_rejects_broken_config(
    make_bridge, fake, sqlite_db
):
    one_robot = {"dev": {"robots": "dev-1"}}
    bridge = make_bridge(
        sqlite_db, receivers=one_robot, delivery={"rate_limit": "1", "rate_window": "3600"}
    )
    post(bridge, make_payload("dev", [make_alert(instance="n0")]))
    settle(bridge)  # dev-1 has used its one message
    for i in (1, 2):
        post(bridge, make_payload("dev", [make_alert(instance=f"n{i}")]))
    assert bridge.pool.available(bridge.config.routes["dev"], time.time()) == 0
    assert bridge.journal.backlog()[0] == 2  # these wait: no robot has budget

    path = bridge.config.path
    original = open(path, encoding="utf-8").read()
    with open(path, "w", encoding="utf-8") as fh:
        fh.write("[receiver:dev]\nrobots = ghost\n")
    status, reply = post(bridge, b"", path="/-/reload")
    assert status == 500 and "[receiver:dev] robots: no section [robot:ghost]" in reply["error"]

    with open(path, "w", encoding="utf-8") as fh:  # add a robot to the receiver
        fh.write(original.replace("robots = dev-1", "robots = dev-1, ops-1"))
    assert post(bridge, b"", path="/-/reload")[0] == 200
    settle(bridge)
    ids = {i for m in fake.delivered() for i in re.findall(r"实例：(n\d)", m.text)}
    assert ids == {"n0", "n1", "n2"}
    assert ROBOTS["ops-1"]["token"] in [m.token for m in fake.delivered()]


def test_sigterm_finishes_the_request_in_flight_and_exits_0(daemon):
    p = daemon()
    p.wait_healthy()
    body = alertbridge.json.dumps(make_payload("dev", [make_alert("InFlight")])).encode()
    sock = socket.create_connection(("127.0.0.1", p.port))
    sock.sendall(
        b"POST /alertmanager HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\n\r\n" % len(body) + body[:10]
    )

    def in_flight():
        text = post(p.url, None, path="/metrics", method="GET")[1]
        return (
            float(re.search(r"^alertbridge_http_requests_in_flight (\S+)", text, re.M).group(1))
            >= 2
        )

    assert wait_until(in_flight)  # our half-sent request is being handled
    p.proc.send_signal(signal.SIGTERM)
    p.wait_log("stopping: finishing in-flight requests")
    sock.sendall(body[10:])
    answer = sock.recv(65536)
    assert answer.startswith(b"HTTP/1.1 200"), answer
    assert p.proc.wait(30) == 0
    with pytest.raises(OSError):
        post(p.url, None, path="/-/healthy", method="GET")  # no longer accepting


def parse_metrics(text):
    """Strict enough: prometheus_client must parse it, and every sample has HELP and TYPE."""
    families = {f.name: f for f in text_string_to_metric_families(text)}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            assert re.fullmatch(r"[a-zA-Z_:][a-zA-Z0-9_:]*(\{[^}]*\})? -?[0-9.e+Inf]+", line), line
    helped = set(re.findall(r"^# HELP (\S+)", text, re.M))
    typed = set(re.findall(r"^# TYPE (\S+)", text, re.M))
    assert helped == typed
    return families


def test_metrics_are_valid_prometheus_text(make_bridge, fake, sqlite_db):
    bridge = make_bridge(sqlite_db)
    post(bridge, make_payload("ops", [make_alert(), make_alert(instance="b")]))
    post(bridge, b"{", path="/alertmanager")
    settle(bridge)
    status, text = post(bridge, None, path="/metrics", method="GET")
    assert status == 200
    families = parse_metrics(text)
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for f in families.values()
        for s in f.samples
    }
    assert samples[("alertbridge_webhooks_total", (("outcome", "200"),))] == 1
    assert samples[("alertbridge_webhooks_total", (("outcome", "400"),))] == 1
    assert samples[("alertbridge_alerts_accepted_total", ())] == 2
    assert samples[("alertbridge_alerts_recorded_total", ())] == 2
    assert (
        samples[
            (
                "alertbridge_sends_total",
                (("errcode", "0"), ("kind", "dingtalk"), ("receiver", "ops"), ("robot", "ops-1")),
            )
        ]
        == 1
    )
    assert samples[("alertbridge_send_duration_seconds_count", ())] == 1
    assert samples[("alertbridge_queue_messages", (("priority", "critical"),))] == 0
    assert samples[("alertbridge_queue_messages", (("priority", "none"),))] == 0
    dingtalk = ("kind", "dingtalk")
    assert samples[("alertbridge_robot_budget_remaining", (dingtalk, ("robot", "ops-1")))] == 19
    assert samples[("alertbridge_robot_budget_remaining", (dingtalk, ("robot", "ops-2")))] == 20
    assert samples[("alertbridge_build_info", (("version", alertbridge.VERSION),))] == 1


AUTH = """
[auth]
bearer_token = am-bearer-token
username = am
password = am-password
"""


def test_auth_bearer_and_basic(make_bridge, fake, sqlite_db):
    bridge = make_bridge(sqlite_db, extra=AUTH)
    payload = make_payload("dev", [make_alert()])
    status, reply = post(bridge, payload)
    assert status == 401 and "credentials" in reply["error"]
    assert post(bridge, payload, headers={"Authorization": "Bearer wrong"})[0] == 401
    assert post(bridge, payload, headers={"Authorization": "Bearer am-bearer-token"})[0] == 200
    basic = base64.b64encode(b"am:am-password").decode()
    assert post(bridge, payload, headers={"Authorization": f"Basic {basic}"})[0] == 200
    wrong = base64.b64encode(b"am:nope").decode()
    assert post(bridge, payload, headers={"Authorization": f"Basic {wrong}"})[0] == 401
    assert post(bridge, b"", path="/-/reload")[0] == 401
    assert post(bridge, None, path="/metrics", method="GET")[0] == 200  # open unless configured
    assert post(bridge, None, path="/-/healthy", method="GET")[0] == 200


def test_auth_can_protect_metrics(make_bridge, fake, sqlite_db):
    bridge = make_bridge(sqlite_db, extra=AUTH + "protect_metrics = true\n")
    assert post(bridge, None, path="/metrics", method="GET")[0] == 401
    assert (
        post(
            bridge,
            None,
            path="/metrics",
            method="GET",
            headers={"Authorization": "Bearer am-bearer-token"},
        )[0]
        == 200
    )


def cli(*args, config=None):
    command = [sys.executable, SCRIPT, *(["-c", str(config)] if config else []), *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=60)


BROKEN_EVERYWHERE = """[alertbrige]
port = 1
[delivery]
max_age = 1x
[receiver:default]
robots = r, gone
at_mobile = 1
[robot:r]
url = https://oapi.dingtalk.com/robot/send?access_token=SECRET-TOKEN-1
  secret = SEC-SECRET-2
[person:a]
mobile = 1-2
[receiver:other]
robots = nothing
"""


def test_every_config_error_is_reported_in_one_run_a_line_each(tmp_path, make_bridge, sqlite_db,
                                                                caplog):
    """Only the first error was reported: fix, run, fix, run. Each error is one line, none
    repeated by what depends on it (the receiver listing the broken robot r), no value quoted;
    a reload with them keeps the running config and logs each."""
    path = tmp_path / "broken.ini"
    path.write_text(BROKEN_EVERYWHERE, encoding="utf-8")
    result = cli("--check-config", config=path)
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.splitlines() == [
        "config error: [alertbrige]: unknown section (did you mean [alertbridge]?)",
        "config error: [receiver:default] at_mobile: unknown key (did you mean at_mobiles?)",
        "config error: [delivery] max_age: not a duration (write 90, 90s, 10m, 4h or 1d)",
        "config error: [robot:r] url: an indented line below it was read as part of url "
        "(configparser continues a value on indented lines): write every key at the start of "
        "its line",
        "config error: [person:a] mobile: not a phone number: write its digits alone "
        "(13800000001), or +COUNTRY-NUMBER (+86-13800000001)",
        "config error: [receiver:other] robots: no section [robot:nothing]",
    ]
    assert "SECRET" not in result.stderr
    bridge = make_bridge(sqlite_db)
    bridge.config = alertbridge.replace(bridge.config, path=str(path))
    ok, said, _ = bridge.reload()
    assert not ok and said.count("; ") == 5 and "\n" not in said
    rejected = [r.getMessage() for r in caplog.records if "reload rejected" in r.getMessage()]
    assert len(rejected) == 6 and bridge.config.routes.keys() == {"ops", "dev"}


def test_cli_check_config_masks_secrets(tmp_path, fake, sqlite_db):
    path = tmp_path / "config.ini"
    path.write_text(config_text(fake.url, sqlite_db, extra=AUTH), encoding="utf-8")
    result = cli("--check-config", config=path)
    assert result.returncode == 0, result.stderr
    assert "receiver ops: one message per group, @13800000000" in result.stdout
    assert (
        "robot ops-1: http://127.0.0.1:" in result.stdout
        and "access_token=tok-***" in result.stdout
    )
    assert "auth bearer basic" in result.stdout
    assert not [
        s
        for s in SECRETS + ["am-bearer-token", "am-password"]
        if s in result.stdout + result.stderr
    ]
    path.write_text("[receiver:x]\nrobots = y\n", encoding="utf-8")
    result = cli("--check-config", config=path)
    assert result.returncode == 2 and "[receiver:x] robots: no section [robot:y]" in result.stderr


def test_cli_help_says_no_flag_runs_the_daemon_and_how_send_test_sends():
    said = " ".join(cli("--help").stdout.split())
    assert "With no command flag below, it runs the daemon" in said
    assert "through the daemon that listens on the config's port, with its running config" in said
    assert "else directly, through this file's robots" in said


def test_cli_send_test_reports_each_robot(tmp_path, fake, sqlite_db):
    path = tmp_path / "config.ini"
    path.write_text(config_text(fake.url, sqlite_db), encoding="utf-8")
    fake.add_robot(
        ROBOTS["ops-3"]["token"], ROBOTS["ops-3"]["secret"], keyword="值班"
    )  # config says "alert"
    result = cli("--send-test", "ops", config=path)
    assert result.returncode == 1
    how, *lines = result.stdout.splitlines()
    assert how == f"directly, through the robots of {path}: no daemon answers on :0"
    assert lines[0].startswith("ops-1: errcode=0 errmsg=ok") and lines[1].startswith(
        "ops-2: errcode=0"
    )
    assert lines[2].startswith("ops-3: errcode=310000 errmsg=keywords not in content")
    assert lines[2].endswith("; fix: the message lacks the robot's keyword: set [robot:ops-3] "
                             "keyword = one of its custom keywords "
                             "(自定义关键词, in the robot's 安全设置)")
    assert all("AlertbridgeTest" in m.text for m in fake.delivered())
    assert cli("--send-test", "dev", config=path).returncode == 0
    assert cli("--send-test", "nobody", config=path).returncode == 2


def shipped_config(directory, port):
    """The config.ini shipped, copied to `directory` (its state there too) to listen on `port`:
    a test must not depend on the default port 9097 being free."""
    text = (ROOT / "config.ini").read_text(encoding="utf-8")
    assert "\nport = 9097\n" in text
    path = directory / "config.ini"
    path.write_text(text.replace("\nport = 9097\n", f"\nport = {port}\n"), encoding="utf-8")
    return path


def test_cli_send_test_does_not_call_a_placeholder_robot(tmp_path):
    result = cli("--send-test", "default", config=shipped_config(tmp_path, free_port()))
    assert result.returncode == 1
    assert "not called: its url still has the placeholder token CHANGE_ME" in result.stdout
    assert "network" not in result.stdout + result.stderr and "Traceback" not in result.stderr


def test_cli_init_db_version_and_log_level(tmp_path, fake, database):
    path = tmp_path / "config.ini"
    path.write_text(config_text(fake.url, database), encoding="utf-8")
    result = cli("--init-db", config=path)
    assert result.returncode == 0 and "schema ready" in result.stdout, result.stderr
    store = alertbridge.Store(database)
    with store.transaction() as cursor:
        store.execute(cursor, "SELECT COUNT(*) FROM alerts")
        assert cursor.fetchone()[0] == 0
    store.close()
    assert cli("--version").stdout.strip() == f"alertbridge {alertbridge.VERSION}"
    assert cli("--log-level", "loud").returncode == 2


def test_retention_purges_old_history_in_batches(make_bridge, fake, database):
    bridge = make_bridge(database, extra="")
    post(bridge, make_payload("dev", [make_alert(instance=f"old-{i}") for i in range(5)]))
    post(bridge, make_payload("dev", [make_alert(instance="new")]))
    settle(bridge)
    store = alertbridge.Store(database)
    with store.transaction() as cursor:  # age five alerts and their sends past the retention
        store.execute(
            cursor,
            "UPDATE alerts SET starts_at = %s, last_received_at = %s WHERE instance <> %s",
            ("2020-01-01 00:00:00.000", "2020-01-01 00:00:00.000", "new"),
        )
        store.execute(
            cursor,
            "UPDATE notifications SET sent_at = %s WHERE id = %s",
            ("2020-01-01 00:00:00.000", history(bridge, "notifications")[0]["id"]),
        )
    store.close()
    bridge.stop()
    again = make_bridge(
        database, start=False, extra=""
    )  # the purge runs at start, then every 10 min
    again.recorder.PURGE_BATCH = 2
    again.start()
    assert wait_until(lambda: len(history(bridge)) == 1)
    assert [r["instance"] for r in history(bridge)] == ["new"]
    assert len(history(bridge, "notifications")) == 1


def test_systemd_unit_verifies():
    if not shutil.which("systemd-analyze"):
        if IN_CI:
            pytest.fail("systemd-analyze is required in CI")
        pytest.skip("systemd-analyze not installed")
    result = subprocess.run(
        ["systemd-analyze", "verify", str(ROOT / "alertbridge.service")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    unit = (ROOT / "alertbridge.service").read_text()
    for directive in (
        "Type=notify",
        "WatchdogSec=",
        "StateDirectory=alertbridge",
        "ProtectSystem=strict",
        "ProtectHome=yes",
        "NoNewPrivileges=yes",
        "PrivateTmp=yes",
        "RestrictAddressFamilies=",
        "Restart=on-failure",
        "ExecReload=/bin/kill -HUP $MAINPID",
    ):
        assert directive in unit


def blocked_signals(pid):
    """The signals blocked in the process's main thread, from /proc."""
    with open(f"/proc/{pid}/status") as fh:
        mask = int(re.search(r"^SigBlk:\s*([0-9a-f]+)", fh.read(), re.M).group(1), 16)
    return {s for s in signal.Signals if mask >> (s - 1) & 1}


@pytest.mark.parametrize("first", [signal.SIGHUP, signal.SIGTERM], ids=["SIGHUP", "SIGTERM"])
def test_a_signal_in_the_first_moments_is_acted_on_not_fatal(daemon, first):
    p = daemon()
    assert wait_until(
        lambda: p.proc.poll() is not None or signal.SIGHUP in blocked_signals(p.proc.pid),
        every=0.001,
    )
    p.proc.send_signal(first)  # long before the bridge listens
    if first == signal.SIGHUP:
        p.wait_healthy()
        p.wait_log("config reloaded")
        assert p.stop() == 0
    else:
        assert p.proc.wait(30) == 0
        assert "stopping: finishing in-flight requests (SIGTERM)" in p.log.read_text()


def test_shutdown_is_bounded_while_mysql_holds_a_lock(tmp_path, fake):
    settings = empty_mysql()
    db = mysql_connect()
    path = tmp_path / "config.ini"
    path.write_text(config_text(fake.url, settings), encoding="utf-8")
    bridge = alertbridge.Bridge(alertbridge.load_config(str(path))).start()
    post(bridge, make_payload("dev", [make_alert(instance="first")]))
    settle(bridge)
    with db.cursor() as cursor:
        cursor.execute("LOCK TABLES alerts WRITE")  # a migration, a backup, a long report
    post(bridge, make_payload("dev", [make_alert(instance="locked-out")]))
    assert fake.wait_for(lambda f: len(f.delivered()) == 2)
    started = time.monotonic()
    bridge.stop(timeout=10)
    assert time.monotonic() - started < 20  # systemd's TimeoutStopSec is 30 s
    db.close()  # the lock goes with its session
    again = alertbridge.Bridge(alertbridge.load_config(str(path))).start()
    try:
        settle(again)
        assert [r["instance"] for r in history(again)] == ["first", "locked-out"]
    finally:
        again.stop()


@pytest.mark.parametrize("damage", [b"", b"this is not a journal" * 100], ids=["empty", "garbage"])
def test_a_damaged_journal_is_named_with_the_way_out(tmp_path, daemon, damage):
    journal = tmp_path / "state" / "journal.db"
    journal.parent.mkdir()
    journal.write_bytes(damage)
    p = daemon()
    assert p.proc.wait(30) == 2
    lines = p.log.read_text().splitlines()
    assert (
        len(lines) == 1
        and str(journal) in lines[0]
        and f"mv {journal} {journal}.damaged" in lines[0]
    )
    assert "Traceback" not in lines[0]


# --- a config that checks OK must run; a start that cannot must say why in one line ----------


def test_check_config_refuses_a_port_out_of_range(tmp_path, fake, sqlite_db):
    """port = 99999 checked OK, then the daemon died with OverflowError."""
    path = tmp_path / "config.ini"
    path.write_text(config_text(fake.url, sqlite_db, main={"port": "99999"}), encoding="utf-8")
    result = cli("--check-config", config=path)
    assert (
        result.returncode == 2
        and result.stderr == "config error: [alertbridge] port: must be at most 65535\n"
    )


def test_a_typo_in_a_level_is_refused_not_a_silent_end_to_every_mention(tmp_path, fake, sqlite_db):
    path = tmp_path / "config.ini"
    receivers = {
        "ops": {"robots": "ops-1", "at_mobiles": "13800000000", "at_severities": "critcal"},
        "dev": {"robots": "dev-1"},
    }
    path.write_text(config_text(fake.url, sqlite_db, receivers=receivers), encoding="utf-8")
    result = cli("--check-config", config=path)
    assert result.returncode == 2 and result.stderr == (
        "config error: [receiver:ops] at_severities: 'critcal' is not a level of priority_order "
        "(critical, error, warning, info, none)\n"
    )
    receivers["ops"]["at_severities"] = "critical"
    path.write_text(config_text(fake.url, sqlite_db, receivers=receivers), encoding="utf-8")
    result = cli("--check-config", config=path)
    assert (
        result.returncode == 0
        and "receiver ops: one message per group, @13800000000 (for critical alerts)"
        in result.stdout
    )


def test_mentions_follow_the_routes_priority_label():
    route = alertbridge.Route(
        "ops",
        (),
        at_mobiles=("13800000000",),
        at_severities=("p1",),
        priority_label="urgency",
        priority_order=("p1", "p2"),
    )
    alert = {"status": "firing", "labels": {"urgency": "P1", "severity": "info"}, "annotations": {}}
    assert alertbridge.Renderer.mentions(route, [alert]).mobiles == ("13800000000",)
    assert not alertbridge.Renderer.mentions(route, [{**alert, "labels": {"urgency": "p2"}}])


@pytest.fixture
def taken_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(1)
        yield sock.getsockname()[1]


@pytest.mark.parametrize(
    "case",
    [
        "port in use",
        "not an address of this host",
        "state_dir under a file",
        "history under a file",
    ],
)
def test_every_start_up_failure_is_one_line_and_a_non_zero_exit(
    tmp_path, fake, sqlite_db, taken_port, case
):
    """Under systemd, a traceback looped with Restart=on-failure; --check-config had said OK."""
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    main, database = {}, sqlite_db
    if case == "port in use":
        main = {"port": str(taken_port)}
    elif case == "not an address of this host":
        main = {"listen": "192.0.2.1"}  # TEST-NET-1: never this host's
    elif case == "state_dir under a file":
        main = {"state_dir": str(blocker / "state")}
    else:
        database = alertbridge.Database(driver="sqlite", path=str(blocker / "history.db"))
    path = tmp_path / "config.ini"
    path.write_text(config_text(fake.url, database, main=main), encoding="utf-8")
    expected = {
        "port in use": f"cannot listen on 127.0.0.1:{taken_port}: address already in use",
        "not an address of this host": "cannot listen on 192.0.2.1:0: not an address of this host",
        "state_dir under a file": f"{blocker} is a file, not a directory",
        "history under a file": f"{blocker} is a file, not a directory",
    }[case]
    checked = cli("--check-config", config=path)
    if case == "port in use":  # it may be the running daemon's own
        assert (
            checked.returncode == 0 and f"note: port {taken_port} is in use now" in checked.stdout
        )
    else:
        assert checked.returncode == 1 and "NOT OK" in checked.stdout
        assert checked.stderr.startswith("error: ") and expected in checked.stderr
    if case == "history under a file":
        return  # the daemon pages on; the history waits
    started = subprocess.run(
        [sys.executable, SCRIPT, "-c", str(path)], capture_output=True, text=True, timeout=60
    )
    assert started.returncode == 1
    assert (
        started.stderr.count("\n") == 1
        and "Traceback" not in started.stderr
        and expected in started.stderr
    )


def test_mysql_without_pymysql_is_one_line_at_check_and_at_start(tmp_path, fake):
    """--check-config said OK, --init-db printed a chained traceback and the daemon retried
    `ModuleNotFoundError: No module named 'pymysql'` forever."""
    hidden = tmp_path / "no-pymysql"
    hidden.mkdir()
    (hidden / "pymysql.py").write_text('raise ModuleNotFoundError("No module named \'pymysql\'")\n')
    path = tmp_path / "config.ini"
    path.write_text(config_text(fake.url, mysql_settings()), encoding="utf-8")
    expected = (
        f"driver = mysql needs pymysql, which {sys.executable} cannot import: install "
        f"python3-pymysql (Debian, Ubuntu) or python3-PyMySQL (RHEL), or pip install pymysql\n"
    )
    env = {**os.environ, "PYTHONPATH": str(hidden)}

    def run(*args):
        command = [sys.executable, SCRIPT, "-c", str(path), *args]
        return subprocess.run(command, capture_output=True, text=True, timeout=30, env=env)

    checked = run("--check-config")
    assert checked.returncode == 1 and "NOT OK" in checked.stdout
    assert checked.stderr == f"error: history: {expected}"
    initialized = run("--init-db")
    assert initialized.returncode == 1
    assert initialized.stderr == f"cannot reach the history store: {expected}"
    log = tmp_path / "daemon.log"
    with log.open("w") as err:
        daemon = subprocess.Popen([sys.executable, SCRIPT, "-c", str(path)], stderr=err, env=env)
    try:  # it pages all the same: the history waits in the journal
        said = expected.strip() + "; alerts are paged"
        assert wait_until(lambda: said in log.read_text() or daemon.poll() is not None)
        assert daemon.poll() is None, log.read_text()
    finally:
        daemon.terminate()
        assert daemon.wait(timeout=30) == 0


def test_a_second_daemon_on_one_journal_refuses_naming_the_first(daemon, tmp_path):
    first = daemon()
    first.wait_healthy()
    second = subprocess.run(
        [sys.executable, SCRIPT, "-c", str(first.config)],
        capture_output=True,
        text=True,
        timeout=60,
        input="",
    )
    assert second.returncode == 1
    assert second.stderr == (
        f"alertbridge: journal {tmp_path}/state/journal.db is in use by another alertbridge "
        f"(pid {first.pid}): one daemon per journal; stop that one, or give this one a "
        f"state_dir of its own\n"
    )
    assert first.stop() == 0
    again = daemon()  # the lock went with the process
    again.wait_healthy()


def test_check_config_piped_into_head_ends_quietly(tmp_path, fake, sqlite_db):
    receivers = {f"r{i}": {"robots": "dev-1"} for i in range(2000)}  # more than a pipe holds
    receivers["dev"] = {"robots": "dev-1"}
    path = tmp_path / "config.ini"
    path.write_text(config_text(fake.url, sqlite_db, receivers=receivers), encoding="utf-8")
    piped = subprocess.run(
        f"{sys.executable} {SCRIPT} -c {path} --check-config | head -1",
        shell=True,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert piped.stdout.startswith("config ") and piped.stderr == ""


def test_a_reload_says_what_only_a_restart_applies(make_bridge, fake, sqlite_db, tmp_path, caplog):
    """A changed [database] was kept, and the reload answered "reloaded" without a word."""
    caplog.set_level(logging.WARNING, logger="alertbridge")
    bridge = make_bridge(sqlite_db)
    other = alertbridge.Database(driver="sqlite", path=str(tmp_path / "other.db"))
    (tmp_path / "config.ini").write_text(
        config_text(fake.url, other, main={"port": "19999"}), encoding="utf-8"
    )
    status, reply = post(bridge, b"", path="/-/reload")
    assert status == 200 and reply == {
        "status": "reloaded",
        "restart_needed": ["[alertbridge] port", "[database] path"],
    }
    assert any(
        "[alertbridge] port, [database] path changed, which takes effect only on a restart"
        in r.getMessage()
        for r in caplog.records
    )
    assert bridge.config.database == sqlite_db  # running on as before
    (tmp_path / "config.ini").write_text(config_text(fake.url, sqlite_db), encoding="utf-8")
    assert post(bridge, b"", path="/-/reload") == (200, {"status": "reloaded"})


def test_send_test_takes_a_slot_of_the_budget_or_says_it_cannot(daemon, fake):
    """During a storm a test message outside the budget cost a 410100 and ten minutes."""
    child = daemon(
        receivers={"dev": {"robots": "dev-1"}},
        extra=AUTH,
        delivery={"rate_limit": "3", "rate_window": "3600", "reserve": "1"},
    )
    child.wait_healthy()
    through = cli("--send-test", "dev", config=child.config)  # the running daemon sends it
    assert through.returncode == 0
    assert through.stdout.splitlines()[1].startswith("dev-1: errcode=0 errmsg=ok")
    child.wait_log("route=dev send-test: ")
    headers = {"Authorization": "Bearer am-bearer-token"}
    assert post(child.url, make_payload("dev", [make_alert("Storm")]), headers=headers)[0] == 200
    assert fake.wait_for(
        lambda f: len(f.delivered()) == 2
    )  # 2 of 3: the last is for critical pages
    refused = cli("--send-test", "dev", config=child.config)
    assert refused.returncode == 1 and refused.stdout.splitlines()[1].startswith(
        "dev-1: not sent: no budget for it now"
    )
    assert len(fake.requests) == 2
    assert child.stop() == 0
    alone = cli("--send-test", "dev", config=child.config)  # no daemon: the journal's send log
    assert alone.returncode == 1 and alone.stdout.splitlines()[1].startswith(
        "dev-1: not sent: no budget for it now"
    )
    assert len(fake.requests) == 2 and [r for r in fake.requests if r.errcode] == []
    assert not list(child.config.parent.glob("state/*-wal"))  # nothing written next to it


def test_send_test_says_which_way_it_went_and_a_changed_file_uses_its_own_robots(daemon, fake):
    """A test with a new file reached the old daemon's robot, and said OK: the daemon sent
    it with its running config, not the file it was given."""
    child = daemon(receivers={"dev": {"robots": "dev-1"}}, extra=AUTH)
    child.wait_healthy()
    through = cli("--send-test", "dev", config=child.config)
    how = through.stdout.splitlines()[0]
    assert through.returncode == 0 and re.fullmatch(
        rf"via the daemon on :{child.port}, its config loaded at "
        r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d \+0800",
        how,
    ), through.stdout
    assert [r.token for r in fake.delivered()] == [ROBOTS["dev-1"]["token"]]

    fake.add_robot("tok-new-dev-0123456789abcdef")  # the team's new robot, not reloaded yet
    robots = {**ROBOTS, "dev-1": {"token": "tok-new-dev-0123456789abcdef"}}
    child.write_config(receivers={"dev": {"robots": "dev-1"}}, extra=AUTH, robots=robots)
    direct = cli("--send-test", "dev", config=child.config)
    first, line = direct.stdout.splitlines()
    assert direct.returncode == 0, direct.stdout + direct.stderr
    assert first.startswith(
        f"directly, through the robots of {child.config}: the daemon on :{child.port} runs "
        f"another [receiver:dev] (its config loaded at "
    ) and first.endswith("); reload it to make this file's its own")
    assert line.startswith("dev-1: errcode=0 errmsg=ok")
    assert [r.token for r in fake.delivered()][1:] == ["tok-new-dev-0123456789abcdef"]
    assert child.log.read_text().count("route=dev send-test: ") == 1  # the first only

    bearer = {"Authorization": "Bearer am-bearer-token"}
    assert post(child.url, b"", path="/-/reload", headers=bearer)[0] == 200
    again = cli("--send-test", "dev", config=child.config)  # reloaded: the daemon's own now
    assert again.stdout.startswith(f"via the daemon on :{child.port}, its config loaded at ")
    assert [r.token for r in fake.delivered()][2:] == ["tok-new-dev-0123456789abcdef"]
    assert child.stop() == 0


def test_send_test_when_what_holds_the_port_is_not_alertbridge(tmp_path, fake, sqlite_db):
    """Whatever else listens on the config's port (9097 on a shared machine), --send-test
    says so and sends directly: no traceback, no dependence on the port being free."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()
    port = server.getsockname()[1]

    def answer_hello():
        connection, _ = server.accept()
        with connection:
            connection.recv(65536)
            connection.sendall(b"HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\n\r\nhello")

    threading.Thread(target=answer_hello, daemon=True).start()
    path = tmp_path / "config.ini"
    path.write_text(config_text(fake.url, sqlite_db, main={"port": str(port)}), encoding="utf-8")
    result = cli("--send-test", "dev", config=path)
    server.close()
    assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr
    assert result.stdout.splitlines()[0] == (
        f"directly, through the robots of {path}: what answers on :{port} is not alertbridge"
    )
    assert [r.token for r in fake.delivered()] == [ROBOTS["dev-1"]["token"]]
