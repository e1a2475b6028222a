"""The cluster's rules in simulated time, as pure functions of what an instance knows and of its
lease clock: no MySQL, no processes, no waiting. tests/test_cluster.py runs the same rules
through real processes on the real MariaDB."""

from alertbridge import (
    ALONE,
    LEADER,
    STANDBY,
    budget_share,
    lease_end,
    may_send,
    missing_after,
    role_after,
)

LEASE, WINDOW, INSTANCES, PRESUMED = 30.0, 60.0, 2, 3600.0


class Instance:
    """One instance's view, turned by hand: its role, lease, contact with MySQL, the missing."""

    def __init__(self, role=STANDBY):
        self.role, self.lease_until, self.contact = role, 0.0, 0.0
        self.sharing_until, self.missing, self.missing_since = 0.0, 0, None

    def turn(self, now, leading, alive=1):
        """A check-in at `now`: MySQL answered `leading` (None: it did not answer)."""
        if leading is not None:
            if self.role == ALONE:
                self.sharing_until = now + WINDOW
            self.contact = now
            self.missing, self.missing_since = missing_after(
                INSTANCES, alive, self.missing_since, now, PRESUMED
            )
            if leading:
                self.lease_until = lease_end(now, LEASE)
        self.role = role_after(self.role, leading, now - self.contact, LEASE, WINDOW)

    def may_send(self, now):
        return may_send(self.role, now, self.lease_until)

    def share(self, now):
        return budget_share(self.role, now, self.sharing_until, self.missing, INSTANCES)


def test_the_leader_dies_a_standby_takes_over_and_keeps_to_its_share_while_it_is_missing():
    standby = Instance()
    standby.turn(0, leading=False)
    assert standby.role == STANDBY and not standby.may_send(0)
    standby.turn(40, leading=True, alive=0)  # the lease lapsed: MySQL gives it to the standby
    assert standby.role == LEADER and standby.may_send(40) and standby.share(40) == 0.5
    standby.turn(40 + PRESUMED, leading=True, alive=0)
    assert standby.share(40 + PRESUMED) == 1.0  # missing that long: presumed gone, not alone
    standby.turn(50 + PRESUMED, leading=True, alive=1)
    assert standby.missing == 0 and standby.share(50 + PRESUMED) == 1.0


def test_a_paused_leader_does_not_send_when_it_resumes():
    leader = Instance(LEADER)
    leader.turn(0, leading=True)
    assert leader.may_send(0) and leader.may_send(19.9)
    assert not leader.may_send(20.0)  # paused past two thirds of its lease
    assert not leader.may_send(95)  # resumed long after: the lease is gone
    leader.turn(95, leading=False)  # another holds it now
    assert leader.role == STANDBY and not leader.may_send(95)


def test_the_lease_lost_in_the_middle_of_a_send_stops_the_next_request():
    leader = Instance(LEADER)
    leader.turn(0, leading=True)
    leader.turn(10, leading=True)  # renewed: good until 30
    assert leader.may_send(29.9)
    leader.turn(20, leading=None)  # MySQL does not answer: no renewal
    assert leader.role == LEADER and leader.may_send(29.9) and not leader.may_send(30.1)


def test_mysql_gone_and_back():
    leader, standby = Instance(LEADER), Instance()
    leader.turn(0, leading=True)
    standby.turn(0, leading=False)
    for now in range(1, 200):
        leader.turn(now, leading=None)
        standby.turn(now, leading=None)
        if now == LEASE:
            assert leader.role == ALONE and standby.role == STANDBY
        if now == 2 * LEASE + WINDOW:
            assert standby.role == ALONE
    assert leader.share(199) == standby.share(199) == 0.5  # together within a robot's budget
    leader.turn(200, leading=True)
    standby.turn(200, leading=False)
    assert leader.role == LEADER and standby.role == STANDBY
    assert leader.share(200 + WINDOW - 1) == 0.5 and leader.share(200 + WINDOW) == 1.0


def test_a_standby_cut_off_goes_alone_only_after_the_leader_has_seen_it_missing():
    leader, standby = Instance(LEADER), Instance()
    leader.turn(0, leading=True, alive=1)
    standby.turn(0, leading=False)
    for now in range(1, 2 * int(LEASE) + int(WINDOW) + 1):
        standby.turn(now, leading=None)
        leader.turn(now, leading=True, alive=1 if now <= LEASE else 0)
        if standby.role == ALONE:
            assert (
                leader.share(now) == 0.5 and now - LEASE >= WINDOW
            )  # the leader's full-rate sends aged
    assert standby.role == ALONE
