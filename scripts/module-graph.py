#!/usr/bin/env python3
"""The module graph of the `runtime` crate, and its cycles.

usage: python3 scripts/module-graph.py [--files]

Reads every `crate::<room>::...` path (in `use` lines and in code) of runtime/src and prints
which room (top-level module: wire, store, pipeline, ...) uses which; with `--files`, the
edges between files too. Exits 1 if the rooms' graph has a cycle, and lists files over 600
lines. Test modules (`#[cfg(test)] mod tests`) are left out: a test may reach anywhere.
"""
import pathlib
import re
import sys

SRC = pathlib.Path(__file__).resolve().parent.parent / "runtime" / "src"


def room_of(path: pathlib.Path) -> str:
    rel = path.relative_to(SRC)
    return rel.parts[0].removesuffix(".rs") if len(rel.parts) > 1 else rel.stem


def module_of(path: pathlib.Path) -> str:
    rel = path.relative_to(SRC).with_suffix("")
    parts = [p for p in rel.parts if p != "mod"]
    return "::".join(parts) or "lib"


def code_without_tests(text: str) -> str:
    cut = text.find("#[cfg(test)]\nmod tests")
    return text if cut < 0 else text[:cut]


def uses(text: str) -> set[str]:
    """`crate::a::b` paths, with `use crate::{a::x, b}` groups expanded."""
    out = set()
    for m in re.finditer(r"crate::\{([^}]*)\}", text):
        for part in m.group(1).split(","):
            part = part.strip()
            if part:
                out.add(part.split("::")[0])
    for m in re.finditer(r"crate::([a-z_]+)", text):
        out.add(m.group(1))
    # `super::` inside a room stays in the room; `fault!` expands to crate::faults.
    if "fault!(" in text:
        out.add("faults")
    return out


def main() -> int:
    files = sorted(SRC.rglob("*.rs"))
    rooms = {room_of(f) for f in files} - {"lib"}
    edges: dict[str, set[str]] = {r: set() for r in rooms}
    file_edges = []
    long_files = []
    for f in files:
        text = f.read_text()
        lines = text.count("\n")
        if lines > 600:
            long_files.append((lines, f.relative_to(SRC)))
        r = room_of(f)
        if r == "lib":
            continue
        for target in uses(code_without_tests(text)):
            if target in rooms and target != r:
                edges[r].add(target)
                file_edges.append((module_of(f), target))
    print("rooms (each uses the rooms listed after it):")
    for r in sorted(edges):
        print(f"  {r:<11} -> {', '.join(sorted(edges[r])) or '(none)'}")
    if "--files" in sys.argv:
        print("\nfiles:")
        for m, t in sorted(set(file_edges)):
            print(f"  {m} -> {t}")
    # Cycle detection (depth-first search).
    state: dict[str, int] = {}
    stack: list[str] = []
    cycles = []

    def visit(n: str) -> None:
        state[n] = 1
        stack.append(n)
        for m in sorted(edges[n]):
            if state.get(m) == 1:
                cycles.append(stack[stack.index(m):] + [m])
            elif m not in state:
                visit(m)
        stack.pop()
        state[n] = 2

    for n in sorted(edges):
        if n not in state:
            visit(n)
    print()
    if cycles:
        for c in cycles:
            print("cycle: " + " -> ".join(c))
    else:
        print("no cycle between rooms")
    print("files over 600 lines: " + (", ".join(f"{p} ({n})" for n, p in sorted(long_files, reverse=True)) or "none"))
    return 1 if cycles else 0


if __name__ == "__main__":
    sys.exit(main())
