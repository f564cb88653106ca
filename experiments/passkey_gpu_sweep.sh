#!/bin/bash
# Scratch sweep behind docs/passkey_small.md: the runs of experiments/passkey_explore.py that 2 CPU cores
# cannot afford, all at once on one GPU, each for a fixed wall time. Logs: $LOGS/NAME.log; a summary
# of every run's eval lines is rewritten to $SUMMARY every 15 s (so a run killed at its limit still reports).
# The two sets in docs/passkey_small.md ran as (one H200, python3 with jax 0.11.2 and ml_collections):
#   SET=1 LOGS=/tmp/sweep SUMMARY=$OUT/summary.txt TRAIN_S=390 FT_S=190 bash experiments/passkey_gpu_sweep.sh
#   SET=2 LOGS=/tmp/sweep SUMMARY=$OUT/summary.txt TRAIN_S=235 bash experiments/passkey_gpu_sweep.sh
set -u
PY=${PY:-python3}; LOGS=${LOGS:-/tmp/passkey_sweep}; SUMMARY=${SUMMARY:-$LOGS/summary.txt}
TRAIN_S=${TRAIN_S:-400}; PRE_STEPS=${PRE_STEPS:-2000}; FT_S=${FT_S:-250}
mkdir -p "$LOGS"
export PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}. XLA_PYTHON_CLIENT_PREALLOCATE=false PYTHONUNBUFFERED=1
BASE="--fmt colon --pack 1 --lo 0 --hi 160 --seq 256 --copy_steps 200 --copy_every 4 --evlens 256,1024,4096 --eval_every 1000 --steps 100000 --verbose 0"
run() { name=$1; shift; $PY experiments/passkey_explore.py $BASE "$@" > "$LOGS/$name.log" 2>&1; }
summarize() { for f in "$LOGS"/*.log; do echo "== $(basename $f .log)"; grep -E "^step|Error|error:" "$f" | tail -n 25; done > "$SUMMARY"; }

if [ "${SET:-1}" = 1 ]; then  # rows of 256 (8 blocks); pretraining with full attention
run fam_norsp --deadline $TRAIN_S &
run fam_rsp0 --rsp 0.8 --deadline $TRAIN_S &
run fam_rsp2k --rsp 0.8 --rsp_start 2000 --deadline $TRAIN_S &
run bswa_m0 --attention bswa --mem 0 --deadline $TRAIN_S &
run bswa_m2 --attention bswa --mem 2 --deadline $TRAIN_S &
run fam_norsp_d128 --d 128 --deadline $TRAIN_S &
run fam_rsp2k_d128 --d 128 --rsp 0.8 --rsp_start 2000 --deadline $TRAIN_S &
( run full_pre --attention full --steps $PRE_STEPS --eval_every 500 --save "$LOGS/full.pkl"
  run ft_fam_rsp --load "$LOGS/full.pkl" --rsp 0.8 --deadline $FT_S &
  run ft_fam_norsp --load "$LOGS/full.pkl" --deadline $FT_S &
  run ft_bswa_m0 --load "$LOGS/full.pkl" --attention bswa --mem 0 --deadline $FT_S &
  wait ) &
else  # longer rows at the same tokens per step: the FAM carries across 16-32 blocks of packed examples
L="--evlens 256,1024,4096,16384 --deadline $TRAIN_S"
run s1024_norsp --seq 1024 --batch 4 $L &
run s1024_hi480_norsp --seq 1024 --batch 4 --hi 480 $L &
run s1024_rsp1k --seq 1024 --batch 4 --rsp 0.8 --rsp_start 1000 $L &
run s1024_rsp0 --seq 1024 --batch 4 --rsp 0.8 $L &
run s256_rsp05 --rsp 0.5 $L &
run s512_norsp --seq 512 --batch 8 $L &
run s512_rsp1k --seq 512 --batch 8 --rsp 0.8 --rsp_start 1000 $L &
run s1024_bswa_m2 --seq 1024 --batch 4 --attention bswa --mem 2 $L &
fi
while [ -n "$(jobs -r)" ]; do summarize; sleep 15; done
summarize; cat "$SUMMARY"
