"""`ray job submit` entrypoint for the whole pipeline (the same function as `synreal run`).

  ray job submit --address http://HEAD:8265 --working-dir . -- python jobs/pipeline.py --config configs/X.yaml
  python jobs/pipeline.py --demo          # make the demo data first (as `synreal demo`)

Relative paths (the --config file, and the paths inside it) are read against the job's working
directory, which under `ray job submit` is Ray's unpacked copy of --working-dir on the head node:
keep datasets and outputs in s3:// or on storage every node mounts, as absolute paths. The config
layer makes every local path absolute before anything reaches Ray. Any other `synreal run` flag
(--set KEY=VALUE, --out, --inception-weights, --force) passes through.
"""

import sys

from synreal_ray.cli import main

if __name__ == "__main__":
    args = sys.argv[1:]
    sys.exit(main(["demo", *args[1:]] if args[:1] == ["--demo"] else ["run", *args]))
