"""Pure: what a batch is, the statuses it passes through, and how OpenAI's API shows it.

    validating ──start──> in_progress ──all_done──> finalizing ──finalized──> completed
        │                    │  │
        │                    │  └─expire─> expired      (the lines done so far in its output)
        ├──cancel──> cancelling <─cancel─┘ ──cancelled──> cancelled  (likewise)
        └──fail──> failed  <──fail── in_progress             (its input file is gone)

``validating`` is the status a batch is created in (its file was checked then); the runner
that takes it moves it on. Every move is one compare-and-set in the database
(``advance`` says whether it is allowed, the store applies it only from the status read), so
an API call and a runner that race cannot both win.
"""

import os
from dataclasses import dataclass

STATUSES = ("validating", "in_progress", "finalizing", "completed", "failed", "expired",
            "cancelling", "cancelled")
TERMINAL = frozenset({"completed", "failed", "expired", "cancelled"})
ACTIVE = tuple(s for s in STATUSES if s not in TERMINAL)
TRANSITIONS: dict[tuple[str, str], str] = {
    ("validating", "start"): "in_progress",
    ("validating", "cancel"): "cancelling",
    ("validating", "fail"): "failed",
    ("in_progress", "all_done"): "finalizing",
    ("in_progress", "cancel"): "cancelling",
    ("in_progress", "expire"): "expired",
    ("in_progress", "fail"): "failed",
    ("finalizing", "finalized"): "completed",
    ("cancelling", "cancelled"): "cancelled",
}
COMPLETION_WINDOWS = {"24h": 24 * 3600}
FILE_PURPOSES = ("batch",)
OUTPUT_PURPOSES = ("batch_output",)


class IllegalMove(ValueError):
    def __init__(self, status: str, event: str) -> None:
        super().__init__(f"a batch that is {status} cannot {event.replace('_', ' ')}")
        self.status, self.event = status, event


def advance(status: str, event: str) -> str:
    """The status after ``event``, or IllegalMove."""
    try:
        return TRANSITIONS[status, event]
    except KeyError:
        raise IllegalMove(status, event) from None


def new_file_id() -> str:
    return "file-" + os.urandom(12).hex()


def new_batch_id() -> str:
    return "batch_" + os.urandom(12).hex()


def output_file_id(batch_id: str, errors: bool) -> str:
    """The same id whenever a batch's results are written: writing them twice (a restart
    between the file and the database) replaces the file, never makes a second."""
    return f"file-{batch_id.removeprefix('batch_')}-{'errors' if errors else 'output'}"


@dataclass(frozen=True)
class StoredFile:
    id: str
    owner: str
    purpose: str
    filename: str
    bytes: int
    lines: int
    created_at: float
    node: str
    """The host whose batch directory holds its bytes."""

    def as_openai(self) -> dict:
        return {"id": self.id, "object": "file", "bytes": self.bytes,
                "created_at": int(self.created_at), "filename": self.filename,
                "purpose": self.purpose, "status": "processed", "status_details": None,
                "expires_at": None}


@dataclass(frozen=True)
class Batch:
    id: str
    owner: str
    node: str
    input_file_id: str
    endpoint: str
    completion_window: str
    metadata: dict | None
    status: str
    total: int
    created_at: float
    expires_at: float
    times: dict[str, float | None]
    """When it entered each status (``in_progress_at`` ...), None where it has not."""
    output_file_id: str | None = None
    error_file_id: str | None = None
    errors: list | None = None

    def as_openai(self, completed: int, failed: int) -> dict:
        def stamp(value: float | None) -> int | None:
            return None if value is None else int(value)

        return {"id": self.id, "object": "batch", "endpoint": self.endpoint,
                "errors": None if not self.errors else {"object": "list", "data": self.errors},
                "input_file_id": self.input_file_id,
                "completion_window": self.completion_window, "status": self.status,
                "output_file_id": self.output_file_id, "error_file_id": self.error_file_id,
                "created_at": int(self.created_at), "expires_at": int(self.expires_at),
                **{f"{s}_at": stamp(self.times.get(s)) for s in TIMED},
                "request_counts": {"total": self.total, "completed": completed,
                                   "failed": failed},
                "metadata": self.metadata}


TIMED = ("in_progress", "finalizing", "completed", "failed", "expired", "cancelling",
         "cancelled")
"""Statuses whose start a batch notes (``<status>_at``)."""


def check_metadata(metadata: object) -> dict | None:
    """OpenAI's rule: at most 16 string pairs, keys up to 64 characters, values up to 512."""
    if metadata is None:
        return None
    if not isinstance(metadata, dict) or len(metadata) > 16 or not all(
            isinstance(k, str) and isinstance(v, str) and len(k) <= 64 and len(v) <= 512
            for k, v in metadata.items()):
        raise ValueError("metadata must be at most 16 string pairs (keys up to 64 characters, "
                         "values up to 512)")
    return metadata
