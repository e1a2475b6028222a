"""Hostile input: 10,000 fuzzed requests, slow clients, connection floods. Only 4xx, never a
crash."""

import copy
import json
import socket
import threading
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import alertbridge
from tests.fakedingtalk import FakeDingTalk
from tests.kit import DELETE, ROBOTS, Daemon, load_fixture, post, set_at

GOOD = load_fixture("am025-ops-partly-resolved.json")
PATHS = [
    ("version",),
    ("status",),
    ("receiver",),
    ("alerts",),
    ("groupLabels",),
    ("commonLabels",),
    ("externalURL",),
    ("truncatedAlerts",),
    ("groupKey",),
    ("alerts", 0),
    ("alerts", 0, "status"),
    ("alerts", 0, "labels"),
    ("alerts", 0, "labels", "alertname"),
    ("alerts", 0, "annotations"),
    ("alerts", 0, "startsAt"),
    ("alerts", 0, "endsAt"),
    ("alerts", 0, "fingerprint"),
    ("alerts", 0, "generatorURL"),
    ("alerts", 1, "labels", "instance"),
    ("alerts", 1, "startsAt"),
]
JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=40),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)
TIMES = st.from_regex(
    r"\A[0-9]{4}-[0-9]{2}-[0-9]{2}[T "
    r"][0-9]{2}:[0-9]{2}:[0-9]{2}(\.[0-9]{0,12})?(Z|[+-][0-9]{2}:[0-9]{2})?\Z"
)
TEXT = st.text(max_size=30) | st.binary(max_size=30).map(lambda b: b.decode("latin-1"))


def _mutate(payload, path, value):
    """set_at, except that a path an earlier mutation removed is left alone."""
    try:
        set_at(payload, path, value)
    except (KeyError, IndexError, TypeError):
        pass


@st.composite
def mutated_bodies(draw):
    payload = copy.deepcopy(GOOD)
    for _ in range(draw(st.integers(1, 3))):
        path = draw(st.sampled_from(PATHS))
        value = draw(
            st.one_of(
                JSON,
                TIMES,
                TEXT,
                st.just(DELETE),
                st.just("x" * 100000),
                st.integers(1, 3000).map(lambda n: "[" * n + "]" * n),
            )
        )
        _mutate(payload, path, value)
    body = json.dumps(payload, ensure_ascii=draw(st.booleans())).encode("utf-8", "surrogatepass")
    return body


HEADERS = st.dictionaries(
    st.sampled_from(
        ["Content-Type", "Authorization", "X-Forwarded-For", "Expect", "Host", "User-Agent"]
    ),
    st.text(alphabet=st.characters(min_codepoint=32, max_codepoint=126), max_size=60),
    max_size=3,
)


@pytest.fixture(scope="module")
def target(tmp_path_factory):
    """One daemon process for the whole fuzz run, so its memory can be watched."""
    fake = FakeDingTalk().start()
    for robot in ROBOTS.values():
        fake.add_robot(robot["token"], robot.get("secret", ""), robot.get("keyword", ""))
    tmp = tmp_path_factory.mktemp("fuzz")
    process = Daemon(
        tmp,
        fake.url,
        alertbridge.Database(driver="sqlite", path=str(tmp / "h.db")),
        main={"request_timeout": "0.3", "max_body_bytes": "262144"},
    )
    process.wait_healthy()
    yield process
    assert process.stop() == 0
    fake.stop()


def rss_kib(pid):
    with open(f"/proc/{pid}/status") as fh:
        return int(next(line for line in fh if line.startswith("VmRSS:")).split()[1])


def raw(process, data, read_timeout=10):
    with socket.create_connection(("127.0.0.1", process.port), timeout=read_timeout) as sock:
        sock.sendall(data)
        answer = b""
        try:
            while chunk := sock.recv(65536):
                answer += chunk
                if b"\r\n\r\n" in answer:
                    head, _, body = answer.partition(b"\r\n\r\n")
                    length = [
                        int(line.split(b":")[1])
                        for line in head.split(b"\r\n")
                        if line.lower().startswith(b"content-length:")
                    ]
                    if length and len(body) >= length[0]:
                        break
        except ConnectionResetError:
            pass
    return answer


def check(answer):
    """A 2xx for what was still a valid webhook, else a 4xx with a one-line JSON reason."""
    assert answer, "connection closed without an answer"
    head, _, body = answer.partition(b"\r\n\r\n")
    status = int(head.split()[1])
    assert status < 500, answer[:300]
    if status >= 400:
        assert json.loads(body)["error"] and body.count(b"\n") == 1
    return status


@settings(max_examples=5000, deadline=None, database=None, suppress_health_check=list(HealthCheck))
@given(body=mutated_bodies(), headers=HEADERS)
def fuzz_json(target, body, headers):
    lines = [b"POST /alertmanager HTTP/1.1", b"Content-Length: %d" % len(body)]
    lines += [f"{k}: {v}".encode() for k, v in headers.items()]
    check(raw(target, b"\r\n".join(lines) + b"\r\n\r\n" + body))


@settings(max_examples=3000, deadline=None, database=None, suppress_health_check=list(HealthCheck))
@given(
    body=st.binary(max_size=2000),
    path=st.sampled_from(["/", "/alertmanager", "/alertmanager/ops", "/x"]),
    content_type=st.sampled_from(
        ["application/json", "text/plain", "", "application/json; charset=gbk"]
    ),
)
def fuzz_bytes(target, body, path, content_type):
    head = (
        f"POST {path} HTTP/1.1\r\nContent-Type: {content_type}\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    )
    check(raw(target, head.encode() + body))


@settings(max_examples=2000, deadline=None, database=None, suppress_health_check=list(HealthCheck))
@given(
    request=st.one_of(
        st.binary(min_size=1, max_size=300).map(lambda b: b + b"\r\n\r\n"),  # garbage request line
        st.tuples(
            st.sampled_from([b"GET", b"POST", b"PUT", b"BREW", b"OPTIONS"]),
            st.binary(max_size=60).filter(
                lambda p: b" " not in p and b"\r" not in p and b"\n" not in p
            ),
            st.sampled_from([b"HTTP/1.1", b"HTTP/1.0", b"HTTP/9.9", b"HTTP/1"]),
        ).map(lambda t: t[0] + b" /" + t[1] + b" " + t[2] + b"\r\nContent-Length: 0\r\n\r\n"),
        st.integers(0, 5000).map(
            lambda n: b"POST /alertmanager HTTP/1.1\r\n" + b"X-A: b\r\n" * n + b"\r\n"
        ),
        st.integers(1, 50).map(
            lambda n: b"POST /alertmanager HTTP/1.1\r\nContent-Length: %d\r\n\r\n{" % (n + 1)
        ),
    )
)
def fuzz_protocol(target, request):
    check(raw(target, request))


def test_10000_fuzzed_requests_get_no_5xx_and_memory_stays_bounded(target):
    before = rss_kib(target.proc.pid)
    fuzz_json(target)
    fuzz_bytes(target)
    fuzz_protocol(target)
    assert target.proc.poll() is None
    assert post(target.url, GOOD)[0] == 200
    grown = rss_kib(target.proc.pid) - before
    assert grown < 64 * 1024, f"RSS grew by {grown} KiB"


def test_slow_clients_cannot_exhaust_the_server(tmp_path, fake, sqlite_db):
    process = Daemon(
        tmp_path, fake.url, sqlite_db, main={"request_timeout": "2", "max_connections": "64"}
    )
    process.wait_healthy()
    stop = threading.Event()
    closed_by_server = []

    def slowloris():
        sock = socket.create_connection(("127.0.0.1", process.port), timeout=30)
        request = b"POST /alertmanager HTTP/1.1\r\nContent-Length: 100\r\n\r\n" + b"{" * 100
        for byte in request:
            if stop.is_set():
                break
            try:
                sock.sendall(bytes([byte]))
            except OSError:
                break
            time.sleep(0.25)  # the client's pace, not a wait in the test
        try:
            closed_by_server.append(sock.recv(65536) is not None)
        except OSError:
            closed_by_server.append(True)
        sock.close()

    threads = [threading.Thread(target=slowloris) for _ in range(40)]
    for t in threads:
        t.start()
    try:
        for _ in range(10):  # normal webhooks still get through
            assert post(process.url, GOOD)[0] == 200
        flood = [socket.create_connection(("127.0.0.1", process.port)) for _ in range(60)]
        answers = []
        for sock in flood:
            sock.settimeout(10)
            try:
                answers.append(sock.recv(65536))
            except OSError as exc:
                answers.append(repr(exc).encode())
            sock.close()
        assert any(a.startswith(b"HTTP/1.1 503") for a in answers)  # over max_connections: refused
        assert all(a == b"" or a.startswith(b"HTTP/1.1 503") or b"408" in a for a in answers), (
            answers[:3]
        )
        for t in threads:
            t.join(30)
        assert len(closed_by_server) == 40  # every slow client was cut off
        assert post(process.url, GOOD)[0] == 200
    finally:
        stop.set()
        assert process.stop() == 0
