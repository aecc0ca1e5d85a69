#!/usr/bin/env bash
# Shared entry of the tools/ commands: run the harness with the system python.
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
PYTHONPATH="$here${PYTHONPATH:+:$PYTHONPATH}" exec python3 -m harness "$@"
