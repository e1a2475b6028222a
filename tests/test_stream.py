"""The app's Stream connection under a hostile gateway (issue 32): reconnects that back off
unless a connection lasted, and start again after one that did; one deadline for connect, TLS
and handshake, which stop() cuts; frames that are not DingTalk's handled one by one; messages
in too many fragments and oversized or fragmented control frames refused; acknowledgements in
the SDKs' format; OpenAPI calls that ask for JSON; throttles that rest only their API; wss://
only over https. The gateway is tests/fakeapp.py (a real `websockets` server) or, where a
frame `websockets` would never send is needed, a server written by hand here."""

import base64
import hashlib
import json
import re
import socket
import ssl
import subprocess
import threading
import time
import urllib.request
import uuid

import pytest
import websockets.sync.server

import alertbridge
from tests.fakeapp import FakeApp
from tests.kit import app_config, make_alert, make_payload, post, wait_until
from tests.test_app import app_bridge, metrics

GATEWAY = "/v1.0/gateway/connections/open"


def counter(bridge, name, **labels):
    """A counter's value from /metrics, None if the series is not there."""
    shown = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    found = re.search(rf"^{name}\{{{re.escape(shown)}\}} (\S+)$", metrics(bridge), re.M)
    return float(found.group(1)) if found else None


def app_settings(tmp_path, app, timeout=5):
    path = tmp_path / "app.ini"
    path.write_text(
        "[receiver:ops]\nrobots = r\n"
        "[robot:r]\nurl = https://oapi.dingtalk.com/robot/send?access_token=t\n"
        + app_config(app).replace("timeout = 5", f"timeout = {timeout:g}"),
        encoding="utf-8",
    )
    return alertbridge.load_config(str(path))


# ---- a gateway written by hand: any bytes, at any pace


def frame(opcode, payload=b"", final=True, length=None):
    """A server frame (unmasked) as bytes; `length` may lie about the payload's length form."""
    n = len(payload) if length is None else length
    head = bytes([(0x80 if final else 0) | opcode])
    if n < 126:
        head += bytes([n])
    elif n < 1 << 16:
        head += bytes([126]) + n.to_bytes(2, "big")
    else:
        head += bytes([127]) + n.to_bytes(8, "big")
    return head + payload


class HandMadeServer:
    """One loopback listener; each connection is given to `behave(conn)` on its own thread.
    `accepted` counts connections; stop() ends every one."""

    def __init__(self, behave):
        self.behave, self.accepted, self.done = behave, 0, threading.Event()
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.conns = []
        threading.Thread(target=self._accept, daemon=True).start()

    def url(self, scheme="ws"):
        return f"{scheme}://127.0.0.1:{self.port}/connect?ticket=t"

    def _accept(self):
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            self.conns.append(conn)
            self.accepted += 1
            threading.Thread(target=self._run, args=(conn,), daemon=True).start()

    def _run(self, conn):
        try:
            self.behave(conn, self)
        except OSError:
            pass

    def trickle(self, conn, data):
        """Send `data` one byte at a time, 0.1 s apart, until the test ends."""
        for byte in data:
            if self.done.wait(0.1):
                return
            conn.sendall(bytes([byte]))

    def stop(self):
        self.done.set()
        self.listener.close()
        for conn in self.conns:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            conn.close()


def read_head(conn):
    head = b""
    while b"\r\n\r\n" not in head:
        chunk = conn.recv(4096)
        if not chunk:
            raise OSError("closed")
        head += chunk
    return head.decode("latin-1")


def shake_hands(conn):
    key = re.search(r"Sec-WebSocket-Key: (\S+)", read_head(conn)).group(1)
    accept = base64.b64encode(
        hashlib.sha1((key + alertbridge.WebSocket.GUID).encode()).digest()
    ).decode()
    conn.sendall(
        (
            "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            f"Sec-WebSocket-Accept: {accept}\r\n\r\n"
        ).encode()
    )


def client_close_code(conn, timeout=10):
    """The code of the first close frame the client sends (frames are masked)."""
    conn.settimeout(timeout)
    data = b""

    def need(n):
        nonlocal data
        while len(data) < n:
            chunk = conn.recv(65536)
            if not chunk:
                raise AssertionError("the client closed the socket without a close frame")
            data += chunk

    while True:
        need(2)
        length, at = data[1] & 0x7F, 2
        if length >= 126:
            size = 2 if length == 126 else 8
            need(2 + size)
            length, at = int.from_bytes(data[2 : 2 + size], "big"), 2 + size
        need(at + 4 + length)
        mask, payload = data[at : at + 4], data[at + 4 : at + 4 + length]
        payload = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
        opcode, data = data[0] & 0x0F, data[at + 4 + length :]
        if opcode == 0x8:
            return int.from_bytes(payload[:2], "big")


@pytest.fixture
def hand_made():
    servers = []

    def make(behave):
        servers.append(HandMadeServer(behave))
        return servers[-1]

    yield make
    for server in servers:
        server.stop()


def connect_in_thread(url, timeout, **options):
    """WebSocket.connect on a thread: (thread, outcome list), so a connect that never ends
    fails the test instead of hanging it."""
    outcome = []

    def run():
        started = time.monotonic()
        try:
            outcome.append(alertbridge.WebSocket.connect(url, timeout, **options))
        except Exception as exc:  # noqa: BLE001 (what it raised is the test's to check)
            outcome.append(exc)
        outcome.append(time.monotonic() - started)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, outcome


# ---- 9. disconnect: no reconnect loop; counted


def test_a_gateway_that_says_disconnect_to_every_connection_is_not_asked_for_tickets_in_a_loop(
    make_bridge, sqlite_db, app
):
    """Each connection told `disconnect` as it opened: 1,733 ticket calls in 5 s. A connection
    that did not last is followed by growing delays (0.5-1 s, 1-2 s, 2-4 s...), each disconnect
    acknowledged and counted."""
    app.disconnect_at_once = True
    bridge = app_bridge(make_bridge, sqlite_db, app)
    assert wait_until(lambda: app.connections >= 1, timeout=10)
    first = time.monotonic()
    assert wait_until(lambda: app.connections >= 4, timeout=60)
    assert time.monotonic() - first >= 2.5  # at least 0.5 + 1 + 2 s of delays, jitter at its least
    assert app.calls[GATEWAY] <= app.connections + 1
    assert wait_until(
        lambda: (counter(bridge, "alertbridge_app_stream_disconnects_total", reason="disconnect")
                 or 0) >= 3,
        timeout=10,
    )
    assert app.bad_answers == []
    assert wait_until(lambda: len(app.closes) >= 3, timeout=10)
    assert set(app.closes[:3]) == {1000}  # answered, then closed as the SDKs do


def test_the_disconnect_counter_is_there_at_zero_from_the_start(make_bridge, sqlite_db, app):
    bridge = app_bridge(make_bridge, sqlite_db, app)
    for reason in ("disconnect", "dropped", "half_open", "connect_failed"):
        assert counter(bridge, "alertbridge_app_stream_disconnects_total", reason=reason) == 0


def test_the_disconnect_frame_is_acknowledged_before_the_connection_is_closed(
    make_bridge, sqlite_db, app
):
    """The Python and Go SDKs answer `disconnect` (code 200, its messageId, its data) and then
    close the connection; a gateway not acknowledged sends its command again."""
    bridge = app_bridge(make_bridge, sqlite_db, app)
    assert wait_until(lambda: app.connections == 1, timeout=10)
    message_id = app.disconnect()
    answer = app.answers.get(timeout=10)
    assert answer["headers"]["messageId"] == message_id and answer["code"] == 200
    assert json.loads(answer["data"]) == {"reason": "gateway upgrade"}
    assert wait_until(lambda: app.closes == [1000], timeout=10)
    assert wait_until(lambda: app.connections == 2, timeout=10)
    assert counter(bridge, "alertbridge_app_stream_disconnects_total", reason="disconnect") == 1


def test_a_throttled_gateway_rests_only_the_gateway_and_a_throttled_card_api_only_cards(
    tmp_path, app
):
    """AppAPI.throttled_until was one for every API: a throttled ticket call held the cards."""
    config = app_settings(tmp_path, app)
    now = [1000.0]
    api = alertbridge.AppAPI(lambda: config, alertbridge.Metrics(), clock=lambda: now[0])
    app.gateway_failures = [403]
    with pytest.raises(alertbridge.AppError) as refused:
        api.open_stream(("topic",))
    assert refused.value.throttled
    api.send_card("t-1", "cid-ops", {"title": "x"})  # cards go on, at the same instant
    assert "t-1" in app.cards
    calls = app.calls[GATEWAY]
    with pytest.raises(alertbridge.AppError, match="resting"):
        api.open_stream(("topic",))  # the gateway rests: no call made
    assert app.calls[GATEWAY] == calls
    now[0] += api.THROTTLE_REST
    assert api.open_stream(("topic",))[1]

    app.card_failures = [403]
    with pytest.raises(alertbridge.AppError):
        api.send_card("t-2", "cid-ops", {"title": "x"})
    assert api.open_stream(("topic",))[1]  # tickets go on while cards rest
    assert api.throttled_until == now[0] + api.THROTTLE_REST  # what the status page shows


# ---- 10. the backoff starts again after a connection that worked


@pytest.mark.parametrize("worked", ["a callback", "open LASTED seconds"])
def test_a_connection_that_worked_is_followed_by_a_reconnect_at_once_however_many_came_before(
    make_bridge, sqlite_db, app, monkeypatch, worked
):
    """The failure count grew with every drop and never went down: after a few healthy
    connections had dropped, 16-60 s without one."""
    lasted = 0.3 if worked != "a callback" else 60
    monkeypatch.setattr(alertbridge.StreamClient, "LASTED", lasted, raising=False)
    monkeypatch.setattr(alertbridge.StreamClient, "SERVED_FOR", 0.3, raising=False)
    app_bridge(make_bridge, sqlite_db, app)
    for n in range(1, 7):
        assert wait_until(lambda: app.connections == n, timeout=10)
        if worked == "a callback":
            deliver_a_callback(app)
        time.sleep(0.5)  # the time itself is the condition: open LASTED, or SERVED_FOR
        dropped = time.monotonic()
        app.drop()
        assert wait_until(lambda: app.connections == n + 1, timeout=10)
        assert time.monotonic() - dropped < 5, f"reconnect {n} took the backoff"


def deliver_a_callback(app):
    """The gateway delivers a callback (a message written to the robot, of no consequence) and
    the client answers it."""
    answered = app.answers.qsize() + len(app.bad_answers)
    app.send(
        {
            "specVersion": "1.0",
            "type": "CALLBACK",
            "headers": {"topic": "/v1.0/card/instances/callback", "messageId": uuid.uuid4().hex},
            "data": json.dumps({"outTrackId": "not-a-card-of-ours", "userId": "u"}),
        }
    )
    assert wait_until(lambda: app.answers.qsize() + len(app.bad_answers) > answered, timeout=10)


# ---- 11. one deadline for connect, TLS and handshake; stop() cuts it


def test_a_handshake_answered_a_byte_at_a_time_ends_at_the_timeout(hand_made):
    def behave(conn, server):
        read_head(conn)
        server.trickle(conn, b"HTTP/1.1 101 Switching Protocols\r\nX-Slow: " + b"a" * 16000)

    server = hand_made(behave)
    thread, outcome = connect_in_thread(server.url(), 1)
    thread.join(15)
    assert not thread.is_alive(), "the handshake held the thread"
    error, took = outcome
    assert isinstance(error, alertbridge.WebSocketClosed) and "within 1 s" in str(error)
    assert took < 5


def test_over_tls_too_the_handshake_answered_a_byte_at_a_time_ends_at_the_timeout(
    hand_made, certificate
):
    """The deadline watches the TLS socket (the plain one is detached once TLS wraps it)."""
    tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    tls.load_cert_chain(*certificate)

    def behave(conn, server):
        conn = tls.wrap_socket(conn, server_side=True)
        read_head(conn)
        server.trickle(conn, b"HTTP/1.1 101 Switching Protocols\r\nX-Slow: " + b"a" * 16000)

    server = hand_made(behave)
    thread, outcome = connect_in_thread(server.url("wss"), 1)
    thread.join(15)
    assert not thread.is_alive(), "the TLS handshake held the thread"
    error, took = outcome
    assert isinstance(error, alertbridge.WebSocketClosed) and "within 1 s" in str(error)
    assert took < 5


def test_stop_interrupts_a_connection_being_made(tmp_path, app, hand_made):
    """A gateway trickling its handshake held the Stream thread: stop() could not end it."""

    def behave(conn, server):
        read_head(conn)
        server.trickle(conn, b"HTTP/1.1 101 Switching Protocols\r\nX-Slow: " + b"a" * 16000)

    server = hand_made(behave)
    app.endpoint = server.url().partition("?")[0]
    config = app_settings(tmp_path, app, timeout=60)
    api = alertbridge.AppAPI(lambda: config, alertbridge.Metrics())
    stream = alertbridge.StreamClient(lambda: config, api, lambda topic, data: {},
                                      alertbridge.Solo()).start()
    assert wait_until(lambda: server.accepted == 1, timeout=10)
    stopped = time.monotonic()
    stream.stop()
    stream.join(10)
    assert not stream.is_alive(), "stop() did not reach the connection being made"
    assert time.monotonic() - stopped < 5


# ---- 12. a frame DingTalk would not send: handled alone, the connection kept


def test_frames_that_are_not_what_dingtalk_sends_are_handled_one_by_one(
    make_bridge, sqlite_db, app
):
    bridge = app_bridge(make_bridge, sqlite_db, app)
    assert wait_until(lambda: app.connections == 1, timeout=10)
    headers = {"topic": "/v1.0/card/instances/callback", "contentType": "application/json"}
    for message_id in (7, [1, 2], {"a": 1}, None, "", "x" * 300):
        app.send({"type": "CALLBACK", "headers": {**headers, "messageId": message_id},
                  "data": "{}"})
    app.send({"type": "CALLBACK", "headers": {"topic": "t"}, "data": "{}"})  # no messageId
    for text in ("not json", "[1, 2]", '{"headers": [1]}', "[" * 100_000 + "]" * 100_000, ""):
        app.send_text(text)
    bad_data = [("CALLBACK", {"outTrackId": "x"}), ("CALLBACK", "[1]"), ("CALLBACK", "{"),
                ("WHATEVER", "{}"), ("SYSTEM", 5)]
    for n, (kind, data) in enumerate(bad_data):
        app.send({"type": kind, "headers": {**headers, "messageId": f"bad-{n}"}, "data": data})
        answer = app.answers.get(timeout=10)
        assert answer["headers"]["messageId"] == f"bad-{n}" and answer["code"] == 400, answer
    assert app.ask("SYSTEM", "ping", "{}")["code"] == 200  # the same connection, still served
    assert app.connections == 1 and bridge.stream.socket is not None
    assert counter(bridge, "alertbridge_app_stream_disconnects_total", reason="dropped") == 0


# ---- 13. a message in too many fragments; control frames by RFC 6455 5.5


@pytest.fixture
def frames_server(hand_made):
    """A hand-made gateway: after the handshake it sends `state["send"]` (bytes) and records
    the client's close code."""
    state = {}

    def behave(conn, server):
        shake_hands(conn)
        conn.sendall(state["send"])
        state["close"] = client_close_code(conn)

    state["server"] = hand_made(behave)
    return state


def fragmented(pieces):
    """One text message in `pieces` frames: '{', then empty continuations, then '}'."""
    middle = frame(0x0, final=False) * (pieces - 2)
    return frame(0x1, b"{", final=False) + middle + frame(0x0, b"}")


def test_a_message_in_more_than_4096_fragments_is_refused_with_1009(frames_server):
    frames_server["send"] = fragmented(4096) + fragmented(32_000)
    ws = alertbridge.WebSocket.connect(frames_server["server"].url(), timeout=5)
    assert ws.recv(timeout=30) == "{}"  # 4096 frames: taken
    started = time.process_time()
    with pytest.raises(alertbridge.WebSocketClosed, match="4096 frames"):
        ws.recv(timeout=30)
    assert time.process_time() - started < 5  # refused as the limit passed, not at the end
    assert wait_until(lambda: frames_server.get("close"), timeout=10) == 1009


@pytest.mark.parametrize(
    "bad",
    [
        frame(0x9, b"p" * 126),  # a ping over 125 bytes
        frame(0x9, b"ping", final=False),  # a fragmented ping
        frame(0xA, b"p" * 200),  # a pong over 125 bytes
        frame(0x8, (1000).to_bytes(2, "big") + b"r" * 124),  # a close over 125 bytes
        frame(0xA, b"", final=False),  # a fragmented pong
    ],
    ids=["ping-126", "ping-fragmented", "pong-200", "close-126", "pong-fragmented"],
)
def test_a_control_frame_over_125_bytes_or_fragmented_is_refused_with_1002(frames_server, bad):
    frames_server["send"] = bad + frame(0x1, b"after")
    ws = alertbridge.WebSocket.connect(frames_server["server"].url(), timeout=5)
    with pytest.raises(alertbridge.WebSocketClosed, match="control frame"):
        ws.recv(timeout=10)
    assert wait_until(lambda: frames_server.get("close"), timeout=10) == 1002


# ---- 14. acknowledgements in the SDKs' format


def test_a_card_click_is_answered_under_response_as_dingtalk_s_sdks_do(
    make_bridge, sqlite_db, app
):
    """The SDKs put a callback's answer under `response` in the acknowledgement's data: without
    it the text that only the answer carries never reached the clicker."""
    bridge = app_bridge(make_bridge, sqlite_db, app)
    assert post(bridge.address, make_payload("ops", [make_alert("DiskFull")]))[0] == 200
    assert wait_until(lambda: app.cards, timeout=10)
    [track] = app.cards
    assert wait_until(lambda: bridge.store.open_incident("ops", track.split(".")[1]), timeout=10)
    content = json.dumps({"cardPrivateData": {"actionIds": ["claim"], "params": {}}})
    click = {"outTrackId": track, "userId": "manager4321", "content": content}
    answer = app.ask("CALLBACK", "/v1.0/card/instances/callback", click, "click-1")
    assert answer["code"] == 200 and answer["headers"] == {
        "messageId": "click-1",
        "contentType": "application/json",
    }
    assert isinstance(answer["message"], str)
    response = json.loads(answer["data"])["response"]
    assert response["cardData"]["cardParamMap"]["state"] == "claimed"
    again = app.ask("CALLBACK", "/v1.0/card/instances/callback", click, "click-1")
    assert again == answer  # replayed: the same answer, not a second claim
    assert app.bad_answers == []


# ---- 15. Accept: application/json


def test_openapi_calls_ask_for_json_as_the_gateway_answers_xml_otherwise(tmp_path, app):
    request = urllib.request.Request(
        app.url + GATEWAY,
        json.dumps({"clientId": app.client_id, "clientSecret": app.client_secret}).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=10) as plain:
        assert plain.read().startswith(b"<?xml")  # the fake does what the Node SDK warns of
    config = app_settings(tmp_path, app)
    api = alertbridge.AppAPI(lambda: config, alertbridge.Metrics())
    assert api.token()
    endpoint, ticket = api.open_stream(("topic",))
    assert endpoint.startswith("ws://") and ticket


# ---- hardening: wss:// over https; a wss connection that works


@pytest.fixture
def certificate(tmp_path, monkeypatch):
    """A certificate for 127.0.0.1 that this process trusts (SSL_CERT_FILE), and its key."""
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
         "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
         "-keyout", str(key), "-out", str(cert)],
        check=True,
        capture_output=True,
    )
    monkeypatch.setenv("SSL_CERT_FILE", str(cert))
    # Python 3.13's HTTPS handler reads the trusted certificates when it is made (the daemon's
    # at import), 3.9 to 3.12's at each connection: one made now trusts this certificate
    opener = urllib.request.build_opener(alertbridge._HTTPHandler, alertbridge._HTTPSHandler)
    monkeypatch.setattr(alertbridge, "_OPENER", opener)
    return cert, key


def test_over_an_https_api_url_only_a_wss_endpoint_is_taken(tmp_path, certificate):
    """An endpoint in clear text would carry the ticket and every click unencrypted."""
    app = FakeApp()
    app.tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    app.tls.load_cert_chain(*certificate)
    app.start()
    try:
        assert app.url.startswith("https://")
        config = app_settings(tmp_path, app)
        api = alertbridge.AppAPI(lambda: config, alertbridge.Metrics())
        app.endpoint = "ws://127.0.0.1:1/connect"
        with pytest.raises(alertbridge.AppError, match=r"no wss:// endpoint.*https"):
            api.open_stream(("topic",))
        app.endpoint = "wss://127.0.0.1:1/connect"
        assert api.open_stream(("topic",))[0] == "wss://127.0.0.1:1/connect"
    finally:
        app.stop()


def test_the_client_speaks_wss_with_the_server_certificate_checked(certificate):
    server_tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_tls.load_cert_chain(*certificate)
    with websockets.sync.server.serve(
        lambda ws: [ws.send(m) for m in ws], "127.0.0.1", 0, ssl=server_tls
    ) as server:
        threading.Thread(target=server.serve_forever, daemon=True).start()
        url = f"wss://127.0.0.1:{server.socket.getsockname()[1]}/connect?ticket=t"
        ws = alertbridge.WebSocket.connect(url, timeout=5)
        ws.send_text("页" * 70_000)
        assert ws.recv(timeout=5) == "页" * 70_000
        ws.close()
        trusting_nobody = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        with pytest.raises(ssl.SSLCertVerificationError):
            alertbridge.WebSocket.connect(url, timeout=5, context=trusting_nobody)
        server.shutdown()


class Redelivering(FakeApp):
    """A gateway that delivers the same callback on each new connection, then drops it."""

    FRAME = {
        "specVersion": "1.0",
        "type": "CALLBACK",
        "headers": {
            "topic": "/v1.0/card/instances/callback",
            "messageId": uuid.uuid4().hex,
            "contentType": "application/json",
        },
        "data": json.dumps({"outTrackId": "not-ours", "userId": "u"}),
    }

    async def _serve(self, ws):
        ticket = ws.request.path.partition("ticket=")[2]
        with self._lock:
            known = ticket in self.tickets
            self.tickets.discard(ticket)
        if not known:
            await ws.close(4001, "unknown ticket")
            return
        self.connections += 1
        try:
            await ws.send(json.dumps(self.FRAME))
            await ws.recv()  # the client's acknowledgement
            await ws.close(1011, "dropped")
        except websockets.ConnectionClosed:
            pass


def test_a_gateway_that_brings_a_callback_and_drops_each_connection_gets_the_backoff(
    make_bridge, sqlite_db
):
    """A callback answered proves a connection worked only if it also stayed open a while:
    one delivered again on each connection, dropped at once, made 1,288 connections in 5 s."""
    app = Redelivering().start()
    try:
        app_bridge(make_bridge, sqlite_db, app)
        assert wait_until(lambda: app.connections >= 4, timeout=30)  # 0.5-1, 1-2, 2-4 s apart
        tickets = app.calls["/v1.0/gateway/connections/open"]
        assert app.connections <= 5 and tickets <= 6
    finally:
        app.stop()
