# session 16, call B: fam-1b and bswa-1b at 8k, micro-batch 4, profiled (code c4465ab: + K/V gradients in flash's layout);
# then the memory-estimator row fam-1b 8k micro-batch 1 no recompute, autocast + eager ops (tests/test_memory.py GPU_PEAKS)
source .gpu/env.sh
mkdir -p $OUT/r .gpu/cc
export TORCHINDUCTOR_CACHE_DIR=$PWD/.inductor0
git log --oneline -1 2>/dev/null || true
timeout 330 python3 -m benchmarks.train_step --recompute auto --results-dir $OUT/r --seq-lens 8192 --micro-batch 4 --configs fam-1b bswa-1b --profile --compile-cache .gpu/cc --json $OUT/mb4.json > $OUT/mb4.log 2>&1; echo "mb4 rc $?"
grep -h "^| \|Error" $OUT/mb4.log | head
timeout 190 python3 -m benchmarks.train_step --recompute off --precision bf16-autocast --eager-ops --results-dir $OUT/rm --seq-lens 8192 --micro-batch 1 --configs fam-1b --json $OUT/mem.json > $OUT/mem.log 2>&1; echo "mem rc $?"
grep -h "^| \|Error" $OUT/mem.log | head
cd .gpu/cc && tar czf /tmp/cc.tgz *.bin && split -b 15m /tmp/cc.tgz $OUT/cc.tgz.part- ; ls -la /tmp/cc.tgz
cd $OUT && tar czf all.tgz *.log *.json r rm 2>/dev/null; rm -rf *.log *.json r rm; ls -la $OUT
