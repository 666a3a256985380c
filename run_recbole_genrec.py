"""python run_recbole_genrec.py --model=NAME[,NAME...] --dataset=NAME [--recipe=cpu] [--config_files="a.yaml b.yaml"]
[--key=value ...] (--help for more)"""
import sys

from recbole_genrec.compare import main  # --model=A,B compares; one model: quick_start.main

if __name__ == "__main__":
    sys.exit(main())
