#!/usr/bin/env bash
# Builds, on this CPU machine, what scripts/gpu_check.sh needs on an offline GPU machine, into .gpu/ (git-ignored,
# carried to the machine, about 45 MiB): the vLLM 0.32 bundle of ../shared/gpu (about 10 minutes, once), the two
# packages vLLM's model loader imports that the bundle lacks (compressed-tensors, and loguru for it), and this
# plugin's wheel (rebuilt on every call: the machine installs the plugin from it).
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qx '/.gpu/' .git/info/exclude 2>/dev/null || printf '/.gpu/\n' >> .git/info/exclude
[ -f .gpu/vllm-site.tar.xz ] || bash ../shared/gpu/build_gpu_bundle.sh .gpu
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_17_x86_64 -d .gpu/deps compressed-tensors==0.17.0 loguru==0.7.3
rm -f .gpu/infokv_vllm-*.whl
.venv/bin/python -m pip wheel -q --no-deps --no-build-isolation -w .gpu .  # setuptools >= 70 (the install's)
rm -rf build
du -sh .gpu
