"""Concurrent API requests answered in shared batches, by one thread that owns the model.

Generating for 8 requests at once costs little more per step than for 1 on a GPU (a step reads every
weight once, whatever the batch), so requests that arrive together are answered together: the first
one waits up to ``window_s`` for company, and past it still for requests already being prepared
(their images decoding: they are milliseconds away); the batch closes at ``max_batch``, and
requests that arrive while a batch runs form the next one. Each answer still ends on its own (its EOS, its own
``max_tokens``) and is handed to its request token by token, so a stream flows as the batch runs
and a short answer is sent before the long ones beside it finish. Batches are static: a request
that arrives mid-batch waits for that batch to end (transformers' ``generate`` cannot add rows).
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

from owl_lightning.apps.web import HttpError
from owl_lightning.data.collate import EncodedSample
from owl_lightning.inference import Generation, OwlAssistant, Sampling

log = logging.getLogger(__name__)

# How long past its window a batch may wait for requests still being prepared: a safety net, as
# preparing (decoding a request's images) takes milliseconds.
PREPARING_GRACE_S = 0.5


class PendingAnswer:
    """One request's answer: generated on the batcher's thread, read on the request's thread."""

    def __init__(self, sample: EncodedSample, sampling: Sampling) -> None:
        self.sample, self.sampling = sample, sampling
        self.generation = Generation()  # replaced by the batch's live one as soon as it grows
        self.error: BaseException | None = None
        self.cancelled = False
        self._changed = threading.Condition()

    def update(self, generation: Generation) -> bool:
        """The batch's progress on this answer (a :data:`~owl_lightning.inference.Listener`): False once cancelled."""
        with self._changed:
            self.generation = generation
            self._changed.notify_all()
        return not self.cancelled

    def fail(self, error: BaseException) -> None:
        """End the answer with ``error``, raised to its reader."""
        with self._changed:
            self.error = error
            self._changed.notify_all()

    def cancel(self) -> None:
        """Stop generating this answer (its client has gone); nothing once it has ended."""
        self.cancelled = True

    def progress(self, tokens_seen: int) -> tuple[list[int], str | None]:
        """Wait until the answer has more than ``tokens_seen`` tokens or has ended: its tokens so far and
        its finish reason (None while it grows). Raises the error its batch failed with."""
        with self._changed:
            self._changed.wait_for(lambda: self.error or self.generation.finish_reason or len(self.generation.tokens) > tokens_seen)
            if self.error is not None:
                raise self.error
            return list(self.generation.tokens), self.generation.finish_reason

    def result(self) -> Generation:
        """Wait for the whole answer."""
        with self._changed:
            self._changed.wait_for(lambda: self.error or self.generation.finish_reason)
            if self.error is not None:
                raise self.error
            return self.generation


class GenerationBatcher:
    """Runs the API's generations on one thread, in batches of the requests that arrive together.

    Args:
        assistant: the model (its :meth:`~owl_lightning.inference.OwlAssistant.generate` answers a batch).
        max_batch: most requests answered in one batch.
        window_s: how long the first request of a batch waits for others to join it.
        lock: held while a batch generates; shared with whatever else uses the model (the chat page).
    """

    def __init__(self, assistant: OwlAssistant, max_batch: int = 8, window_s: float = 0.02, lock: threading.Lock | None = None) -> None:
        if max_batch < 1 or window_s < 0:
            raise ValueError(f"max_batch must be at least 1 and window_s at least 0, got {max_batch} and {window_s}")
        self.assistant, self.max_batch, self.window_s = assistant, max_batch, window_s
        self.lock = lock or threading.Lock()
        self._queue: queue.Queue[PendingAnswer | None] = queue.Queue()
        self._thread: threading.Thread | None = None
        self._start_lock = threading.Lock()
        self._closed = False
        self._preparing = 0  # requests between their body and submit(): a batch about to close waits for them
        self._preparing_lock = threading.Lock()

    @contextmanager
    def preparing(self) -> Iterator[None]:
        """Around a request's last steps before :meth:`submit` (decoding its images): the batch being gathered
        waits for it rather than leave a moment before it is submitted."""
        with self._preparing_lock:
            self._preparing += 1
        try:
            yield
        finally:
            with self._preparing_lock:
                self._preparing -= 1

    def submit(self, sample: EncodedSample, sampling: Sampling) -> PendingAnswer:
        """Queue one encoded request (:meth:`~owl_lightning.inference.OwlAssistant.encode`) for the next batch."""
        pending = PendingAnswer(sample, sampling)
        with self._start_lock:
            if self._closed:
                raise HttpError(503, "the server is shutting down: send the request again once it is back", "server_shutting_down")
            if self._thread is None:  # started on first use: a chat page nobody calls the API on runs no extra thread
                self._thread = threading.Thread(target=self._run, name="generation batcher", daemon=True)
                self._thread.start()
            self._queue.put(pending)
        return pending

    def close(self) -> None:
        """Finish the batch under way, fail the requests still queued, and stop the thread."""
        with self._start_lock:
            self._closed = True
            self._queue.put(None)
            thread = self._thread
        if thread is not None:
            thread.join(timeout=60)

    def _run(self) -> None:
        while (batch := self._next_batch()) is not None:
            batch = [pending for pending in batch if not pending.cancelled]
            if batch:
                self._generate(batch)
        stopping = HttpError(503, "the server stopped before answering this request: send it again once it is back", "server_shutting_down")
        while not self._queue.empty():
            if (pending := self._queue.get_nowait()) is not None:
                pending.fail(stopping)

    def _next_batch(self) -> list[PendingAnswer] | None:
        """The requests for the next batch: the first to come, then whatever arrives within the window or is
        being prepared then, up to ``max_batch``. None once :meth:`close` was called."""
        first = self._queue.get()
        if first is None:
            return None
        batch = [first]
        deadline = time.monotonic() + self.window_s
        while len(batch) < self.max_batch:
            wait = deadline - time.monotonic()
            if wait <= 0:
                if not self._preparing or wait < -PREPARING_GRACE_S:
                    break
                wait = 0.002  # a request being prepared is submitted within milliseconds
            try:
                pending = self._queue.get(timeout=wait)
            except queue.Empty:
                continue
            if pending is None:
                self._queue.put(None)  # answer this batch, then stop
                break
            batch.append(pending)
        return batch

    def _generate(self, batch: list[PendingAnswer]) -> None:
        started = time.perf_counter()
        try:
            with self.lock:
                generations = self.assistant.generate(
                    [pending.sample for pending in batch],
                    [pending.sampling for pending in batch],
                    listener=lambda row, generation: batch[row].update(generation),
                )
        except Exception as err:  # one failed batch (out of memory, a bug) fails its requests, not the server
            log.exception("a batch of %d requests failed", len(batch))
            for pending in batch:
                pending.fail(HttpError(500, f"generation failed: {err!r} (traceback on the server console)", "generation_failed"))
            return
        for pending, generation in zip(batch, generations, strict=True):
            pending.update(generation)  # its final state, whatever the last step reported
        tokens = sum(generation.steps for generation in generations)
        log.info("answered %d requests together: %d tokens in %.2f s", len(batch), tokens, time.perf_counter() - started)
