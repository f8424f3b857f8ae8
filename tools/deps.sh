#!/usr/bin/env bash
# Install hpc_rlhf into a NEW virtual environment with one of three dependency sets, then run the tests there:
#
#   tools/deps.sh locked [PYTEST_ARGS...]   # constraints.txt: the exact versions CI runs (what README's commands install)
#   tools/deps.sh newest [PYTEST_ARGS...]   # whatever pip resolves today inside setup.cfg's bounds (catches drift early)
#   tools/deps.sh oldest [PYTEST_ARGS...]   # constraints-oldest.txt: the lower bounds setup.cfg admits
#   tools/deps.sh lock                      # newest set + whole test suite; on success rewrite constraints.txt from it
#
# A fresh venv each time (in $DEPS_VENV, default a temporary folder) so that nothing kept from an earlier install
# hides a problem. PYTEST_ARGS default to the whole suite. torch stays at the CPU wheel named in constraints.txt.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

mode="${1:-}"
shift || true
case "$mode" in locked|newest|oldest|lock) ;; *)
  echo "usage: tools/deps.sh locked|newest|oldest|lock [PYTEST_ARGS...]" >&2; exit 2 ;;
esac

torch_pin="$(grep -E '^torch==' constraints.txt)"
venv="${DEPS_VENV:-$(mktemp -d)/venv}"
echo "deps.sh: $mode set in a new venv at $venv" >&2
python3 -m venv "$venv"
# shellcheck disable=SC1091
. "$venv/bin/activate"
python -m pip install -q "$torch_pin"
# DeepSpeed compiles its CPU ops into TORCH_EXTENSIONS_DIR; another DeepSpeed version must not find them there.
export TORCH_EXTENSIONS_DIR="$venv/torch_extensions"

case "$mode" in
  locked) python -m pip install -q -c constraints.txt -e ".[test]" ;;
  oldest) python -m pip install -q -c constraints-oldest.txt -e ".[test]" ;;
  newest|lock)
    only_torch="$(mktemp)"; echo "$torch_pin" > "$only_torch"
    python -m pip install -q --upgrade -c "$only_torch" -e ".[test]" ;;
esac
python -m pip list --format=freeze 2>/dev/null | grep -iE '^(torch|transformers|deepspeed|kernels|vllm|trl|submitit|pyarrow|peft|tokenizers|huggingface.hub|safetensors|mpi4py|gguf)=' >&2

set +e
python -m pytest "$@"
status=$?
set -e
if [ "$mode" = lock ] && [ "$status" -eq 0 ]; then
  {
    echo "# The exact versions the test suite passed with (tools/deps.sh lock wrote this; CI installs it)."
    echo "# Used as a constraint: pip install -c constraints.txt -e \".[test]\". With vLLM use setup.cfg's bounds instead"
    echo "# (README, \"On a GPU cluster\"): this set pins a numpy newer than vLLM accepts."
    python -m pip list --format=freeze 2>/dev/null | grep -viE '^(hpc.rlhf|pip|setuptools|wheel)=' | sort -f
  } > constraints.txt
  echo "deps.sh: constraints.txt rewritten" >&2
fi
exit "$status"
