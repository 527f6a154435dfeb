"""`pdserve up`'s supervisor gives up on a pod that keeps dying, and says why (issue 11).

A real process that fails at once (a decode pod pointed at a missing model) stands for a
pod that crashes on every start: it is restarted ``limit`` times, with the backoff between
tries, and then ``supervise`` names the pod, how it exited and the limit.
"""

from __future__ import annotations

import time

from pdserve.fleet import Fleet, RestartPolicy, describe_exit


def test_a_pod_that_keeps_dying_is_restarted_up_to_the_limit_then_given_up() -> None:
    fleet = Fleet(RestartPolicy(limit=2, backoff_s=0.05))
    fleet.launch("decode-0", ["decode", "--model", "/nonexistent-model", "--port", "0"])
    deadline = time.monotonic() + 120
    reason = None
    try:
        while reason is None and time.monotonic() < deadline:
            reason = fleet.supervise(time.monotonic())
            time.sleep(0.05)
    finally:
        fleet.stop(drain_timeout=1)
    assert reason is not None, "the supervisor never gave up"
    assert reason.startswith("decode-0 (pid ")
    assert "exit code 2" in reason and "restarted 2 time(s) in a row" in reason
    assert "--restart-limit 2" in reason and "giving up" in reason
    assert fleet.pods["decode-0"].restarts == 2


def test_exits_are_described_by_signal_name_or_code() -> None:
    assert describe_exit(-9) == "killed by SIGKILL"
    assert describe_exit(3) == "exit code 3"
