"""Exact mid-epoch resume of the training streams: which batches each DataLoader worker still owes.

A rank's batches of one epoch are numbered ``0, 1, 2, ...`` (its *positions*). With ``W``
workers, PyTorch's DataLoader takes batches from workers ``0, 1, ..., W-1, 0, 1, ...`` in turn,
so worker ``w`` produces positions ``w, w + W, w + 2W, ...``.

A run resumed after ``done`` batches must go on with position ``done``, but the fresh DataLoader
starts again at worker 0. So on resume worker ``w`` plays the part of worker ``(w + done) % W``
— its *role*: it reads that worker's stream (seeds are drawn from the role, not the worker id)
and yields that worker's remaining positions. Positions keep their order, and every batch holds
exactly what it held in the uninterrupted run, provided ``W`` is unchanged (a different worker
count changes the streams of a streamed dataset; the stage-2 mixture does not care).

A streamed dataset (stage 1) also needs to know where each role's stream stood: every batch carries
its worker's cursor, and the training loader saves, per rank and role, the cursor of the last batch
training took. Such a state only fits the world size and worker count it was saved with; resuming it
under others is refused with :func:`world_size_changed` / :func:`worker_count_changed`.
"""

from __future__ import annotations

from torch.utils.data import get_worker_info


def worker_info() -> tuple[int, int]:
    """``(worker id, number of workers)`` of the calling DataLoader worker; ``(0, 1)`` in the main process."""
    worker = get_worker_info()
    return (worker.id, worker.num_workers) if worker is not None else (0, 1)


def worker_role(batches_done: int) -> tuple[int, int]:
    """``(role, number of workers)``: the worker whose stream the calling worker continues (module docstring)."""
    worker_id, num_workers = worker_info()
    return (worker_id + batches_done) % num_workers, num_workers


def role_positions(role: int, num_workers: int, batches_done: int) -> tuple[int, int]:
    """``(first, step)``: the rank-local positions of ``role`` not yet consumed are ``first, first + step, ...``.

    ``first`` is the smallest position ``>= batches_done`` congruent to ``role`` modulo ``num_workers``."""
    first = batches_done + (role - batches_done) % num_workers
    return first, num_workers


def batches_consumed_by_role(role: int, num_workers: int, batches_done: int) -> int:
    """How many of the first ``batches_done`` positions belonged to ``role`` (its batches to replay)."""
    return len(range(role, batches_done, num_workers))


# The way out named by both refusals: the data state is dropped, the rest of the epoch is read afresh.
_NEW_LAYOUT_FIX = (
    "or pass --data.allow_new_layout true to go on with fresh streams for the rest of the epoch "
    "(not the batches the interrupted run would have seen)"
)


def worker_count_changed(saved: int, now: int) -> str:
    """Why a streamed dataset saved with ``saved`` DataLoader workers per process cannot resume with ``now``."""
    return (
        f"the checkpoint read its training data with num_workers={saved} per process, this run has num_workers={now}: "
        "each DataLoader worker reads a stream of its own, so the batches after the resume would differ from the "
        f"interrupted run's. Resume with --data.num_workers {saved}, {_NEW_LAYOUT_FIX}"
    )


def world_size_changed(saved: int, now: int) -> str:
    """Why a streamed dataset saved by ``saved`` processes cannot resume on ``now``."""
    return (
        f"the checkpoint was saved by {saved} training process(es) (world size), this run has {now}: each process reads "
        "streams of its own, so the batches after the resume would differ from the interrupted run's. Resume on "
        f"{saved} process(es) (devices × nodes), {_NEW_LAYOUT_FIX}"
    )
