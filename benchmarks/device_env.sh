# Sourced by the GPU-machine scripts (benchmarks/device_run.sh, benchmarks/device_family.sh): installs the
# carried wheels (.whl: recbole 1.2.1, colorlog, texttable, pandas 2.3.3, pytz, tzdata) into /tmp/site once per
# machine and sets the environment every Python command there needs.
OUT=${OUT:-/tmp/out}; mkdir -p $OUT
if [ ! -f /tmp/site/sitecustomize.py ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  # numpy 2 dropped np.float/np.long, which RecBole 1.2.1's metrics still use
  cat > /tmp/site/sitecustomize.py <<'PY'
import numpy as np
for k, v in {"float": float, "int": int, "bool": bool, "long": int, "object": object}.items():
    if k not in np.__dict__:
        setattr(np, k, v)
PY
fi
export PYTHONPATH=/tmp/site:$PWD HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
