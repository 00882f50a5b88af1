#!/usr/bin/env bash
# Run batchgpt's benchmarks and print their tables.
#
#   bash benchmarks/run_all.sh            # utilisation + overhead (about 10 minutes)
#   bash benchmarks/run_all.sh --all      # also every other argument-free script in benchmarks/
#
# Loopback only: each benchmark starts the simulator (python -m batchgpt.simulator) itself;
# no API key, no network. Uses ./.venv if it exists, else the python on PATH (the project
# must be installed: pip install -e '.[bench]'). Numbers are printed, never asserted; the
# method and the figures measured so far are in docs/performance.md.
#
#   benchmarks/utilisation.py   share of an RPM/TPM limit kept busy, 429s (about 4 min)
#   benchmarks/overhead.py      requests/s and CPU per request vs the bare SDK, and a
#                               profile of one batchgpt run (about 6 min)
#   other scripts               listed below; run with --all (they take no arguments)
set -euo pipefail

cd "$(dirname "$0")/.."
if [[ -x .venv/bin/python ]]; then
    PY=.venv/bin/python
else
    PY=${PYTHON:-python3}
fi

ALL=0
for arg in "$@"; do
    case "$arg" in
        --all) ALL=1 ;;
        -h|--help) sed -n '2,16p' "$0"; exit 0 ;;
        *) echo "unknown argument: $arg (try --help)" >&2; exit 2 ;;
    esac
done

echo "== batchgpt benchmarks: $(date -u +%Y-%m-%dT%H:%MZ), $(nproc) cores," \
     "$($PY -c 'import sys, openai; print(f"Python {sys.version.split()[0]}, openai {openai.__version__}")')"

status=0
run() {
    echo
    echo "### $*"
    if ! "$PY" "$@"; then
        echo "!!! $* failed" >&2
        status=1
    fi
}

run benchmarks/utilisation.py
run benchmarks/overhead.py --profile

# Other benchmark scripts in this folder (not the two above, not this file).
others=()
for f in benchmarks/*.py; do
    case "$(basename "$f")" in
        utilisation.py|overhead.py|__init__.py|__main__.py|_*) ;;
        *) others+=("$f") ;;
    esac
done
if ((${#others[@]})); then
    echo
    echo "### other benchmark scripts in benchmarks/:"
    for f in "${others[@]}"; do
        first=$("$PY" - "$f" <<'EOF'
import ast, sys
doc = ast.get_docstring(ast.parse(open(sys.argv[1]).read())) or ""
print(doc.strip().splitlines()[0] if doc.strip() else "")
EOF
)
        echo "  $f  ${first}"
    done
    if ((ALL)); then
        for f in "${others[@]}"; do
            run "$f"
        done
    else
        echo "  (run them with: bash benchmarks/run_all.sh --all)"
    fi
fi
exit $status
