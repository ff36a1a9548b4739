#!/bin/sh
# The checks of a session lent a GPU, as one prepared command on the device machine (python 3.12 with torch there,
# but not diffusers, mlxtend, POT or torchsde). Here, first: `make gpu-wheels` (downloads them into .whl/, git-ignored);
# then the device tool: run(command="sh benchmarks/gpu_check.sh PARTS", carry=[".whl"], timeout_s=600).
#
#   tests       pytest tests/test_cuda.py: every sampler, likelihood, training, precision, compile and the MNIST
#               benchmarks' --device cuda path against the CPU (a few minutes)
#   mnist       issue 20 on the GPU: scoresde's VP model against diffusers' twin at 4000 steps, training seeds 0
#               and 1, NFE 20, sample seeds 1 4 5 6 7, n = 500 (`benchmarks/weightings.py`; about 6 min)
#   mnist-embed the same for scoresde's VP model with the twin's time embedding and PyTorch's initialisation
#               (session 17's open question; about 3 min)
#   throughput  python -m benchmarks gpu: images/s of training and sampling against diffusers (about 5 min)
#   downstream  issues 20 and 23 (b) on the GPU: scoresde's 4000-step VP model of part mnist (training seed 0;
#               trained first where absent), then Tweedie / replacement / twisted-SMC inpainting of the lower half
#               of held-out digits 100-299 (`benchmarks/inpainting.py`) and the five alignment methods fine-tuning
#               it towards the digit 3 at 4x session 16's iterations and batch (`alignment --parts mnist`)
#
# The times are estimates: this script has not yet run on a GPU. Default: mnist; each part is meant to fit one call
# of at most 10 min (run "tests" in a second call). Results come back as $OUT/gpu_check.tgz (what this run wrote
# under benchmarks/results/, and the logs).
set -u
PARTS=${*:-mnist}
OUT=${OUT:-/tmp/gpu_check_out}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || { echo "could not install .whl/*.whl: make them here with 'make gpu-wheels' (python 3.12) and carry .whl"; exit 2; }
export PYTHONPATH=/tmp/site:src:. PYTHONUNBUFFERED=1
touch "$OUT/start"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
MNIST="--data mnist --steps 4000 --runs runs/weightings_mnist_4000_cuda --samplers dpm2m_sde --nfes 20 --seeds 1 4 5 6 7 --threads 8 --device cuda"
for part in $PARTS; do
    echo "=== $part ($(date -u +%T))"
    case $part in
        tests) timeout 540 python3 -m pytest -q -p no:cacheprovider tests/test_cuda.py 2>&1 | tee "$OUT/tests.log" ;;
        mnist) for seed in 0 1; do
                   timeout 270 python3 -m benchmarks weightings $MNIST --weightings sigma2 --twin --train-seed $seed \
                       --tag _cuda_train$seed 2>&1 | tee -a "$OUT/mnist.log"
               done ;;
        mnist-embed) for seed in 0 1; do
                   timeout 150 python3 -m benchmarks weightings $MNIST --weightings sigma2 --train-seed $seed \
                       --net-args '{"emb_dim": 32, "emb_freqs": [0.17783, 1000], "zero_init": false}' \
                       --tag _cuda_dembed_plain_train$seed 2>&1 | tee -a "$OUT/mnist.log"
               done ;;
        throughput) timeout 420 python3 -m benchmarks gpu 2>&1 | tee "$OUT/throughput.log" ;;
        downstream) RUN=runs/weightings_mnist_4000_cuda/VP_sigma2_cuda_train0
               [ -f $RUN/checkpoint.safetensors ] || timeout 150 python3 -m benchmarks weightings $MNIST \
                   --weightings sigma2 --train-seed 0 --tag _cuda_train0 2>&1 | tee -a "$OUT/mnist.log"
               timeout 150 python3 -m benchmarks inpainting --run $RUN --device cuda 2>&1 | tee "$OUT/inpainting.log"
               timeout 240 python3 -m benchmarks alignment --parts mnist --mnist-run $RUN --device cuda --mnist-betas 1 \
                   --mnist-iters 240 --mnist-batch 64 --mnist-steps 10 --mnist-eval 256 --tag _cuda 2>&1 \
                   | tee "$OUT/alignment_mnist.log" ;;
        *) echo "unknown part $part (tests, mnist, mnist-embed, throughput, downstream)"; exit 2 ;;
    esac
done
find benchmarks/results -type f -newer "$OUT/start" | tar czf "$OUT/gpu_check.tgz" -T - "$OUT"/*.log
echo "=== done ($(date -u +%T)); $OUT/gpu_check.tgz"
