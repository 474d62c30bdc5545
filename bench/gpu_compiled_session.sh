#!/usr/bin/env bash
# The compiled model's GPU questions, in steps that fit the device tool's 10-minute calls:
#
#   STEPS="tests compiled-slides" bash bench/gpu_compiled_session.sh OUTDIR
#
# Steps, run in this order whatever order STEPS names them in:
# ceiling: the model alone at batch 64, eager vs the AOTInductor package (TRTWSI_COMPILE_PACKAGE=1
#   builds it in a child process here, into ~/.cache/trtwsi/compiled, then loads it), and the
#   in-memory image with the package (memory.json);
# tests: the `-m gpu` suite without the package test (330 s: 109 of 112 took 250 s on an H200);
#   package-test: that test alone (it builds packages at batch 16 for both heads;
#   TRTWSI_TEST_COMPILE_PACKAGE=1 must be set);
# slides / compiled-slides: the 1 and 4 Gpx slides eager, then with the package (slides: loaded,
#   the ceiling step built it) or with torch.compile in each slide's process (compiled-slides);
# batch: bench_batch, eager.
# Results packed into OUTDIR/results.tgz after each step. Needs ultralytics and imagecodecs.
# 2026-12-07 (H100, torch 2.11): the package's load segfaulted in most runs (README).
set -u
out=${1:?usage: STEPS="..." bash bench/gpu_compiled_session.sh OUTDIR}
r=/tmp/gpu-session
source "$(dirname "$0")/_gpu_run.sh"
compile_bytecode
has() { [[ " ${STEPS:-ceiling slides} " == *" $1 "* ]]; }
gen_slides &  # the bench slides, in the background while the GPU tests run
slides() {  # $1: name; the environment says the variant
  TRTWSI_BENCH_SIZES=${SIZES:-1,4} TRTWSI_BENCH_OUT="$r/slides-$1.json" timeout ${TIMEOUT:-120} \
    python3 -m pytest bench/bench_pipeline.py -q -p no:cacheprovider -k slide > "$r/slides-$1.txt" 2>&1
  tail -1 "$r/slides-$1.txt"
}
if has ceiling; then
  TRTWSI_COMPILE_PACKAGE=1 TRTWSI_BENCH_COMPILE=1 TRTWSI_BENCH_CEILING_BATCHES=64 TRTWSI_BENCH_OUT="$r/memory.json" timeout 330 \
    python3 -X faulthandler -m pytest bench/bench_pipeline.py -q -p no:cacheprovider \
    -k "ceiling or e2e_memory and not stream" > "$r/memory.txt" 2>&1
  tail -1 "$r/memory.txt"; ls -la ~/.cache/trtwsi/compiled > "$r/packages.txt" 2>&1; pack
fi
if has tests; then
  timeout 330 python3 -m pytest -m gpu tests -q -rf -p no:cacheprovider -W ignore \
    -k "not compiled_package" > "$r/gpu-tests.txt" 2>&1
  tail -1 "$r/gpu-tests.txt"; pack
fi
if has package-test; then
  timeout 280 python3 -m pytest -m gpu tests -q -rf -p no:cacheprovider -W ignore \
    -k "compiled_package" > "$r/package-test.txt" 2>&1
  tail -1 "$r/package-test.txt"; pack
fi
wait  # the slides
if has slides || has compiled-slides; then
  slides eager; pack
fi
if has slides; then
  TRTWSI_COMPILE_PACKAGE=1 TRTWSI_BENCH_COMPILE=1 slides package; pack
fi
if has compiled-slides; then
  TRTWSI_BENCH_COMPILE=1 TIMEOUT=240 slides compiled; pack  # torch.compile in each slide's process
fi
if has batch; then
  touch "$r/.start"
  timeout 120 python3 bench/bench_batch.py --kind cuda --max 1 --slides 16 --size 20000x15000 \
    > "$r/batch.txt" 2>&1
  find bench/results -name 'batch-*.json' -newer "$r/.start" -exec cp {} "$r/" \;
  grep "slides/h" "$r/batch.txt"; pack
fi
