#!/usr/bin/env python3
"""On-call benchmark: what 10,000 open incidents cost (MariaDB).

    python3 -m bench.oncall [--incidents 10000] [--loads 1000]

- the escalation tick: the escalator reads every unclaimed incident from the history, through
  the store process as the daemon does, once a second; timed with nothing due, and with 100
  steps due at once (each marked done in the history and journaled as a message);
- the claim page: GET /incident/TOKEN (a form) and the POST that claims, on a running daemon
  whose own escalator polls the same 10,000 incidents meanwhile.
"""

import argparse
import hashlib
import statistics
import tempfile
import time
import urllib.parse

import alertbridge
from bench.common import fresh_database, percentile, start_alertbridge, start_fake
from tests.kit import ONCALL, SECRET, connect

PEOPLE = (
    ONCALL
    + """
[escalation:slow]
steps =
    1h = lisi
"""
)
ESCALATING = "claim_links = true\nescalation = slow\n"


def group(n):
    return hashlib.sha256(f"g{n}".encode()).hexdigest()


def opened(now, minutes_ago):
    return alertbridge.db_time(
        alertbridge.datetime.fromtimestamp(now - minutes_ago * 60, alertbridge.timezone.utc)
    )


def fill(database, incidents, opened_minutes_ago):
    import pymysql

    db = pymysql.connect(**database, autocommit=True)
    store = alertbridge.Store(alertbridge.Database(driver="mysql", **database))
    store.ping()  # the tables
    store.close()
    now = time.time()
    with db.cursor() as cursor:
        rows = [
            (
                "ops",
                "ops",
                group(n),
                group(n),
                f"g{n}",
                "{}",
                f"Incident {n}",
                "critical",
                "open",
            )
            + (opened(now, opened_minutes_ago(n)),) * 2  # opened_at, and next_step_at: look now
            for n in range(incidents)
        ]
        cursor.executemany(
            "INSERT INTO incidents (route, receiver, group_hash, open_group, group_key, "
            "group_labels, title, level, state, opened_at, next_step_at) VALUES "
            "(%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)",
            rows,
        )
    db.close()


def ticks(config, database, runs):
    """Times of escalator steps through a store process, as the daemon makes them (ms): the
    first (it looks at every open incident once, and sends what is due), then `runs` more."""
    directory = tempfile.mkdtemp(prefix="alertbridge-bench-oncall-")
    journal = alertbridge.Journal(f"{directory}/journal.db", "normal")
    store = alertbridge.StoreProcess(alertbridge.Database(driver="mysql", **database))
    escalator = alertbridge.Escalator(
        lambda: config, store, journal, alertbridge.Solo(), alertbridge.Metrics(), time.time
    )
    times = []
    for _ in range(runs + 1):
        started = time.perf_counter()
        escalator.step()
        times.append((time.perf_counter() - started) * 1000)
    waiting = journal.backlog()[0]
    store.close(5)
    journal.close()
    return times[0], times[1:], waiting


def timed(url, method, path, body=None, headers=None):
    connection = connect(url)
    started = time.perf_counter()
    connection.request(method, path, body=body, headers=headers or {})
    response = connection.getresponse()
    text = response.read().decode()
    elapsed = (time.perf_counter() - started) * 1000
    connection.close()
    assert response.status == 200, (response.status, text[:300])
    return elapsed, response.headers, text


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--incidents", type=int, default=10000)
    parser.add_argument("--loads", type=int, default=1000)
    args = parser.parse_args()
    fake = start_fake(latency=0.05, rate_window=3600)
    database = fresh_database("alertbridge_bench_oncall")
    # opened 30 minutes ago: none due (the step comes after 1 h), but the last 100 (2 h ago)
    fill(database, args.incidents, lambda n: 120 if n >= args.incidents - 100 else 30)
    state = tempfile.mkdtemp(prefix="alertbridge-bench-oncall-config-")
    path = f"{state}/config.ini"
    with open(path, "w", encoding="utf-8") as fh:
        fh.write(
            f"[alertbridge]\nstate_dir = {state}\n[database]\ndriver = mysql\n"
            + "".join(f"{k} = {v}\n" for k, v in database.items())
            + f"[receiver:ops]\nrobots = r0\n{ESCALATING}\n[robot:r0]\n"
            f"url = {fake.url}/robot/send?access_token=bench-1\n" + PEOPLE
        )
    config = alertbridge.load_config(path)
    first, idle, due = ticks(config, database, 30)

    bridge = start_alertbridge(fake.url, database, extra=PEOPLE, receiver=ESCALATING)
    expires = time.time() + 3600
    gets, posts = [], []
    for n in range(args.loads):
        token = alertbridge.sign_link(SECRET, "ops", group(n), "claim", expires)
        elapsed, headers, _ = timed(bridge.url, "GET", f"/incident/{token}")
        gets.append(elapsed)
        cookie = headers["Set-Cookie"].split(";")[0]
        if n % 2 == 0:
            form = urllib.parse.urlencode(
                {"person": "zhangsan", "csrf": cookie.split("=", 1)[1]}
            ).encode()
            elapsed, _, text = timed(
                bridge.url,
                "POST",
                f"/incident/{token}",
                form,
                {"Content-Type": "application/x-www-form-urlencoded", "Cookie": cookie},
            )
            assert "has it" in text
            posts.append(elapsed)
    for child in (bridge, fake):
        child.stop()

    print(f"\nOn call: {args.incidents:,} open incidents in MariaDB\n")
    print("| what | median | p99 | max |")
    print("| --- | --- | --- | --- |")
    print(
        f"| first escalation tick: every open incident looked at, 100 steps due (journaled: "
        f"{due}) | {first:.0f} ms | - | - |"
    )
    for name, times in (
        (f"escalation tick, nothing due ({len(idle)} ticks)", idle),
        (f"GET /incident/TOKEN ({len(gets)} loads)", gets),
        (f"POST /incident/TOKEN, a claim ({len(posts)} claims)", posts),
    ):
        print(
            f"| {name} | {statistics.median(times):.1f} ms | {percentile(times, 99):.1f} ms | "
            f"{max(times):.1f} ms |"
        )


if __name__ == "__main__":
    main()
