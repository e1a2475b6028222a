#!/usr/bin/env python3
"""On-call benchmark: what 10,000 open incidents cost (MariaDB).

    python3 -m bench.oncall [--incidents 10000] [--loads 1000]

- the escalation tick: the escalator reads the incidents due from the history, through the
  store process as the daemon does, once a second; timed with nothing due, and with 100 steps
  due at once (each marked done in the history with its note, the notes journaled folded);
- the claim page: GET /incident/TOKEN (a form) and the POST that claims, on a running daemon
  whose own escalator polls the same 10,000 incidents meanwhile;
- a flood: every one of the 10,000 incidents due at once on a running daemon, a new critical
  page posted meanwhile: how long the escalator takes to work through them, how many messages
  their steps become, and how long the page waits (delivered at DingTalk's 20/min limit).
"""

import argparse
import hashlib
import re
import statistics
import tempfile
import time
import urllib.parse

import alertbridge
from bench.common import fresh_database, percentile, start_alertbridge, start_fake
from tests.kit import ONCALL, SECRET, connect, get, make_alert, make_payload, post, wait_until

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
    solo, clock = alertbridge.Solo(), alertbridge.SteadyClock()
    relay = alertbridge.NoteRelay(lambda: config, store, journal, solo, time.time)
    escalator = alertbridge.Escalator(
        lambda: config, store, solo, alertbridge.Metrics(), clock, time.time, relay
    )
    times = []
    for _ in range(runs + 1):
        started = time.perf_counter()
        escalator.step()
        times.append((time.perf_counter() - started) * 1000)
    waiting = journal.backlog()[0]
    taken = sum(i["events"].count("escalated") for i in store.incidents(200))
    store.close(5)
    journal.close()
    return times[0], times[1:], taken, waiting


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
    first, idle, taken, journaled = ticks(config, database, 30)

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
            assert "已认领" in text  # the receivers' language: zh
            posts.append(elapsed)
    bridge.stop()
    fake.stop()
    flood = flooded(args.incidents)

    print(f"\nOn call: {args.incidents:,} open incidents in MariaDB\n")
    print("| what | median | p99 | max |")
    print("| --- | --- | --- | --- |")
    print(
        f"| first escalation tick: every open incident looked at, 100 steps due (steps: "
        f"{taken}, messages journaled: {journaled}) | {first:.0f} ms | - | - |"
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


    print(
        f"\nA flood: {args.incidents:,} incidents due at once on a running daemon, a new "
        f"critical page posted meanwhile (DingTalk at 20/min, 50 ms an answer)\n"
    )
    print("| what | figure |")
    print("| --- | --- |")
    for name, figure in flood:
        print(f"| {name} | {figure} |")


def flooded(incidents):
    """Every incident due at once on a daemon just started; a critical page posted as the
    escalator starts on them. (what, figure) rows."""
    fake = start_fake(latency=0.05)
    database = fresh_database("alertbridge_bench_oncall_flood")
    fill(database, incidents, lambda n: 120)
    bridge = start_alertbridge(fake.url, database, extra=PEOPLE, receiver=ESCALATING)
    started = time.perf_counter()
    page = make_payload("ops", [make_alert("NewOutage", "db-9:9100")])
    assert post(bridge.url, page | {"groupKey": "new-outage"})[0] == 200
    assert wait_until(lambda: any("NewOutage" in r["text"] for r in stats(fake)), timeout=600)
    waited = time.perf_counter() - started

    def taken():
        return count(database, "SELECT COUNT(*) FROM incident_events WHERE kind = 'escalated'")

    assert wait_until(lambda: taken() >= incidents, timeout=1200, every=0.2)
    through = time.perf_counter() - started
    time.sleep(5)  # the first notes go out; the rest wait, folded, for the budget
    sent = [r for r in stats(fake) if r["errcode"] == 0]
    steps = [r for r in sent if "升级" in r["text"]]
    notes = count(database, "SELECT COUNT(*) FROM incident_notes")
    bridge.stop()
    fake.stop()
    first = steps[0]["text"] if steps else ""
    counted = re.findall(r"另有 (\d+) 条", first)
    return [
        ("the new critical page, from its POST to DingTalk", f"{waited * 1000:.0f} ms"),
        (f"all {incidents:,} steps taken (marked done, each with its note)", f"{through:.1f} s"),
        ("notes kept in the history", f"{notes:,}"),
        ("messages sent in the first 5 s after (one per robot's free slots)",
         f"{len(sent)} (of which steps: {len(steps)})"),
        ("incidents in the first step message: listed, and counted after them",
         f"{first.count('升级第')}, {counted[0] if counted else 0}"),
    ]


def stats(fake):
    return get(fake.url, "/stats")[1]


def count(database, sql):
    import pymysql

    db = pymysql.connect(**database, autocommit=True)
    with db.cursor() as cursor:
        cursor.execute(sql)
        n = cursor.fetchone()[0]
    db.close()
    return n


if __name__ == "__main__":
    main()
