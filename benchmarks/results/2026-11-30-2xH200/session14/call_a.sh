# session 14, call A: the flash scan steps and the compiled block loads; GPU tests + the first figures
source .gpu/env.sh
mkdir -p $OUT/r
TS="python3 -m benchmarks.train_step --recompute auto --results-dir $OUT/r"
( export CUDA_VISIBLE_DEVICES=1 TORCHINDUCTOR_CACHE_DIR=$PWD/.inductor1
  timeout 220 python3 -m pytest -m gpu -q -rs -p no:cacheprovider -s tests/test_gpu.py -k "flash or matches_cpu or captured" > $OUT/pytest_a.log 2>&1
  echo "pytest rc $?" >> $OUT/pytest_a.log
  timeout 330 $TS --configs fam-1b bswa-1b --seq-lens 32768 --micro-batch 2 --json $OUT/mb2_32k.json > $OUT/mb2_32k.log 2>&1 ) &
export CUDA_VISIBLE_DEVICES=0 TORCHINDUCTOR_CACHE_DIR=$PWD/.inductor0
timeout 230 $TS --configs fam-1b bswa-1b --seq-lens 8192 --micro-batch 4 --json $OUT/mb4_8k.json > $OUT/mb4_8k.log 2>&1
timeout 170 $TS --configs fam-1b bswa-1b --seq-lens 8192 --micro-batch 1 --json $OUT/mb1_8k.json > $OUT/mb1_8k.log 2>&1
timeout 150 $TS --configs fam-1b --seq-lens 8192 --micro-batch 4 --scan-attention matmul --json $OUT/mb4_8k_matmul.json > $OUT/mb4_8k_matmul.log 2>&1
wait
grep -h "^|\|rc \|passed\|failed\|Error" $OUT/*.log | head -60
cd $OUT && tar czf all.tgz *.log *.json r && rm -rf *.log *.json r
