"""Job: personalise every user not yet in the store (merge-then-adapt), resumable.

Local (embedded Ray):  python -m jobs.personalize --config configs/demo.yaml --out runs/demo
On a cluster:          ray job submit --address http://HEAD:8265 --working-dir . \\
                           --runtime-env-json '{"env_vars": {"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}}' -- \\
                           python -m jobs.personalize --config configs/lamp/lamp2.yaml --out /shared/runs/lamp2
"""

import sys

from jobs._entry import run

if __name__ == "__main__":
    sys.exit(run(["personalize"], __doc__))
