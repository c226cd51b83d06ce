"""Stop strings: end on a match, never emitting the stop string or a partial prefix of it."""

from __future__ import annotations


class StopStringMatcher:
    def __init__(self, stops: list[str]) -> None:
        self.stops = [s for s in stops if s]
        self.longest = max((len(s) for s in self.stops), default=0)
        self.text = ""  # all decoded output text so far
        self.emitted = 0  # how much of it has been released

    def feed(self, delta: str, armed: bool = True) -> tuple[str, bool]:
        """Add new text; return (text safe to emit now, whether a stop string matched).

        While not `armed` (min_tokens not yet reached) a match is ordinary text, but a
        trailing prefix of a stop string is still held back: it may complete once armed.
        """
        if not self.stops:
            self.text += delta
            self.emitted = len(self.text)
            return delta, False
        before = len(self.text)
        self.text += delta
        # a match must end in the new text (an older one was seen, or ignored, before)
        found = (self.text.find(s, max(0, before - len(s) + 1)) for s in self.stops)
        hit = min((i for i in found if i >= 0), default=-1)
        if hit >= 0 and armed:
            out = self.text[self.emitted:hit] if hit > self.emitted else ""
            self.text = self.text[:hit]
            self.emitted = len(self.text)
            return out, True
        safe = len(self.text) - self._held_suffix()
        out = self.text[self.emitted:safe] if safe > self.emitted else ""
        self.emitted = max(self.emitted, safe)
        return out, False

    def flush(self) -> str:
        """The request ended another way: release what was held back."""
        out = self.text[self.emitted:]
        self.emitted = len(self.text)
        return out

    def _held_suffix(self) -> int:
        """Length of the longest tail of the text that begins some stop string."""
        for n in range(min(self.longest - 1, len(self.text)), 0, -1):
            tail = self.text[-n:]
            if any(s.startswith(tail) for s in self.stops):
                return n
        return 0
