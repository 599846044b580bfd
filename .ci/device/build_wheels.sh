#!/usr/bin/env bash
# Builds .whl/: the wheels `lctrain train` / `lctrain bench train` import on the GPU machines, whose
# Python (3.12; torch 2.11, triton 3.6, numpy, rich, tensorboard, pyyaml, requests, ... preinstalled)
# lacks megatron-core, deepspeed, mosaicml-streaming and omegaconf and cannot reach a registry.
# Run here (PyPI reachable, the CI environment active), from anywhere in the checkout:
#     bash .ci/device/build_wheels.sh            (DEST=.whl by default; .whl/ is git-ignored)
# then carry `.whl` in the device call; .ci/device/train_bench.sh installs it with --no-index --no-deps.
#
# What goes in is measured, not listed by hand: a Python probe imports everything the training path
# imports on a GPU (config, data loader, mesh, CP ops, Ulysses, the loop, `lctrain bench train`),
# maps the loaded modules to their distributions, drops the ones the GPU image already has
# (PRESENT, from the device notes' package list) and torch/triton/nvidia-*, and pins each to the
# version installed here (what CI tests with). Binary wheels are for CPython 3.12 / x86-64;
# sdist-only packages (deepspeed) are built here as pure-python wheels (DS_BUILD_OPS=0).
set -euo pipefail
cd "$(dirname "$0")/../.."
DEST=${DEST:-.whl}
mkdir -p "$DEST"
export DS_ACCELERATOR=cpu DS_BUILD_OPS=0
PRESENT="absl-py accelerate aiohttp attrs certifi charset-normalizer click cloudpickle contourpy cycler einops filelock
fonttools fsspec grpcio h5py huggingface-hub humanize idna jinja2 joblib kiwisolver markdown markdown-it-py markupsafe
matplotlib mdurl ml-dtypes mpmath msgpack networkx ninja numpy nvidia-ml-py packaging pandas pillow pip protobuf psutil
py-cpuinfo pygments pyparsing python-dateutil pyyaml regex requests rich safetensors scipy sentencepiece setuptools six
sympy tensorboard tensorboard-data-server tokenizers tqdm transformers typing-inspect urllib3 werkzeug wheel xxhash
cuda-bindings cuda-pathfinder cuda-core cuda-toolkit lctrain"
SPECS=$(python3 - "$PRESENT" <<'PY'
import importlib.metadata as md, re, sys, warnings
warnings.filterwarnings("ignore")
norm = lambda n: re.sub(r"[-_.]+", "-", n).lower()
present = {norm(n) for n in sys.argv[1].split()}
import lctrain.config, lctrain.data, lctrain.models, lctrain.train.step, lctrain.parallel  # noqa: F401
import lctrain.train.trainer, lctrain.train.command  # noqa: F401,E401
from lctrain.parallel import mesh, ulysses  # noqa: F401
from megatron.core import parallel_state  # noqa: F401
import deepspeed.comm  # noqa: F401
from deepspeed.sequence.layer import DistributedAttention  # noqa: F401
from deepspeed.accelerator import get_accelerator  # noqa: F401
from streaming import MDSWriter, StreamingDataLoader, StreamingDataset  # noqa: F401
from streaming.base.format import reader_from_json  # noqa: F401
try:
    import lctrain.bench.train  # noqa: F401
except ImportError:
    pass
owners = md.packages_distributions()
dists = {d for m in list(sys.modules) for d in owners.get(m.split(".")[0], [])}
# typing_extensions is always carried: pydantic needs a newer one than older images hold
keep = sorted(d for d in dists if norm(d) not in present and not norm(d).startswith(("torch", "triton", "nvidia-")))
print(" ".join(f"{d}=={md.version(d)}" for d in keep))
PY
)
echo "bundling: $SPECS"
PLATFORMS=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64
           --platform manylinux2014_x86_64 --platform manylinux1_x86_64 --platform manylinux_2_34_x86_64)
for spec in $SPECS; do
  name=${spec%%==*}
  get() { python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
           "${PLATFORMS[@]}" -d "$DEST" "$1" 2>/dev/null; }
  get "$spec" && continue
  # No binary wheel (deepspeed ships an sdist only): build it here. A pure-python build (py3-none-any)
  # installs on the device's 3.12; one with compiled code would be for this machine's Python (3.11),
  # which the device refuses (zstd 1.5.7.2 has no cp312 wheel): drop it and take the newest release
  # that has a 3.12 wheel instead (never an old pure-python one: pip picked deepspeed 0.3.1.dev5 so).
  tmp=$(mktemp -d)
  if python3 -m pip wheel -q --no-deps --no-binary=:all: -w "$tmp" "$spec" > /dev/null 2>&1 && ls "$tmp"/*-py3-none-any.whl > /dev/null 2>&1; then
    mv "$tmp"/*.whl "$DEST"/; rm -rf "$tmp"; echo "built $spec as a pure-python wheel"; continue
  fi
  rm -rf "$tmp"
  if ! { echo "no 3.12 wheel of $spec: taking the newest $name that has one"; get "$name"; }; then
    echo "no 3.12 wheel of any $name release: the GPU machine cannot install it" >&2; exit 1
  fi
done
# Tools of the GPU runs, not imported by training: pytest-xdist (the GPU tests compile many Triton
# kernels: -n N spreads the compilation over the host's cores) and fla-core, the anchor of the benches.
# FLA_VERSION (default 0.6.0): 0.6.0's chunk_log_linear_attn did not compile on the image's Triton 3.6
# (2026-12-01, BENCHMARKS.md), so `lctrain bench loglinear --methods fla_ll_mamba2` may need an older one
# (0.5.x and 0.4.x have it too, without the scale argument the bench does not pass).
rm -f "$DEST"/fla_core-*.whl   # one fla-core in the bundle: pip would refuse two versions of it
for spec in "pytest-xdist==$(python3 -c 'import xdist; print(xdist.__version__)')" \
            "execnet==$(python3 -c 'import execnet; print(execnet.__version__)')" "fla-core==${FLA_VERSION:-0.6.0}"; do
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 "${PLATFORMS[@]}" -d "$DEST" "$spec"
done
echo "bundle: $(ls "$DEST"/*.whl | wc -l) wheels, $(du -ch "$DEST"/*.whl | tail -1 | cut -f1) (the device call carries at most 64 MiB in all)"
ls -S -s "$DEST" | head -6
