"""The egress gate never costs a download (tasks/egress.py).

The server errors behind these cases (423 on taking a slot, 500 on releasing one) came from a
real Prefect server under 16 runners (docs/scale.md) and cannot be produced on demand, so the
slot here is a stand-in context manager.
Mutants caught: the release not guarded (test 1 fails), the acquire error not made temporary
(test 2 fails), a failed release replacing the body's own error (test 3 fails).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager

import pytest

from tartflow.errors import TartflowError
from tasks.egress import guarded
from tasks.pull import is_temporary


class ServerError(Exception):
    pass


@contextmanager
def slot(fail_on: str = "") -> Iterator[None]:
    if fail_on == "take":
        raise ServerError("423 Locked")
    try:
        yield
    finally:
        if fail_on == "release":
            raise ServerError("500 Internal Server Error")


def test_a_failed_release_is_logged_and_the_layer_stands(caplog: pytest.LogCaptureFixture) -> None:
    done = []
    with caplog.at_level(logging.WARNING, logger="tartflow.egress"), guarded("tartflow-egress", lambda: slot("release")):
        done.append("layer")
    assert done == ["layer"]
    assert "releasing the slot failed" in caplog.text and "lease expires" in caplog.text


def test_a_slot_not_granted_is_temporary_and_retried() -> None:
    with pytest.raises(TartflowError) as caught, guarded("tartflow-egress", lambda: slot("take")):
        pytest.fail("the body must not run without a slot")
    assert caught.value.temporary and not caught.value.exhausted
    assert isinstance(caught.value.__cause__, ServerError)

    class State:
        def result(self, raise_on_failure: bool = True) -> BaseException:
            return caught.value

    assert is_temporary(None, None, State())


def test_the_bodys_own_error_wins_over_a_failed_release() -> None:
    with pytest.raises(KeyError), guarded("tartflow-egress", lambda: slot("release")):
        raise KeyError("the layer's own failure")
