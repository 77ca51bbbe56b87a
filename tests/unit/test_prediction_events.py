"""The events of a prediction's stream, from the successive states the store gives."""

import asyncio
from dataclasses import replace

from serve import prediction_events
from serve.prediction_events import new_log_lines
from serve.predictions import Prediction


def _stream(states: list[Prediction], poll_s: float = 0.0) -> list[bytes]:
    later = iter(states[1:])

    async def load():
        return next(later)

    async def read():
        return [chunk async for chunk in prediction_events.prediction_events(
            states[0], load, poll_s)]

    return asyncio.run(read())


def test_a_redrawn_progress_line_is_sent_again_and_added_lines_once():
    assert new_log_lines("", "Using seed: 4\n") == ["Using seed: 4"]
    assert new_log_lines("Using seed: 4\n 10%|██| 1/10\n",
                         "Using seed: 4\n 20%|████| 2/10\n") == [" 20%|████| 2/10"]
    assert new_log_lines("a\nb\n", "a\nb\n") == []
    assert new_log_lines("a\nb\n", "a\nb\nc\nd\n") == ["c", "d"]


def test_each_state_sends_what_changed_then_the_files_and_done():
    start = Prediction(model="a/b", version="v", input={}, logs="Using seed: 4\n")
    running = replace(start, status="processing", logs=start.logs + " 50%|█| 1/2\n")
    done = replace(running, logs=start.logs + "100%|██| 2/2\n")
    done.finish("succeeded", output=["http://x/files/1.png", "http://x/files/2.png"])
    chunks = _stream([start, start, running, done])
    assert chunks == [
        b"event: logs\nid: 1\ndata: Using seed: 4\n\n",
        b"event: logs\nid: 2\ndata:  50%|\xe2\x96\x88| 1/2\n\n",
        b"event: logs\nid: 3\ndata: 100%|\xe2\x96\x88\xe2\x96\x88| 2/2\n\n",
        b"event: output\nid: 4\ndata: http://x/files/1.png\n\n",
        b"event: output\nid: 5\ndata: http://x/files/2.png\n\n",
        b"event: done\nid: 6\ndata: {}\n\n"]


def test_a_single_output_a_failure_and_an_abort_end_as_replicate_ends_them():
    single = Prediction(model="a/b", version="v", input={})
    single.finish("succeeded", output="http://x/files/1.png")
    assert _stream([single])[0] == b"event: output\nid: 1\ndata: http://x/files/1.png\n\n"
    failed = Prediction(model="a/b", version="v", input={})
    failed.finish("failed", error="NSFW content detected.\nTry again")
    assert _stream([failed]) == [
        b"event: error\nid: 1\ndata: NSFW content detected.\ndata: Try again\n\n",
        b'event: done\nid: 2\ndata: {"reason": "error"}\n\n']
    aborted = Prediction(model="a/b", version="v", input={})
    aborted.finish("aborted")
    assert _stream([aborted]) == [b'event: done\nid: 1\ndata: {"reason": "aborted"}\n\n']


def test_a_quiet_stream_sends_a_comment_to_keep_the_connection(monkeypatch):
    monkeypatch.setattr(prediction_events, "KEEP_ALIVE_S", 0.0)
    waiting = Prediction(model="a/b", version="v", input={})
    finished = replace(waiting)
    finished.finish("canceled")
    chunks = _stream([waiting, waiting, finished])
    assert chunks == [b": keep-alive\n\n", b": keep-alive\n\n",
                      b'event: done\nid: 1\ndata: {"reason": "canceled"}\n\n']


def test_a_store_out_of_reach_is_read_again_and_an_expired_prediction_ends_in_error():
    running = Prediction(model="a/b", version="v", input={}, status="processing")
    reads = iter([ConnectionError("store down"), running, None])

    async def load():
        got = next(reads)
        if isinstance(got, Exception):
            raise got
        return got

    async def read():
        return [chunk async for chunk in prediction_events.prediction_events(
            running, load, 0.0)]

    assert asyncio.run(read()) == [
        b"event: error\nid: 1\ndata: the prediction is no longer kept\n\n",
        b'event: done\nid: 2\ndata: {"reason": "error"}\n\n']
