"""A server's Retry-After on a 429 or 503 is honoured, up to a cap (FetchSettings.max_retry_after_s), against
the test media server on 127.0.0.1."""

from __future__ import annotations

import asyncio
import email.utils
from pathlib import Path

import pytest

from batchvl.media.fetch import Fetcher, FetchSettings, retry_after_s

from .media_server import Route


def fetch(url: str, settings: FetchSettings) -> bytes:
    async def one():
        fetcher = Fetcher(settings)
        try:
            return (await fetcher.fetch(url, Path("."), True)).data
        finally:
            await fetcher.close()

    return asyncio.run(one())


def test_retry_after_reads_seconds_and_http_dates():
    now = 1_700_000_000.0
    assert retry_after_s("120") == 120.0 and retry_after_s(" 0 ") == 0.0
    assert retry_after_s(email.utils.formatdate(now + 30, usegmt=True), now=now) == pytest.approx(30, abs=1)
    assert retry_after_s(email.utils.formatdate(now - 30, usegmt=True), now=now) == 0.0
    assert retry_after_s(None) is None and retry_after_s("soon") is None and retry_after_s("-5") is None


def test_a_503_with_retry_after_is_retried_after_the_wait_it_asks_for(server):
    s, base = server
    s.routes["/busy.png"] = Route(body=b"image bytes", fail_first=1, retry_after="1")
    assert fetch(f"{base}/busy.png", FetchSettings(backoff_s=0.01, http_retries=2)) == b"image bytes"
    first, second = s.routes["/busy.png"].hit_times
    assert second - first >= 0.9  # the backoff alone would have been about 0.01 s


def test_a_retry_after_beyond_the_cap_is_waited_for_only_up_to_the_cap(server):
    s, base = server
    s.routes["/slow.png"] = Route(body=b"image bytes", fail_first=1, retry_after="3600")
    settings = FetchSettings(backoff_s=0.01, http_retries=2, max_retry_after_s=0.3)
    assert fetch(f"{base}/slow.png", settings) == b"image bytes"
    first, second = s.routes["/slow.png"].hit_times
    assert 0.25 <= second - first < 3
