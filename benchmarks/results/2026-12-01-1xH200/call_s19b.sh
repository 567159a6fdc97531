# Session 19, call B: tests/test_gpu.py in file order (the GPU against CPU fp32 logits and every gradient,
# flash, the captured scan: the tests call A's reverse order reached last and its time limit cut), then
# the acceptance table's 8k rows with the anchor beside each (micro-batch 1).
set -u
start=$SECONDS
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && touch /tmp/site/.famtron-wheels || exit 1  # as fam_speed.sh does, which then skips it
export PYTHONPATH=/tmp/site:$PWD TORCH_CUDA_ARCH_LIST=9.0 MLFLOW_TRACKING_URI=
CUDA_VISIBLE_DEVICES=0 timeout 240 python3 -m pytest -m gpu -q -rs -p no:cacheprovider tests/test_gpu.py \
    > "$OUT/pytest_test_gpu.log" 2>&1
echo "test_gpu.py: rc $? in $((SECONDS - start)) s"; tail -n 3 "$OUT/pytest_test_gpu.log"
SEQS=8192 timeout $((590 - (SECONDS - start))) bash benchmarks/fam_speed.sh "$OUT" table
echo "call: $((SECONDS - start)) s"
