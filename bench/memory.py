#!/usr/bin/env python3
"""Memory: RSS and PSS of the daemon and of its store process, idle, with 1 route and with 500
(each route an Alertmanager receiver with its own [receiver:NAME] section), after a webhook has
been delivered and recorded (so the store process runs). History in MariaDB.

    python3 -m bench.memory [--routes 1 500]

Prints a row per route count: RSS and PSS of each process, their sum, and the threads of the
daemon. PSS counts shared pages in proportion: it is what the two add to the host.
"""

import argparse
import pathlib
import time

from bench.common import count_rows, fresh_database, start_alertbridge, start_fake
from tests.kit import make_alert, make_payload, post, wait_until


def smaps(pid):
    """{"Rss": MiB, "Pss": MiB} of a process, from /proc."""
    found = {}
    for line in pathlib.Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        key, _, rest = line.partition(":")
        if key in ("Rss", "Pss"):
            found[key] = int(rest.split()[0]) / 1024
    return found


def recorded(database):
    try:
        return count_rows(database) == 1
    except Exception:  # noqa: BLE001 (the table is made by the store process, soon)
        return False


def measure(routes, database):
    fake = start_fake(latency=0.05)
    extra = "".join(f"[receiver:team-{i}]\nrobots = r{i % 3}\n" for i in range(routes - 1))
    daemon = start_alertbridge(fake.url, database, extra=extra)
    try:
        assert post(daemon.url, make_payload("ops", [make_alert("Memory")]))[0] == 200
        assert wait_until(lambda: recorded(database), timeout=60)
        time.sleep(5)  # idle: every thread asleep
        [store] = daemon.children()
        own, child = smaps(daemon.pid), smaps(store)
        threads = len(list(pathlib.Path(f"/proc/{daemon.pid}/task").iterdir()))
        return own, child, threads
    finally:
        daemon.stop()
        fake.stop()


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--routes", type=int, nargs="+", default=[1, 500])
    args = parser.parse_args()
    print("| routes | daemon RSS / PSS | store process RSS / PSS | both PSS | daemon threads |")
    print("| ---: | ---: | ---: | ---: | ---: |")
    for routes in args.routes:
        own, child, threads = measure(routes, fresh_database("alertbridge_bench_memory"))
        print(
            f"| {routes} | {own['Rss']:.1f} / {own['Pss']:.1f} MiB | {child['Rss']:.1f} / "
            f"{child['Pss']:.1f} MiB | {own['Pss'] + child['Pss']:.1f} MiB | {threads} |"
        )


if __name__ == "__main__":
    main()
