#!/usr/bin/env python3
"""Storm benchmark: 10,000 alerts in 1,000 groups on one receiver with 3 robots, DingTalk's real
limit (20 messages per 60 s per robot, enforced by the fake, which throttles past it), history in
MariaDB.

    python3 -m bench.storm [--groups 1000] [--per-group 10] [--window 60]

Prints: time until every alert is recorded, time until every alert was delivered in some
message, messages sent per robot per full minute while the backlog lasted, the most any robot got
in any sliding window, 410100 answers, alerts missing from delivered messages, peak RSS.
"""

import argparse
import concurrent.futures
import re
import statistics
import time

from bench.common import client, describe_rss, fresh_database, payload, send, start_alertbridge, start_fake
from tests.kit import get, metric, wait_until

ID = re.compile(r"bench-\d+-\d+")


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--groups", type=int, default=1000)
    parser.add_argument("--per-group", type=int, default=10)
    parser.add_argument("--window", type=float, default=60.0)
    args = parser.parse_args()
    total = args.groups * args.per_group
    fake = start_fake(latency=0.05, rate_limit=20, rate_window=args.window)
    database = fresh_database("alertbridge_bench_storm")
    bridge = start_alertbridge(fake.url, database, extra=f"[delivery]\nrate_window = {args.window:g}\n")
    bodies = [payload(g, args.per_group) for g in range(args.groups)]
    expected = {f"bench-{g}-{i}" for g in range(args.groups) for i in range(args.per_group)}

    started = time.monotonic()
    wall_start = time.time()
    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        statuses = list(pool.map(lambda b: send(client(bridge.url), b), bodies))
    posted = time.monotonic() - started
    assert statuses == [200] * args.groups, set(statuses)
    wait_until(lambda: metric(bridge.url, "alertbridge_alerts_recorded_total") >= total, timeout=600, every=0.05)
    recorded = time.monotonic() - started

    def delivered():
        stats = get(fake.url, "/stats")[1]
        return stats, {found for r in stats if r["errcode"] == 0 for found in ID.findall(r["text"])}
    deadline = time.monotonic() + 3600
    while True:
        stats, ids = delivered()
        if ids >= expected or time.monotonic() > deadline:
            break
        time.sleep(1)
    all_delivered = time.monotonic() - started
    rss = describe_rss(bridge)
    bridge.stop()
    fake.stop()

    per_robot = {}
    for r in stats:
        per_robot.setdefault(r["token"], []).append(r["at"])
    minutes = int((max(r["at"] for r in stats) - wall_start) // args.window)   # full windows of backlog
    counts = [sum(1 for t in times if wall_start + k * args.window <= t < wall_start + (k + 1) * args.window)
              for times in per_robot.values() for k in range(minutes)]
    sliding = max(max_in_window(times, args.window) for times in per_robot.values())
    throttled = sum(r["errcode"] in (410100, 130101) for r in stats)
    messages = sum(r["errcode"] == 0 for r in stats)
    sizes = [r["size"] for r in stats]

    print(f"\nStorm: {total:,} alerts in {args.groups:,} webhooks on 1 receiver with 3 robots, limit 20 per "
          f"{args.window:g} s per robot (fake DingTalk enforces it), history in MariaDB\n")
    print("| figure | value | goal |")
    print("| --- | --- | --- |")
    print(f"| webhooks posted (16 clients) | {posted:.1f} s | |")
    print(f"| all {total:,} alerts recorded in MariaDB | {recorded:.1f} s after the first webhook | < 10 s |")
    print(f"| all alerts delivered in some message | {all_delivered:.0f} s, {messages} messages "
          f"(largest {max(sizes):,} bytes) | |")
    if counts:
        print(f"| messages per robot per full {args.window:g} s window while the backlog lasted | "
              f"min {min(counts)}, mean {statistics.mean(counts):.1f} ({statistics.mean(counts) / 20:.0%} of 20), "
              f"{len(counts)} robot-windows | >= 95% of 20 |")
    print(f"| most requests one robot got in any sliding {args.window:g} s | {sliding} | <= 20 |")
    print(f"| 410100/130101 answers | {throttled} | 0 |")
    print(f"| alerts missing from delivered messages | {len(expected - ids)} | 0 |")
    print(f"| peak RSS of alertbridge | {rss} | |")


def max_in_window(times, window):
    times, best, start = sorted(times), 0, 0
    for end, t in enumerate(times):
        while times[start] <= t - window:
            start += 1
        best = max(best, end - start + 1)
    return best


if __name__ == "__main__":
    main()
