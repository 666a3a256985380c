#!/bin/bash
# 3-seed runs of the TIGER family on ml-100k on the GPU machine (the `device` tool), side by side:
# MODELS="TIGER TokenWeightedTIGER" by default (any of TIGER TokenWeightedTIGER LETTER ETEGRec).
#   bash benchmarks/device_family.sh start [BUDGET_S]   # background (setsid) runs, each with train_time_budget
#   bash benchmarks/device_family.sh wait  [MAX_S]      # sleep until all results exist (or MAX_S), print progress
#   bash benchmarks/device_family.sh collect            # copy result JSONs and logs to $OUT, print summaries
# Needs .whl (recbole 1.2.1, colorlog, texttable, pandas 2.3.3, pytz, tzdata) and shared_ids/ carried
# (`python benchmarks/tiger_seeds.py export --dataset=ml-100k --seeds=2020,2021,2022 --out=shared_ids`).
source benchmarks/device_env.sh
W=/tmp/family; mkdir -p $W
MODELS=${MODELS:-"TIGER TokenWeightedTIGER"}
case "${1:-start}" in
start)
  for m in $MODELS; do
    setsid nohup env OMP_NUM_THREADS=2 python3 benchmarks/tiger_seeds.py run --model=$m --dataset=ml-100k \
      --seeds=2020,2021,2022 --ids=shared_ids --results=$W/results --logs=$W/logs --device=cuda \
      --show_progress=False --train_time_budget=${2:-1150} "${EXTRA}" > $W/$m.driver.log 2>&1 < /dev/null &
  done
  sleep 60; nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv; tail -3 $W/logs/*.log ;;
wait)
  end=$((SECONDS + ${2:-540}))
  want=$((3 * $(echo $MODELS | wc -w)))
  while [ $SECONDS -lt $end ] && [ "$(ls $W/results/*.json 2>/dev/null | wc -l)" -lt $want ]; do sleep 10; done
  for f in $W/logs/*.log; do echo "== $f"; grep -a 'evaluating' $f | tail -2; done
  ls $W/results ;;
collect)
  cp $W/results/*.json $OUT/ 2>/dev/null
  tar czf $OUT/logs.tgz -C $W logs
  for m in $MODELS; do python3 benchmarks/tiger_seeds.py summary $W/results/$m-*.json; done ;;
esac
