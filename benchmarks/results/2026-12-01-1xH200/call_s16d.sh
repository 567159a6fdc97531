# session 16, call D: fam-1b with the FAM scan on a side stream beside the window attention (--fam-scan-overlap on:
# the scan's kernel gaps, 15 ms a step at micro-batch 4, are what separates it from bswa-1b now), bswa-1b beside it;
# then the GPU-vs-CPU test on the final scan code (c4465ab)
source .gpu/env.sh
mkdir -p $OUT
export TORCHINDUCTOR_CACHE_DIR=$PWD/.inductor0
timeout 285 python3 -m benchmarks.train_step --recompute auto --results-dir $OUT/r --seq-lens 8192 --micro-batch 4 --configs fam-1b bswa-1b --fam-scan-overlap on --profile --json $OUT/overlap.json > $OUT/overlap.log 2>&1; echo "overlap rc $?"
grep -h "^| \|Error" $OUT/overlap.log | head
timeout 125 python3 -m pytest -q -m gpu tests/test_gpu.py -k "matches_cpu_fp32" -x > $OUT/pytest.log 2>&1; echo "pytest rc $?"; tail -2 $OUT/pytest.log
cd $OUT && tar czf all.tgz *.log *.json r 2>/dev/null; rm -rf *.log *.json r; ls -la $OUT
