"""Progress reporting for long loops: ``None``, a callable, or a tqdm-like bar or class."""

from __future__ import annotations

from typing import Any


class Progress:
    """Adapts ``progress`` (None, a callable, a tqdm-like bar or a tqdm-like class)."""

    def __init__(self, progress: Any, total: int, desc: str = "fusionjax"):
        self._bar = None
        self._fn = None
        self._owned = False
        if progress is None:
            return
        if isinstance(progress, type):  # e.g. tqdm.tqdm itself
            self._bar = progress(total=total, desc=desc)
            self._owned = True
        elif hasattr(progress, "update"):
            self._bar = progress
            if hasattr(progress, "reset"):
                progress.reset(total=total)
        elif callable(progress):
            self._fn = progress
        else:
            raise TypeError(f"progress must be None, a callable or tqdm-like, got {type(progress)}")

    def start(self, message: str) -> None:
        if self._bar is not None and hasattr(self._bar, "set_postfix_str"):
            self._bar.set_postfix_str(message)
        if self._fn is not None:
            self._fn(message)

    def done(self) -> None:
        if self._bar is not None:
            self._bar.update(1)

    def close(self) -> None:
        if self._owned:
            self._bar.close()
