"""When a failed release is tried again (edged/mqtt/retry.py): the backoff, and the news
that cuts it short. The disk check runs on a real tmpfs that the test fills and frees."""

from __future__ import annotations

import random
import time

from edged.config import UpdateSettings
from edged.mqtt.retry import DISK_MARGIN, RetryBook, space_needed


def book(**settings: float) -> RetryBook:
    return RetryBook(UpdateSettings(**settings), rng=random.Random(1))


def test_the_wait_doubles_up_to_the_cap_and_jitter_only_shortens_it():
    retries = book(retry_min_s=10, retry_max_s=100, retry_jitter=0.2)
    for attempts, base in [(1, 10), (2, 20), (3, 40), (4, 80), (5, 100), (6, 100), (60, 100), (500, 100)]:
        delays = [retries.delay(attempts) for _ in range(200)]
        assert all(0.8 * base <= d <= base for d in delays), (attempts, min(delays), max(delays))
        assert len(set(delays)) > 1  # jittered: a fleet does not retry in step
    assert book(retry_min_s=10, retry_max_s=100, retry_jitter=0).delay(3) == 40


def test_a_repeated_failure_counts_up_and_a_different_release_starts_again():
    retries = book(retry_min_s=10, retry_max_s=1000, retry_jitter=0)
    first = retries.failed("face", "2", "t", b"release 2", "no reply")
    again = retries.failed("face", "2", "t", b"release 2", "no reply")
    assert (first.attempts, again.attempts) == (1, 2)
    assert round(again.due - again.failed_at) == 20
    newer = retries.failed("face", "3", "t", b"release 3", "no reply")
    assert newer.attempts == 1 and retries.get("face") is newer
    assert retries.due() == []  # not before its wait
    assert retries.forget("face") is newer and retries.get("face") is None and retries.wait_s() is None


def test_news_from_after_the_failure_makes_it_due_news_from_before_does_not():
    retries = book(retry_min_s=3600)
    before = time.monotonic()
    pending = retries.failed("face", "2", "t", b"r", "no reply", silent=True)
    answered_badly = retries.failed("pose", "2", "t", b"p", "truncated chunk")
    assert retries.hurry(since=before) == 0 and retries.due() == []  # sent before it failed
    assert retries.heard_since(before) == 0
    # A reply says the registry is back: for the release it did not answer, not for the one
    # whose download's late replies these may be (that would retry it in a loop).
    assert retries.heard_since(time.monotonic()) == 1 and retries.due() == [pending]
    assert answered_badly not in retries.due()
    retries.forget("pose")
    pending = retries.failed("face", "2", "t", b"r", "no reply")
    assert retries.hurry("other", since=time.monotonic()) == 0
    assert retries.hurry("face", since=time.monotonic()) == 1 and retries.due() == [pending]


def test_a_release_short_of_disk_is_due_once_the_disk_has_room(small_disk, tmp_path):
    disk = small_disk(tmp_path / "disk", 8)
    retries = book(retry_min_s=3600, disk_poll_s=0.01)
    disk.fill(leave=1 << 20)
    pending = retries.failed("face", "2", "t", b"r", "not enough disk", disk=[(disk.path, 4 << 20)])
    assert retries.hurry(since=time.monotonic()) == 0  # the registry's news does not make room
    time.sleep(0.02)
    assert retries.due() == [] and retries.wait_s() < 3600  # polled, not left to the backoff
    disk.free()
    time.sleep(0.02)
    assert retries.due() == [pending]


def test_a_disk_that_had_room_right_after_the_failure_is_left_to_the_backoff(small_disk, tmp_path):
    """ENOSPC, but the space came back by itself before the failure was recorded: polling
    the disk would retry a disk that is simply too small at every poll."""
    disk = small_disk(tmp_path / "disk", 8)
    retries = book(retry_min_s=3600, disk_poll_s=0.01)
    retries.failed("face", "2", "t", b"r", "No space left on device", disk=[(disk.path, 4 << 20)])
    time.sleep(0.02)
    assert retries.due() == []


def test_an_update_needs_its_size_once_on_one_file_system_and_in_each_across_two(small_disk, tmp_path):
    """On one file system the store hard-links the verified download, so no second copy."""
    total = 10 << 20
    assert space_needed(tmp_path / "downloads", tmp_path / "store", total) == [
        (tmp_path / "downloads", total + DISK_MARGIN)]
    disk = small_disk(tmp_path / "disk", 16)
    assert space_needed(disk.path / "downloads", tmp_path / "store", total) == [
        (disk.path / "downloads", total + DISK_MARGIN), (tmp_path / "store", total + DISK_MARGIN)]
