#!/usr/bin/env python3
"""Counts an application file's lines of code and how many of them are boilerplate.

Lines of code: not blank, not only a comment, before the `#[cfg(test)]` module.
Boilerplate (the lines that say nothing about the domain, only wire it to the runtime):
- `use` declarations;
- `#[derive(...)]` attributes;
- `runtime::message!` / `runtime::messages!` declarations;
- `impl Trait for Type {` headers and the associated `type X = Y;` lines;
- the signatures of trait methods (from `fn` to the line that opens the body);
- `fn main` and its body (the hosting).
Everything else (message and state structs, decisions, saga rules, closing braces) is
the application's own code.

Usage: scripts/count-code.py FILE [--max-lines N --max-boilerplate PERCENT] [--show]
Exits 1 if a given limit is exceeded.
"""
import argparse
import re
import sys


def classify(text):
    rows = []
    in_use = in_sig = in_main = False
    depth_main = 0
    in_impl_trait = False
    for line in text.splitlines():
        s = line.strip()
        if s.startswith("#[cfg(test)]"):
            break
        if not s or s.startswith("//"):
            continue
        kind = "code"
        if in_main:
            kind = "boilerplate"
            depth_main += s.count("{") - s.count("}")
            if depth_main <= 0:
                in_main = False
        elif in_use:
            kind = "boilerplate"
            in_use = not s.endswith(";")
        elif in_sig:
            kind = "boilerplate"
            in_sig = not s.endswith("{")
        elif s.startswith("use "):
            kind = "boilerplate"
            in_use = not s.endswith(";")
        elif s.startswith("#[derive("):
            kind = "boilerplate"
        elif re.match(r"runtime::messages?!", s):
            kind = "boilerplate"
        elif re.match(r"impl\b.*\bfor\b.*\{$", s):
            kind = "boilerplate"
            in_impl_trait = True
        elif in_impl_trait and re.match(r"(type|const) \w+", s) and line.startswith("    ") \
                and not line.startswith("        ") and s.startswith("type "):
            kind = "boilerplate"
        elif in_impl_trait and line.startswith("    fn "):
            kind = "boilerplate"
            in_sig = not s.endswith("{")
        elif s.startswith("fn main("):
            kind = "boilerplate"
            in_main = True
            depth_main = s.count("{") - s.count("}")
        if line.startswith("}"):
            in_impl_trait = False
        rows.append((kind, line))
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("file")
    ap.add_argument("--max-lines", type=int)
    ap.add_argument("--max-boilerplate", type=float)
    ap.add_argument("--show", action="store_true", help="print each line with its class")
    a = ap.parse_args()
    rows = classify(open(a.file).read())
    if a.show:
        for kind, line in rows:
            print(f"{'B' if kind == 'boilerplate' else ' '} {line}")
    total = len(rows)
    boiler = sum(1 for k, _ in rows if k == "boilerplate")
    share = 100.0 * boiler / total if total else 0.0
    print(f"{a.file}: {total} lines of code, {boiler} boilerplate ({share:.0f}%)")
    ok = True
    if a.max_lines is not None and total > a.max_lines:
        print(f"more than {a.max_lines} lines of code")
        ok = False
    if a.max_boilerplate is not None and share > a.max_boilerplate:
        print(f"more than {a.max_boilerplate:.0f}% boilerplate")
        ok = False
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
