"""Retry policy shared by the flows: retry transient I/O failures only, never bad data or bugs."""

from __future__ import annotations

from typing import Any


def retry_on_io(task: Any, task_run: Any, state: Any) -> bool:
    """Prefect ``retry_condition_fn``: True when the task failed with an ``OSError`` (network
    shares, busy files), False for anything else (bad input is reported, not retried)."""
    try:
        state.result()
    except OSError:
        return True
    except Exception:
        return False
    return False
