#!/usr/bin/env bash
# Issue 13's GPU measurements in phases that each fit one device call (10 minutes), so that a
# session spends its GPU time on measuring, not on rebuilding its run scripts.
#
#   GPU machine, from the repo root (carry .whl/, built by ../shared/gpu/wheelhouse.sh, with the anchor
#   copied in: cp ../shared/gpu/anchor_gpt.py .whl/):
#       bash benchmarks/fam_speed.sh OUT PHASE [PHASE ...]
#   PHASE:
#     short     fam-1b, bswa-1b, dense-1b at 8k and 32k, each with the anchor beside it
#     long      the same at 64k and 128k, recompute (long64, long128: one length each, to run side by side)
#     table     the same at SEQS (default 8192; a quoted list for several)
#     profile   fam-1b and bswa-1b at 8k, micro-batch MB (default 4), with --profile (GPU busy, kernels, waits)
#     ratios    fam-1b and bswa-1b at 8k (micro-batch 6, no recompute), 32k, 64k and 128k (micro-batch 2, recompute):
#               issue 13's fam / bswa rows side by side in one process, at the micro-batch where each ratio is highest
#               (8k: 0.906 at 6 against 0.897 at 4, 2026-12-02; fam-1b's peak 118 GiB of an H200's 139; on an
#               80 GB card, by these peaks, SCAN_FLAGS="--micro-batch 2 2 2 1"; not tried)
#     ratios8k  fam-1b and bswa-1b at 8k, micro-batch 4 and 6, no recompute, 10 timed steps: the 8k rows with less noise,
#               and at the largest micro-batch both fit without recompute (fam-1b 118.4 GiB, measured 2026-12-02)
#     batch2    fam-1b and bswa-1b at 8k, micro-batch 2 (the scan's weight reads serve both sequences)
#     batches   fam-1b and bswa-1b at SEQ (default 8192), one process per micro-batch in BATCHES
#               (default "1 2 4"): where FAM's cost meets BSWA's as the scan's GEMMs get more rows
#     slots     fam-1b and bswa-1b at SEQ, micro-batch MB (default 4), --profile, one process with the scan's
#               kept-activation slots (the default), one without (--scan-slots off, as before 2026-12-01)
#     blocks    fam-1b and bswa-1b at SEQ, micro-batch MB, --profile, one process with the scan's keys/values
#               buffers held for its backward (the default since 2026-12-02), one reloading them (--scan-blocks)
#     firststep fam-1b and bswa-1b at SEQ, micro-batch MB, --profile, one process with block 0's step and the prompt
#               step merged (--scan-first-step merged), one with them separate (the default)
#     combo     fam-1b and bswa-1b at SEQ, micro-batch MB, --profile, the scan's steps compiled with inductor's
#               combo kernels (--scan-compile-mode combo-kernels)
#     codegen   fam-1b and bswa-1b at SEQ, micro-batch MB, profiled, with inductor's generated code saved
#               (OUT/output_code.log.gz): where each kernel of the profile comes from
#     attention benchmarks.step_attention_probe: the scan's attention backward as today (flash, block rows copied
#               out) and deferred (dQ and the FAM rows per step, every block's rows after the loop), one layer
#               at 8k and 64k, micro-batch 1 and 4 (session 22's lead: 63 of a backward step's ~198 us)
#     backends  benchmarks.step_backends_probe: the scan step's attention forward and backward by SDPA kernel (flash as
#               today, cuDNN, memory-efficient), one layer at 8k and 64k, micro-batch 2 and 4
#     tests     pytest -m gpu, in a shuffled order (SEED, default 1), or ORDER (file, reverse, shuffle:N)
#               (about 7 min on an H200, 2026-12-02); TESTS: files to run instead of all of tests/
#     parity    the parity suite's 1gpu, tp2, pp2, dp2 cells (2 GPUs; CELLS to choose)
#   The table phases add their records (with each anchor's row) to OUT/<date>-<card>/train_step.json,
#   so short and long, run in two calls, fill one file; their logs and --json rows go to OUT too.
#   Times on an H200 (2026-11-30): cold compiles dominate. On a fresh machine `profile` did not finish
#   fam-1b's 8k row in 210 s; with --profile and the anchor, 8k to 64k (9 rows, 6 anchors) took about
#   520 s. So give each table phase a call of its own, and keep the machine warm between calls (it goes
#   back after 30 s idle, and its inductor caches with it).
#   TRACE=1 saves each profiled cell of a pair phase (profile, slots, blocks, combo, codegen) as a gzipped Chrome
#   trace in OUT/traces (train_step --trace): the timeline behind the idle gaps that --profile prints; read it
#   with `python -m benchmarks.trace_gaps OUT/traces/NAME.trace.json.gz` (no GPU needed).
#   PROFILE=1 adds --profile to the table phases (micro-batch 1: the anchor's). COMPILE_CACHE=DIR passes
#   --compile-cache DIR to every train_step (benchmarks/compile_cache.py), meant to skip the compiles when
#   DIR is carried from an earlier call; tried once on an H200 (2026-12-01), it did not (see that file).
#   SCAN_FLAGS adds train_step flags to every table and pair phase (e.g. "--scan-attention cudnn"): a kernel
#   option measured against another in the same call without a commit between.
#   GPU picks the device for one-GPU phases (default 0): on two GPUs, `tests` on GPU 1 beside a table
#   on GPU 0 compiles on the same host, which slows the table's CPU-bound 8k rows (2026-11-30).
# Each phase has its own inductor cache (.inductor-<phase>, git-ignored): one process's cache at a
# time (a shared one lost Triton files on an H200, 2026-11-30). INDUCTOR_CACHE=DIR gives the phases
# of one call, which run one after another, one cache.
set -uo pipefail
OUT=${1:?usage: bash benchmarks/fam_speed.sh OUT PHASE [PHASE ...]}
shift
mkdir -p "$OUT"
if [ -d .whl ]; then  # once per machine: a second phase running beside the first must not rewrite its modules
    if [ ! -f /tmp/site/.famtron-wheels ]; then
        python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
            .whl/*.whl && touch /tmp/site/.famtron-wheels \
            || { echo "fam_speed.sh: the wheel install of .whl/ failed"; exit 1; }
    fi
    export PYTHONPATH=/tmp/site:$PWD
fi
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} PYTHONUNBUFFERED=1 MLFLOW_TRACKING_URI=
ANCHOR=${ANCHOR:-$( [ -f .whl/anchor_gpt.py ] && echo .whl/anchor_gpt.py || echo ../shared/gpu/anchor_gpt.py )}
CONFIGS=(fam-1b bswa-1b dense-1b)

table() {  # name, sequence lengths...
    local name=$1; shift
    CUDA_VISIBLE_DEVICES=${GPU:-0} python3 -m benchmarks.train_step --configs "${CONFIGS[@]}" --seq-lens "$@" \
        --recompute auto --anchor "$ANCHOR" --results-dir "$OUT" --json "$OUT/$name.json" ${PROFILE:+--profile} \
        ${COMPILE_CACHE:+--compile-cache "$COMPILE_CACHE"} ${SCAN_FLAGS:-} > "$OUT/$name.log" 2>&1
    echo "$name: rc $?"; grep -h "^|" "$OUT/$name.log"
}

pair() {  # name, train_step flags...: fam-1b and bswa-1b at SEQ (default 8k), no anchor
    local name=$1; shift
    CUDA_VISIBLE_DEVICES=${GPU:-0} python3 -m benchmarks.train_step --configs fam-1b bswa-1b --seq-lens "${SEQ:-8192}" \
        --recompute auto --json "$OUT/$name.json" ${COMPILE_CACHE:+--compile-cache "$COMPILE_CACHE"} "$@" \
        ${TRACE:+--trace "$OUT/traces"} ${SCAN_FLAGS:-} > "$OUT/$name.log" 2>&1
    echo "$name: rc $?"; grep -h "^|" "$OUT/$name.log"
}

for phase in "$@"; do
    export TORCHINDUCTOR_CACHE_DIR=${INDUCTOR_CACHE:-$PWD/.inductor-$phase}
    case $phase in
        short) table short 8192 32768 ;;
        long) table long 65536 131072 ;;
        long64) table long64 65536 ;;
        long128) table long128 131072 ;;
        table) seqs=${SEQS:-8192}; table "table-${seqs// /-}" $seqs ;;  # SEQS: one length or several, quoted
        ratios)  # both configs with the same recompute at each length (auto ran bswa-1b without it at 32k, session 22)
            pair ratios --seq-lens 8192 32768 65536 131072 --micro-batch 6 2 2 2 --recompute off on on on \
                --results-dir "$OUT" ;;
        ratios8k)  # the 8k rows again at micro-batch 4 and 6 (both fit without recompute), 10 timed steps each
            pair ratios8k --seq-lens 8192 8192 --micro-batch 4 6 --recompute off --steps 10 --results-dir "$OUT" ;;
        batch2) pair batch2 --micro-batch 2 --results-dir "$OUT" ;;
        profile) pair profile --micro-batch "${MB:-4}" --profile ;;
        slots)
            for s in on off; do pair "slots-$s" --micro-batch "${MB:-4}" --profile --scan-slots "$s"; done ;;
        blocks)
            for k in held reloaded; do pair "blocks-$k" --micro-batch "${MB:-4}" --profile --scan-blocks "$k"; done ;;
        firststep)  # block 0's step and the prompt step as one (model/scan_first_step.py) against two, profiled
            for f in merged separate; do pair "firststep-$f" --micro-batch "${MB:-4}" --profile --scan-first-step "$f" \
                --results-dir "$OUT"; done ;;
        combo) pair combo --micro-batch "${MB:-4}" --profile --scan-compile-mode combo-kernels ;;
        codegen)  # the code inductor generated for every compiled graph (gzipped): which source line each kernel
            # of the profile's list comes from (the 343 non-contiguous copies a fam-1b step, session 18)
            export TORCH_LOGS=output_code TORCH_LOGS_OUT="$OUT/output_code.log"
            pair codegen --micro-batch "${MB:-4}" --warmup 1 --steps 2 --profile
            unset TORCH_LOGS TORCH_LOGS_OUT; gzip -f "$OUT/output_code.log" ;;
        batches)
            for b in ${BATCHES:-1 2 4}; do pair "batch-${SEQ:-8192}-$b" --micro-batch "$b" --results-dir "$OUT"; done ;;
        attention)
            CUDA_VISIBLE_DEVICES=${GPU:-0} python3 -m benchmarks.step_attention_probe --json "$OUT/step_attention.json" \
                > "$OUT/step_attention.log" 2>&1
            echo "attention: rc $?"; grep -h "^|" "$OUT/step_attention.log" ;;
        backends)
            CUDA_VISIBLE_DEVICES=${GPU:-0} python3 -m benchmarks.step_backends_probe --seq-lens 8192 65536 \
                --micro-batch 2 4 --json "$OUT/step_backends.json" > "$OUT/step_backends.log" 2>&1
            echo "backends: rc $?"; grep -h "^|" "$OUT/step_backends.log" ;;
        tests)
            CUDA_VISIBLE_DEVICES=${GPU:-0} python3 -m pytest -m gpu -q -rs -p no:cacheprovider \
                --order "${ORDER:-shuffle:${SEED:-1}}" ${TESTS:-tests} > "$OUT/pytest_gpu.log" 2>&1
            echo "tests: rc $?"; tail -n 3 "$OUT/pytest_gpu.log" ;;
        parity)
            # shellcheck disable=SC2086  # CELLS is a list of words
            python3 -m benchmarks.parity_suite --out "$OUT/parity" --cells ${CELLS:-1gpu tp2 pp2 dp2} --steps 10 \
                --warmup-steps 10 > "$OUT/parity.log" 2>&1
            echo "parity: rc $?"; tail -n 15 "$OUT/parity.log" ;;
        *) echo "fam_speed.sh: unknown phase '$phase' (short, long, long64, long128, table, ratios, ratios8k," \
                "profile, batch2, slots, blocks, firststep, combo, codegen, batches, attention, backends, tests," \
                "parity)"
           exit 2 ;;
    esac
done
