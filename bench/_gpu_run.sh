# Shared start of bench/gpu_session.sh and bench/gpu_variants.sh (source it with $out and $r
# set: the caller's OUTDIR and its scratch folder). Defines pack (everything in $r into
# $out/results.tgz), exports the bench cache and offline settings, notes the GPU and the tree,
# and compiles the bytecode of trtwsi, site-packages, $PYTHONPATH and any folders passed.
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
