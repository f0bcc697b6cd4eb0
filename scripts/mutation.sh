#!/usr/bin/env bash
# Mutation testing with mutmut: every one-line change mutmut makes to the code under test must
# make a focused, fast test selection fail (the oracle differential and the scenario, device and
# edge tests, 100 derandomized examples per property, no shrinking). Run from the repository:
#
#   scripts/mutation.sh                       # upmtrace/model/
#   scripts/mutation.sh 'upmtrace/engine/reference.py' 'upmtrace/trace/importers/*'
#
# It works in a temporary copy of the work tree (uncommitted edits included) with its own venv
# (mutmut needs the package importable from its mutants/ folder, not from an editable install),
# prints mutmut's results and the score, and leaves the work tree untouched. KEEP=1 keeps the
# copy (its path is printed) to inspect survivors with `mutmut show NAME`. JOBS sets mutmut's
# parallelism (default: the number of CPUs). VENV=DIR reuses a venv a previous run made (kept
# with KEEP=1: move its .venv out first) instead of installing one.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
patterns=("$@")
[ ${#patterns[@]} -gt 0 ] || patterns=("upmtrace/model/*")
jobs="${JOBS:-$(nproc)}"

work="$(mktemp -d)"
if [ "${KEEP:-0}" = 1 ]; then
    echo "mutation.sh: working copy kept in $work" >&2
else
    trap 'rm -rf "$work"' EXIT
fi

cd "$root"
git ls-files -z --cached --others --exclude-standard | xargs -0 cp --parents -t "$work"
cd "$work"

if [ -n "${VENV:-}" ]; then
    ln -s "$VENV" .venv
else
    python3 -m venv .venv
    .venv/bin/python -m pip install --quiet -e '.[test]' 'mutmut>=3.3,<4'
    .venv/bin/python -m pip uninstall --quiet -y upmtrace  # import the mutants, not this copy
fi

{
    echo "[mutmut]"
    echo "source_paths = upmtrace"
    echo "only_mutate ="
    printf '    %s\n' "${patterns[@]}"
    echo "pytest_add_cli_args_test_selection ="
    printf '    %s\n' tests/test_oracle.py tests/test_engine_scenarios.py tests/test_engine_devices.py \
        tests/test_engine_edges.py
    echo "pytest_add_cli_args ="
    printf '    %s\n' -p no:cacheprovider -n 0 -x -q  # mutmut runs its own children
} > setup.cfg

# a fixed, smaller example budget: every mutant sees the same examples (tests/conftest.py)
export UPMTRACE_FUZZ=mutation UPMTRACE_FUZZ_EXAMPLES="${UPMTRACE_FUZZ_EXAMPLES:-100}"
.venv/bin/python -m mutmut run --max-children "$jobs" > mutmut-run.log 2>&1 || {
    tail -40 mutmut-run.log >&2
    exit 1
}
.venv/bin/python -m mutmut results --all true > results.txt || true
grep -Ev ': (killed|timeout)$' results.txt || true
count() { grep -Ec ": ($1)\$" results.txt || true; }
detected=$(count 'killed|timeout') run=$(grep -c ': ' results.txt || true)
unrun=$(count 'not checked')
echo "mutation score: $detected of $((run - unrun)) mutants killed" \
    "($(python3 -c "print(f'{100 * $detected / max($run - $unrun, 1):.1f}')") %)" \
    "in ${patterns[*]}; $unrun not run"
