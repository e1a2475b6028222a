"""A fake DingTalk robot API on loopback, faithful to what alertbridge relies on.

It checks what the real one checks (access token, a robot disabled in its group, the IP
allow-list, signature and its one-hour window, custom keyword, body size, 20 messages per window
per robot with a throttle after it) and answers with the real errcodes. Tests can add latency,
script failures (errcodes, HTTP 500, broken answers, answers that hang or trickle), run a hook
before answering, and await what it received.
"""

import base64
import contextlib
import hashlib
import hmac
import http.server
import json
import socket
import threading
import time
import urllib.parse
from dataclasses import dataclass, field

# DingTalk's clock is its own: a test that steps the wall clock of alertbridge's process
# (monkeypatching time.time) does not move it.
REAL_TIME = time.time


# Answers a proxy or a broken server may give instead of DingTalk's JSON, as raw bytes.
BROKEN = {
    "json-array": b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
    b"Content-Length: 2\r\n\r\n[]",
    "json-null": b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
    b"Content-Length: 4\r\n\r\nnull",
    "bad-status-line": b"SSH-2.0-OpenSSH_9.2\r\n\r\n",
    "cut-chunked": b'HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n20\r\n{"errcode": 0, "er',
}


@dataclass
class Request:
    token: str
    body: dict
    at: float
    errcode: int
    size: int
    raw: bytes = field(default=b"", repr=False)

    @property
    def text(self):
        """What the group reads: DingTalk's and WeCom's text or markdown, Feishu's card or text."""
        if isinstance(self.body.get("card"), dict):
            elements = self.body["card"].get("elements") or []
            return "\n".join(str(e.get("content", "")) for e in elements if isinstance(e, dict))
        kind = self.body.get("msgtype") or self.body.get("msg_type")
        content = self.body.get(kind) or self.body.get("content") or {}
        if not isinstance(content, dict):
            return ""
        return str(content.get("text", content.get("content", "")))


class FakeDingTalk:
    def __init__(self, rate_limit=20, rate_window=60.0, throttle_seconds=600.0, max_bytes=20000):
        self.rate_limit = rate_limit
        self.rate_window = rate_window
        self.throttle_seconds = throttle_seconds
        self.max_bytes = max_bytes
        self.latency = 0.0
        self.robots = {}  # token -> (secret, keyword)
        self.allowed_ips = {}  # token -> the addresses its IP allow-list (安全设置) holds
        self.disabled = set()  # tokens of robots disabled (停用) in their group
        self.requests = []  # every request, in arrival order
        self.cond = threading.Condition()
        self._arrivals = {}  # token -> arrival times inside the window
        self._throttled_until = {}
        # token -> scripted answers: errcode, "http500", "hang", "trickle" or BROKEN
        self._script = {}
        self.release = threading.Event()  # ends every "hang" and "trickle" answer
        self.before_answer = None  # called with the Request before it is answered
        self.server = None
        self.tls = None  # an ssl.SSLContext to serve HTTPS, as DingTalk does

    # set-up
    def add_robot(self, token, secret="", keyword="", allowed_ips=()):
        self.robots[token] = (secret, keyword)
        if allowed_ips:
            self.allowed_ips[token] = set(allowed_ips)

    def disable_robot(self, token):
        self.disabled.add(token)

    def url(self, token):
        scheme = "https" if self.tls else "http"
        return (
            f"{scheme}://127.0.0.1:{self.server.server_address[1]}/robot/send?access_token={token}"
        )

    def fail_next(self, token, answer, times=1):
        with self.cond:
            self._script.setdefault(token, []).extend([answer] * times)

    def clear_script(self):
        with self.cond:
            self._script.clear()

    def start(self, port=0):
        fake = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            disable_nagle_algorithm = True

            def log_message(self, *args):
                pass

            def do_GET(self):  # /stats: what a benchmark in another process needs to know
                with fake.cond:
                    stats = [
                        {
                            "token": r.token,
                            "at": r.at,
                            "errcode": r.errcode,
                            "size": r.size,
                            "text": r.text if r.errcode == 0 else "",
                        }
                        for r in fake.requests
                    ]
                data = json.dumps(stats, ensure_ascii=False).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                if fake.latency:
                    time.sleep(fake.latency)
                status, answer, request = fake.handle(self.path, body, self.client_address[0])
                if fake.before_answer:
                    fake.before_answer(request)
                if request.errcode in BROKEN:
                    self.wfile.write(BROKEN[request.errcode])
                    self.close_connection = True
                    return
                if request.errcode in ("hang", "trickle"):
                    return self._stall(request.errcode)
                data = json.dumps(answer).encode()
                self.send_response(status)
                for name, value in fake.headers(request).items():
                    self.send_header(name, value)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _stall(self, how):
                """Hang without a byte, or trickle a space every 0.1 s, until released."""
                self.close_connection = True
                if how == "trickle":
                    self.wfile.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100000\r\n\r\n")
                while not fake.release.wait(0.1):
                    if how == "trickle":
                        try:
                            self.wfile.write(b" ")
                        except OSError:
                            return
                with contextlib.suppress(OSError):
                    self.connection.shutdown(socket.SHUT_RDWR)

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", port), Handler)
        if self.tls:
            self.server.socket = self.tls.wrap_socket(self.server.socket, server_side=True)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, args=(0.02,), daemon=True).start()
        return self

    def headers(self, request):
        """Headers of the answer to this request, beyond the content's."""
        return {}

    def stop(self):
        self.release.set()
        self.server.shutdown()
        self.server.server_close()

    # the API
    def handle(self, path, raw, client="127.0.0.1"):
        now = REAL_TIME()
        parts = urllib.parse.urlsplit(path)
        query = dict(urllib.parse.parse_qsl(parts.query))
        token = query.get("access_token", "")
        with self.cond:
            status, errcode, errmsg = self._judge(parts.path, token, query, raw, now, client)
            try:
                body = json.loads(raw.decode("utf-8"))
            except ValueError:
                body = {}
            request = Request(token, body, now, errcode, len(raw), raw)
            self.requests.append(request)
            self.cond.notify_all()
        return status, {"errcode": errcode, "errmsg": errmsg}, request

    def _judge(self, path, token, query, raw, now, client):
        if path != "/robot/send":
            return 404, -1, "not found"
        if token not in self.robots:
            return 200, 300001, "token is not exist"
        if token in self.disabled:
            return 200, 400102, "robot is disabled"
        if token in self.allowed_ips and client not in self.allowed_ips[token]:
            return 200, 310000, f"ip {client} not in whitelist"
        secret, keyword = self.robots[token]
        if secret:
            timestamp, sign = query.get("timestamp", ""), query.get("sign", "")
            if not timestamp.isdigit() or abs(int(timestamp) - now * 1000) > 3600 * 1000:
                return 200, 310000, "sign not match, more: [timestamp expired]"
            expected = base64.b64encode(
                hmac.new(
                    secret.encode(), f"{timestamp}\n{secret}".encode(), hashlib.sha256
                ).digest()
            ).decode()
            if not hmac.compare_digest(sign, expected):
                return 200, 310000, "sign not match"
        if self._throttled_until.get(token, 0) > now:
            return 200, 410100, "send too fast, exceed 20 times per minute"
        arrivals = [t for t in self._arrivals.get(token, []) if t > now - self.rate_window]
        if len(arrivals) >= self.rate_limit:
            self._throttled_until[token] = now + self.throttle_seconds
            return 200, 410100, "send too fast, exceed 20 times per minute"
        arrivals.append(now)
        self._arrivals[token] = arrivals
        script = self._script.get(token)
        if script:
            answer = script.pop(0)
            if answer == "http500":
                return 500, -1, "internal error"
            return (
                200,
                answer,
                "scripted failure",
            )  # an errcode, or a BROKEN, "hang" or "trickle" answer
        if len(raw) > self.max_bytes:
            return 200, 460101, "message too long, exceed 20000 bytes"
        try:
            text = self._text(json.loads(raw.decode("utf-8")))
        except (ValueError, KeyError, TypeError):
            return 200, 40035, "缺少参数 json"
        if keyword and keyword not in text:
            return 200, 310000, "keywords not in content"
        return 200, 0, "ok"

    @staticmethod
    def _text(body):
        """The text a keyword is looked for in; KeyError, TypeError or ValueError when the body
        lacks what its msgtype needs, as the real API answers 40035 then."""
        kind = body["msgtype"]
        content = body[kind]
        if kind == "text":
            return str(content["content"])
        if kind == "markdown":
            return content["title"] + content["text"]
        if kind == "actionCard":
            title, text = content["title"], content["text"]
            if "btns" in content:
                buttons = content["btns"]
                if (
                    not isinstance(buttons, list)
                    or not buttons
                    or content.get("btnOrientation", "0") not in ("0", "1")
                ):
                    raise ValueError("btns")
                for button in buttons:
                    if not (
                        button["title"]
                        and str(button["actionURL"]).startswith(
                            ("http://", "https://", "dingtalk://")
                        )
                    ):
                        raise ValueError("btn")
            elif not (content["singleTitle"] and content["singleURL"]):
                raise ValueError("single")
            return title + text
        raise ValueError(kind)

    # what tests read
    def delivered(self, token=None):
        with self.cond:
            return [
                r for r in self.requests if r.errcode == 0 and (token is None or r.token == token)
            ]

    def wait_for(self, predicate, timeout=10.0):
        """Wait until predicate(self) is true; returns its last value."""
        deadline = time.monotonic() + timeout
        with self.cond:
            while True:
                value = predicate(self)
                left = deadline - time.monotonic()
                if value or left <= 0:
                    return value
                self.cond.wait(left)

    def max_per_window(self, token, window=None):
        """Most requests this robot received in any window (rate_window's, or `window`
        seconds): must never exceed the limit."""
        window = window or self.rate_window
        times = sorted(r.at for r in self.requests if r.token == token)
        best, start = 0, 0
        for end, t in enumerate(times):
            while times[start] <= t - window:
                start += 1
            best = max(best, end - start + 1)
        return best


if (
    __name__ == "__main__"
):  # a stand-alone fake for benchmarks: python3 -m tests.fakedingtalk --port 18080 ...
    import argparse

    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--tokens", default="bench-1,bench-2,bench-3")
    parser.add_argument("--latency", type=float, default=0.05)
    parser.add_argument("--rate-limit", type=int, default=20)
    parser.add_argument("--rate-window", type=float, default=60.0)
    args = parser.parse_args()
    server = FakeDingTalk(rate_limit=args.rate_limit, rate_window=args.rate_window)
    server.latency = args.latency
    for name in args.tokens.split(","):
        server.add_robot(name)
    server.start(args.port)
    threading.Event().wait()
