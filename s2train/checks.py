"""The one helper that turns a failed check of a user's value into a ``ValueError`` with a sentence.

``assert`` is for invariants of our own code; a value a user gave (a config field, a request) is checked
with ``check`` so the CLI reports it as an error message, not a traceback.
"""

from __future__ import annotations


def check(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(message)
