#!/usr/bin/env bash
# Create (idempotently) the peer virtual environment eval/.peer-venv that holds
# llm-compressor 0.14.0.1 for eval/peer_llmcompressor.py.
#
# torch is installed first (torch==2.13.0 resolves to the local CPU wheel) and
# then pinned with a constraints file, so installing llmcompressor can never
# replace it with another (e.g. CUDA) build.
#
# Usage (from anywhere):  bash eval/peer_setup.sh
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$ROOT/eval/.peer-venv"
PY="$VENV/bin/python"
TORCH_VERSION="2.13.0"
LLMC_VERSION="0.14.0.1"

die() { echo "peer_setup: ERROR: $*" >&2; exit 1; }

check() {
    "$PY" - "$LLMC_VERSION" "$TORCH_VERSION" <<'EOF' 2>/dev/null
import sys
from importlib.metadata import version
import torch, datasets, llmcompressor  # noqa: F401
ok = version("llmcompressor") == sys.argv[1] and torch.__version__.startswith(sys.argv[2]) \
    and not torch.version.cuda
sys.exit(0 if ok else 1)
EOF
}

if [ -x "$PY" ] && check; then
    echo "peer_setup: llmcompressor $LLMC_VERSION already installed in $VENV"
    exit 0
fi

echo "peer_setup: creating $VENV"
python3 -m venv "$VENV" || die "python3 -m venv failed"
PIP=("$VENV/bin/pip" install --disable-pip-version-check)

"${PIP[@]}" "torch==$TORCH_VERSION" || die "installing torch==$TORCH_VERSION failed"

CONSTRAINTS="$VENV/peer-constraints.txt"
"$PY" -c 'import torch; print("torch==" + torch.__version__)' > "$CONSTRAINTS" \
    || die "torch does not import after install"

"${PIP[@]}" -c "$CONSTRAINTS" "llmcompressor==$LLMC_VERSION" datasets \
    || die "installing llmcompressor==$LLMC_VERSION failed (torch pinned by $CONSTRAINTS)"

check || die "llmcompressor $LLMC_VERSION / torch $TORCH_VERSION+cpu not importable in $VENV"
"$PY" -c 'import torch, transformers, llmcompressor; from importlib.metadata import version
print("peer_setup: torch", torch.__version__, "| transformers", transformers.__version__,
      "| llmcompressor", version("llmcompressor"))'
echo "peer_setup: peer venv ready at $VENV (python: $PY)"
