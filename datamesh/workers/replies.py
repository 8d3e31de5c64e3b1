"""Tasks whose answer a caller waits for: reads routed to a worker that holds the data.

Reads of AP shards (:mod:`datamesh.workers.remote_reads`) and of the regional indexes
(:mod:`datamesh.workers.remote_search`) go to the workers that hold the files, as tasks on their
queues, and their answers come back through Celery's result backend (``DATAMESH_RESULT_BACKEND``, by
default the broker's Redis, which every process shares already).  :class:`Replies` is that round
trip, in two parts (:meth:`~Replies.send`, :meth:`~Replies.wait`) so that a caller can send several
questions before it waits for the first answer.

A question is sent with an expiry equal to its timeout: a worker that takes it after its caller
gave up drops it unread.  Every failure is one :class:`NoAnswer` (its message says what was asked
and why nothing came back, ``retryable`` whether asking again may help), which each caller turns
into its tier's error.  An answer is a JSON object; a worker reports a read it could not do as
``{"error": ..., "retryable": ...}`` (a value, not a task failure, so that the caller can say what
happened), which :meth:`~Replies.wait` raises as ``NoAnswer`` too.
"""

from __future__ import annotations

import threading
import time
from typing import Any

from celery import Celery
from celery.exceptions import TimeoutError as CeleryTimeout
from celery.result import AsyncResult

from datamesh.core.config import DataMeshConfig

Reply = dict[str, Any]

#: The options of every task whose answer a caller waits for (``read_ap``, ``query_index``).  Its
#: result is stored (the answer travels back through the result backend).  It sends no monitoring
#: event, though workers run with ``-E`` for Flower: the answer is the user's content (a
#: task-succeeded event carries the result's repr, task-received the arguments), which the
#: monitoring stream must not broadcast, and each event was a Redis publish costing the worker
#: about a quarter of its time per read.
ANSWER_TASK = {"ignore_result": False, "send_events": False}


class NoAnswer(Exception):
    """A question without a usable answer: not sent, not answered in time, or answered with an error."""

    def __init__(self, message: str, *, retryable: bool) -> None:
        super().__init__(message)
        self.message = message
        self.retryable = retryable


class Replies:
    """This process's way to the workers that answer reads: a Celery app, built on first use, that
    publishes tasks and waits for their results.  Thread-safe."""

    def __init__(self, config: DataMeshConfig) -> None:
        self.config = config
        self._app: Celery | None = None
        self._lock = threading.Lock()

    def app(self) -> Celery:
        with self._lock:
            if self._app is None:
                from datamesh.workers.app import create_app

                self._app = create_app(self.config, load_celeryconfig=False)
                # No task-sent monitoring event for a question: its arguments are a search's query or
                # a read's keys, which the monitoring stream must not broadcast (nor do the workers
                # send events for these tasks: :data:`ANSWER_TASK`).  This app only asks questions.
                self._app.conf.task_send_sent_event = False
            return self._app

    def send(self, task: str, kwargs: dict[str, Any], *, what: str, timeout: float) -> AsyncResult:
        """Publish ``task`` (routed by its keyword arguments); raises a retryable ``NoAnswer``
        naming ``what`` when the broker cannot be reached."""
        try:
            # ``expires``: a worker that takes the message after the caller gave up drops it unread.
            return self.app().send_task(task, kwargs=kwargs, ignore_result=False, expires=timeout)
        except Exception as exc:  # kombu/redis failures after their retries: one boundary
            raise NoAnswer(f"could not send {what}: {exc}", retryable=True) from exc

    def wait(self, sent: AsyncResult, *, what: str, who: str, hint: str, timeout: float, deadline: float) -> Reply:
        """The answer to ``sent``, waited for until ``deadline`` (``time.monotonic()``), the end of
        its ``timeout``; ``NoAnswer`` otherwise (``hint`` says what to check when none came, ``who``
        names the worker in an error it answered)."""
        try:
            reply = sent.get(timeout=max(deadline - time.monotonic(), 0.001), propagate=False)
        except CeleryTimeout:
            self.forget(sent)
            raise NoAnswer(f"no answer to {what} within {timeout:g}s: {hint}", retryable=True) from None
        except Exception as exc:  # the result backend unreachable: one boundary
            raise NoAnswer(f"no answer to {what}: {exc}", retryable=True) from exc
        sent.forget()  # an answer may hold content: it stays in the backend no longer than needed
        if not isinstance(reply, dict):  # the task raised (``reply`` is its exception)
            raise NoAnswer(f"{who} failed: {reply!r}", retryable=True)
        if "error" in reply:
            raise NoAnswer(f"{who}: {reply['error']}", retryable=bool(reply["retryable"]))
        return reply

    def forget(self, sent: AsyncResult) -> None:
        """Stop listening for the answer to ``sent`` (its caller will not wait for it)."""
        self.app().backend.remove_pending_result(sent)

    def close(self) -> None:
        with self._lock:
            app, self._app = self._app, None
        if app is not None:
            app.close()
