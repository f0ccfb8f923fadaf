"""The nftables port: run one text batch, read our table as JSON.

`NftPort` is what the reconciler needs; `Libnft` (libnftables via Debian's
python3-nftables) and `FakeNft` (in memory, for unit tests) both provide it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from ..model import Observed


class NftError(Exception):
    """The kernel or nft refused a batch; nothing of it was applied.

    `batch` is the text that was sent, `message` what nft said (with line and
    column of the offending statement).
    """

    def __init__(self, message: str, batch: str = ""):
        self.message = message.strip()
        self.batch = batch
        super().__init__(self.message)

    def excerpt(self, context: int = 2) -> str:
        """The lines of the batch that nft's message points at, for logs."""
        import re
        lines = self.batch.splitlines()
        out = []
        for m in re.finditer(r":(\d+):\d+(?:-\d+)?: Error", self.message):
            n = int(m.group(1))
            for i in range(max(1, n - context), min(len(lines), n + context) + 1):
                out.append(f"{i:6d}  {lines[i - 1][:200]}")
        return "\n".join(out)


class NftPort(Protocol):
    def run(self, batch: str) -> None:
        """Apply `batch` atomically or raise NftError."""

    def generation(self) -> int:
        """The ruleset's generation number: changed by every commit, ours or not."""

    def list_table(self, terse: bool = False) -> dict:
        """`nft -j list table inet egress_agent` as a dict; {"nftables": []} if absent.
        `terse`: without set elements."""

    def read_table(self) -> "Observed":
        """`list_table` read into an `Observed` (nft/listing.py), without routes."""
