"""Verdicts are made in one place and read back from capture comments in the same one."""

from __future__ import annotations

import pytest

from vsproxy.verdict import Mark, Verdict, rewritten_in, verdict_of

MARKS = [
    (Mark.denied("not in app's outbound allowlist"), Verdict.DENIED, False),
    (Mark.rewritten_to("remap 3=2", 2, 9000), Verdict.ALLOWED, True),
    (Mark.rewritten_to(None, 5, 1234), Verdict.ALLOWED, True),
    (Mark.spoofed(9, 5), Verdict.SPOOFED, False),
    (Mark.refused("max-connections (64)"), Verdict.REFUSED, False),
]


@pytest.mark.parametrize(("mark", "verdict", "rewritten"), MARKS, ids=[str(m[0]).split()[0] for m in MARKS])
def test_a_mark_read_back_from_its_capture_comment_gives_the_verdict_it_was_made_with(
        mark: Mark, verdict: Verdict, rewritten: bool) -> None:
    comment = str(mark)  # what a pcapng file keeps: the text alone
    assert type(comment) is str and mark.verdict is verdict
    assert verdict_of(comment) is verdict and rewritten_in(comment) is rewritten


def test_the_words_stay_those_earlier_captures_hold() -> None:
    assert str(Mark.denied("default: sibling cid6 not allowed for cid5")) == \
        "denied by default: sibling cid6 not allowed for cid5; vsproxy answers RST"
    assert str(Mark.rewritten_to("remap 3=2", 2, 9000)) == "rewritten (remap 3=2): real peer 2:9000"
    assert str(Mark.spoofed(9, 5)) == "spoofed: src_cid 9 is not the guest's CID 5; dropped"
    assert verdict_of(None) is Verdict.ALLOWED and verdict_of("a comment someone wrote") is Verdict.ALLOWED


def test_the_filter_language_knows_every_verdict() -> None:
    from vsproxy.capture.view import PacketView
    from vsproxy.filter import compile_filter

    view = PacketView(0.0, "dev", True, None, 3, b"", comment=str(Mark.refused("max-pending (64)")))
    assert compile_filter("verdict == refused")(view)
    assert compile_filter("verdict")(view) and not compile_filter("verdict == denied")(view)
