#!/usr/bin/env python3
"""The common design of existing bridges, as a baseline: inside the webhook request, post to
DingTalk, then write the history to MySQL, then answer. Same stack as alertbridge (http.server,
urllib, pymysql), so the difference measured is the design.

    python3 bench/sync_baseline.py PORT DINGTALK_URL MYSQL_DATABASE
"""

import http.server
import json
import sys
import threading
import urllib.request

import pymysql

PORT, DINGTALK, DATABASE = int(sys.argv[1]), sys.argv[2], sys.argv[3]
local = threading.local()


def db():
    if getattr(local, "db", None) is None:
        local.db = pymysql.connect(
            host="127.0.0.1",
            user="root",
            password="",
            database=DATABASE,
            charset="utf8mb4",
            autocommit=True,
        )
        with local.db.cursor() as cursor:
            cursor.execute(
                "CREATE TABLE IF NOT EXISTS alerts (id BIGINT AUTO_INCREMENT PRIMARY KEY, "
                "fingerprint VARCHAR(64), alertname VARCHAR(255), instance VARCHAR(255), "
                "status VARCHAR(16), labels JSON, starts_at VARCHAR(40))"
            )
    return local.db


class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True

    def log_message(self, *args):
        pass

    def do_POST(self):
        payload = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        text = "\n\n".join(
            f"**{a['labels'].get('alertname')}** {a['labels'].get('instance')} {a['status']}"
            for a in payload["alerts"]
        )
        body = json.dumps(
            {"msgtype": "markdown", "markdown": {"title": "alerts", "text": text}}
        ).encode()
        request = urllib.request.Request(
            DINGTALK, data=body, headers={"Content-Type": "application/json"}
        )
        urllib.request.urlopen(request, timeout=10).read()
        with db().cursor() as cursor:
            cursor.executemany(
                "INSERT INTO alerts (fingerprint, alertname, instance, status, labels, starts_at) "
                "VALUES (%s, %s, %s, %s, %s, %s)",
                [
                    (
                        a["fingerprint"],
                        a["labels"].get("alertname"),
                        a["labels"].get("instance"),
                        a["status"],
                        json.dumps(a["labels"]),
                        a["startsAt"],
                    )
                    for a in payload["alerts"]
                ],
            )
        self.send_response(200)
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"ok")


server = http.server.ThreadingHTTPServer(("127.0.0.1", PORT), Handler)
server.daemon_threads = True
server.serve_forever()
