#!/usr/bin/env bash
# The 4 Gpx synthetic slide and the 16-slide batch under several settings, on one machine (one
# machine's runs compare; two H100 hosts differed by 30 %). Usage, from the repository root on
# the GPU host (ultralytics and imagecodecs on the path, as bench/gpu_session.sh says):
#
#   bash bench/gpu_variants.sh OUTDIR "NAME ENV=VALUE ..." ...
#
# e.g. bash bench/gpu_variants.sh $OUT "default" "strips1 TRTWSI_READ_STRIPS=1"
# Each variant runs the slide (bench_pipeline.py, SIZES=4: a fresh and a warm run) and the
# batch (bench_batch.py); $SKIP_BATCH=1 skips the batches. Results are packed into
# OUTDIR/results.tgz after each run.
set -u
out=${1:?usage: bash bench/gpu_variants.sh OUTDIR "NAME ENV=VALUE ..." ...}
shift
r=/tmp/gpu-variants
source "$(dirname "$0")/_gpu_run.sh"
compile_bytecode
[ -f /tmp/bc/bench-63232.tif ] || python3 -c "from trtwsi.synthetic import make_slide as m
m('/tmp/bc/bench-63232.tif', 63232, 63232, seed=3, n_sections=3)" > "$r/gen.txt" 2>&1
for variant in "$@"; do
  read -r name envs <<< "$variant"
  env $envs TRTWSI_BENCH_SIZES=4 TRTWSI_BENCH_OUT="$r/slides-$name.json" timeout 90 \
    python3 -m pytest bench/bench_pipeline.py -q -p no:cacheprovider -k slide > "$r/slides-$name.txt" 2>&1
  echo "$name: $(tail -1 "$r/slides-$name.txt")"; pack
done
[ "${SKIP_BATCH:-0}" = 1 ] && exit 0
for variant in "$@"; do
  read -r name envs <<< "$variant"
  touch "$r/.start"
  env $envs timeout 120 python3 bench/bench_batch.py --kind cuda --max 1 --slides 16 \
    --size 20000x15000 > "$r/batch-$name.txt" 2>&1
  mkdir -p "$r/batch-$name"
  find bench/results -name 'batch-*.json' -newer "$r/.start" -exec cp {} "$r/batch-$name/" \;
  echo "$name: $(grep "slides/h" "$r/batch-$name.txt")"; pack
done
