"""Pre-copy stop rules, after p.haul (the CRIU live-migration driver): stop iterating and freeze
when the rounds stop paying off. Pure logic, unit-tested on its own."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class StopRules:
    """p.haul's defaults: MAX_ITERS=8, MIN_ITER_PAGES=64, grow limit 10%."""

    max_rounds: int = 8       # pre-copy rounds at most (round 0 = the full copy counts)
    min_pages: int = 64       # a round that dirtied this few pages is small enough to freeze
    max_growth: float = 10.0  # percent: a round bigger than the previous by more -> not converging

    def decide(self, pages: list[int]) -> str | None:
        """Given the page counts of the pre-copy rounds so far (round 0 first), return why to
        stop now ("max-rounds", "min-pages", "growth") or None to run another round.

        Round 0 copies everything, so min-pages and growth are judged from round 1 on (a tiny
        region would otherwise stop at round 0 and never exercise tracking)."""
        n = len(pages)
        if n == 0:
            return None
        if n >= 2:
            cur, prev = pages[-1], pages[-2]
            if cur <= self.min_pages:
                return "min-pages"
            if n >= 3 and cur > prev * (1 + self.max_growth / 100.0):
                return "growth"
        if n >= self.max_rounds:
            return "max-rounds"
        return None
