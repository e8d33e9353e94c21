#!/usr/bin/env bash
# Mutation testing of the sans-IO cores (docs/mutation.md), each module against its own
# tests only. Not part of CI: a full run takes tens of minutes.
#   bash scripts/mutation.sh                   record, framing, nmea, link, one after the other
#   bash scripts/mutation.sh framing nmea      only these
# Prints the score of each module, then one JSON line with all of them.
# Environment: MUTATION_JOBS (mutmut's --max-children, default 2),
#              MUTATION_WORKDIR (where the copies go, default a new /tmp/smartcorr-mutation.*),
#              MUTATION_TREE (what is copied: a commit, default HEAD, or "worktree" for the
#              files of this checkout as they are, untracked ones included).
#
# mutmut never runs in this checkout: each module gets its own copy under the work dir,
# and mutmut writes only there.
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
py="$repo/.venv/bin/python"
say() { printf 'mutation: %s\n' "$*" >&2; }

if [ ! -x "$py" ]; then
    say "no .venv: run 'bash scripts/setup.sh --test' first"; exit 2
fi
# mutmut is the optional extra "mutation" of pyproject.toml, not a test tool: installed
# on first use, with the version bounds declared there.
if ! "$py" -c 'import mutmut' >/dev/null 2>&1; then
    mapfile -t reqs < <("$py" -c 'import tomllib, sys
extras = tomllib.load(open(sys.argv[1], "rb"))["project"]["optional-dependencies"]
print(*extras["mutation"], sep="\n")' "$repo/pyproject.toml")
    say "installing ${reqs[*]} into .venv"
    "$py" -m pip install -q --disable-pip-version-check "${reqs[@]}"
fi

# module -> files to mutate ; its own test files (missing ones are skipped)
declare -A mutate=(
    [record]="core/record.py buffer/seal.py central/record.py"
    [framing]="firmware_bridge/framing.py"
    [nmea]="drivers/nmea.py"
    [link]="firmware_bridge/link.py"
)
declare -A tests=(
    [record]="tests/test_record.py tests/test_mutants_record.py"
    [framing]="tests/test_framing.py tests/test_mutants_framing.py"
    [nmea]="tests/test_nmea.py tests/test_mutants_nmea.py"
    [link]="tests/test_link.py tests/test_mutants_link.py"
)
modules=("$@")
[ "${#modules[@]}" -gt 0 ] || modules=(record framing nmea link)
for m in "${modules[@]}"; do
    [ -n "${mutate[$m]:-}" ] || { say "unknown module '$m' (record, framing, nmea, link)"; exit 2; }
done

work="${MUTATION_WORKDIR:-$(mktemp -d /tmp/smartcorr-mutation.XXXXXX)}"
mkdir -p "$work"
work="$(cd "$work" && pwd)"
case "$work/" in "$repo"/*) say "the work dir must be outside the checkout"; exit 2 ;; esac
jobs="${MUTATION_JOBS:-2}"
tree="${MUTATION_TREE:-HEAD}"
packages=(core firmware_bridge drivers buffer provisioning uplink app lab central)
say "work dir $work, $jobs worker(s), source: $tree"

toml_list() { local out="" x; for x in "$@"; do out+="${out:+, }\"$x\""; done; printf '[%s]' "$out"; }

results=()
for m in "${modules[@]}"; do
    dest="$work/$m"
    rm -rf "$dest"
    mkdir -p "$dest/repo"
    if [ "$tree" = worktree ]; then
        (cd "$repo" && git ls-files -z --cached --others --exclude-standard \
            | tar --null --ignore-failed-read -T - -cf - 2>/dev/null) | tar -C "$dest/repo" -xf -
    else
        git -C "$repo" archive --format=tar "$tree" | tar -C "$dest/repo" -xf -
    fi
    # tests read ../shared/data beside the checkout; mutmut runs them from repo/mutants/
    ln -s "$(cd "$repo/.." && pwd)/shared" "$dest/shared"
    ln -s "$(cd "$repo/.." && pwd)/shared" "$dest/repo/shared"
    selected=()
    for t in ${tests[$m]}; do [ -f "$dest/repo/$t" ] && selected+=("$t"); done
    # shellcheck disable=SC2086
    cat >> "$dest/repo/pyproject.toml" <<EOF

[tool.mutmut]
source_paths = $(toml_list "${packages[@]}")
only_mutate = $(toml_list ${mutate[$m]})
pytest_add_cli_args_test_selection = $(toml_list "${selected[@]}")
also_copy = ["docs", "gateway.py"]
pytest_add_cli_args = ["-p", "no:cacheprovider", "-p", "no:randomly"]
use_git_change_detection = false
EOF
    say "$m: mutating ${mutate[$m]} against ${selected[*]}"
    start=$SECONDS
    (cd "$dest/repo" && env -u PYTHONPATH nice -n 19 "$repo/.venv/bin/mutmut" run \
        --max-children "$jobs" > "$dest/run.log" 2>&1) || {
        say "$m: mutmut failed, see $dest/run.log"; tail -n 30 "$dest/run.log" >&2; exit 1; }
    say "$m: mutmut took $((SECONDS - start)) s"
    line="$(cd "$dest/repo" && "$py" "$repo/scripts/mutation_report.py" "$m" \
        "$repo/docs/mutation.md" "$dest/survivors.txt")"
    results+=("$line")
done
"$py" -c 'import json, sys
print(json.dumps({"mutation": {r["module"]: r for r in map(json.loads, sys.argv[1:])}}))' \
    "${results[@]}"
