#!/usr/bin/env bash
# Submit a training run to a running Ray cluster as a Ray job.
#
#   deploy/ray/submit.sh                                          # configs/qwen2.5-0.5b-gsm8k.yaml
#   deploy/ray/submit.sh configs/qwen2.5-1.5b-math.yaml trainer.steps=200
#   RAY_ADDRESS=http://head:8265 deploy/ray/submit.sh configs/debug.yaml output_dir=/tmp/out
#
# The first argument is the config, the rest are dotlist overrides passed to system.train.
# RAY_ADDRESS is the dashboard (job server) address of the cluster, default the local one.
# Follow the job with `ray job logs -f <submission id>`; stop it with `ray job stop <id>`.
set -euo pipefail
cd "$(dirname "$0")/../.."  # repository root: the working dir that gets uploaded

ray job submit --address "${RAY_ADDRESS:-http://127.0.0.1:8265}" \
  --working-dir . --runtime-env deploy/ray/runtime_env.yaml \
  -- python -m system.train --config "${1:-configs/qwen2.5-0.5b-gsm8k.yaml}" "${@:2}"
