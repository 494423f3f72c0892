"""`ray job submit` entrypoint for the whole pipeline (the same function as `synreal run`).

  ray job submit --address http://HEAD:8265 --working-dir . -- python jobs/pipeline.py --config configs/X.yaml
  python jobs/pipeline.py --demo          # make the demo data first (as `synreal demo`)
"""

import sys

from synreal_ray.cli import main

if __name__ == "__main__":
    args = sys.argv[1:]
    sys.exit(main(["demo", *args[1:]] if args[:1] == ["--demo"] else ["run", *args]))
