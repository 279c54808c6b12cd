"""The paged KV cache's bookkeeping: a pool of fixed-size pages and one page table per sequence.

Pages hold `page_size` token positions of every layer's keys and values; the runner owns the memory
(one tensor per layer, indexed by page), this module only decides which pages each sequence owns.
Token position p of a sequence lives in slot `pages[p // page_size] * page_size + p % page_size`.
Rolling back rejected drafts is moving a sequence's length: whole pages past it go back to the pool.
"""

from __future__ import annotations

from dataclasses import dataclass, field


class OutOfPagesError(Exception):
    """The pool cannot hand out the pages asked for (the scheduler preempts or refuses)."""


def pages_for(num_tokens: int, page_size: int) -> int:
    """Pages needed to hold num_tokens positions."""
    return -(-num_tokens // page_size)


@dataclass
class PageTable:
    """The pages one sequence owns, in position order."""

    pages: list[int] = field(default_factory=list)

    def capacity(self, page_size: int) -> int:
        """Positions its pages can hold."""
        return len(self.pages) * page_size


class PagePool:
    """Free list of page indices; every page is owned by at most one page table."""

    def __init__(self, num_pages: int, page_size: int) -> None:
        if num_pages < 1 or page_size < 1:
            raise ValueError(f"need at least one page of at least one token (got {num_pages} x {page_size})")
        self.num_pages = num_pages
        self.page_size = page_size
        # Hand out low indices first: a short run touches few distinct pages (better cache locality).
        self._free = list(range(num_pages - 1, -1, -1))

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_used(self) -> int:
        return self.num_pages - len(self._free)

    @property
    def capacity_tokens(self) -> int:
        return self.num_pages * self.page_size

    def reserve(self, table: PageTable, num_tokens: int) -> None:
        """Grows `table` to hold num_tokens positions; all or nothing (raises OutOfPagesError)."""
        needed = pages_for(num_tokens, self.page_size) - len(table.pages)
        if needed > len(self._free):
            raise OutOfPagesError(f"{needed} pages needed, {len(self._free)} free of {self.num_pages}")
        for _ in range(max(needed, 0)):
            table.pages.append(self._free.pop())

    def can_reserve(self, table: PageTable, num_tokens: int, keep_free: int = 0) -> bool:
        """Whether `table` can grow to num_tokens positions and still leave `keep_free` pages free."""
        return pages_for(num_tokens, self.page_size) - len(table.pages) + keep_free <= len(self._free)

    def truncate(self, table: PageTable, num_tokens: int) -> None:
        """Keeps the pages holding the first num_tokens positions; the rest return to the pool."""
        keep = pages_for(num_tokens, self.page_size)
        while len(table.pages) > keep:
            self._free.append(table.pages.pop())

    def release(self, table: PageTable) -> None:
        """Returns every page of `table` to the pool."""
        self.truncate(table, 0)
