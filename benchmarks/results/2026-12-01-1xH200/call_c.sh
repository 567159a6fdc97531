# session 15, call C: fam-1b at 8k, micro-batch 1, merged first step (cold compile) and apart; bswa-1b; GPU tests
source .gpu/env.sh
mkdir -p $OUT/r
TS="python3 -m benchmarks.train_step --recompute auto --results-dir $OUT/r --seq-lens 8192 --micro-batch 1"
export TORCHINDUCTOR_CACHE_DIR=$PWD/.inductor0
timeout 240 $TS --configs fam-1b --json $OUT/merged.json > $OUT/merged.log 2>&1; echo "merged rc $?"
timeout 70 $TS --configs fam-1b --first-step apart --json $OUT/apart.json > $OUT/apart.log 2>&1; echo "apart rc $?"
timeout 110 $TS --configs bswa-1b --json $OUT/bswa.json > $OUT/bswa.log 2>&1; echo "bswa rc $?"
timeout 130 python3 -m pytest -m gpu -q -rs -p no:cacheprovider -s tests/test_gpu.py -k "flash or captured" > $OUT/pytest.log 2>&1; echo "pytest rc $?"
grep -h "^| fam\|^| bswa\|passed\|failed\|Error" $OUT/*.log | head -40
cd $OUT && tar czf all.tgz *.log *.json r && rm -rf *.log *.json r
