#!/usr/bin/env python3
"""Storm benchmark: 10,000 alerts in 1,000 groups on one receiver with 3 robots, DingTalk's real
limit (20 messages per 60 s per robot, enforced by the fake, which throttles past it), history in
MariaDB.

    python3 -m bench.storm [--groups 1000] [--per-group 10] [--window 60]
                           [--kind dingtalk|feishu|wecom]

--kind feishu or wecom sends through that platform's fake instead, at its limits (Feishu: 100
per window and 5 per 1/60 of it, 100 a minute and 5 a second at --window 60; WeCom: 20 per
window), the robots' rate_limit set to the same.

Prints: time until every alert is recorded, time until every alert was delivered in some
message, messages sent per robot per full minute while the backlog lasted, the most any robot got
in any sliding window, 410100 answers, alerts missing from delivered messages, peak RSS, and how
long a critical alert posted in the middle of the storm took from its 200 to DingTalk.
"""

import argparse
import collections
import concurrent.futures
import json
import re
import statistics
import time

from bench.common import (
    client,
    describe_rss,
    fresh_database,
    payload,
    send,
    start_alertbridge,
    start_fake,
)
from tests.kit import get, make_alert, make_payload, metric, wait_until

ID = re.compile(r"bench-\d+-\d+")
KINDS = {  # windows at --window W, robot URL, throttle errcodes
    "dingtalk": (lambda w: ((20, w),), None, (410100, 130101)),
    "feishu": (
        lambda w: ((100, w), (5, w / 60)),
        lambda url, token: f"{url}/open-apis/bot/v2/hook/{token}",
        (11232, 99991400),
    ),
    "wecom": (
        lambda w: ((20, w),),
        lambda url, token: f"{url}/cgi-bin/webhook/send?key={token}",
        (45009,),
    ),
}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--groups", type=int, default=1000)
    parser.add_argument("--per-group", type=int, default=10)
    parser.add_argument("--window", type=float, default=60.0)
    parser.add_argument("--kind", choices=sorted(KINDS), default="dingtalk")
    parser.add_argument(
        "--critical-after",
        type=float,
        default=None,
        help="seconds into the storm to post a critical alert (default: half a window)",
    )
    parser.add_argument(
        "--instances",
        type=int,
        default=1,
        help="a cluster of this many instances, every webhook posted to each",
    )
    args = parser.parse_args()
    critical_after = args.window / 2 if args.critical_after is None else args.critical_after
    total = args.groups * args.per_group
    windows, robot_url, throttle_codes = KINDS[args.kind]
    windows = windows(args.window)
    fake = start_fake(latency=0.05, rate_limit=20, rate_window=args.window, kind=args.kind,
                      windows=windows)
    database = fresh_database("alertbridge_bench_storm")
    delivery = f"[delivery]\nrate_window = {args.window:g}\n"
    rate_limit = ", ".join(f"{count}/{seconds:g}s" for count, seconds in windows)
    robot_keys = f"rate_limit = {rate_limit}\n" if robot_url else ""
    cluster = (
        "[cluster]\nenabled = true\ninstance = bench-{}\ninstances = %d\nlease = 5\n"
        % args.instances
        if args.instances > 1
        else ""
    )
    bridges = [
        start_alertbridge(fake.url, database, extra=delivery + cluster.format(n),
                          robot_url=robot_url, robot_keys=robot_keys)
        for n in range(args.instances)
    ]
    bridge = bridges[0]
    bodies = [payload(g, args.per_group) for g in range(args.groups)]
    expected = {f"bench-{g}-{i}" for g in range(args.groups) for i in range(args.per_group)}

    started = time.monotonic()
    wall_start = time.time()
    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        statuses = list(pool.map(lambda b: [send(client(each.url), b) for each in bridges], bodies))
    posted = time.monotonic() - started
    assert statuses == [[200] * args.instances] * args.groups, statuses[:3]
    wait_until(
        lambda: metric(bridge.url, "alertbridge_alerts_recorded_total") >= total,
        timeout=600,
        every=0.05,
    )
    recorded = time.monotonic() - started

    def delivered():
        stats = get(fake.url, "/stats")[1]
        return stats, {found for r in stats if r["errcode"] == 0 for found in ID.findall(r["text"])}

    all_delivered = None  # seconds until the storm was delivered: it may be before the page

    def storm_out(ids):
        nonlocal all_delivered
        if all_delivered is None and ids >= expected:
            all_delivered = time.monotonic() - started
        return all_delivered is not None

    while time.monotonic() < started + critical_after:  # until the storm's budget is spent
        storm_out(delivered()[1])
        time.sleep(max(0.0, min(0.5, started + critical_after - time.monotonic())))
    critical = min(critical_alert(each.url) for each in bridges)
    deadline = time.monotonic() + 3600
    while True:  # the storm delivered, and the critical page
        stats, ids = delivered()
        paged = any(r["errcode"] == 0 and "DatacenterDown" in r["text"] for r in stats)
        if (storm_out(ids) and paged) or time.monotonic() > deadline:
            break
        time.sleep(0.05 if all_delivered is not None else 1)
    all_delivered = all_delivered or time.monotonic() - started
    if args.instances > 1:
        time.sleep(args.window)  # what a second instance would still send, it sends
        stats, ids = delivered()
    named = collections.Counter(
        i for r in stats if r["errcode"] == 0 for i in set(ID.findall(r["text"]))
    )
    duplicates = sum(n - 1 for n in named.values())
    page = [r for r in stats if r["errcode"] == 0 and "DatacenterDown" in r["text"]]
    page_seconds = page[0]["at"] - critical if page else float("nan")
    page_alone = bool(page) and not ID.search(page[0]["text"])
    rss = " + ".join(describe_rss(each) for each in bridges)
    for each in bridges:
        each.stop()
    fake.stop()

    per_robot, storm = {}, {}  # every request; the storm's alone
    for r in stats:
        per_robot.setdefault(r["token"], []).append(r["at"])
        if "DatacenterDown" not in r["text"]:
            storm.setdefault(r["token"], []).append(r["at"])
    storm_share = windows[0][0] - 2  # the reserve keeps 2 for urgent pages
    minutes = int(
        (max(r["at"] for r in stats) - wall_start) // args.window
    )  # full windows of backlog
    counts = [
        sum(
            1
            for t in times
            if wall_start + k * args.window <= t < wall_start + (k + 1) * args.window
        )
        for times in storm.values()
        for k in range(minutes)
    ]
    sliding = [max(max_in_window(times, seconds) for times in per_robot.values())
               for _, seconds in windows]
    throttled = sum(r["errcode"] in throttle_codes for r in stats)
    messages = sum(r["errcode"] == 0 for r in stats)
    sizes = [r["size"] for r in stats]

    through = (
        f", through a cluster of {args.instances} (every webhook to each)"
        if args.instances > 1
        else ""
    )
    name = {"dingtalk": "DingTalk", "feishu": "Feishu", "wecom": "WeCom"}[args.kind]
    limits = " and ".join(f"{count} per {seconds:g} s" for count, seconds in windows)
    print(
        f"\nStorm: {total:,} alerts in {args.groups:,} webhooks on 1 receiver with 3 robots, "
        f"limit {limits} per robot (fake {name} enforces it), history in MariaDB{through}\n"
    )
    print("| figure | value | goal |")
    print("| --- | --- | --- |")
    print(f"| webhooks posted (16 clients) | {posted:.1f} s | |")
    print(
        f"| all {total:,} alerts recorded in MariaDB | {recorded:.1f} s after the first webhook | "
        f"< 10 s |"
    )
    print(
        f"| all alerts delivered in some message | {all_delivered:.0f} s, {messages} messages "
        f"(largest {max(sizes):,} bytes) | |"
    )
    if counts:
        print(
            f"| messages per robot per full {args.window:g} s window while the backlog lasted | "
            f"min {min(counts)}, mean {statistics.mean(counts):.1f} "
            f"({statistics.mean(counts) / storm_share:.0%} of the {storm_share} the reserve "
            f"leaves), "
            f"{len(counts)} robot-windows | >= 90 % of {storm_share} |"
        )
    for (count, seconds), most in zip(windows, sliding):
        print(f"| most requests one robot got in any sliding {seconds:g} s | {most} | <= {count} |")
    print(f"| {'/'.join(map(str, throttle_codes))} answers | {throttled} | 0 |")
    print(f"| alerts missing from delivered messages | {len(expected - ids)} | 0 |")
    print(f"| alerts delivered more than once | {duplicates} | 0 |")
    print(f"| peak RSS of alertbridge | {rss} | |")
    print(
        f"| a critical alert posted {critical_after:g} s into the storm: from its 200 to {name} "
        f"| "
        f"{page_seconds:.2f} s, {'in a message of its own' if page_alone else 'NOT alone'} | < 3 "
        f"s |"
    )


def critical_alert(url):
    """Post one critical alert to the storm's receiver; the wall-clock time of its 200."""
    alert = make_alert(
        "DatacenterDown", "dc-1", severity="critical", starts_at="2026-11-24T09:00:00Z"
    )
    connection = client(url)
    assert send(connection, json.dumps(make_payload("ops", [alert])).encode()) == 200
    return time.time()


def max_in_window(times, window):
    times, best, start = sorted(times), 0, 0
    for end, t in enumerate(times):
        while times[start] <= t - window:
            start += 1
        best = max(best, end - start + 1)
    return best


if __name__ == "__main__":
    main()
