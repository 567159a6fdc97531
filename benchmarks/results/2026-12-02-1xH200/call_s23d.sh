# Session 23, call D (warm after C): issue 13's fam / bswa rows (8k micro-batch 4 no recompute; 32k, 64k, 128k
# micro-batch 2 with recompute), one process, on the session's model changes (the layer output's residual sum
# written in place, the scan's keys/values joined in one compiled call, the scan attention's backward as chosen
# after call C: model/fast_scan.py ATTENTION_BACKWARD).
set -u
start=$SECONDS
export INDUCTOR_CACHE=$PWD/.inductor-s23
timeout 585 bash benchmarks/fam_speed.sh "$OUT/s23d" ratios
echo "call: $((SECONDS - start)) s"
