"""Zero-loss drain: SIGTERM to one of two replicas of a service under load loses no request - health
turns NOT_SERVING, the client channel (the one peers use) stops sending to it, its in-flight calls
finish, it exits 0, and the other replica takes every call."""

from __future__ import annotations

import pytest

from tests.fixtures.drain import SERVICES, drain_under_load


@pytest.mark.parametrize("service", SERVICES)
def test_sigterm_to_one_of_two_replicas_under_load_loses_no_request(service, tmp_path):
    result = drain_under_load(service, tmp_path)
    assert result.lost == [], result.lost[:5]
    assert result.exit_code == 0
    assert result.before > 0 and result.after > 0, result
