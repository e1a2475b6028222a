#!/usr/bin/env python3
"""Intake benchmark: webhooks/s and ack latency, 10 alerts per webhook, history in MariaDB,
alertbridge against the synchronous design (post to DingTalk inside the request), both against the
same fake DingTalk answering in 50 ms, in the same run.

    python3 -m bench.intake [--rate 200] [--seconds 10] [--connections 16]

Fixed rate: requests are scheduled at --rate per second and latency is measured from the scheduled
time, so a server that falls behind shows it (no coordinated omission). Max: --connections
keep-alive clients send back to back for --seconds: first from Python threads, then from wrk (if
installed: Debian package wrk), which leaves more of the 2 cores to the server.
"""

import argparse
import asyncio
import os
import re
import shutil
import subprocess
import tempfile
import threading
import time

from bench.common import (
    PYTHON,
    client,
    count_rows,
    describe_rss,
    fresh_database,
    log_file,
    payload,
    percentile,
    send,
    start_alertbridge,
    start_fake,
)
from tests.kit import ROOT, Child, free_port, metric, wait_until


def fixed_rate(url, rate, seconds, first_group, connections=32):
    """Open loop on one asyncio thread (lighter than a thread per request, so the generator
    disturbs the server less): webhook i is due at start + i/rate on a free kept-alive
    connection, and its latency counts from when it was due."""
    return asyncio.run(_fixed_rate(url, rate, seconds, first_group, connections))


async def _fixed_rate(url, rate, seconds, first_group, connections):
    host, port = url.split("//")[1].split(":")
    total = int(rate * seconds)
    requests = [
        b"POST /alertmanager HTTP/1.1\r\nHost: bench\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\n\r\n" % len(body) + body
        for body in (payload(first_group + i, 10) for i in range(total))
    ]
    idle = asyncio.Queue()
    for _ in range(connections):
        idle.put_nowait(await asyncio.open_connection(host, int(port)))
    latencies, errors = [], [0]

    async def one(i, due):
        reader, writer = await idle.get()
        try:
            writer.write(requests[i])
            head = await reader.readuntil(b"\r\n\r\n")
            length = int(re.search(rb"Content-Length: (\d+)", head).group(1))
            await reader.readexactly(length)
            errors[0] += not head.startswith(b"HTTP/1.1 200")
        except (OSError, asyncio.IncompleteReadError):
            errors[0] += 1
            reader, writer = await asyncio.open_connection(host, int(port))
        latencies.append(time.monotonic() - due)
        idle.put_nowait((reader, writer))

    start = time.monotonic() + 0.2
    tasks = []
    for i in range(total):
        due = start + i / rate
        delay = due - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.ensure_future(one(i, due)))
    await asyncio.gather(*tasks)
    while not idle.empty():
        idle.get_nowait()[1].close()
    return total, latencies, errors[0]


def max_throughput(url, seconds, connections, first_group):
    counts, latencies, errors, lock = [0] * connections, [], [0], threading.Lock()
    bodies = [payload(first_group + i, 10) for i in range(20000)]
    stop_at = time.monotonic() + seconds

    def worker(w):
        connection, n = client(url), 0
        while time.monotonic() < stop_at:
            began = time.monotonic()
            try:
                ok = send(connection, bodies[(w * 20000 // connections + n) % 20000]) == 200
            except OSError:
                ok, connection = False, client(url)
            with lock:
                latencies.append(time.monotonic() - began)
                errors[0] += not ok
            n += 1
        counts[w] = n

    started = time.monotonic()
    threads = [threading.Thread(target=worker, args=(w,)) for w in range(connections)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return sum(counts), time.monotonic() - started, latencies, errors[0]


WRK_SCRIPT = """
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
local f = io.open("%s", "r")
wrk.body = f:read("*a")
f:close()
"""


def max_with_wrk(url, seconds, connections, group):
    """wrk (C, one thread) as the load: the client then takes little of the 2 cores."""
    directory = tempfile.mkdtemp()
    body, script = os.path.join(directory, "body.json"), os.path.join(directory, "post.lua")
    with open(body, "wb") as fh:
        fh.write(payload(group, 10))
    with open(script, "w") as fh:
        fh.write(WRK_SCRIPT % body)
    out = subprocess.run(
        [
            "wrk",
            "-t1",
            f"-c{connections}",
            f"-d{seconds:.0f}s",
            "--latency",
            "-s",
            script,
            url + "/alertmanager",
        ],
        capture_output=True,
        text=True,
        timeout=seconds + 60,
    ).stdout
    rate = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
    total = int(re.search(r"(\d+) requests in", out).group(1))
    errors = int(
        (re.search(r"Non-2xx or 3xx responses: (\d+)", out) or re.search(r"()$", "0")).group(1) or 0
    )

    def ms(label):
        value, unit = re.search(rf"{label}%\s+([\d.]+)(us|ms|s)", out).groups()
        return float(value) * {"us": 0.001, "ms": 1, "s": 1000}[unit]

    print(
        f"| {'':34} | wrk, {connections} conns{'':6} | {total:8} | {rate:9.0f} | {ms('50'):7.1f} | "
        f"{ms('99'):8.1f} | {'':8} | {errors:6} |"
    )


def row(name, mode, webhooks, rate, latencies, errors):
    ms = [x * 1000 for x in latencies]
    print(
        f"| {name:34} | {mode:18} | {webhooks:8} | {rate:9.0f} | {percentile(ms, 50):7.1f} | "
        f"{percentile(ms, 99):8.1f} | {max(ms):8.1f} | {errors:6} |"
    )


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--rate", type=float, default=200)
    parser.add_argument("--seconds", type=float, default=10)
    parser.add_argument("--connections", type=int, default=16)
    args = parser.parse_args()

    fake = start_fake(latency=0.05)
    print(
        f"\nIntake: 10 alerts per webhook, fake DingTalk answering in 50 ms, history in MariaDB; "
        f"fixed rate {args.rate:.0f}/s for {args.seconds:.0f} s, then {args.connections} "
        f"connections flat out "
        f"for {args.seconds:.0f} s\n"
    )
    print(
        "| design                             | load               | webhooks | webhooks/s | p50 "
        "ms | p99 ms   | max ms   | errors |"
    )
    print(
        "| ---------------------------------- | ------------------ | -------- | --------- | "
        "------- | -------- | -------- | ------ |"
    )
    group = 0
    for sync in ("full", "normal"):
        database = fresh_database(f"alertbridge_bench_intake_{sync}")
        bridge = start_alertbridge(fake.url, database, sync=sync)
        name = f"alertbridge (journal_sync={sync})"
        total, latencies, errors = fixed_rate(bridge.url, args.rate, args.seconds, group)
        group += total
        row(name, f"fixed {args.rate:.0f}/s", total, total / args.seconds, latencies, errors)
        count, elapsed, latencies, errors = max_throughput(
            bridge.url, args.seconds, args.connections, group
        )
        group += 20000
        row(name, f"max, {args.connections} conns", count, count / elapsed, latencies, errors)
        if shutil.which("wrk"):
            max_with_wrk(bridge.url, args.seconds, args.connections, group)
        began = time.monotonic()
        wait_until(
            lambda: metric(bridge.url, "alertbridge_record_backlog_events") == 0, timeout=600
        )
        accepted = metric(bridge.url, "alertbridge_alerts_accepted_total")
        recorded = metric(bridge.url, "alertbridge_alerts_recorded_total")
        print(
            f"|   {recorded:,.0f} of {accepted:,.0f} accepted alerts recorded in MariaDB "
            f"({count_rows(database):,} rows: "
            f"wrk repeats one webhook); backlog drained {time.monotonic() - began:.1f} s after "
            f"the load; "
            f"peak RSS {describe_rss(bridge)} |"
        )
        bridge.stop()

    database = fresh_database("alertbridge_bench_intake_sync")
    port = free_port()
    baseline = Child(
        [
            PYTHON,
            str(ROOT / "bench" / "sync_baseline.py"),
            str(port),
            f"{fake.url}/robot/send?access_token=baseline",
            database["database"],
        ],
        log_file("bench-baseline.log"),
    )
    baseline.url = f"http://127.0.0.1:{port}"
    wait_until(lambda: _up(port))
    total, latencies, errors = fixed_rate(baseline.url, args.rate, args.seconds, group)
    row(
        "synchronous baseline",
        f"fixed {args.rate:.0f}/s",
        total,
        total / args.seconds,
        latencies,
        errors,
    )
    count, elapsed, latencies, errors = max_throughput(
        baseline.url, args.seconds, args.connections, group + total
    )
    row(
        "synchronous baseline",
        f"max, {args.connections} conns",
        count,
        count / elapsed,
        latencies,
        errors,
    )
    if shutil.which("wrk"):
        max_with_wrk(baseline.url, args.seconds, args.connections, group)
    baseline.stop()
    fake.stop()


def _up(port):
    import socket

    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
        return True
    except OSError:
        return False


if __name__ == "__main__":
    main()
