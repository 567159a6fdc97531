# Session 20, call B (call A's warm machine): `pytest -m gpu` whole, as one process, in a shuffled order.
set -u
start=$SECONDS
ORDER=shuffle:20 timeout 580 bash benchmarks/fam_speed.sh "$OUT" tests
echo "call: $((SECONDS - start)) s"
