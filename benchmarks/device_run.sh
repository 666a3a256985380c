#!/bin/bash
# bash benchmarks/device_run.sh [seeds|analysis|all]. One GPU-machine session (the `device` tool): 3-seed TIGER on ml-100k (CUDA), beam analysis and GPU beam
# speed on the seed-2020 checkpoint, and the CPU benchmarks pinned to 2 cores (taskset) in parallel.
# Needs: .whl (recbole 1.2.1, colorlog, texttable, pandas 2.3.3, pytz, tzdata) and shared_ids/ carried.
source benchmarks/device_env.sh
EPOCHS=${EPOCHS:-50}
STAGE=${1:-all}
if [ "$STAGE" != analysis ]; then
[ -z "$SKIP_CPU" ] && ( taskset -c 0,1 env OMP_NUM_THREADS=2 python3 benchmarks/bench_beam_search.py --ids=shared_ids --reference_users=32 \
    --json=$OUT/beam_cpu.json
  taskset -c 0,1 env OMP_NUM_THREADS=2 python3 benchmarks/bench_tiger_training.py --ids=shared_ids --steps=10 \
    --sasrec --loader --json=$OUT/train_cpu.json ) > /tmp/cpu_bench.log 2>&1 &
taskset -c 2-15 env OMP_NUM_THREADS=4 timeout ${SEED_TIMEOUT:-500} python3 benchmarks/tiger_seeds.py run \
    --dataset=ml-100k --seeds=2020,2021,2022 --ids=shared_ids --results=/tmp/seeds --logs=/tmp/seedlogs \
    --device=cuda --epochs=$EPOCHS --show_progress=False 2>&1 | tail -40
for f in /tmp/seedlogs/*.log; do grep -a 'evaluating\|test result' $f | tail -4; done
cp /tmp/seeds/*.json $OUT/ 2>/dev/null
wait
grep -v Warning /tmp/cpu_bench.log | tail -30
fi
[ "$STAGE" = seeds ] && exit 0
CK=$(python3 -c "import json;print(json.load(open('/tmp/seeds/TIGER-ml-100k-seed2020.json'))['checkpoint'])" || ls -t saved/TIGER-*.pth | head -1)
echo "checkpoint: $CK"
taskset -c 2-15 python3 -c "
import sys; sys.path.insert(0, '.')
from benchmarks.tiger_seeds import exported_loader
from recbole_genrec.model import tiger
tiger.load_semantic_ids = exported_loader('shared_ids')
from recbole_genrec.beam_analysis import main
main(['--checkpoint=$CK', '--beam_sizes=10,20,50,100', '--device=cuda', '--json=$OUT/beam_analysis.json'])"
taskset -c 2-15 python3 benchmarks/bench_beam_search.py --ids=shared_ids --checkpoint=$CK --device=cuda \
    --reference_users=32 --json=$OUT/beam_gpu.json 2>&1 | grep -v "^ \|^{\|^}"
