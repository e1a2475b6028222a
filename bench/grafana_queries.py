#!/usr/bin/env python3
"""Scale check for the Grafana dashboard: 1,000,000 alert rows (and 500,000 sends) in MariaDB/MySQL,
then every panel's and variable's query, expanded as Grafana does, timed and EXPLAINed.

    python3 -m bench.grafana_queries [--rows 1000000] [--dsn root:@127.0.0.1:3306/alertbridge_bench]

The database is created (and its tables dropped and refilled) by this script: do not point it at a
database you care about. Prints one row per query: median time over 3 runs, rows returned, and the
index EXPLAIN says MySQL uses.
"""

import argparse
import json
import random
import statistics
import time
from datetime import datetime, timedelta, timezone

import pymysql

import alertbridge
from tests.grafana_sql import expand
from tests.kit import ROOT


def connect(dsn, database=None):
    creds, _, location = dsn.rpartition("@")
    user, _, password = creds.partition(":")
    hostport, _, name = location.partition("/")
    host, _, port = hostport.partition(":")
    db = pymysql.connect(
        host=host,
        port=int(port or 3306),
        user=user,
        password=password,
        database=database,
        charset="utf8mb4",
        autocommit=True,
    )
    return db, name


def fill(db, rows, now):
    rng = random.Random(42)
    names = [f"Rule{i:03d}" for i in range(200)]
    weights = [1 / (i + 1) for i in range(200)]  # a few rules fire most, as in life
    severities, receivers = (
        ["critical", "warning", "info", "page"],
        ["ops", "dev", "dba", "net", "sre"],
    )
    columns = (
        "receiver, fingerprint, starts_at, ends_at, status, alertname, instance, severity, job, "
        "summary, "
        "description, labels, annotations, generator_url, first_received_at, last_received_at, "
        "received_count, notified_count, robots"
    )
    insert = f"INSERT INTO alerts ({columns}) VALUES ({', '.join(['%s'] * 19)})"
    batch = []
    # The daemon records alerts as they come, so row ids follow time: keep that physical order.
    offsets = sorted((rng.randrange(180 * 86400) for _ in range(rows)), reverse=True)
    with db.cursor() as cursor:
        for n, offset in enumerate(offsets):
            name = rng.choices(names, weights)[0]
            instance = f"10.0.{rng.randrange(8)}.{rng.randrange(250)}:9100"
            severity, receiver = rng.choice(severities), rng.choice(receivers)
            starts = now - timedelta(seconds=offset)
            firing = rng.random() < 0.02
            ends = None if firing else starts + timedelta(seconds=rng.randrange(60, 7200))
            labels = json.dumps(
                {"alertname": name, "instance": instance, "severity": severity, "job": "node"}
            )
            batch.append(
                (
                    receiver,
                    f"{n:016x}",
                    alertbridge.db_time(starts),
                    alertbridge.db_time(ends),
                    "firing" if firing else "resolved",
                    name,
                    instance,
                    severity,
                    "node",
                    f"{name} on {instance}",
                    "",
                    labels,
                    "{}",
                    "",
                    alertbridge.db_time(starts),
                    alertbridge.db_time(ends or starts),
                    1,
                    rng.randrange(1, 5),
                    f"{receiver}-1",
                )
            )
            if len(batch) == 5000:
                cursor.executemany(insert, batch)
                batch = []
        if batch:
            cursor.executemany(insert, batch)
        sends = []
        insert = (
            "INSERT INTO notifications (sent_at, receiver, robot, request_id, message_id, alerts, "
            "fingerprints, "
            "errcode, errmsg, latency_ms) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s)"
        )
        for n, offset in enumerate(
            sorted((rng.randrange(180 * 86400) for _ in range(rows // 2)), reverse=True)
        ):
            receiver = rng.choice(receivers)
            errcode = rng.choices([0, 410100, -1, None, 310000], [95, 2, 1, 1, 1])[0]
            sends.append(
                (
                    alertbridge.db_time(now - timedelta(seconds=offset)),
                    receiver,
                    f"{receiver}-{rng.randrange(1, 4)}",
                    "r",
                    n,
                    1,
                    "",
                    errcode,
                    "",
                    rng.randrange(20, 200),
                )
            )
            if len(sends) == 5000:
                cursor.executemany(insert, sends)
                sends = []
        if sends:
            cursor.executemany(insert, sends)
        cursor.execute("ANALYZE TABLE alerts, notifications")
        cursor.fetchall()


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--dsn", default="root:@127.0.0.1:3306/alertbridge_bench")
    parser.add_argument("--keep", action="store_true", help="reuse the rows already there")
    args = parser.parse_args()
    db, name = connect(args.dsn)
    with db.cursor() as cursor:
        create = f"CREATE DATABASE IF NOT EXISTS `{name}` CHARACTER SET utf8mb4"  # noqa: S608
        cursor.execute(create)
        cursor.execute(f"USE `{name}`")
        cursor.execute("SET time_zone = '+00:00'")
        if not args.keep:
            for table in ("alerts", "notifications", "recorder_progress"):
                cursor.execute(f"DROP TABLE IF EXISTS {table}")  # noqa: S608
        for statement in alertbridge.statements(alertbridge.MYSQL_SCHEMA):
            cursor.execute(statement)
        cursor.execute("SELECT COUNT(*) FROM alerts")
        have = cursor.fetchone()[0]
        cursor.execute("SELECT VERSION()")
        version = cursor.fetchone()[0]
    now = datetime.now(timezone.utc).replace(microsecond=0)
    if have < args.rows:
        started = time.monotonic()
        fill(db, args.rows - have, now)
        print(
            f"filled {args.rows - have:,} alert rows and {(args.rows - have) // 2:,} sends "
            f"in {time.monotonic() - started:.0f} s"
        )

    dashboard = json.loads((ROOT / "grafana-dashboard.json").read_text(encoding="utf-8"))
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    queries = [
        (f"variable {v['name']}", v["query"]) for v in variables.values() if v["type"] == "query"
    ]
    queries += [(p["title"], p["targets"][0]["rawSql"]) for p in dashboard["panels"]]
    with db.cursor() as cursor:
        values = {}
        for var in ("receiver", "severity", "alertname"):
            cursor.execute(variables[var]["query"])
            values[var] = ([r[0] for r in cursor.fetchall()], True)
        print(
            f"\n{version}: {args.rows:,} alert rows, time range: last 7 days, all variables at "
            f"All\n"
        )
        print(f"{'query':45} {'median ms':>10} {'rows':>6}  index used (EXPLAIN, first table)")
        for title, sql in queries:
            expanded = expand(
                sql,
                {**values, "dimension": ("alertname", False)},
                int((now - timedelta(days=7)).timestamp()),
                int(now.timestamp()),
                "1h",
            )
            times = []
            for _ in range(3):
                started = time.perf_counter()
                cursor.execute(expanded)
                rows = cursor.fetchall()
                times.append((time.perf_counter() - started) * 1000)
            cursor.execute("EXPLAIN " + expanded)
            columns = [c[0] for c in cursor.description]
            plan = dict(zip(columns, cursor.fetchone()))
            used = plan.get("key") or "none (full scan)"
            print(
                f"{title[:45]:45} {statistics.median(times):10.1f} {len(rows):6}  {used} "
                f"({plan.get('type')})"
            )


if __name__ == "__main__":
    main()
