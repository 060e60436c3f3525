#!/usr/bin/env bash
# The paper's comparison at CPU scale: TTT-Linear, TTT-MLP, Llama and Mamba2 of about the same parameter count,
# trained by ttt-train on the same tokens of the embedded corpus (the CPython standard library's .py files) with one
# shared tokenizer, then compared by ttt-eval. Its results and what they show: eval/README.md, "The paper's
# comparison at CPU scale"; the files it wrote then: eval/reproduction/.
#
#   bash eval/reproduce_small.sh [OUT_DIR]        # default out/reproduce; STEPS=160 by default (4 x 1024 tokens each)
# On the project's 2-core CPU (AVX-512), fp32, run alone: 35 minutes in all (2026-12-07): training TTT-Linear 6 min,
# TTT-MLP 11, Llama 5, Mamba2 11 (TTT-MLP peaks at ~4.6 GiB); the evaluations ~3 minutes.
set -euo pipefail
OUT=${1:-out/reproduce}
STEPS=${STEPS:-160}
SEQ=${SEQ:-1024}
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
mkdir -p "$OUT"
common=(--config 5m-linear --seq-len "$SEQ" --batch-size 4 --max-steps "$STEPS" --eval-every "$STEPS"
        --eval-tokens 65536 --save-every "$STEPS" --seed 0)

timed() { local name=$1; shift; local t0=$SECONDS; "$@"; echo "$name: $((SECONDS - t0)) s" | tee -a "$OUT/times.txt"; }

timed train-ttt-linear ttt-train "${common[@]}" --output-dir "$OUT/ttt-linear" --overwrite
tok="$OUT/ttt-linear"   # every model reads the same tokens
timed train-ttt-mlp ttt-train "${common[@]}" --set ttt_layer_type=mlp --tokenizer "$tok" --output-dir "$OUT/ttt-mlp" --overwrite
timed train-llama ttt-train "${common[@]}" --arch llama --tokenizer "$tok" --output-dir "$OUT/llama" --overwrite
timed train-mamba2 ttt-train "${common[@]}" --arch mamba2 --tokenizer "$tok" --output-dir "$OUT/mamba2" --overwrite

models=(--model "$OUT/ttt-linear" --label TTT-Linear --model "$OUT/ttt-mlp" --label TTT-MLP
        --model "$OUT/llama" --label Llama --model "$OUT/mamba2" --label Mamba2)
timed position-loss ttt-eval position-loss "${models[@]}" --min-tokens $((4 * SEQ)) --max-tokens-per-document $((4 * SEQ)) \
    --max-documents 64 --output "$OUT/position_loss.csv"
for m in ttt-linear ttt-mlp llama mamba2; do
    timed "passkey-$m" ttt-eval passkey --model "$OUT/$m" --lengths 256,1024,2048,4096 --depths 0,0.5,1 --trials 3 \
        --output "$OUT/passkey-$m.json"
done
timed speed ttt-eval speed "${models[@]}" --lengths 256,1024,4096 --output "$OUT/speed.json"
timed state ttt-eval state --model "$OUT/ttt-linear" --tokens $((8 * SEQ)) --output "$OUT/state.json"
