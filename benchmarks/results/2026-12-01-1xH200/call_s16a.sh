# session 16, call A: fam-1b and bswa-1b at 8k, micro-batch 4, profiled, on the code with the joined keys/values and the split hidden
source .gpu/env.sh
mkdir -p $OUT/r .gpu/cc
export TORCHINDUCTOR_CACHE_DIR=$PWD/.inductor0
nvidia-smi --query-gpu=name,memory.used --format=csv,noheader
timeout 400 python3 -m benchmarks.train_step --recompute auto --results-dir $OUT/r --seq-lens 8192 --micro-batch 4 --configs fam-1b bswa-1b --profile --compile-cache .gpu/cc --json $OUT/mb4.json > $OUT/mb4.log 2>&1; echo "mb4 rc $?"
grep -h "^| \|Error" $OUT/mb4.log | head
timeout 150 python3 -m pytest -q -m gpu tests/test_gpu.py -k "matches_cpu_fp32" -x > $OUT/pytest.log 2>&1; echo "pytest rc $?"; tail -3 $OUT/pytest.log
ls -la .gpu/cc; mkdir -p $OUT/cc; cp .gpu/cc/*.bin $OUT/cc/ 2>/dev/null
cd $OUT && tar czf all.tgz *.log *.json r 2>/dev/null; rm -rf *.log *.json r; ls -la $OUT $OUT/cc
