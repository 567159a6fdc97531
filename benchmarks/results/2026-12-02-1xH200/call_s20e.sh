# Session 20, call E (fresh machine, the session's last 290 s): one fam-1b layer's matmuls in the scan's
# layout and in the [F; block] layout, against BSWA's whole-sequence matmuls (benchmarks/block_rows_probe.py).
set -u
start=$SECONDS
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || exit 1
export PYTHONPATH=/tmp/site:$PWD MLFLOW_TRACKING_URI=
timeout 150 python3 -m benchmarks.block_rows_probe --config fam-1b --seq-lens 8192 32768 65536 131072 \
    --micro-batch 1 2 4 --json "$OUT/block_rows_probe.json" > "$OUT/block_rows_probe.log" 2>&1
echo "probe: rc $? in $((SECONDS - start)) s"; grep "^|" "$OUT/block_rows_probe.log"; tail -n 3 "$OUT/block_rows_probe.log"
