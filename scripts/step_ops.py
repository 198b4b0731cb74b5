#!/usr/bin/env python3
"""Count the libtorch operations a recorded decoding step issues, from callgrind's output of
`core/examples/step_ops.rs` (which says how to run it): the calls of tch's C functions
(`atg_*`, one libtorch operation each) made while callgrind collected, per call of the
recorded body, by operation. With two files (an AR step's and a speculative step's), also
what the second adds to the first.

    scripts/step_ops.py /tmp/ops.ar in_place_logits [/tmp/ops.spec verify_and_draft]
"""
import collections
import re
import sys


def calls_by_callee(path: str) -> collections.Counter:
    """Calls of each function, summed over its callers (callgrind's `cfn=` / `calls=` lines,
    names compressed to `(id)` after their first use)."""
    names: dict[str, str] = {}

    def name(token: str) -> str:
        m = re.match(r"\((\d+)\)(?: (.*))?", token)
        if not m:
            return token
        ident, full = m.groups()
        if full:
            names[ident] = full
        return names.get(ident, ident)

    calls: collections.Counter = collections.Counter()
    callee = None
    with open(path) as f:
        for line in f:
            if line.startswith("fn="):
                name(line[3:].strip())
                callee = None
            elif line.startswith("cfn="):
                callee = name(line[4:].strip())
            elif line.startswith("calls=") and callee is not None:
                calls[callee] += int(line.split()[0][len("calls="):])
                callee = None
    return calls


def per_call(path: str, body: str) -> tuple[int, dict[str, float]]:
    calls = calls_by_callee(path)
    runs = sum(v for k, v in calls.items() if body in k)
    if runs == 0:
        sys.exit(f"{path}: no call of a function named like {body!r} was collected")
    return runs, {k[len("atg_"):]: v / runs for k, v in calls.items() if k.startswith("atg_")}


def main() -> None:
    args = sys.argv[1:]
    if len(args) not in (2, 4):
        sys.exit(__doc__)
    tables = []
    for path, body in zip(args[::2], args[1::2]):
        runs, ops = per_call(path, body)
        print(f"{path}: {runs} calls of {body}, {sum(ops.values()):.0f} operations a call")
        tables.append(ops)
    names = sorted(set().union(*tables), key=lambda n: -max(t.get(n, 0) for t in tables))
    header = "| operation | " + " | ".join(f"{b} a call" for b in args[1::2]) + (" | added |" if len(tables) == 2 else " |")
    print(header)
    print("|---" * (header.count("|") - 1) + "|")
    for n in names:
        cells = [f"{t.get(n, 0):.1f}" for t in tables]
        if len(tables) == 2:
            cells.append(f"{tables[1].get(n, 0) - tables[0].get(n, 0):+.1f}")
        print(f"| {n} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
