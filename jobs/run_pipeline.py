"""Job: the whole MTA pipeline (prepare, embed, cluster, bank, personalize, evaluate).

Local (embedded Ray):  python -m jobs.run_pipeline --config configs/demo.yaml --out runs/demo
On a cluster:          ray job submit --address http://HEAD:8265 --working-dir . \\
                           --runtime-env-json '{"env_vars": {"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}}' -- \\
                           python -m jobs.run_pipeline --config configs/lamp/lamp2.yaml --out /shared/runs/lamp2 \\
                           data.format=processed data.path=/shared/data/lamp2.json
"""

import sys

from jobs._entry import run

if __name__ == "__main__":
    sys.exit(run(["run"], __doc__))
