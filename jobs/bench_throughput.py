"""Job: the throughput benchmark (PEFT one-at-a-time vs the multi-slot trainer) on a GPU node.

Local:         python -m jobs.bench_throughput --config configs/bench/throughput-8b.yaml --out bench/results
On a cluster:  ray job submit --address http://HEAD:8265 --working-dir . --entrypoint-num-gpus 1 \\
                   --runtime-env-json '{"env_vars": {"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}}' -- \\
                   python -m jobs.bench_throughput --config configs/bench/throughput-8b.yaml --out /shared/bench
"""

import sys

from jobs._entry import run

if __name__ == "__main__":
    sys.exit(run(["bench", "throughput"], __doc__))
