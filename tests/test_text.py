"""Unit tests of ``TextAssembler``: UTF-8 split across tokens, stop sequences, flushing."""

from __future__ import annotations

import pytest

from lorad.daemon.text import TextAssembler

TEXT = "café 日本 🎉"


def feed_all(asm: TextAssembler, chunks: list[bytes]) -> list[str]:
    return [asm.feed(c) for c in chunks]


def byte_by_byte(text: str) -> list[bytes]:
    data = text.encode("utf-8")
    return [data[i : i + 1] for i in range(len(data))]


def assert_clean(pieces: list[str]) -> None:
    for piece in pieces:
        assert "\ufffd" not in piece
        piece.encode("utf-8")  # no lone surrogates either


def test_utf8_byte_by_byte_never_broken() -> None:
    asm = TextAssembler([])
    pieces = feed_all(asm, byte_by_byte(TEXT))
    assert_clean(pieces)
    assert asm.finish() == ""
    assert "".join(pieces) == TEXT
    # A piece appears exactly when its character's last byte arrives.
    assert [p for p in pieces if p] == list(TEXT)
    assert len(pieces) == len(TEXT.encode("utf-8"))


@pytest.mark.parametrize("size", [1, 2, 3, 5, 7])
def test_utf8_any_split(size: int) -> None:
    data = (TEXT * 3).encode("utf-8")
    asm = TextAssembler([])
    pieces = feed_all(asm, [data[i : i + size] for i in range(0, len(data), size)])
    assert_clean(pieces)
    assert "".join(pieces) + asm.finish() == TEXT * 3


def test_four_byte_character_waits_for_all_its_bytes() -> None:
    asm = TextAssembler([])
    emoji = "🎉".encode()
    assert len(emoji) == 4
    assert asm.feed(emoji[:1]) == ""
    assert asm.feed(emoji[1:3]) == ""
    assert asm.feed(emoji[3:] + b"!") == "🎉!"


def test_dangling_partial_sequence_becomes_replacement_at_finish() -> None:
    asm = TextAssembler([])
    assert asm.feed(b"ok" + "日".encode()[:2]) == "ok"
    assert asm.finish() == "\ufffd"


def test_invalid_bytes_are_replaced_not_raised() -> None:
    asm = TextAssembler([])
    assert asm.feed(b"a\xffb") == "a\ufffdb"


def test_no_stop_passes_text_through() -> None:
    asm = TextAssembler([])
    assert asm.feed(b"Hello") == "Hello"
    assert asm.feed(b", world") == ", world"
    assert asm.finish() == ""
    assert not asm.stopped


def test_stop_cuts_before_the_stop_string() -> None:
    asm = TextAssembler(["\n\n"])
    assert asm.feed(b"one two\n\nthree") == "one two"
    assert asm.stopped


def test_stop_at_the_very_start() -> None:
    asm = TextAssembler(["END"])
    assert asm.feed(b"END and more") == ""
    assert asm.stopped
    assert asm.finish() == ""


def test_stop_split_across_feeds() -> None:
    asm = TextAssembler(["STOP"])
    out = feed_all(asm, [b"abc S", b"T", b"O", b"P tail"])
    assert out == ["abc ", "", "", ""]
    assert asm.stopped
    assert asm.finish() == ""


def test_stop_split_byte_by_byte_with_multibyte_stop() -> None:
    stop = "日本"
    asm = TextAssembler([stop])
    pieces = feed_all(asm, byte_by_byte("café 日本 🎉"))
    assert_clean(pieces)
    assert "".join(pieces) == "café "
    assert asm.stopped
    assert asm.finish() == ""


def test_held_prefix_that_is_not_a_stop_is_released() -> None:
    asm = TextAssembler(["STOP"])
    assert asm.feed(b"abc ST") == "abc "  # "ST" could start "STOP": held back
    assert asm.feed(b"ar") == "STar"  # it did not: released with the new text
    assert not asm.stopped
    assert asm.feed(b" S") == " "
    assert asm.finish() == "S"  # held text is flushed at the end


def test_overlapping_prefix_restarts() -> None:
    # "aab" cannot be confused by a run of "a"s: only the last two may start the stop.
    asm = TextAssembler(["aab"])
    assert asm.feed(b"aaaa") == "aa"
    assert asm.feed(b"a") == "a"
    assert asm.feed(b"b!") == ""
    assert asm.stopped


def test_earliest_of_several_stops_wins() -> None:
    asm = TextAssembler(["world", "lo"])
    assert asm.feed(b"hello world") == "hel"
    asm = TextAssembler(["lo", "hello"])
    assert asm.feed(b"say hello") == "say "


def test_several_stops_split_across_feeds() -> None:
    asm = TextAssembler(["</s>", "###"])
    assert asm.feed(b"x <") == "x "
    assert asm.feed(b"/") == ""
    assert asm.feed(b"#") == "</"  # not "</s>" after all; "#" may start "###"
    assert asm.feed(b"##") == ""
    assert asm.stopped


def test_longest_possible_prefix_is_held() -> None:
    asm = TextAssembler(["ab", "xyz"])
    assert asm.feed(b"0xy") == "0"
    assert asm.feed(b"a") == "xy"  # "xya": "a" may still start "ab"
    assert asm.feed(b"c") == "ac"


def test_empty_stop_strings_are_ignored() -> None:
    asm = TextAssembler(["", "Z"])
    assert asm.feed(b"abc") == "abc"
    assert asm.feed(b"Z") == ""
    assert asm.stopped


def test_finish_flushes_held_text() -> None:
    asm = TextAssembler(["<end>"])
    assert asm.feed(b"result <en") == "result "
    assert asm.finish() == "<en"
    assert not asm.stopped


def test_finish_flushes_held_text_and_pending_bytes() -> None:
    asm = TextAssembler(["<end>"])
    assert asm.feed(b"x <" + "é".encode()[:1]) == "x "
    assert asm.finish() == "<\ufffd"


def test_after_stop_feed_returns_nothing() -> None:
    asm = TextAssembler(["."])
    assert asm.feed(b"One. Two") == "One"
    assert asm.stopped
    assert asm.feed(b"more text") == ""
    assert asm.feed("日本".encode()) == ""
    assert asm.finish() == ""


def test_text_concatenation_is_exact_with_stops_that_never_match() -> None:
    text = "a<b<<c<d 日本 <🎉"
    asm = TextAssembler(["<<<", "日本語"])
    pieces = feed_all(asm, byte_by_byte(text))
    assert_clean(pieces)
    assert "".join(pieces) + asm.finish() == text
    assert not asm.stopped
