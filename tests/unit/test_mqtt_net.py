"""When the restart net ingests what it gets (gateway/mqtt_net.py `RestartWindow`), on an injected clock."""

from __future__ import annotations

from dataclasses import dataclass

from gateway.mqtt_net import RestartWindow


@dataclass
class Session:
    subscribed_at: float | None = None


class Clock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def window(grace: float = 5.0) -> tuple[RestartWindow, Session, Session, Clock]:
    shared, net, clock = Session(), Session(), Clock()
    return RestartWindow(shared, net, grace=grace, clock=clock), shared, net, clock


def test_while_the_shared_subscription_is_down_everything_is_ingested() -> None:
    w, _shared, net, clock = window()
    net.subscribed_at = clock.t
    assert w.admit(False, 10)  # the broker just restarted: nobody holds the shared subscription
    clock.t += 60
    assert w.admit(False, 10)  # still down a minute later: the net is the only way in


def test_before_the_net_has_subscribed_its_queued_messages_are_ingested() -> None:
    w, shared, _net, clock = window()
    shared.subscribed_at = clock.t - 100  # the shared side has been up for long
    assert w.admit(True, 1000)  # the net's restored session delivers its queue right after CONNACK


def test_in_normal_operation_the_net_only_acknowledges() -> None:
    w, shared, net, clock = window()
    shared.subscribed_at = net.subscribed_at = clock.t - 60
    assert not w.admit(False, 1)
    assert not w.admit(True, 1)  # a burst of live traffic is not a backlog from a window


def test_the_window_lasts_the_grace_after_both_sessions_are_back() -> None:
    w, shared, net, clock = window(grace=5.0)
    shared.subscribed_at = clock.t
    net.subscribed_at = clock.t + 2  # the net came back later: the grace counts from the later one
    clock.t += 6.9
    assert w.admit(False, 1)
    clock.t += 0.2
    assert not w.admit(False, 1)


def test_a_backlog_that_began_in_the_window_is_ingested_whole() -> None:
    w, shared, net, clock = window(grace=5.0)
    shared.subscribed_at = net.subscribed_at = clock.t
    assert w.admit(True, 1000)
    clock.t += 30  # long past the grace, but the queue the window started on is still being delivered
    assert w.admit(True, 1000)
    assert w.admit(False, 10)  # the last of it: waiting queue now empty, but this batch is still backlog
    assert not w.admit(False, 10)  # from here on, live traffic the shared group has
    assert not w.admit(True, 10)  # and a later burst does not reopen it
