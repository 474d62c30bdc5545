# Shared start of bench/gpu_session.sh, gpu_compiled_session.sh and gpu_variants.sh (source it
# with $out and $r set: the caller's OUTDIR and its scratch folder). Defines pack (everything in
# $r into $out/results.tgz) and gen_slides, exports the bench cache and offline settings, notes
# the GPU and the tree, and compiles the bytecode of trtwsi, site-packages, $PYTHONPATH and any
# folders passed.
mkdir -p "$r" "$out" /tmp/bc
pack() { tar czf "$out/results.tgz" -C "$r" . ; }
export YOLO_OFFLINE=1 TRTWSI_BENCH_CACHE=/tmp/bc
{ nvidia-smi --query-gpu=name --format=csv,noheader 2>&1; git log --oneline -1; git status --short; } > "$r/tree.txt"

# The lent hosts set PYTHONDONTWRITEBYTECODE=1: compile once, as a pip install would, or every
# process start measures compilation (a fresh `import torch` 7.1 s instead of 1.2-1.4 s).
compile_bytecode() {
  local dirs p pp
  dirs="trtwsi $(python3 -c "import site; print(' '.join(site.getsitepackages()))") $*"
  pp=${PYTHONPATH:-}
  for p in ${pp//:/ }; do  # e.g. the --target dir of the device's wheels
    [ -d "$p" ] && dirs="$dirs $p"; done
  for p in $dirs; do python3 -m compileall -q -j 16 "$p" > /dev/null 2>&1; done
}

gen_slides() {  # the 4 and 1 Gpx bench slides into /tmp/bc (the 1 Gpx one last: it marks done)
  [ -f /tmp/bc/bench-31744.tif ] && return
  python3 -c "from trtwsi.synthetic import make_slide as m
m('/tmp/bc/bench-63232.tif', 63232, 63232, seed=3, n_sections=3)
m('/tmp/bc/bench-31744.tif', 31744, 31744, seed=3, n_sections=3)" > "$r/gen.txt" 2>&1
}
