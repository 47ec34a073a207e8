#!/usr/bin/env bash
# Submit a training run to a running Ray cluster as a Ray job.
#
#   deploy/ray/submit.sh                                          # configs/qwen2.5-0.5b-gsm8k.yaml
#   deploy/ray/submit.sh configs/qwen2.5-1.5b-math.yaml trainer.steps=200
#   RAY_ADDRESS=http://head:8265 RAY_AUTH_TOKEN=<token> deploy/ray/submit.sh configs/debug.yaml \
#       output_dir=/shared/out
#
# The first argument is the config, the rest are dotlist overrides passed to system.train.
# RAY_ADDRESS is the dashboard (job server) address of the cluster, default the local one.
# Token authentication: the cluster's token comes from RAY_AUTH_TOKEN, the file RAY_AUTH_TOKEN_PATH
# or ~/.ray/auth_token (`ray get-auth-token` on the head prints it); RAY_AUTH_MODE=disabled only for
# a cluster started without authentication.
# Follow the job with `ray job logs -f <submission id>`; stop it with `ray job stop <id>`.
set -euo pipefail
cd "$(dirname "$0")/../.."  # repository root: the working dir that gets uploaded

# Ray's CLI sends the token only in token mode; without it the cluster answers 401 Unauthorized.
export RAY_AUTH_MODE="${RAY_AUTH_MODE:-token}"
if [[ "$RAY_AUTH_MODE" == token && -z "${RAY_AUTH_TOKEN:-}" && -z "${RAY_AUTH_TOKEN_PATH:-}" \
      && ! -s "$HOME/.ray/auth_token" ]]; then
  echo "submit.sh: no Ray auth token: set RAY_AUTH_TOKEN (the head's \`ray get-auth-token\`)," \
       "RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token; RAY_AUTH_MODE=disabled for a cluster without auth" >&2
  exit 2
fi

ray job submit --address "${RAY_ADDRESS:-http://127.0.0.1:8265}" \
  --working-dir . --runtime-env deploy/ray/runtime_env.yaml \
  -- python -m system.train --config "${1:-configs/qwen2.5-0.5b-gsm8k.yaml}" "${@:2}"
