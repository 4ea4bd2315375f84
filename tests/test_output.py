"""A generation's output processor, in-process (no model): tokens in, items out."""

from __future__ import annotations

from lorad.daemon import tools
from lorad.daemon.output import Output

PIECES = {1: b"Hel", 2: b"lo", 3: b" wor", 4: b"ld", 5: b"\xe2\x82", 6: b"\xac", 7: b"<tool_call>",
          8: b'\n{"name": "f", "arguments": {}}\n</tool_call>'}
EOG = 0


def _output(stop: list[str] | None = None, splitter: tools.StreamSplitter | None = None
            ) -> Output:
    return Output(PIECES.__getitem__, lambda t: t == EOG, stop or [], splitter)


def test_tokens_become_items_and_an_end_of_generation_token_ends_it() -> None:
    out = _output()
    items = [out.token(t) for t in (1, 2, 5, 6)]
    assert [i["text"] for i in items] == ["Hel", "lo", "", "€"]  # a split character waits
    assert [i["token_ids"] for i in items] == [[1], [2], [5], [6]]
    assert out.finish is None and out.token(EOG) is None and out.finish == "stop"
    assert out.generated == 5 and out.tokens == [1, 2, 5, 6]
    assert out.close() is None


def test_a_stop_sequence_ends_it_and_holds_back_what_may_begin_one() -> None:
    out = _output(stop=["world"])
    assert out.token(1)["text"] == "Hel" and out.token(2)["text"] == "lo"
    assert out.token(3)["text"] == " " and out.finish is None  # "wor" may begin "world"
    assert out.token(4)["text"] == "" and out.finish == "stop"
    tail = _output(stop=["xyz"])
    tail.token(1)
    assert tail.close() is None  # nothing held


def test_log_probabilities_ride_on_their_item() -> None:
    item = _output().token(1, ([[1, -0.1], [2, -2.0]], -0.1))
    assert item["logprobs"] == [[[1, -0.1], [2, -2.0]]] and item["token_logprobs"] == [-0.1]


def test_a_tool_call_is_held_back_and_parsed_at_the_end() -> None:
    use = tools.parse_tools([{"type": "function", "function": {"name": "f"}}])
    out = _output(splitter=tools.StreamSplitter(use, "hermes"))
    assert [out.token(t)["text"] for t in (1, 2, 7, 8)] == ["Hel", "lo", "", ""]
    assert out.close() is None and out.finish == "tool_calls"
    assert [c["function"]["name"] for c in out.calls] == ["f"]


def test_the_end_metrics_count_from_arrival_start_prompt_and_first_token() -> None:
    import time

    now = time.perf_counter()
    out = Output(PIECES.__getitem__, lambda t: t == EOG, [], received_at=now - 0.5,
                 started=now - 0.25)
    assert out.stats(10, 4)["time_to_first_token_ms"] >= 500  # none yet: the end
    out.prompt_done()
    out.token(1)
    out.token(EOG)
    stats = out.stats(10, 4)
    assert 249 <= stats["queue_ms"] <= 251
    assert stats["prompt_tokens"] == 10 and stats["cached_prompt_tokens"] == 4
    assert stats["generated_tokens"] == 2
    assert 500 <= stats["time_to_first_token_ms"] <= stats["total_ms"]
    assert 0 < stats["prompt_tokens_per_s"] <= 6 / 0.25 + 0.01  # 6 evaluated in 0.25 s
