"""The coordinator looks for replies every federation.reply_poll_s, not Flower's fixed 3 s."""

from __future__ import annotations

import time
from types import SimpleNamespace

import pytest

from server.reply_poll import PromptGrid


class FakeGrid:
    """Replies become available ``delay_s`` after the push; pulls return each reply once."""

    def __init__(self, delay_s: float, answered: set[str]) -> None:
        self.delay_s, self.answered, self.pushed_at, self.sent = delay_s, answered, 0.0, False

    def push_messages(self, messages: list[str]) -> list[str]:
        self.pushed_at = time.monotonic()
        return [f"id-{m}" for m in messages]

    def pull_messages(self, ids: set[str]) -> list[SimpleNamespace]:
        if self.sent or time.monotonic() - self.pushed_at < self.delay_s:
            return []
        self.sent = True
        return [SimpleNamespace(metadata=SimpleNamespace(reply_to_message_id=i)) for i in sorted(ids) if i in self.answered]

    def get_node_ids(self) -> list[int]:
        return [1, 2]


def test_replies_are_collected_within_one_poll_interval_of_arriving() -> None:
    grid = PromptGrid(FakeGrid(0.3, {"id-a", "id-b"}), poll_s=0.05)  # type: ignore[arg-type]
    started = time.monotonic()
    replies = list(grid.send_and_receive(["a", "b"], timeout=30))  # type: ignore[list-item]  # FakeGrid pushes strings
    took = time.monotonic() - started
    assert sorted(r.metadata.reply_to_message_id for r in replies) == ["id-a", "id-b"]
    assert 0.3 <= took < 3.0  # Flower's Grid would look again only after 3 s
    assert grid.looks >= 2 and grid.get_node_ids() == [1, 2]  # everything else is the wrapped grid's


def test_a_missing_reply_ends_the_wait_at_the_timeout_with_what_arrived() -> None:
    grid = PromptGrid(FakeGrid(0.0, {"id-a"}), poll_s=0.05)  # type: ignore[arg-type]
    started = time.monotonic()
    replies = list(grid.send_and_receive(["a", "b"], timeout=0.4))  # type: ignore[list-item]  # FakeGrid pushes strings
    assert [r.metadata.reply_to_message_id for r in replies] == ["id-a"]
    assert 0.4 <= time.monotonic() - started < 2.0


def test_the_poll_interval_must_be_positive() -> None:
    with pytest.raises(ValueError, match="reply_poll_s"):
        PromptGrid(FakeGrid(0, set()), poll_s=0)  # type: ignore[arg-type]
