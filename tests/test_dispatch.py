"""The event dispatcher on its own: notifications from many threads are all delivered, in each poster's
order, none after stop returns; control events run inline or on workers with deadlines."""

from __future__ import annotations

import threading
import time

import pytest

from fsfilter._engine.dispatch import Dispatcher, Origin, Outcome, current_job, reset_timeout

pytestmark = pytest.mark.timeout(60)


@pytest.mark.parametrize("serialize", [False, True])
def test_every_notification_is_delivered_in_order(serialize: bool) -> None:
    d = Dispatcher()
    d.serialize = serialize
    seen: dict[int, list[int]] = {}
    lock = threading.Lock()

    def handler(params: object) -> None:
        poster, seq = params  # type: ignore[misc]
        with lock:
            seen.setdefault(poster, []).append(seq)

    d.start()
    posters, each = 4, 5000

    def post(poster: int) -> None:
        for seq in range(each):
            d.post(handler, (poster, seq), Origin(poster, poster, 0, 0))
            if seq % 997 == 0:
                time.sleep(0.002)  # let the queue run empty now and then: wake-ups must not be lost

    threads = [threading.Thread(target=post, args=(i,)) for i in range(posters)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert d.stop() == 0
    assert d.stats.notifications_posted == d.stats.notifications_delivered == posters * each
    assert seen == {i: list(range(each)) for i in range(posters)}
    assert d.queued_notifications == 0


def test_a_lone_notification_arrives_promptly() -> None:
    d = Dispatcher()
    arrived = threading.Event()
    d.start()
    try:
        for _ in range(3):
            arrived.clear()
            d.post(lambda p: arrived.set(), None, None)
            assert arrived.wait(2)
    finally:
        d.stop()


def test_handlers_see_their_origin_and_failures_are_reported() -> None:
    errors: list[tuple[int, str]] = []
    d = Dispatcher(on_error=lambda code, text: errors.append((code, text)))
    d.start()
    origins: list[int] = []

    def who(params: object) -> None:
        job = current_job()
        assert job is not None and job.origin is not None
        origins.append(job.origin.pid)

    def boom(params: object) -> None:
        raise ValueError("bad handler")

    try:
        assert d.call(who, None, Origin(42, 43, 0, 0)) is Outcome.DONE
        assert d.call(boom, None, None) is Outcome.FAILED
        d.post(boom, None, None)
        d.post(who, None, Origin(7, 7, 0, 0))
    finally:
        d.stop()
    assert origins == [42, 7]
    assert len(errors) == 2 and all("bad handler" in text for _, text in errors)


def test_timeouts_expire_and_reset_timeout_extends() -> None:
    d = Dispatcher()
    d.timeout = 0.2
    d.start()
    try:
        release = threading.Event()
        assert d.call(lambda p: release.wait(5), None, None) is Outcome.EXPIRED
        release.set()

        def slow_but_extends(params: object) -> None:
            assert reset_timeout(2.0)
            time.sleep(0.4)

        assert d.call(slow_but_extends, None, None) is Outcome.DONE
    finally:
        d.stop()
    assert d.stats.expired == 1
