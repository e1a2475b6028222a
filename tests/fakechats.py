"""Fake Feishu and WeCom group robot APIs on loopback, as faithful to the documented ones as the
DingTalk fake is to DingTalk's (the server, scripted failures, latency, hooks and waiting are
FakeDingTalk's).

Feishu's custom bot (自定义机器人): POST /open-apis/bot/v2/hook/TOKEN; a signed bot checks
`timestamp` (seconds, within an hour) and `sign` (base64 of HMAC-SHA256 keyed by
"timestamp\\nsecret" over nothing) in the body; 100 requests a minute and 5 a second per bot
(past 5 a second the gateway answers HTTP 429 with x-ogw-ratelimit-reset, past 100 a minute
code 11232); a body at most 20 KB; {"code": 0, "msg": "success"}; 19001 no such bot, 19021 sign,
19022 IP, 19024 keyword, 9499 bad request.

WeCom's group robot (群机器人): POST /cgi-bin/webhook/send?key=KEY; 20 messages a minute
(45009 past it); markdown content at most 4096 bytes and text content 2048 (40058 past
them); 93000 a key it does not know; {"errcode": 0, "errmsg": "ok"}.
"""

import base64
import hashlib
import hmac
import json
import threading
import urllib.parse

from tests.fakedingtalk import REAL_TIME, FakeDingTalk, Request


class FakeChat(FakeDingTalk):
    """A fake whose robots are counted in several windows: `windows` of (count, seconds)."""

    WINDOWS = ()

    def __init__(self, windows=None, throttle_seconds=0.0):
        windows = tuple(windows or self.WINDOWS)
        super().__init__(rate_limit=windows[0][0], rate_window=windows[0][1],
                         throttle_seconds=throttle_seconds)
        self.windows = windows

    def handle(self, path, raw, client="127.0.0.1"):
        now = REAL_TIME()
        parts = urllib.parse.urlsplit(path)
        token = self.token_of(parts)
        try:
            body = json.loads(raw.decode("utf-8"))
        except ValueError:
            body = {}
        with self.cond:
            status, errcode, errmsg = self._judge(parts.path, token, body, raw, now, client)
            request = Request(token, body if isinstance(body, dict) else {}, now, errcode,
                              len(raw), raw)
            self.requests.append(request)
            self.cond.notify_all()
        return status, self.answer(errcode, errmsg), request

    def over_limit(self, token, now):
        """The window this request would exceed (its arrival not counted then), or None."""
        arrivals = self._arrivals.setdefault(token, [])
        arrivals[:] = [t for t in arrivals if t > now - self.windows[0][1]]
        for count, seconds in self.windows:
            if sum(1 for t in arrivals if t > now - seconds) >= count:
                return count, seconds
        arrivals.append(now)
        return None

    def scripted(self, token):
        script = self._script.get(token)
        if not script:
            return None
        answer = script.pop(0)
        if answer == "http500":
            return 500, -1, "internal error"
        return 200, answer, "scripted failure"


class FakeFeishu(FakeChat):
    WINDOWS = ((100, 60.0), (5, 1.0))
    MAX_BYTES = 20 * 1024

    def url(self, token):
        return f"http://127.0.0.1:{self.server.server_address[1]}/open-apis/bot/v2/hook/{token}"

    @staticmethod
    def token_of(parts):
        return parts.path.rpartition("/")[2]

    @staticmethod
    def answer(errcode, errmsg):
        return {"code": errcode, "data": {}, "msg": errmsg}

    def headers(self, request):
        if request.errcode == 99991400:
            return {"x-ogw-ratelimit-limit": "5", "x-ogw-ratelimit-reset": "1"}
        return {}

    def _judge(self, path, token, body, raw, now, client):
        if not path.startswith("/open-apis/bot/v2/hook/"):
            return 404, 404, "not found"
        if token not in self.robots:
            return 200, 19001, "param invalid: incoming webhook access token invalid"
        if token in self.allowed_ips and client not in self.allowed_ips[token]:
            return 200, 19022, "Ip Not Allowed"
        secret, keyword = self.robots[token]
        if secret and not self._signed(body, secret, now):
            return 200, 19021, ("sign match fail or timestamp is not within one hour from "
                                "current time")
        over = self.over_limit(token, now)
        if over == self.windows[-1] and len(self.windows) > 1:
            return 429, 99991400, "request trigger frequency limit"
        if over:
            return 200, 11232, "frequency limited psm[lark.oapi.app_platform_runtime]"
        scripted = self.scripted(token)
        if scripted:
            return scripted
        if len(raw) > self.MAX_BYTES:
            return 400, 9499, "Bad Request: the request body exceeds 20 KB"
        try:
            text = self._text(body)
        except (KeyError, TypeError, ValueError, AttributeError):
            return 400, 9499, "Bad Request"
        if keyword and keyword not in text:
            return 200, 19024, "Key Words Not Found"
        return 200, 0, "success"

    @staticmethod
    def _signed(body, secret, now):
        timestamp, sign = str(body.get("timestamp", "")), str(body.get("sign", ""))
        if not timestamp.isdigit() or abs(int(timestamp) - now) > 3600:
            return False
        key = f"{timestamp}\n{secret}".encode()
        expected = base64.b64encode(hmac.new(key, b"", hashlib.sha256).digest()).decode()
        return hmac.compare_digest(sign, expected)

    @staticmethod
    def _text(body):
        """What a keyword is looked for in; an error when the body is not what its msg_type
        needs (Feishu answers 9499 then)."""
        kind = body["msg_type"]
        if kind == "text":
            return str(body["content"]["text"])
        if kind != "interactive":
            raise ValueError(kind)
        card = body["card"]
        title = card["header"]["title"]["content"]
        texts = [title]
        for element in card["elements"]:
            if element["tag"] == "markdown":
                texts.append(str(element["content"]))
            elif element["tag"] == "action":
                for button in element["actions"]:
                    if not (button["text"]["content"] and
                            str(button["url"]).startswith(("http://", "https://"))):
                        raise ValueError("button")
            else:
                raise ValueError(element["tag"])
        return "\n".join(texts)


class FakeWeCom(FakeChat):
    WINDOWS = ((20, 60.0),)
    LIMITS = {"markdown": 4096, "text": 2048}  # bytes of content

    def url(self, key):
        return f"http://127.0.0.1:{self.server.server_address[1]}/cgi-bin/webhook/send?key={key}"

    @staticmethod
    def token_of(parts):
        return dict(urllib.parse.parse_qsl(parts.query)).get("key", "")

    @staticmethod
    def answer(errcode, errmsg):
        return {"errcode": errcode, "errmsg": errmsg}

    def _judge(self, path, token, body, raw, now, client):
        if path != "/cgi-bin/webhook/send":
            return 404, 404, "not found"
        if token not in self.robots:
            return 200, 93000, "invalid webhook url, hint: [1700000000_1_xxx]"
        if self.over_limit(token, now):
            return 200, 45009, "api freq out of limit"
        scripted = self.scripted(token)
        if scripted:
            return scripted
        try:
            kind = body["msgtype"]
            content = body[kind]["content"]
            lists = [body[kind].get(k, []) for k in ("mentioned_list", "mentioned_mobile_list")]
            if kind not in self.LIMITS or not isinstance(content, str) or not all(
                isinstance(each, list) for each in lists
            ):
                raise ValueError(kind)
        except (KeyError, TypeError, ValueError, AttributeError):
            return 200, 40008, "invalid message type"
        if kind == "markdown" and any(lists):
            return 200, 40008, "invalid message type: markdown takes no mentioned lists"
        if len(content.encode()) > self.LIMITS[kind]:
            return 200, 40058, f"content exceed max length {self.LIMITS[kind]}"
        return 200, 0, "ok"


if __name__ == "__main__":  # stand-alone, for benchmarks: python3 -m tests.fakechats feishu ...
    import argparse

    parser = argparse.ArgumentParser()
    parser.add_argument("kind", choices=("feishu", "wecom"))
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--tokens", default="bench-1,bench-2,bench-3")
    parser.add_argument("--latency", type=float, default=0.05)
    parser.add_argument("--windows", default="", help="COUNT/SECONDS,...: the limits it keeps")
    args = parser.parse_args()
    windows = [tuple(float(n) for n in w.split("/")) for w in args.windows.split(",") if w]
    server = (FakeFeishu if args.kind == "feishu" else FakeWeCom)(
        windows=[(int(count), seconds) for count, seconds in windows] or None
    )
    server.latency = args.latency
    for name in args.tokens.split(","):
        server.add_robot(name)
    server.start(args.port)
    threading.Event().wait()
