"""What an engine step reports: one small frozen event per row and happening, in the spirit of
vLLM's EngineCoreOutput.

Each event names its row; the row carries the details (its result so far, why it finished, the
error that failed it). A row's events come in this order: `Admitted` once, `TokenAdded` for each
new token that does not end it, then exactly one of `Finished` or `Failed`. A waiting row may
finish (cancelled) or fail without ever being admitted.
"""

from dataclasses import dataclass

from app.engine.rows import Row


@dataclass(frozen=True)
class Admitted:
    """The row left the waiting queue and runs."""

    row: Row


@dataclass(frozen=True)
class TokenAdded:
    """The row has a new token: its result so far."""

    row: Row


@dataclass(frozen=True)
class Finished:
    """The row is done: `row.result.finish_reason` says why."""

    row: Row


@dataclass(frozen=True)
class Failed:
    """The row ended on an error: `row.error`."""

    row: Row


EngineEvent = Admitted | TokenAdded | Finished | Failed
