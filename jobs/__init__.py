"""Entry points for `ray job submit`: each module runs one mta_ray command on the cluster it is submitted to.

    ray job submit --working-dir . -- python -m jobs.<name> --config CONFIG --out DIR [key=value ...]
"""
