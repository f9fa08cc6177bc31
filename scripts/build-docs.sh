#!/usr/bin/env bash
# Builds the API manual from the docstrings with pdoc: the typed client services use
# (starter), the carrier adapter interface (carriers.base, carriers.exceptions) and each
# adapter family, and the payload codec. Output: docs/api/index.html (or the directory given
# as $1). The output is generated, never committed: the directory ignores itself.
#
# Fails when pdoc cannot import a module or warns (an annotation it cannot resolve, a broken
# include, a docstring it cannot read), so CI catches an API manual gone stale.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON="${PYTHON:-.venv/bin/python}"
OUT="${1:-docs/api}"
MODULES=(
    starter
    carriers.base
    carriers.exceptions
    # the adapter families (carriers.factory.FAMILIES)
    carriers.oneapi
    carriers.parlayx
    carriers.camara
    carriers.smpp
    carriers.aggregator
    carriers.callback_aggregator
    carriers.polling_aggregator
    codec
    codec.aesgcm
    codec.server
    codec.keys
)

log="$(mktemp)"
trap 'rm -f "$log"' EXIT
rm -rf "$OUT"
if ! "$PYTHON" -m pdoc --docformat restructuredtext --footer-text "carrierbilling API" \
        -o "$OUT" "${MODULES[@]}" 2>"$log"; then
    cat "$log" >&2
    echo "build-docs: pdoc failed" >&2
    exit 1
fi
if [ -s "$log" ]; then
    cat "$log" >&2
    echo "build-docs: pdoc warned (above); fix the docstring or annotation it names" >&2
    exit 1
fi
printf '*\n' >"$OUT/.gitignore"
echo "API manual: $OUT/index.html"
