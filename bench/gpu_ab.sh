#!/usr/bin/env bash
# Eager slides of this tree against another trtwsi on one machine, alternating (a b a2 b2):
#
#   TESTS_K="threshold or lane" bash bench/gpu_ab.sh OUTDIR OLD   # OLD holds the other tree's trtwsi/
#
# e.g. OLD made here by `git archive REV trtwsi | tar -x -C .ab` (carried as .ab). The bench
# code is this tree's for both (copied into OLD: bench_pipeline puts its own root first).
# TESTS_K, when set, first runs `pytest -m gpu tests -k "$TESTS_K"`.
# VARIANT (VAR=value ...), when set, runs this tree once more in that environment (after b).
# PROBES, when set, first runs bench_tissue.py and probe_start.py on the 1 Gpx slide.
# Results packed into OUTDIR/results.tgz after each step; `python bench/pack_ab.py` turns them
# into one results JSON.
set -u
out=${1:?usage: bash bench/gpu_ab.sh OUTDIR OLD}
old=$(cd "${2:?usage: bash bench/gpu_ab.sh OUTDIR OLD}" && pwd)
r=/tmp/gpu-session
source "$(dirname "$0")/_gpu_run.sh"
compile_bytecode "$old/trtwsi"
rm -rf "$old/bench" && cp -r bench "$old/bench"
gen_slides &
if [ -n "${TESTS_K:-}" ]; then
  timeout "${TESTS_TIMEOUT:-200}" python3 -m pytest -m gpu tests -q -rf -p no:cacheprovider -W ignore -k "$TESTS_K" \
    > "$r/gpu-tests.txt" 2>&1
  tail -1 "$r/gpu-tests.txt"; pack
fi
wait
if [ -n "${PROBES:-}" ]; then
  timeout 100 python3 bench/bench_tissue.py --slide /tmp/bc/bench-31744.tif --repeat 7 \
    --out "$r/tissue.json" > "$r/tissue.txt" 2>&1
  timeout 120 python3 bench/probe_start.py --slide /tmp/bc/bench-31744.tif --repeat 7 \
    --out "$r/start.json" > "$r/probe.txt" 2>&1
  pack
fi
slides() {  # $1: name, $2: the trtwsi tree's parent
  (cd "$2" && PYTHONPATH="$2:${PYTHONPATH:-}" TRTWSI_BENCH_SIZES=${SIZES:-1,4} \
    TRTWSI_BENCH_OUT="$r/slides-$1.json" timeout 90 python3 -m pytest bench/bench_pipeline.py -q \
    -p no:cacheprovider -k slide > "$r/slides-$1.txt" 2>&1)
  tail -1 "$r/slides-$1.txt"
}
variant() {
  # shellcheck disable=SC2086
  [ -z "${VARIANT:-}" ] || { (export $VARIANT; slides variant "$PWD"); pack; }
}
slides a "$PWD"; pack
slides b "$old"; pack
variant  # e.g. VARIANT="TRTWSI_DECODE=gpu": this tree once more with it
slides a2 "$PWD"; pack
slides b2 "$old"; pack
