# session 14, call C: the 2-GPU parity suite; the flash test again; fam-1b vs bswa-1b at micro-batch 4 (32k, 64k)
source .gpu/env.sh
mkdir -p $OUT/r
TS="python3 -m benchmarks.train_step --recompute auto --results-dir $OUT/r"
TORCHINDUCTOR_CACHE_DIR=$PWD/.inductorP timeout 240 python3 -m pytest -m gpu -q -rs -p no:cacheprovider -s tests/test_gpu_parallel.py > $OUT/pytest_parallel.log 2>&1
echo "pytest rc $?" >> $OUT/pytest_parallel.log
( export CUDA_VISIBLE_DEVICES=1 TORCHINDUCTOR_CACHE_DIR=$PWD/.inductor1
  timeout 100 python3 -m pytest -m gpu -q -rs -p no:cacheprovider -s tests/test_gpu.py -k flash > $OUT/pytest_flash.log 2>&1
  echo "pytest rc $?" >> $OUT/pytest_flash.log
  timeout 230 $TS --configs fam-1b bswa-1b --seq-lens 65536 --micro-batch 4 --json $OUT/mb4_64k.json > $OUT/mb4_64k.log 2>&1 ) &
export CUDA_VISIBLE_DEVICES=0 TORCHINDUCTOR_CACHE_DIR=$PWD/.inductor0
timeout 320 $TS --configs fam-1b bswa-1b --seq-lens 32768 --micro-batch 4 --json $OUT/mb4_32k.json > $OUT/mb4_32k.log 2>&1
wait
grep -h "^|\|rc \|passed\|failed\|bf16 scan vs" $OUT/*.log | head -60
cd $OUT && tar czf all.tgz *.log *.json r && rm -rf *.log *.json r
