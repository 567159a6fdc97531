# session 15, call A: where the time goes now (profile), fam-1b vs bswa-1b at 8k, micro-batch 1 and 4
source .gpu/env.sh
mkdir -p $OUT/r
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
TS="python3 -m benchmarks.train_step --recompute auto --results-dir $OUT/r --profile"
export TORCHINDUCTOR_CACHE_DIR=$PWD/.inductor0
timeout 250 $TS --configs fam-1b bswa-1b --seq-lens 8192 --micro-batch 1 --json $OUT/prof_mb1.json > $OUT/prof_mb1.log 2>&1; echo "mb1 rc $?"
timeout 260 $TS --configs fam-1b bswa-1b --seq-lens 8192 --micro-batch 4 --json $OUT/prof_mb4.json > $OUT/prof_mb4.log 2>&1; echo "mb4 rc $?"
grep -h "^|" $OUT/*.log | head -30
cd $OUT && tar czf all.tgz *.log *.json r && rm -rf *.log *.json r
