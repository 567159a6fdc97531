# session 16, call C: does inductor's programmatic dependent launch (TORCHINDUCTOR_ENABLE_PDL) shorten the scan's kernel gaps?
# fam-1b and bswa-1b at 8k, micro-batch 4, profiled, without it (from call B's compile cache) and with it, on one machine
source .gpu/env.sh
mkdir -p $OUT .gpu/cc && tar xzf .gpu/cc.tgz -C .gpu/cc && ls -la .gpu/cc
python3 -c "import torch, torch._inductor.config as c; print(torch.__version__, 'enable_pdl' in dir(c.triton))"
export TORCHINDUCTOR_CACHE_DIR=$PWD/.inductor0
timeout 200 python3 -m benchmarks.train_step --recompute auto --results-dir $OUT/r --seq-lens 8192 --micro-batch 4 --configs fam-1b bswa-1b --profile --compile-cache .gpu/cc --json $OUT/base.json > $OUT/base.log 2>&1; echo "base rc $?"
grep -h "^| \|Error\|compile cache" $OUT/base.log | head
export TORCHINDUCTOR_CACHE_DIR=$PWD/.inductor1 TORCHINDUCTOR_ENABLE_PDL=1
timeout 300 python3 -m benchmarks.train_step --recompute auto --results-dir $OUT/rp --seq-lens 8192 --micro-batch 4 --configs fam-1b bswa-1b --profile --json $OUT/pdl.json > $OUT/pdl.log 2>&1; echo "pdl rc $?"
grep -h "^| \|Error" $OUT/pdl.log | head
cd $OUT && tar czf all.tgz *.log *.json r rp 2>/dev/null; rm -rf *.log *.json r rp; ls -la $OUT
