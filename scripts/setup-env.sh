#!/usr/bin/env bash
# Create (or refresh) the project virtualenv in <repo>/.venv.
#
#   bash scripts/setup-env.sh          # run it
#   source scripts/setup-env.sh        # from other scripts (test.sh, demo.sh); also puts .venv/bin on PATH
#
# Idempotent: after a successful install it writes .venv/.installed-<sha1 of pyproject.toml> and
# skips pip entirely while that stamp exists. Editing pyproject.toml triggers a reinstall.
# torch/torchvision are installed first with exactly `pip install torch==2.14.1 torchvision==0.29.1`
# so pip takes the local CUDA wheels; then the project itself, editable, with the test extra.
# Set PYTHON=/path/to/python3 to choose the interpreter that creates the venv.

_fp_setup_env() {
    local root venv py sha stamp
    root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
    venv="$root/.venv"
    py="${PYTHON:-python3}"

    if [ ! -x "$venv/bin/python" ]; then
        echo "setup-env: creating virtualenv $venv (with $py)"
        "$py" -m venv "$venv" || return 1
    fi

    sha="$(sha1sum "$root/pyproject.toml" | cut -d' ' -f1)" || return 1
    stamp="$venv/.installed-$sha"
    if [ -f "$stamp" ]; then
        echo "setup-env: $venv is up to date (stamp $(basename "$stamp"))"
    else
        echo "setup-env: installing torch and torchvision into $venv"
        "$venv/bin/python" -m pip install torch==2.14.1 torchvision==0.29.1 || return 1
        echo "setup-env: installing this project (editable, with [test]) into $venv"
        (cd "$root" && "$venv/bin/python" -m pip install -e '.[test]') || return 1
        rm -f "$venv"/.installed-*
        touch "$stamp"
        echo "setup-env: done (stamp $(basename "$stamp"))"
    fi

    case ":$PATH:" in
        *":$venv/bin:"*) ;;
        *) export PATH="$venv/bin:$PATH" ;;
    esac
}

if ! _fp_setup_env; then
    echo "setup-env: FAILED" >&2
    unset -f _fp_setup_env
    # `return` when sourced, `exit` when run as a script.
    return 1 2>/dev/null || exit 1
fi
unset -f _fp_setup_env
