"""Stop strings over streamed text: the answer ends just before the first stop string, which a
piece may split. Text that could be the start of a stop string is held back until the next
piece tells; nothing at or after a stop string ever goes out.

The engine feeds it each token's text as the token is sampled (engine.py), so the token that
completes a stop string is known: the answer's tokens end with it, as vLLM's do, and the
generation ends at that step (no later token is generated or counted)."""

from __future__ import annotations


class StopStrings:
    def __init__(self, stops: "list[str] | tuple[str, ...]"):
        self.stops = [s for s in stops if s]
        self.pending = ""  # received, not yet released

    def feed(self, piece: str) -> tuple[str, bool]:
        """(text to release now, whether a stop string was found: the answer ends there)."""
        if not self.stops:
            return piece, False
        self.pending += piece
        found = [i for i in (self.pending.find(s) for s in self.stops) if i >= 0]
        if found:
            out, self.pending = self.pending[:min(found)], ""
            return out, True
        keep = self._partial_match()
        out = self.pending[:len(self.pending) - keep]
        self.pending = self.pending[len(self.pending) - keep:]
        return out, False

    def flush(self) -> str:
        """The held-back text, once the answer ended without a stop string."""
        out, self.pending = self.pending, ""
        return out

    def _partial_match(self) -> int:
        """Length of the longest end of `pending` that begins some stop string."""
        for n in range(min(len(self.pending), max(len(s) for s in self.stops) - 1), 0, -1):
            tail = self.pending[-n:]
            if any(s.startswith(tail) for s in self.stops):
                return n
        return 0
