# session 14, call D: the GPU scan tests on the final code (block loads compiled as Pointwise, padded by F.pad)
source .gpu/env.sh
mkdir -p $OUT
TORCHINDUCTOR_CACHE_DIR=$PWD/.inductorD timeout 200 python3 -m pytest -m gpu -q -rs -p no:cacheprovider -s tests/test_gpu.py -k "captured or (matches_cpu and bf16 and one)" > $OUT/call_d_pytest.log 2>&1
echo "pytest rc $?" >> $OUT/call_d_pytest.log
grep -v "DEBUG    torch" $OUT/call_d_pytest.log > $OUT/x && mv $OUT/x $OUT/call_d_pytest.log
grep -h "rc \|passed\|failed\|captured vs\|GPU bf16" $OUT/call_d_pytest.log | head
