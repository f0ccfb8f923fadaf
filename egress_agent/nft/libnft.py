"""The real nftables adapter: one long-lived libnftables context.

A long-lived `Nftables()` object adds or deletes one element in about 0.1 ms;
spawning `nft` costs 4-18 ms (docs/design.md, "Measured constraints").
"""

from __future__ import annotations

import json
import os
import pickle
import signal
from typing import Callable, TypeVar

import nftables  # Debian's python3-nftables, wrapping the installed libnftables

from .. import names
from . import NftError


# A batch this long leaves libnftables' cache holding every element it added
# (hundreds of MB at 100k workloads), freed only by the next command, which then
# takes a second: a fresh context after such a batch frees it at once.
BIG_BATCH_BYTES = 1 << 20


class Libnft:
    def __init__(self) -> None:
        self._nft = self._context()
        self._gen_socket = None  # NETLINK_NETFILTER, for generation()

    @staticmethod
    def _context() -> "nftables.Nftables":
        nft = nftables.Nftables()
        nft.set_json_output(False)
        nft.set_handle_output(False)
        return nft

    def run(self, batch: str) -> None:
        if not batch.strip():
            return
        try:
            rc, out, err = self._nft.cmd(batch)
        finally:
            if len(batch) > BIG_BATCH_BYTES:
                self._nft = self._context()
        if rc != 0:
            raise NftError(_relabel(err or out or f"nft exited {rc}"), batch)

    def check(self, batch: str) -> None:
        """Parse and evaluate `batch` without touching the kernel (`nft -c`)."""
        self._nft.set_dry_run(True)
        try:
            self.run(batch)
        finally:
            self._nft.set_dry_run(False)

    def generation(self) -> int:
        from ..nftwatch import generation, generation_socket
        if self._gen_socket is None:
            self._gen_socket = generation_socket()
        try:
            return generation(self._gen_socket)
        except OSError:
            self._gen_socket.close()
            self._gen_socket = None
            raise

    def read_table(self):
        """Our table as an `Observed` (elements, generated chains, skeleton), read and
        decoded by a child process: at 100k workloads the listing takes libnftables
        ~500 MB and its JSON as dicts ~600 MB more, heap this process would keep."""
        from .listing import observed_from_json
        return in_child(lambda: observed_from_json(self._context_list()))

    def _context_list(self) -> dict:
        self._nft = self._context()  # the parent's is not shared across fork()
        return self.list_table()

    def list_table(self, terse: bool = False) -> dict:
        """`terse`: without set elements (`nft -t`), to read the skeleton cheaply.

        nft 1.0.6 fetches every set element for `list table -t` and only leaves
        them out of the output (4-7 s at 100k workloads, right after the full
        sync); `list ruleset inet -t` does not fetch them (2 ms). That lists the
        family's other tables too: only our table's objects are kept."""
        if not terse:
            return self._list(f"list table {names.TABLE}")
        self._nft.set_terse_output(True)
        try:
            doc = self._list(f"list ruleset {names.TABLE_FAMILY}")
        finally:
            self._nft.set_terse_output(False)
        return {"nftables": [i for i in doc.get("nftables", []) if _ours(i)]}

    def has_table(self) -> bool:
        """Is the agent's table in this network namespace? PermissionError when
        nftables cannot be read (no CAP_NET_ADMIN)."""
        try:
            doc = self._list(f"list tables {names.TABLE_FAMILY}")
        except NftError as e:
            if "Operation not permitted" in e.message:
                raise PermissionError(e.message) from e
            raise
        return any(i.get("table", {}).get("name") == names.TABLE_NAME
                   for i in doc.get("nftables", []))

    def list_set(self, name: str) -> dict:
        return self._list(f"list set {names.TABLE} {name}")

    def _list(self, command: str) -> dict:
        self._nft.set_json_output(True)
        try:
            rc, out, err = self._nft.cmd(command)
        finally:
            self._nft.set_json_output(False)
        if rc != 0:
            if "No such file or directory" in err:
                return {"nftables": []}
            raise NftError(err)
        return json.loads(out)


def _ours(item: dict) -> bool:
    """Is this item of a listing the metainfo or an object of our table?"""
    if "metainfo" in item:
        return True
    (kind, obj), = item.items()
    name = obj.get("name") if kind == "table" else obj.get("table")
    return name == names.TABLE_NAME and obj.get("family") == names.TABLE_FAMILY


T = TypeVar("T")


def in_child(fn: Callable[[], T]) -> T:
    """`fn()` in a forked child, its result pickled back: what it allocates dies with
    the child instead of fragmenting this process's heap. NftError when `fn` raised
    or the child ended without an answer (killed, out of memory). The child runs
    only `fn`, no other thread, with default signal dispositions."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child; its exit status says how it went
        status = 1
        try:
            os.close(r)
            for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                signal.signal(sig, signal.SIG_DFL)
            try:
                payload = pickle.dumps((True, fn()), protocol=pickle.HIGHEST_PROTOCOL)
            except NftError as e:
                payload = pickle.dumps((False, e.message))
            except BaseException as e:  # noqa: BLE001 - reported to the parent
                payload = pickle.dumps((False, f"{type(e).__name__}: {e}"))
            with os.fdopen(w, "wb") as f:
                f.write(payload)
            status = 0
        finally:
            os._exit(status)
    os.close(w)
    try:
        with os.fdopen(r, "rb") as f:
            data = f.read()
    finally:
        _, status = os.waitpid(pid, 0)
    if not data:
        how = (f"killed by signal {os.WTERMSIG(status)}" if os.WIFSIGNALED(status)
               else f"exit status {os.WEXITSTATUS(status)}")
        raise NftError(f"the process reading nftables ended without an answer ({how})")
    ok, value = pickle.loads(data)
    if not ok:
        raise NftError(value)
    return value


def _relabel(err: str) -> str:
    # libnftables names the buffer "/dev/stdin" or "internal"; say "batch".
    return err.replace("/dev/stdin:", "batch:").replace("internal:", "batch:")


def refused_elements(doc: dict) -> list[tuple[int, str, int]]:
    """(lease mark, protocol, packets) of @refused_ports, from `list set` JSON."""
    out = []
    for item in doc.get("nftables", []):
        for e in item.get("set", {}).get("elem", []):
            if isinstance(e, dict) and "elem" in e:
                mark, proto = e["elem"]["val"]["concat"]
                out.append((int(mark), str(proto), int(e["elem"].get("counter", {}).get("packets", 0))))
    return out
