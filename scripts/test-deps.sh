#!/usr/bin/env bash
# Installs what the test suite needs on a fresh Debian machine (as root). Idempotent: what is
# already there is left alone. Called by scripts/test.sh and by .ci/run.
set -euo pipefail

need_apt=()
command -v python3 >/dev/null || need_apt+=(python3)
command -v node >/dev/null || need_apt+=(nodejs)
command -v npm >/dev/null || need_apt+=(npm)
python3 -m pip --version >/dev/null 2>&1 || need_apt+=(python3-pip)
# Virtualenvs (the SDK tests', schemathesis').
python3 -c 'import ensurepip, venv' >/dev/null 2>&1 || need_apt+=(python3-venv)
# Image store tests (execbox-image): a real registry, image tools and a static busybox to put
# in the images they build.
[ -x /usr/bin/docker-registry ] || need_apt+=(docker-registry)
command -v skopeo >/dev/null || need_apt+=(skopeo)
command -v umoci >/dev/null || need_apt+=(umoci)
dpkg -s busybox-static >/dev/null 2>&1 || need_apt+=(busybox-static)
# Disk-backed sandbox storage (tests/storage.rs, volumes): mke2fs formats the disks.
[ -x /sbin/mke2fs ] || [ -x /usr/sbin/mke2fs ] || need_apt+=(e2fsprogs)
# Go code contexts (tests/code_contexts.rs): Debian's Go toolchain.
command -v go >/dev/null || need_apt+=(golang-go)
# The unprivileged-user test of tests/operability.rs.
command -v runuser >/dev/null || need_apt+=(util-linux)
# The HTTPS client of tests/tls.rs (TLS versions, client certificates).
command -v curl >/dev/null || need_apt+=(curl)
if ((${#need_apt[@]})); then
  apt-get update -qq && apt-get install -y -qq "${need_apt[@]}"
fi

# The official Python SDKs the compatibility suites drive (opensandbox; e2b and
# e2b-code-interpreter) are installed by the tests themselves, from PyPI, into virtualenvs under
# target/ (tests/sdk/requirements.txt, crates/execbox/tests/e2b_sdk/requirements.txt).

# matplotlib, pandas and the rest of the data stack are not installed here: the tests get them
# from execbox's code-interpreter template, built on first use into the tests' shared cache
# (/var/tmp/execbox-test-templates) from the package index the host's pip is configured for.

# isol8's and session-execute's bun runtime.
command -v bun >/dev/null || npm install -g --silent bun

# The API fuzzer of tests/api_fuzz.rs: schemathesis from PyPI, pinned, in a virtualenv of its
# own (its dependencies stay out of the system Python's).
SCHEMATHESIS_VERSION=4.32.5
SCHEMATHESIS_VENV=/opt/execbox-test/schemathesis
if ! "$SCHEMATHESIS_VENV/bin/schemathesis" --version 2>/dev/null | grep -qF "$SCHEMATHESIS_VERSION"; then
  python3 -m venv "$SCHEMATHESIS_VENV"
  "$SCHEMATHESIS_VENV/bin/python" -m pip install -q --disable-pip-version-check --no-input \
    "schemathesis==$SCHEMATHESIS_VERSION"
fi
