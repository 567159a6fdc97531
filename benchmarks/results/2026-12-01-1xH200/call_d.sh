# session 15, call D: fam-1b at 8k, micro-batch 4, with flash's block K/V gradients kept in bf16 (cold compile)
source .gpu/env.sh
mkdir -p $OUT/r
export TORCHINDUCTOR_CACHE_DIR=$PWD/.inductor0
timeout 262 python3 -m benchmarks.train_step --recompute auto --results-dir $OUT/r --seq-lens 8192 --micro-batch 4 --configs fam-1b --json $OUT/mb4.json > $OUT/mb4.log 2>&1; echo "mb4 rc $?"
grep -h "^| fam\|Error" $OUT/*.log | head
cd $OUT && tar czf all.tgz *.log *.json r 2>/dev/null; rm -rf *.log *.json r
