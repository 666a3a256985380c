"""python run_hyper.py --model=NAME --dataset=NAME --params_file=FILE [--num_samples=N] [--scheduler=asha|fifo]
[--ray_address=ADDRESS] [--cpus_per_trial=C] [--gpus_per_trial=G] [--output=DIR] [--config_files="a.yaml b.yaml"]
[--key=value ...]"""
import sys

from recbole_genrec.hyper import main

if __name__ == "__main__":
    sys.exit(main())
