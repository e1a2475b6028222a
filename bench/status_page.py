#!/usr/bin/env python3
"""Status page benchmark: how long the status page and the preview take to answer when a storm
has left a large backlog and the history holds many firing alerts (MariaDB).

    python3 -m bench.status_page [--webhooks 20000] [--loads 50]

Every robot's budget is spent at once (1 message per hour each), so the webhooks stay waiting in
the journal: the page has to count them by receiver and level, and read the firing alerts from
the history, on every load.
"""

import argparse
import concurrent.futures
import re
import statistics
import time
import urllib.parse

from bench.common import (
    client,
    fresh_database,
    payload,
    percentile,
    send,
    start_alertbridge,
    start_fake,
)
from tests.kit import FIXTURES, connect, get, metric, wait_until


def timed(url, method, path, body=None, headers=None):
    connection = connect(url)
    started = time.perf_counter()
    connection.request(method, path, body=body, headers=headers or {})
    response = connection.getresponse()
    text = response.read()
    elapsed = time.perf_counter() - started
    connection.close()
    assert response.status == 200, (response.status, text[:300])
    return elapsed, len(text)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--webhooks", type=int, default=20000)
    parser.add_argument("--loads", type=int, default=50)
    args = parser.parse_args()
    fake = start_fake(latency=0.05, rate_window=3600)
    database = fresh_database("alertbridge_bench_status")
    bridge = start_alertbridge(
        fake.url, database, extra="[delivery]\nrate_limit = 1\nrate_window = 3600\n"
    )
    bodies = [payload(g, 1) for g in range(args.webhooks)]
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        assert set(pool.map(lambda b: send(client(bridge.url), b), bodies)) == {200}
    wait_until(
        lambda: metric(bridge.url, "alertbridge_alerts_recorded_total") >= args.webhooks,
        timeout=600,
    )
    metrics = get(bridge.url, "/metrics")[1]
    waiting = sum(
        float(v) for v in re.findall(r"^alertbridge_queue_messages\{[^}]*\} (\S+)$", metrics, re.M)
    )

    page = [timed(bridge.url, "GET", "/") for _ in range(args.loads)]
    fixture = (FIXTURES / "am025-ops-firing-group.json").read_text(encoding="utf-8")
    form = urllib.parse.urlencode({"payload": fixture}).encode()
    headers = {"Content-Type": "application/x-www-form-urlencoded"}
    preview = [timed(bridge.url, "POST", "/preview", form, headers) for _ in range(args.loads)]
    for child in (bridge, fake):
        child.stop()

    print(
        f"\nStatus page: {args.webhooks:,} alerts firing in MariaDB, {waiting:,.0f} messages "
        f"waiting "
        f"in the journal, {args.loads} loads each, one at a time\n"
    )
    print("| page | median | p99 | max | size |")
    print("| --- | --- | --- | --- | --- |")
    for name, runs in (("GET / (status)", page), ("POST /preview (2 alerts, 3 robots)", preview)):
        times = [t * 1000 for t, _ in runs]
        print(
            f"| {name} | {statistics.median(times):.1f} ms | {percentile(times, 99):.1f} ms | "
            f"{max(times):.1f} ms | {runs[0][1] / 1024:.0f} KiB |"
        )


if __name__ == "__main__":
    main()
