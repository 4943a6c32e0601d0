#!/usr/bin/env bash
# Build everything issue 5's benchmark needs on another CPU into one folder, plus the script
# that measures it there (docs/bench-avx512/README.md): the bench bundles of parts a, b, c
# (shipped and official config), k and r (the shipped step's roofline) for TARGET, the device
# runtime (libtvm_runtime.so from the installed apache-tvm, the apache-tvm-ffi wheel for that
# machine's Python) and run.sh.
#
#   scripts/bench_kit.sh KIT [TARGET] [PYTHON_VERSION]     # here (TVM compiler, torch, network)
#   KIT/run.sh OUT                                         # there: JSON + profiles into OUT
#
# TARGET defaults to x86_64-avx512, PYTHON_VERSION (of the measuring machine) to 3.12.
# The measuring machine needs numpy, onnxruntime and torch (part c) and this repository.
set -euo pipefail
cd "$(dirname "$0")/.."
kit=${1:?usage: scripts/bench_kit.sh KIT [TARGET] [PYTHON_VERSION]}
target=${2:-x86_64-avx512}
pyver=${3:-3.12}
if [ -e "$kit" ]; then
    echo "scripts/bench_kit.sh: $kit exists; remove it or name a new folder" >&2
    exit 2
fi
mkdir -p "$kit"
model=$(python3 -c 'from bidiff.runtime.artifact import SHIPPED_MODEL; print(SHIPPED_MODEL)')
ckpt=models/weights/$model.safetensors
python3 scripts/bench.py --part a --target "$target" --bundle "$kit/a"
python3 scripts/bench.py --part b --target "$target" --bundle "$kit/b"
python3 scripts/bench.py --part c --config "$model" --checkpoint "$ckpt" --target "$target" \
    --bundle "$kit/cs"
python3 scripts/bench.py --part c --config official-x2 --target "$target" --bundle "$kit/co"
python3 scripts/bench.py --part k --target "$target" --bundle "$kit/k"
python3 scripts/bench.py --part r --config "$model" --checkpoint "$ckpt" --target "$target" \
    --bundle "$kit/r"
tvm_lib=$(python3 -c 'import pathlib, tvm; print(pathlib.Path(tvm.__file__).parent / "lib")')
cp "$tvm_lib/libtvm_runtime.so" "$kit/"
ffi_version=$(python3 -c 'from importlib.metadata import version; print(version("apache-tvm-ffi"))')
python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version "$pyver" \
    --platform manylinux_2_28_x86_64 --dest "$kit/wheels" "apache-tvm-ffi==$ffi_version"
cat > "$kit/run.sh" <<'EOF'
#!/usr/bin/env bash
# Measure this kit on this machine, 2 threads pinned to 2 cores; results into OUT.
# Run from the root of a bidiff checkout (the benchmark script and the runtime come from it).
set -euo pipefail
kit=$(cd "$(dirname "$0")" && pwd)
out=${1:?usage: KIT/run.sh OUT}
mkdir -p "$out"
site=$(mktemp -d)
python3 -m pip install --quiet --no-index --no-deps --target "$site" "$kit"/wheels/*.whl
python3 -m pip install --quiet --no-deps --no-build-isolation -e .
export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}" BIDIFF_TVM_RUNTIME="$kit/libtvm_runtime.so"
pin="taskset -c 0,1"
command -v taskset >/dev/null || pin=""
$pin python3 scripts/bench.py --run "$kit/k" --json "$out/k.json" | tee "$out/k.md"
for part in a b; do
    $pin python3 scripts/bench.py --run "$kit/$part" --threads 2 --json "$out/$part.json" \
        | tee "$out/$part.md"
done
# A step takes up to a second per contender: 7 rounds of 3 keep both configs near a minute.
for part in cs co; do
    $pin python3 scripts/bench.py --run "$kit/$part" --threads 2 --rounds 7 --repeat 3 \
        --json "$out/$part.json" | tee "$out/$part.md"
done
$pin python3 scripts/bench.py --run "$kit/r" --threads 2 --rounds 5 --repeat 2 \
    --thread-counts 1,2 --json "$out/r.json" | tee "$out/r.md"
for part in cs co; do
    $pin python3 scripts/profile_step.py --library "$kit/$part/c_model.so" --threads 2 \
        --steps 5 | tee "$out/profile-$part.md"
done
EOF
chmod +x "$kit/run.sh"
du -sh "$kit"
echo "carry $kit and run  $kit/run.sh OUT  from a bidiff checkout on the measuring machine"
