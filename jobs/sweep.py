"""`ray job submit` entrypoint for a sweep (the same function as `synreal tune`).

  ray job submit --address http://HEAD:8265 --working-dir . -- python jobs/sweep.py --config configs/sweep.yaml

Submitting it again after an interruption resumes the sweep (Tuner.restore) from its storage.
Relative paths are read against the job's working directory (Ray's unpacked copy of
--working-dir on the head node) and made absolute by the config layer before the trials start;
keep the sweep's data and `out` in s3:// or on storage every node mounts. `synreal tune` flags
(--set KEY=VALUE, --out, --inception-weights) pass through.
"""

import sys

from synreal_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["tune", *sys.argv[1:]]))
