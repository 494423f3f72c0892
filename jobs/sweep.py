"""`ray job submit` entrypoint for a sweep (the same function as `synreal tune`).

  ray job submit --address http://HEAD:8265 --working-dir . -- python jobs/sweep.py --config configs/sweep.yaml

Submitting it again after an interruption resumes the sweep (Tuner.restore) from its storage.
"""

import sys

from synreal_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["tune", *sys.argv[1:]]))
