"""A fake DingTalk for the enterprise app robot, on loopback: the OpenAPI (access tokens that
expire, the Stream gateway's tickets, interactive cards created, delivered and updated, DING,
session webhooks) over http.server, and the Stream gateway itself over a real WebSocket server
(the `websockets` package), which sends frames as DingTalk does and collects the answers.

Failures on demand: `card_failures` (HTTP status codes the next card calls get), groups the
robot is not in (`groups_without_robot`: the card is created, its delivery fails), tokens expired
at once (`expire_tokens`), the gateway's `disconnect`, and a connection frozen half-open through
a TCP proxy (`freeze`). Stream failures: `gateway_failures` (statuses the next tickets get),
`disconnect_at_once` (every connection is told `disconnect` as it opens), `drop()` (the gateway
closes the connection), `endpoint` (another endpoint in the tickets' answer).

As DingTalk, it answers XML to an OpenAPI call without `Accept: application/json`, and takes an
answer to a frame only in the SDKs' format (`ack_problem`): others go to `bad_answers`."""

import asyncio
import collections
import http.server
import json
import queue
import secrets
import threading
import time
import uuid

import websockets
import websockets.asyncio.server

from tests.kit import TcpProxy


class FakeApp:
    def __init__(self, client_id="ding-app", client_secret="app-secret-123456", expire_in=7200):
        self.client_id, self.client_secret, self.expire_in = (
            client_id,
            client_secret,
            expire_in,
        )
        self.tokens = {}  # token -> valid until (time.monotonic())
        self.tickets = set()
        self.cards = {}  # outTrackId -> {"group", "params", "at", "updates": [...]}
        self.dings, self.replies, self.calls = [], [], collections.Counter()
        self.card_failures = []  # HTTP statuses the next card calls answer
        self.replies_held = threading.Event()  # cleared: replies to commands hang until set
        self.replies_held.set()
        self.groups_without_robot = set()  # openConversationIds: created, never delivered
        self.connections = 0  # WebSocket connections accepted, each with a fresh ticket
        self.answers = queue.Queue()  # the client's answers to frames, as dicts
        self.bad_answers = []  # (answer, why the gateway would not take it)
        self.frames = {}  # messageId -> the frame sent with it
        self.closes = []  # the close code of each connection, as the client closed it
        self.gateway_failures = []  # HTTP statuses the next connections/open calls answer
        self.disconnect_at_once = False
        self.endpoint = None  # the endpoint tickets name (default: the gateway, via the proxy)
        self.tls = None  # an ssl.SSLContext to serve the OpenAPI over HTTPS
        self._sockets = []
        self._lock = threading.Lock()
        self._loop = None

    # ---- life
    def start(self):
        handler = type("Handler", (_Handler,), {"app": self})
        self.http = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        if self.tls:
            self.http.socket = self.tls.wrap_socket(self.http.socket, server_side=True)
        threading.Thread(target=self.http.serve_forever, args=(0.02,), daemon=True).start()
        scheme = "https" if self.tls else "http"
        self.url = f"{scheme}://127.0.0.1:{self.http.server_address[1]}"
        ready = threading.Event()
        threading.Thread(target=self._gateway, args=(ready,), daemon=True).start()
        ready.wait(10)
        self.proxy = TcpProxy(self.ws_port).start()
        return self

    def stop(self):
        self.http.shutdown()
        self.http.server_close()
        if self._loop:
            self._loop.call_soon_threadsafe(self._stop.set_result, None)
        self.proxy.cut()

    # ---- the gateway (a real WebSocket server)
    def _gateway(self, ready):
        self._loop = asyncio.new_event_loop()

        async def main():
            self._stop = self._loop.create_future()
            async with websockets.asyncio.server.serve(
                self._serve, "127.0.0.1", 0, ping_interval=None, max_size=8 << 20
            ) as server:
                self.ws_port = server.sockets[0].getsockname()[1]
                ready.set()
                await self._stop

        self._loop.run_until_complete(main())

    async def _serve(self, ws):
        ticket = ws.request.path.partition("ticket=")[2]
        with self._lock:
            known = ticket in self.tickets
            self.tickets.discard(ticket)  # a ticket opens one connection
        if not known:
            await ws.close(4001, "unknown ticket")
            return
        self.connections += 1
        self._sockets.append(ws)
        try:
            if self.disconnect_at_once:
                await ws.send(json.dumps(self._remember(disconnect_frame())))
            async for message in ws:
                self._take(message)
        except websockets.ConnectionClosed:
            pass
        finally:
            self._sockets.remove(ws)
            await ws.wait_closed()
            self.closes.append(ws.close_code)

    def _remember(self, frame):
        message_id = frame.get("headers", {}).get("messageId")
        if isinstance(message_id, str):
            self.frames[message_id] = frame
        return frame

    def _take(self, message):
        """An answer from the client: taken if DingTalk would take it."""
        answer = json.loads(message)
        frame = self.frames.get(answer.get("headers", {}).get("messageId"), {})
        why = ack_problem(frame, answer)
        if why:
            self.bad_answers.append((answer, why))
        else:
            self.answers.put(answer)

    def _run(self, coroutine):
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result(10)

    def send(self, frame):
        """Send a frame on the newest connection."""

        self._remember(frame)

        async def go():
            await self._sockets[-1].send(json.dumps(frame))

        self._run(go())

    def send_fragmented(self, frame, pieces=4):
        self._remember(frame)
        text = json.dumps(frame)
        size = len(text) // pieces + 1

        async def go():
            await self._sockets[-1].send([text[i : i + size] for i in range(0, len(text), size)])

        self._run(go())

    def send_text(self, text):
        """Send a text message as it is (it need not be JSON, nor a frame DingTalk sends)."""

        async def go():
            await self._sockets[-1].send(text)

        self._run(go())

    def ask(self, kind, topic, data, message_id=None, timeout=10):
        """Send a frame and wait for the client's answer to it."""
        message_id = message_id or uuid.uuid4().hex
        self.send(
            {
                "specVersion": "1.0",
                "type": kind,
                "headers": {
                    "topic": topic,
                    "messageId": message_id,
                    "contentType": "application/json",
                    "time": str(int(time.time() * 1000)),
                },
                "data": json.dumps(data) if isinstance(data, dict) else data,
            }
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                answer = self.answers.get(timeout=max(0.01, deadline - time.monotonic()))
            except queue.Empty:
                break
            if answer.get("headers", {}).get("messageId") == message_id:
                return answer
        raise AssertionError(f"no answer to {message_id}")

    def click(self, track, user_id, action="claim"):
        content = {"cardPrivateData": {"actionIds": [action], "params": {"action": action}}}
        answer = self.ask(
            "CALLBACK",
            "/v1.0/card/instances/callback",
            {
                "outTrackId": track,
                "userId": user_id,
                "corpId": "ding-corp",
                "type": "actionCallback",
                "content": json.dumps(content),
            },
        )
        return json.loads(answer["data"])["response"]  # what DingTalk shows the clicker

    def write(self, text, user_id, conversation="cid-ops"):
        """Someone writes to the robot in a group; the reply goes to this fake's session hook."""
        session = uuid.uuid4().hex
        self.ask(
            "CALLBACK",
            "/v1.0/im/bot/messages/get",
            {
                "conversationId": conversation,
                "conversationType": "2",
                "senderStaffId": user_id,
                "senderNick": user_id,
                "msgtype": "text",
                "text": {"content": " " + text + " "},
                "sessionWebhook": f"{self.url}/session/{session}",
                "sessionWebhookExpiredTime": int(time.time() * 1000) + 3600_000,
            },
        )
        return session

    def disconnect(self):
        """The gateway's SYSTEM `disconnect` on the newest connection; its messageId."""
        frame = disconnect_frame()
        self.send(frame)
        return frame["headers"]["messageId"]

    def drop(self, code=1011):
        """The gateway closes the newest connection."""

        async def go():
            await self._sockets[-1].close(code, "dropped")

        self._run(go())

    def freeze(self):
        """The connection goes half-open: bytes stop flowing, nothing is closed."""
        self.proxy.frozen.set()

    def thaw(self):
        self.proxy.frozen.clear()

    def knows(self, client_id, client_secret):
        return (client_id, client_secret) == (self.client_id, self.client_secret)

    def expire_tokens(self):
        with self._lock:
            self.tokens.clear()

    def reply_to(self, session, timeout=10):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = [r for s, r in self.replies if s == session]
            if found:
                return found[0]
            time.sleep(0.02)
        raise AssertionError("no reply through the session webhook")


class _Handler(http.server.BaseHTTPRequestHandler):
    app: FakeApp

    def log_message(self, *args):
        pass

    def do_POST(self):
        self._handle()

    def do_PUT(self):
        self._handle()

    def _handle(self):
        app = self.app
        body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
        path = self.path
        app.calls[path] += 1
        if path.startswith("/v1.0/") and self.headers.get("Accept") != "application/json":
            return self._xml()  # as the gateway does (the Node SDK says so)
        if path == "/v1.0/oauth2/accessToken":
            if not app.knows(body.get("appKey"), body.get("appSecret")):
                return self._answer(400, {"code": "invalidClientIdOrSecret", "message": "bad"})
            token = secrets.token_hex(16)
            with app._lock:
                app.tokens[token] = time.monotonic() + app.expire_in
            return self._answer(200, {"accessToken": token, "expireIn": app.expire_in})
        if path == "/v1.0/gateway/connections/open":
            if not app.knows(body.get("clientId"), body.get("clientSecret")):
                return self._answer(401, {"code": "InvalidAuthentication", "message": "bad"})
            if app.gateway_failures:
                status = app.gateway_failures.pop(0)
                code = "Forbidden.AccessDenied.QpsLimitForApi" if status == 403 else "ServiceError"
                return self._answer(status, {"code": code, "message": "fake failure"})
            ticket = secrets.token_hex(8)
            with app._lock:
                app.tickets.add(ticket)
            return self._answer(
                200,
                {
                    "endpoint": app.endpoint or f"ws://127.0.0.1:{app.proxy.port}/connect",
                    "ticket": ticket,
                },
            )
        if path.startswith("/session/"):
            app.replies_held.wait(60)
            app.replies.append((path[9:], body))
            return self._answer(200, {"errcode": 0, "errmsg": "ok"})
        token = self.headers.get("x-acs-dingtalk-access-token", "")
        with app._lock:
            valid = app.tokens.get(token, 0) > time.monotonic()
        if not valid:
            return self._answer(401, {"code": "InvalidAuthentication", "message": "token"})
        if path.startswith("/v1.0/card/") and app.card_failures:
            status = app.card_failures.pop(0)
            code = "Forbidden.AccessDenied.QpsLimitForApi" if status == 403 else "ServiceError"
            return self._answer(status, {"code": code, "message": "fake failure"})
        if path == "/v1.0/card/instances/createAndDeliver":
            # as DingTalk: the card is created whatever happens to its delivery, and the call
            # succeeds; each space it was to go to says in deliverResults whether it went
            group = body["openSpaceId"].rpartition("IM_GROUP.")[2]
            delivered = group not in app.groups_without_robot
            if delivered:
                app.cards[body["outTrackId"]] = {
                    "body": body,
                    "params": dict(body["cardData"]["cardParamMap"]),
                    "updates": [],
                }
            result = {"spaceType": "IM_GROUP", "spaceId": group, "success": delivered}
            if not delivered:
                result["errorMsg"] = "robot is not a member of the group"
            return self._answer(
                200,
                {
                    "success": True,
                    "result": {"outTrackId": body["outTrackId"], "deliverResults": [result]},
                },
            )
        if path == "/v1.0/card/instances" and self.command == "PUT":
            card = app.cards.get(body["outTrackId"])
            if card is None:
                return self._answer(400, {"code": "cardNotExist", "message": "no such card"})
            card["params"].update(body["cardData"]["cardParamMap"])
            card["updates"].append(body["cardData"]["cardParamMap"])
            return self._answer(200, {"success": True, "result": True})
        if path == "/v1.0/robot/ding/send":
            app.dings.append(body)
            return self._answer(200, {"openDingId": uuid.uuid4().hex})
        return self._answer(404, {"code": "notFound", "message": path})

    def _answer(self, status, body):
        raw = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(raw)))
        self.end_headers()
        self.wfile.write(raw)

    def _xml(self):
        raw = b"<?xml version='1.0' encoding='UTF-8'?><Map><error>Accept</error></Map>"
        self.send_response(200)
        self.send_header("Content-Type", "application/xml")
        self.send_header("Content-Length", str(len(raw)))
        self.end_headers()
        self.wfile.write(raw)


def disconnect_frame():
    return {
        "specVersion": "1.0",
        "type": "SYSTEM",
        "headers": {"topic": "disconnect", "messageId": uuid.uuid4().hex},
        "data": json.dumps({"reason": "gateway upgrade"}),
    }


def ack_problem(frame, answer):
    """Why DingTalk's gateway would not take `answer` as the acknowledgement of `frame` ("" if
    it would), in the format of its SDKs (dingtalk-stream-sdk-python frames.AckMessage and
    handlers.py, the Go SDK's DataFrameResponse): {code, headers: {messageId, contentType},
    message, data: a string}; a callback's data is {"response": ...}; a SYSTEM frame's data is
    its own."""
    if not frame:
        return "no frame was sent with this messageId"
    if not isinstance(answer, dict) or set(answer) != {"code", "headers", "message", "data"}:
        return "not {code, headers, message, data}"
    headers = answer["headers"]
    if not isinstance(answer["code"], int) or not isinstance(headers, dict):
        return "code or headers of the wrong type"
    if headers.get("contentType") != "application/json":
        return "its contentType is not application/json"
    if not isinstance(answer["message"], str) or not isinstance(answer["data"], str):
        return "its message or data is not a string"
    if answer["code"] != 200:
        return ""
    if frame["type"] == "CALLBACK":
        try:
            data = json.loads(answer["data"])
        except ValueError:
            return "its data is not JSON"
        if not isinstance(data, dict) or set(data) != {"response"}:
            return 'a callback\'s data is not {"response": the answer}'
    if frame["type"] == "SYSTEM" and not same_json(answer["data"], frame.get("data") or ""):
        return "a SYSTEM frame's data is not its own"
    return ""


def same_json(a, b):
    try:
        return json.loads(a or "{}") == json.loads(b or "{}")
    except ValueError:
        return a == b
