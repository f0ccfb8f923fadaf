"""Value types shared by the pure stages: what the kernel must hold.

An element is a (key, value) pair of plain Python values; `value` is None for
set elements. Atoms are str (addresses, prefixes, interface names, cgroup
paths), int (marks; stale cgroup elements, which the kernel shows by id) and
(lo, hi) port ranges; concatenations are tuples of atoms.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Optional, Union

if TYPE_CHECKING:
    from .shape import Shape

Atom = Union[str, int, tuple[int, int]]
Key = Union[Atom, tuple[Atom, ...]]
Element = tuple[Key, Optional[Union[Atom, tuple[Atom, ...]]]]


@dataclass(frozen=True, order=True)
class Route:
    """The default route of one of our tables: `default via GW dev DEV table T`."""

    family: int  # 4 or 6
    table: int
    dev: str
    gateway: Optional[str] = None  # None: on-link default route via dev

    def describe(self) -> str:
        via = f"via {self.gateway} " if self.gateway else ""
        return f"route -{self.family} default {via}dev {self.dev} table {self.table}"


@dataclass(frozen=True, order=True)
class Rule:
    """`ip rule add fwmark MARK/MASK lookup TABLE priority PRIO`, or one of the
    guard's (names.py, table 0): action "prohibit" (`from SRC fwmark MARK/MASK
    prohibit`), "goto" (`from SRC goto TARGET`), "nop"."""

    family: int
    priority: int
    fwmark: int
    mask: int
    table: int
    src: str = ""  # a prefix; "" = from all
    action: str = "lookup"  # | "prohibit" | "goto" | "nop"
    target: int = 0  # the priority a "goto" continues at

    def describe(self) -> str:
        frm = f" from {self.src}" if self.src else ""
        mark = f" fwmark {self.fwmark:#x}/{self.mask:#x}" if self.fwmark or self.mask else ""
        then = {"prohibit": "prohibit", "goto": f"goto {self.target}", "nop": "nop"}.get(
            self.action, f"lookup {self.table}")
        return f"rule -{self.family} priority {self.priority}{frm}{mark} {then}"


@dataclass(frozen=True)
class RouteOp:
    op: str  # "add" | "delete"
    obj: Union[Route, Rule]

    def describe(self) -> str:
        return f"{self.op} {self.obj.describe()}"


@dataclass(frozen=True)
class Desired:
    """Everything of ours the kernel should hold after a sync."""

    elements: dict[str, frozenset[Element]] = field(default_factory=dict)
    chains: dict[str, tuple[str, ...]] = field(default_factory=dict)  # generated chain -> rules
    routes: frozenset[Route] = frozenset()
    rules: frozenset[Rule] = frozenset()


@dataclass(frozen=True)
class Observed:
    """What the kernel holds of ours. `table` False: our table does not exist."""

    table: bool = False
    skeleton: Optional[str] = None  # the skeleton digest in the table comment
    elements: dict[str, frozenset[Element]] = field(default_factory=dict)
    chains: dict[str, tuple[str, ...]] = field(default_factory=dict)  # chain -> rule comments
    routes: frozenset[Route] = frozenset()
    rules: frozenset[Rule] = frozenset()
    # the skeleton's chains, rules and set declarations as the kernel lists them
    # (shape.py); None: not read (memory of what was applied, or no table)
    shape: Optional["Shape"] = None
