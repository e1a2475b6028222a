"""A fake Alertmanager API v2 on loopback, for what alertbridge asks of it: silences made
(POST /api/v2/silences), expired (DELETE /api/v2/silence/ID) and listed (GET /api/v2/silences),
and the alerts it holds (GET /api/v2/alerts, whatever the test sets). The real Alertmanager is
tested in test_e2e.py; this one can be slow or hang on demand (`delay`, `hold`), and counts the
requests it got, to test what a slow Alertmanager must not hold up."""

import datetime
import http.server
import json
import select
import socket
import threading
import uuid


class FakeAlertmanager:
    def __init__(self):
        self.alerts = []  # what GET /api/v2/alerts answers
        self.silences = {}  # id -> the silence, as the API lists it
        self.requests = []  # (method, path), in order
        self.delay = 0.0  # seconds before each answer
        self.hold = threading.Event()  # while clear and `holding`, answers wait for it
        self.holding = False
        self.waiting = threading.Semaphore(0)  # released once for each request held
        self.abandoned = 0  # requests held until their client gave up (a deadline passed)
        self.started = datetime.datetime(2000, 1, 1, tzinfo=datetime.timezone.utc)  # long up
        self._lock = threading.Lock()

    def start(self):
        handler = type("Handler", (_Handler,), {"am": self})
        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, args=(0.02,), daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        return self

    def stop(self):
        self.hold.set()
        self.server.shutdown()
        self.server.server_close()

    def fire(self, labels, receiver="ops", silenced_by=()):
        """An alert Alertmanager holds, firing, with these labels."""
        self.alerts.append(
            {
                "labels": labels,
                "receivers": [{"name": receiver}],
                "endsAt": "2999-01-01T00:00:00Z",
                "status": {"state": "suppressed" if silenced_by else "active",
                           "silencedBy": list(silenced_by), "inhibitedBy": []},
            }
        )

    def expire(self, silence_id):
        """Someone expires the silence in Alertmanager's UI."""
        self.silences[silence_id]["status"]["state"] = "expired"

    def extend(self, silence_id, ends):
        """Someone moves the silence's end in Alertmanager's UI (it keeps its id)."""
        self.silences[silence_id]["endsAt"] = ends.isoformat()

    def restart(self):
        """Alertmanager started again: it keeps its silences, not its alerts."""
        self.started = datetime.datetime.now(datetime.timezone.utc)
        self.alerts = []

    def _held(self, connection):
        """Wait for `hold`, noting a client that hangs up meanwhile."""
        while not self.hold.wait(0.05):
            if connection is not None and select.select([connection], [], [], 0)[0]:
                try:
                    gone = connection.recv(1, socket.MSG_PEEK) == b""
                except OSError:
                    gone = True
                if gone:
                    with self._lock:
                        self.abandoned += 1
                    return

    def made(self):
        """The silences made, oldest first."""
        return list(self.silences.values())

    def answer(self, method, path, body, connection=None):
        with self._lock:
            self.requests.append((method, path))
        if self.holding:
            self.waiting.release()
            self._held(connection)
        if self.delay:
            threading.Event().wait(self.delay)
        if method == "POST" and path == "/api/v2/silences":
            silence_id = str(uuid.uuid4())
            self.silences[silence_id] = {**body, "id": silence_id, "status": {"state": "active"}}
            return 200, {"silenceID": silence_id}
        if method == "DELETE" and path.startswith("/api/v2/silence/"):
            found = self.silences.get(path.rsplit("/", 1)[1])
            if found is None:
                return 404, {"message": "silence not found"}
            found["status"]["state"] = "expired"
            found["endsAt"] = datetime.datetime.now(datetime.timezone.utc).isoformat()
            return 200, None
        if method == "GET" and path == "/api/v2/status":
            return 200, {"uptime": self.started.isoformat(), "versionInfo": {}}
        if method == "GET" and path == "/api/v2/silences":
            return 200, list(self.silences.values())
        if method == "GET" and path.split("?")[0] == "/api/v2/alerts":
            return 200, self.alerts  # filters are not applied: alertbridge uses none
        return 404, {"message": "not here"}


class _Handler(http.server.BaseHTTPRequestHandler):
    am = None

    def log_message(self, *args):
        pass

    def do_GET(self):
        self._handle("GET")

    def do_POST(self):
        self._handle("POST")

    def do_DELETE(self):
        self._handle("DELETE")

    def _handle(self, method):
        length = int(self.headers.get("Content-Length") or 0)
        body = json.loads(self.rfile.read(length) or b"null")
        status, answer = self.am.answer(method, self.path, body, self.connection)
        data = b"" if answer is None else json.dumps(answer).encode()
        try:
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
        except OSError:
            pass
