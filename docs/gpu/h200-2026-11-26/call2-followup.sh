set -u
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .gpu_wheels/*.whl
export PYTHONPATH=src:/tmp/site PYTHONUNBUFFERED=1
L=$OUT/followup.log
s() { echo "===== $* " | tee -a $L; t0=$(date +%s); timeout -k 3 "$@" >>$L 2>$L.err.tmp; rc=$?; tail -3 $L.err.tmp >> $L; echo "rc=$rc $(( $(date +%s)-t0 )) s" | tee -a $L; }
s 30 python3 scripts/gpu_check.py agreement --device cuda --images 32 --iwae-samples 20
s 60 python3 -m gpvae train --out /tmp/g --model gpvae --epochs 1 --latent-dim 50 --limit-train 1000 --limit-test 500 --device cuda --no-progress
s 30 python3 -m gpvae evaluate /tmp/g --iwae-samples 100 --limit-test 500 --device cuda --json --no-progress
s 30 python3 -m gpvae evaluate /tmp/g --iwae-samples 100 --limit-test 500 --device cuda --json --no-progress --gp-quadratic blocked
s 50 python3 -m gpvae bench-train --latent-dim 50 --models vae,gpvae --precision bf16 --compile on --fused-trunks on --gp-quadratic both --device cuda --steps 10 --repeats 5 --json
s 45 python3 -m gpvae bench-iwae --model vae --images 5000 --compile both --device cuda --json
rm -f $L.err.tmp
