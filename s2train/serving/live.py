"""The server's engine: live continuous batching of requests that arrive while others generate.

One thread owns the ``InferenceEngine`` and runs ``InferenceEngine.run_feed`` over this object's queue.
A request submitted while rows are generating takes a free row before the next frame; a request that
finishes, or whose client cancels or disconnects, frees its row at the next frame. Each request's frames
go to its own ``RequestAudio`` (the causal streaming codec decoder), and its audio chunks to the
``sink`` its submitter gave: the first after ``first_chunk_frames`` frames, then every ``chunk_frames``.
The queue is bounded: ``submit`` raises ``QueueFull`` beyond ``max_queue`` waiting requests.

    live = LiveEngine(synth, max_queue=64, slots=2048)
    ticket = live.submit(request, sink=chunks.put)   # chunks: AudioChunk ..., then Finished
    live.cancel(ticket)                              # a client went away: its row is freed
"""

from __future__ import annotations

import threading
import time
import traceback
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from s2train.inference.engine import AudioChunk, Request, RequestAudio, check_codec
from s2train.inference.synthesis import Synthesizer


class QueueFull(RuntimeError):
    """The server's queue holds ``max_queue`` waiting requests already."""


class Closed(RuntimeError):
    """The engine is shutting down and takes no more requests."""


@dataclass
class Finished:
    """The last item a sink receives: how the request ended."""

    frames: int
    stopped: bool  # ended on <|im_end|> (False: reached max_new_tokens)
    error: str | None = None  # the engine failed on this request (its message)


@dataclass
class Ticket:
    """A submitted request: where its audio goes, and its timings."""

    id: int
    request: Request
    sink: Callable[[AudioChunk | Finished], None]
    submitted: float = field(default_factory=time.perf_counter)
    first_audio_s: float | None = None  # from submit to its first audio chunk
    cancelled: bool = False
    audio: RequestAudio | None = None


@dataclass
class LiveStats:
    """What ``/metrics`` reports."""

    queued: int
    running: int
    frames_total: int
    requests_total: int
    frames_per_s: float  # over the last ``window_s`` seconds
    first_audio_s: list[float]  # recent times to first audio (at most the last 1000)


class LiveEngine:
    """Live continuous batching over a synthesizer's engine (module docstring)."""

    def __init__(
        self,
        synth: Synthesizer,
        *,
        max_queue: int = 64,
        slots: int = 2048,
        first_chunk_frames: int = 8,
        chunk_frames: int = 16,
        window_s: float = 10.0,
    ):
        if max_queue < 1:
            raise ValueError(f"max_queue must be at least 1, not {max_queue}")
        check_codec(synth.engine, synth.codec)
        self.synth, self.engine = synth, synth.engine
        self.max_queue, self.window_s = max_queue, window_s
        self.slots = min(slots, synth.model.config.max_seq_len)
        self.first_chunk_frames, self.chunk_frames = first_chunk_frames, chunk_frames
        self._cond = threading.Condition()
        self._queue: deque[Ticket] = deque()
        self._tickets: dict[int, Ticket] = {}  # submitted and not finished: queued or running
        self._next_id = 0
        self._closed = False
        self._frames_total = self._requests_total = 0
        self._frame_times: deque[float] = deque()  # when each column of the last window_s was made
        self._first_audio: deque[float] = deque(maxlen=1000)
        self._thread = threading.Thread(target=self._serve, name="s2train-engine", daemon=True)
        self._thread.start()

    # ---------------------------------------------------------------------------------------- clients

    def submit(self, request: Request, sink: Callable[[AudioChunk | Finished], None]) -> Ticket:
        """Queue ``request`` (checked first: a bad one raises ValueError); its audio goes to ``sink``, from
        the engine's thread. Raises ``QueueFull`` or ``Closed``."""
        self.engine.check(request)
        need = request.prompt.shape[1] + request.max_new_tokens
        if need > self.slots:
            raise ValueError(
                f"the prompt's {request.prompt.shape[1]} positions plus {request.max_new_tokens} frames exceed "
                f"the server's {self.slots} positions a request (serve.max_positions): shorten the text, "
                "the reference clip or max_new_tokens"
            )
        with self._cond:
            if self._closed:
                raise Closed("the server is shutting down")
            if len(self._queue) >= self.max_queue:
                raise QueueFull(f"{len(self._queue)} requests are waiting already; try again shortly")
            ticket = Ticket(self._next_id, request, sink)
            self._next_id += 1
            self._tickets[ticket.id] = ticket
            self._queue.append(ticket)
            self._cond.notify_all()
        return ticket

    def cancel(self, ticket: Ticket) -> None:
        """Withdraw ``ticket``: dropped from the queue, or its row freed at the next frame."""
        with self._cond:
            ticket.cancelled = True
            if ticket in self._queue:
                self._queue.remove(ticket)
                self._tickets.pop(ticket.id, None)

    def stats(self) -> LiveStats:
        with self._cond:
            now = time.perf_counter()
            self._forget_before(now - self.window_s)
            span = now - self._frame_times[0] if self._frame_times else 0.0
            recent = len(self._frame_times)
            return LiveStats(
                queued=len(self._queue),
                running=len(self._tickets) - len(self._queue),
                frames_total=self._frames_total,
                requests_total=self._requests_total,
                frames_per_s=recent / max(span, 1.0),  # a short burst is not extrapolated
                first_audio_s=list(self._first_audio),
            )

    def close(self, timeout: float = 10.0) -> None:
        """Take no more requests, cancel the waiting and running ones, stop the engine's thread."""
        with self._cond:
            self._closed = True
            for ticket in self._tickets.values():
                ticket.cancelled = True
            self._queue.clear()
            self._cond.notify_all()
        self._thread.join(timeout)

    # ----------------------------------------------------------------------- the engine's feed (its thread)

    def take(self, n: int, wait: bool) -> list[tuple[int, Request]]:
        with self._cond:
            while wait and not self._queue and not self._closed:
                self._cond.wait()
            taken = [self._queue.popleft() for _ in range(min(n, len(self._queue)))]
        for ticket in taken:
            ticket.audio = RequestAudio(
                self.synth.codec, self.engine.vocab.im_end_id, self.first_chunk_frames, self.chunk_frames
            )
        return [(t.id, t.request) for t in taken]

    def cancelled(self, index: int) -> bool:
        ticket = self._tickets.get(index)
        if ticket is not None and ticket.cancelled:
            with self._cond:
                self._tickets.pop(index, None)
            self.engine.first_frame_s.pop(index, None)
            return True
        return False

    def _forget_before(self, start: float) -> None:
        """Drop the frame times older than ``start`` (callers hold the lock)."""
        while self._frame_times and self._frame_times[0] < start:
            self._frame_times.popleft()

    def exhausted(self) -> bool:
        with self._cond:
            return self._closed and not self._queue

    def _serve(self) -> None:
        """The engine's thread: runs the feed; an engine error fails the requests it held, not the server."""
        while not self.exhausted():
            try:
                self._run()
            except Exception as error:  # noqa: BLE001 - reported to every request it touched
                message = f"generation failed: {type(error).__name__}: {error}"
                traceback.print_exc()
                with self._cond:
                    failed = [t for t in self._tickets.values() if t not in self._queue]
                    for ticket in failed:
                        self._tickets.pop(ticket.id, None)
                for ticket in failed:
                    ticket.sink(Finished(0, False, message))

    def _run(self) -> None:
        for step in self.engine.run_feed(self, self.synth.batch_size, self.slots):
            now = time.perf_counter()
            ticket = self._tickets.get(step.index)
            with self._cond:
                self._frames_total += 1
                self._frame_times.append(now)
                self._forget_before(now - self.window_s)  # bounded whether or not /metrics is read
            if ticket is None:
                continue
            chunk = ticket.audio.push(step)
            if chunk is not None and len(chunk.audio) and ticket.first_audio_s is None:
                ticket.first_audio_s = time.perf_counter() - ticket.submitted
                self._first_audio.append(ticket.first_audio_s)
            if chunk is not None:
                ticket.sink(chunk)
            if step.done is not None:
                with self._cond:
                    self._tickets.pop(ticket.id, None)
                    self._requests_total += 1
                self.engine.first_frame_s.pop(
                    step.index, None
                )  # a server runs for ever: keep no per-request entry
                frames = step.done.codes.shape[1]
                ticket.sink(Finished(frames, step.done.stopped))
