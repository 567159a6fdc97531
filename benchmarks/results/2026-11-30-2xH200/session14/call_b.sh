# session 14, call B: the whole GPU suite; fam-1b vs bswa-1b at micro-batch 2 (64k, 128k) and 4 (8k)
source .gpu/env.sh
mkdir -p $OUT/r
TS="python3 -m benchmarks.train_step --recompute auto --results-dir $OUT/r"
( export CUDA_VISIBLE_DEVICES=1 TORCHINDUCTOR_CACHE_DIR=$PWD/.inductor1
  timeout 370 python3 -m pytest -m gpu -q -rs -p no:cacheprovider -s --order shuffle:14 tests > $OUT/pytest_gpu.log 2>&1
  echo "pytest rc $?" >> $OUT/pytest_gpu.log
  timeout 200 $TS --configs fam-1b bswa-1b --seq-lens 8192 --micro-batch 4 --json $OUT/mb4_8k.json > $OUT/mb4_8k.log 2>&1 ) &
export CUDA_VISIBLE_DEVICES=0 TORCHINDUCTOR_CACHE_DIR=$PWD/.inductor0
timeout 250 $TS --configs fam-1b bswa-1b --seq-lens 65536 --micro-batch 2 --json $OUT/mb2_64k.json > $OUT/mb2_64k.log 2>&1
timeout 310 $TS --configs fam-1b bswa-1b --seq-lens 131072 --micro-batch 2 --json $OUT/mb2_128k.json > $OUT/mb2_128k.log 2>&1
wait
grep -h "^|\|rc \|passed\|failed" $OUT/*.log | head -60
cd $OUT && tar czf all.tgz *.log *.json r && rm -rf *.log *.json r
