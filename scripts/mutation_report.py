"""Score of one mutmut run, equivalent mutants excluded (run by scripts/mutation.sh).

Usage, from the copy mutmut ran in: mutation_report.py MODULE DOCS_MD SURVIVORS_TXT

The equivalent mutants are the ``toml`` block of docs/mutation.md: each entry names the
module, the function, and the mutated line before and after (whitespace-trimmed, as
``mutmut show`` prints them), so an entry survives the renumbering of mutants when the
code around it changes. An entry that matches no survivor is reported as stale.

Prints the module's score on stderr, the survivors (diffs) to SURVIVORS_TXT, and one JSON
line on stdout.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import tomllib
from pathlib import Path

DETECTED = {"killed", "timeout", "segfault", "caught by type check"}
EXCLUDED = {"skipped"}


def mutmut(*args: str) -> str:
    mutmut_bin = str(Path(sys.executable).with_name("mutmut"))
    return subprocess.run([mutmut_bin, *args], check=True, capture_output=True,
                          text=True).stdout


def equivalents(docs: Path, module: str) -> list[dict[str, str]]:
    text = docs.read_text("utf-8") if docs.exists() else ""
    match = re.search(r"```toml\n(.*?)```", text, re.DOTALL)
    if match is None:
        return []
    entries = tomllib.loads(match[1]).get("equivalent", [])
    return [e for e in entries if e["module"] == module]


def changed_lines(diff: str) -> tuple[str, str]:
    before, after = [], []
    for line in diff.splitlines():
        if line.startswith(("---", "+++")):
            continue
        if line.startswith("-"):
            before.append(line[1:].strip())
        elif line.startswith("+"):
            after.append(line[1:].strip())
    return "\n".join(before), "\n".join(after)


def main() -> None:
    module, docs, survivors_txt = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3])
    status: dict[str, str] = {}
    for line in mutmut("results", "--all", "true").splitlines():
        name, sep, state = line.strip().rpartition(": ")
        if sep:
            status[name] = state
    known = equivalents(docs, module)
    used = [False] * len(known)
    equivalent, alive = [], []
    for name, state in sorted(status.items()):
        if state in DETECTED or state in EXCLUDED:
            continue
        diff = mutmut("show", name)
        before, after = changed_lines(diff)
        for i, entry in enumerate(known):
            if (entry["function"] in name and entry["before"].strip() == before
                    and entry["after"].strip() == after):
                used[i] = True
                equivalent.append(name)
                break
        else:
            alive.append((name, state, diff))
    total = sum(1 for s in status.values() if s not in EXCLUDED)
    detected = sum(1 for s in status.values() if s in DETECTED)
    considered = total - len(equivalent)
    score = 100.0 * detected / considered if considered else 100.0
    with survivors_txt.open("w", encoding="utf-8") as out:
        for _name, _state, diff in alive:
            out.write(f"{diff.rstrip()}\n\n")
    stale = [f"{e['function']}: {e['before']!r} -> {e['after']!r}"
             for e, u in zip(known, used, strict=True) if not u]
    print(f"mutation: {module}: {score:.1f} % ({detected} of {considered} mutants detected, "
          f"{len(equivalent)} equivalent excluded, {len(alive)} alive: {survivors_txt})",
          file=sys.stderr)
    for entry in stale:
        print(f"mutation: {module}: equivalent entry matched nothing (stale?): {entry}",
              file=sys.stderr)
    print(json.dumps({"module": module, "score": round(score, 1), "detected": detected,
                      "mutants": total, "equivalent": len(equivalent), "alive": len(alive),
                      "alive_names": [name for name, _, _ in alive]}))


if __name__ == "__main__":
    main()
