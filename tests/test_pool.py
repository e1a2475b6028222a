"""The robot pool in simulated time: rotation, budgets per token, throttles, robots out of
rotation, and the restart from the send log. Time is an argument; no test here waits."""

import pytest

from alertbridge import Delivery, Robot, RobotPool, Route, SendResult

T0 = 1_000_000.0
OK, THROTTLED, SIGN_WRONG, NO_ANSWER = (
    SendResult(0, "ok"),
    SendResult(410100, "too fast"),
    SendResult(310000, "sign not match"),
    SendResult(None, "network"),
)


def robot(name, token=None):
    return Robot(
        name, f"https://oapi.dingtalk.com/robot/send?access_token={token or 'tok-' + name}"
    )


A, B, C = robot("a"), robot("b"), robot("c")
ROUTE = Route("ops", (A, B, C))


@pytest.fixture
def limits():
    return {"delivery": Delivery(rate_limit=2, rate_window=60.0, throttle_seconds=600.0)}


@pytest.fixture
def pool(limits):
    return RobotPool(lambda: limits["delivery"])


def send(pool, route, now, result=OK, tried=()):
    """acquire() then release() at the same moment: one request; the robot's name, or None."""
    chosen = pool.acquire(route, now, set(tried))
    if chosen is not None:
        pool.release(chosen, result, now)
    return chosen and chosen.name


def test_robots_take_turns_and_each_sends_at_most_its_budget_per_window(pool):
    assert [send(pool, ROUTE, T0) for _ in range(7)] == ["a", "b", "c", "a", "b", "c", None]
    assert pool.available(ROUTE, T0) == 0
    assert pool.next_slot_at(ROUTE, T0) == T0 + 60
    assert send(pool, ROUTE, T0 + 59.9) is None  # the window slides: not a fixed minute
    assert pool.available(ROUTE, T0 + 60.1) == 6
    assert send(pool, ROUTE, T0 + 60.1) == "a"


def test_a_request_in_flight_holds_its_slot_and_is_dated_by_its_end(pool):
    a1 = pool.acquire(ROUTE, T0, set())
    a2 = pool.acquire(Route("ops", (A,)), T0, set())
    assert (a1, a2) == (A, A) and pool.acquire(Route("ops", (A,)), T0, set()) is None  # 2 in flight
    pool.release(a1, OK, T0 + 5)  # an answer that took 5 s
    pool.release(a2, NO_ANSWER, T0 + 30)  # no answer counts too: it may have arrived
    assert pool.available(Route("ops", (A,)), T0 + 64) == 0
    assert pool.available(Route("ops", (A,)), T0 + 65.1) == 1
    assert pool.available(Route("ops", (A,)), T0 + 90.1) == 2


def test_a_throttled_robot_rests_a_window_longer_if_it_repeats_and_the_others_go_on(pool):
    only_a = Route("x", (A,))
    assert send(pool, ROUTE, T0, THROTTLED) == "a"
    assert [send(pool, ROUTE, T0 + 1) for _ in range(4)] == ["b", "c", "b", "c"]
    assert pool.available(ROUTE, T0 + 30) == 0 and pool.next_slot_at(only_a, T0 + 30) == T0 + 60
    assert send(pool, only_a, T0 + 60.1, THROTTLED) == "a"  # again: two windows
    assert pool.next_slot_at(only_a, T0 + 61) == T0 + 60.1 + 120
    assert send(pool, only_a, T0 + 180.2, THROTTLED) == "a"  # and again: four
    assert pool.next_slot_at(only_a, T0 + 181) == T0 + 180.2 + 240
    last = T0 + 180.2
    for _ in range(5):  # never more than throttle_seconds
        last = pool.next_slot_at(only_a, last) + 0.1
        send(pool, only_a, last, THROTTLED)
    assert pool.next_slot_at(only_a, last) == last + 600
    assert send(pool, only_a, last + 600.1) == "a"  # a message taken ends the run
    assert send(pool, only_a, last + 700, THROTTLED) == "a"
    assert pool.next_slot_at(only_a, last + 700) == last + 760


def test_a_misconfigured_robot_is_out_until_forgiven(pool):
    assert send(pool, ROUTE, T0, SIGN_WRONG) == "a"
    a, b = pool.report([A, B], T0 + 3600)
    assert (a.name, a.budget, a.disabled) == ("a", 2, (SIGN_WRONG.errcode, SIGN_WRONG.errmsg, T0))
    assert (b.name, b.budget, b.disabled, b.last_sent_at) == ("b", 2, None, None)
    assert send(pool, Route("x", (A,)), T0 + 3600) is None
    assert pool.next_slot_at(Route("x", (A,)), T0 + 3600) is None  # not while the config stays
    pool.forgive()  # a reload
    assert send(pool, Route("x", (A,)), T0 + 3600) == "a"


def test_two_sections_with_one_token_share_one_budget_and_one_throttle(pool):
    twin = robot("twin", token="tok-a")
    route = Route("ops", (A, twin))
    assert [send(pool, route, T0) for _ in range(3)] == ["a", "twin", None]
    send(pool, Route("z", (twin,)), T0 + 61, THROTTLED)
    assert send(pool, Route("y", (A,)), T0 + 62) is None  # a's throttle too


def test_failover_skips_the_robots_already_tried(pool):
    assert send(pool, ROUTE, T0, tried={A.key, B.key}) == "c"
    assert send(pool, ROUTE, T0, tried={A.key, B.key, C.key}) is None


def test_a_placeholder_robot_is_never_used(pool):
    placeholder = robot("new", token="CHANGE_ME")
    route = Route("ops", (placeholder, A))
    assert [send(pool, route, T0) for _ in range(3)] == ["a", "a", None]


def test_budgets_and_throttles_come_back_from_the_send_log(pool):
    pool.restore(
        [
            (B.key, T0 - 200, 410100),
            (C.key, T0 - 61, 0),
            (A.key, T0 - 30, 0),
            (A.key, T0 - 10, 0),
            (B.key, T0 - 100, 410100),
        ],
        T0,
    )  # twice: two windows of rest
    report = pool.report([A, B, C], T0)
    assert [(r.name, r.budget, r.throttled(T0), r.disabled) for r in report] == [
        ("a", 0, False, None),
        ("b", 2, True, None),
        ("c", 2, False, None),
    ]
    assert report[1].throttled_until == T0 - 100 + 120
    assert send(pool, ROUTE, T0) == "c"


def test_new_limits_apply_at_once(pool, limits):
    assert [send(pool, ROUTE, T0) for _ in range(6)] == ["a", "b", "c"] * 2
    limits["delivery"] = Delivery(rate_limit=3, rate_window=60.0)  # what a reload does
    assert pool.available(ROUTE, T0) == 3


@pytest.fixture
def reserving(limits):
    limits["delivery"] = Delivery(rate_limit=4, rate_window=60.0, reserve=2)
    return RobotPool(lambda: limits["delivery"])


def test_the_reserve_is_kept_for_urgent_messages_and_the_limit_never_exceeded(reserving):
    route = Route("ops", (A,))
    assert reserving.available(route, T0, urgent=False) == 2 and reserving.available(route, T0) == 4
    assert [reserving.acquire(route, T0, set(), urgent=False) for _ in range(3)] == [A, A, None]
    assert reserving.next_slot_at(route, T0, urgent=False) > T0  # a storm waits here...
    assert reserving.next_slot_at(route, T0, urgent=True) == T0  # ...a page does not
    assert [reserving.acquire(route, T0, set(), urgent=True) for _ in range(3)] == [A, A, None]


def test_routes_sharing_a_robot_take_turns_when_its_slots_run_short(limits):
    limits["delivery"] = Delivery(rate_limit=2, rate_window=60.0, reserve=0)
    pool = RobotPool(lambda: limits["delivery"])
    storm, other = Route("storm", (A,)), Route("other", (A,))
    assert [send_as(pool, storm, t) for t in (T0, T0 + 10, T0 + 20)] == ["a", "a", None]
    assert send_as(pool, other, T0 + 30) is None  # a page comes; it waits too
    for t in (T0 + 35, T0 + 40, T0 + 45, T0 + 50, T0 + 55, T0 + 60, T0 + 65, T0 + 70):
        pool.wants(other, t)  # its sender, every few seconds
    assert send_as(pool, storm, T0 + 60.5) == "a"  # the storm had waited longer
    assert send_as(pool, storm, T0 + 70.5) is None  # the next slot is the page's...
    assert pool.next_slot_at(storm, T0 + 70.5, urgent=False) > T0 + 70.5
    assert send_as(pool, other, T0 + 70.6) == "a"  # ...which takes it
    assert send_as(pool, storm, T0 + 120.6) == "a"  # and the storm has it back


def test_a_route_that_stopped_asking_is_not_waited_for(limits):
    limits["delivery"] = Delivery(rate_limit=1, rate_window=60.0, reserve=0)
    pool = RobotPool(lambda: limits["delivery"])
    storm, gone = Route("storm", (A,)), Route("gone", (A,))
    assert [send_as(pool, storm, T0), send_as(pool, gone, T0 + 1)] == ["a", None]
    assert send_as(pool, storm, T0 + 60.5) == "a"  # "gone" has not asked for a minute


def send_as(pool, route, now):
    """One non-urgent request of `route`; the robot's name, or None."""
    chosen = pool.acquire(route, now, set(), urgent=False)
    if chosen is not None:
        pool.release(chosen, OK, now)
    return chosen and chosen.name


def feishu_robot(name, rate_limit=((100, 60.0), (5, 1.0))):
    """A robot counted as Feishu counts (its own rate_limit: any kind may have one)."""
    return Robot(name, robot(name).url, rate_limit=rate_limit)


def windowed_pool(limits, *robots):
    """A pool whose robots are counted in windows of their own (Robot.rate_limit), as
    Config.budget_windows gives them."""
    of = {r.key: r.rate_limit for r in robots}
    return RobotPool(lambda: limits["delivery"], windows=lambda: of.__getitem__)


def test_a_robot_counted_in_two_windows_keeps_to_both(limits):
    """Feishu counts 100 a minute and 5 a second: a burst stops at 5 in any second, and the
    minute's count stops it at 100 whatever the seconds."""
    limits["delivery"] = Delivery(reserve=0)
    f = feishu_robot("f")
    pool, route = windowed_pool(limits, f), Route("ops", (f,))
    sent = {}  # second -> messages
    now = T0
    while now < T0 + 60:
        while send(pool, route, now):
            sent[int(now - T0)] = sent.get(int(now - T0), 0) + 1
        free = pool.next_slot_at(route, now)
        assert free > now
        now = free
    assert max(sent.values()) == 5 and sum(sent.values()) == 100  # and no second holds 6
    assert pool.next_slot_at(route, T0 + 59) == T0 + 60  # the minute's first slots age out


def test_the_reserve_and_a_platforms_wait_hold_for_every_window(limits):
    limits["delivery"] = Delivery(reserve=2, throttle_seconds=600.0)
    f = feishu_robot("f", ((10, 60.0), (3, 1.0)))
    pool, route = windowed_pool(limits, f), Route("ops", (f,))
    for second in range(3):  # 8 of the minute's 10 for any message, 3 a second at most
        now = T0 + second
        sent = [pool.acquire(route, now, set(), urgent=False) for _ in range(4)]
        assert sent.count(f) == (3 if second < 2 else 2)
        for _ in range(sent.count(f)):
            pool.release(f, SendResult(0, "ok"), now)
    assert pool.acquire(route, T0 + 3, set(), urgent=False) is None  # 2 kept for urgent
    assert [pool.take(f, T0 + 3, urgent=True) for _ in range(3)] == [True, True, False]
    [report] = pool.report([f], T0)
    assert (report.capacity, report.reserve) == (10, 2)
    pool = windowed_pool(limits, f)
    assert pool.acquire(route, T0, set()) is f
    pool.release(f, SendResult(11232, "frequency limited", outcome="throttled", rest=7.0), T0)
    assert pool.next_slot_at(route, T0) == T0 + 7  # as long as the platform said, not a minute


def test_a_restart_counts_each_robot_in_its_own_windows(limits):
    limits["delivery"] = Delivery(reserve=0, rate_limit=20, rate_window=60.0)
    f = feishu_robot("f", ((4, 600.0),))
    pool = windowed_pool(limits, f)
    pool.restore([(f.key, T0 + i * 100, 0) for i in range(4)], T0 + 350)
    assert pool.available(Route("ops", (f,)), T0 + 350) == 0  # 300 s old: in its 10 minutes
    assert pool.available(Route("ops", (f,)), T0 + 601) == 1
