#!/bin/sh
# Install the ILD DICOM node into a new virtual environment: the ONE list of install commands.
# deploy/Dockerfile, deploy/Dockerfile.cuda and tests/test_deploy.py all run this file, so the image
# and the tested install cannot drift apart.
#
#   deploy/install.sh VENV SOURCE_DIR
#
# VENV        the virtual environment to create (must not exist yet), e.g. /opt/venv
# SOURCE_DIR  a checkout of this repository; the node is installed from it as a wheel (not editable): the
#             shipped config/ and models/ come with the package, so the checkout may be removed afterwards
#
# Environment (all optional):
# PYTHON          interpreter that creates the venv (default: python3; Python >= 3.11)
# TORCH_SPEC      the torch requirement, installed first (default: torch==2.13.0, as the Makefile)
# TORCH_PIP_ARGS  pip arguments for torch only: the wheel index of the build you want, e.g.
#                 --index-url https://download.pytorch.org/whl/cpu (CPU only, ~200 MB instead of several GB)
#
# Exit status: 0 installed and checked, non-zero at the first failing step (set -e).
set -eu

if [ "$#" -ne 2 ]; then
    echo "usage: $0 VENV SOURCE_DIR" >&2
    exit 2
fi
venv=$1
src=$2
if [ -e "$venv" ]; then
    echo "error: $venv already exists: give a new folder for the virtual environment" >&2
    exit 2
fi
if [ ! -f "$src/setup.cfg" ]; then
    echo "error: $src is not a checkout of the node (no setup.cfg)" >&2
    exit 2
fi

"${PYTHON:-python3}" -m venv "$venv"
# torch first, from the index chosen above: left to the project's requirements, pip would pick the
# default build (CUDA, several GB) even on a CPU-only host.
# shellcheck disable=SC2086  # TORCH_PIP_ARGS holds several words on purpose
"$venv/bin/pip" install --quiet ${TORCH_PIP_ARGS:-} "${TORCH_SPEC:-torch==2.13.0}"
"$venv/bin/pip" install --quiet "$src"

# The install is usable: the entry point runs, and the installed package's own configuration (with its
# shipped rules file and bundled model) validates.
"$venv/bin/dicom-node" --version
"$venv/bin/dicom-node" config check
