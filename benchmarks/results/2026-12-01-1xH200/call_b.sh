# session 15, call B: the merged first step (+ flash's block K/V gradients kept in bf16), 8k
source .gpu/env.sh
mkdir -p $OUT/r
TS="python3 -m benchmarks.train_step --recompute auto --results-dir $OUT/r"
export TORCHINDUCTOR_CACHE_DIR=$PWD/.inductor0
timeout 170 $TS --configs fam-1b bswa-1b --seq-lens 8192 --micro-batch 1 --json $OUT/mb1.json > $OUT/mb1.log 2>&1; echo "mb1 rc $?"
timeout 190 $TS --configs fam-1b bswa-1b --seq-lens 8192 --micro-batch 4 --json $OUT/mb4.json > $OUT/mb4.log 2>&1; echo "mb4 rc $?"
timeout 140 python3 -m pytest -m gpu -q -rs -p no:cacheprovider -s tests/test_gpu.py -k "flash or captured or matches_cpu" > $OUT/pytest.log 2>&1; echo "pytest rc $?"
timeout 85 $TS --configs fam-1b --seq-lens 8192 --micro-batch 1 --first-step apart --json $OUT/mb1_apart.json > $OUT/mb1_apart.log 2>&1; echo "apart rc $?"
grep -h "^|\|passed\|failed\|Error" $OUT/*.log | head -40
cd $OUT && tar czf all.tgz *.log *.json r && rm -rf *.log *.json r
