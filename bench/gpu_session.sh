#!/usr/bin/env bash
# One GPU session's measurements in one command, results packed as they come (a command cut at
# its time limit keeps what it finished). Usage, from the repository root on the GPU host:
#
#   bash bench/gpu_session.sh OUTDIR [A/B-REV]
#
# OUTDIR gets a .tgz of everything after each step (OUTDIR/results.tgz). With A/B-REV (a commit)
# the batch and 4 Gpx slide runs alternate between this tree and that commit (a git worktree
# in /tmp/ab), on the same machine: timings from different machines of one kind differ by up to
# 30 % (reader-process speed), so only such pairs compare. Needs ultralytics and imagecodecs on
# the path (the device's wheels), and about 7 minutes (a fresh machine: 9).
set -u
out=${1:?usage: bash bench/gpu_session.sh OUTDIR [A/B-REV]}
ab=${2:-}
r=/tmp/gpu-session
source "$(dirname "$0")/_gpu_run.sh"
extra=
if [ -n "$ab" ]; then
  git worktree add -f /tmp/ab "$ab" > "$r/worktree.txt" 2>&1 && extra=/tmp/ab/trtwsi
fi
compile_bytecode $extra

gen_slides &  # the bench slides, in the background while the GPU tests run
# 112 tests; 109 of them took 250 s on the H200 host beside the slide generation (2026-12-07)
timeout 330 python3 -m pytest -m gpu tests -q -rf -p no:cacheprovider -W ignore > "$r/gpu-tests.txt" 2>&1
tail -1 "$r/gpu-tests.txt"; pack
wait

slides() {  # $1: name, $2: tree
  (cd "$2" && PYTHONPATH="$2:${PYTHONPATH:-}" TRTWSI_BENCH_SIZES=${SIZES:-1,4} TRTWSI_BENCH_OUT="$r/slides-$1.json" timeout 90 \
    python3 -m pytest bench/bench_pipeline.py -q -p no:cacheprovider -k slide > "$r/slides-$1.txt" 2>&1)
  tail -1 "$r/slides-$1.txt"
}
BATCH="bench/bench_batch.py --kind cuda --max 1 --slides 16 --size 20000x15000"
batch() {  # $1: name, $2: tree
  touch "$r/.start"
  (cd "$2" && PYTHONPATH="$2:${PYTHONPATH:-}" timeout 120 python3 $BATCH > "$r/batch-$1.txt" 2>&1
    mkdir -p "$r/batch-$1"
    find bench/results -name 'batch-*.json' -newer "$r/.start" -exec cp {} "$r/batch-$1/" \;)
  grep "slides/h" "$r/batch-$1.txt"
}
here=$PWD
slides a "$here"; pack
# Each against the default run above on the same machine: does the compiled model pay on slides
# here (on the reader-bound H200 host of 2026-12-07 it did not)? Do strips on every read and no
# launch graphs still lose here? (Compiled packages are left out: loading one segfaulted in most
# runs with torch 2.11; bench/gpu_compiled_session.sh asks that again.)
TRTWSI_BENCH_COMPILE=1 slides compiled "$here"; pack
SIZES=4 TRTWSI_READ_STRIPS=16 slides strips16 "$here"; pack
SIZES=4 TRTWSI_LAUNCH_GRAPHS=0 slides no-graphs "$here"; pack
batch a "$here"; pack
if [ -n "$ab" ]; then
  SIZES=4 slides b "/tmp/ab"; SIZES=4 slides a2 "$here"; pack
  batch b "/tmp/ab"; batch a2 "$here"; pack
fi
SIZES=4 TRTWSI_BENCH_COMPILE=1 TRTWSI_BENCH_SWITCH_INTERVAL=0.0005 \
  slides compiled-switch "$here"; pack  # GIL handoffs of 0.5 ms, not 5
# ceilings (eager and compiled) and the in-memory image, compiled
TRTWSI_BENCH_COMPILE=1 TRTWSI_BENCH_OUT="$r/memory.json" timeout 240 python3 -m pytest \
  bench/bench_pipeline.py -q -p no:cacheprovider -k "ceiling or e2e_memory" > "$r/memory.txt" 2>&1
tail -1 "$r/memory.txt"; pack
# Where the batch's wall goes, when py-spy is there (wall time of every thread of the
# coordinator and the worker: `python bench/profile_summary.py batch-profile.json`);
# PROFILE=0 skips it
spy=$(command -v py-spy || ls /tmp/site/bin/py-spy 2> /dev/null)
if [ -n "$spy" ] && [ "${PROFILE:-1}" != 0 ]; then
  timeout 120 "$spy" record --subprocesses --idle -r 100 -f speedscope -o "$r/batch-profile.json" \
    -- python3 $BATCH > "$r/batch-profile.txt" 2>&1
  pack
fi
[ -z "$ab" ] || git worktree remove --force /tmp/ab
