#!/usr/bin/env bash
# Create the Cloud Build trigger that runs cloudbuild.yaml on every push to main (the GitHub
# repository must be connected to Cloud Build once, in the console). --dry-run prints the command.
#
#   deploy/gcp/build-trigger.sh --project my-project --repo-owner me --repo-name emotion-classifier
set -euo pipefail
cd "$(dirname "$0")/../.."
PROJECT=${PROJECT:-}
REPO_OWNER=${REPO_OWNER:-}
REPO_NAME=${REPO_NAME:-}
REGION=${REGION:-europe-west4}
DRY_RUN=""
while [ $# -gt 0 ]; do
  case "$1" in
    --project) PROJECT=$2; shift 2 ;;
    --repo-owner) REPO_OWNER=$2; shift 2 ;;
    --repo-name) REPO_NAME=$2; shift 2 ;;
    --region) REGION=$2; shift 2 ;;
    --dry-run) DRY_RUN=1; shift ;;
    *) echo "unknown option $1" >&2; exit 2 ;;
  esac
done
[ -n "$PROJECT" ] && [ -n "$REPO_OWNER" ] && [ -n "$REPO_NAME" ] \
  || { echo "build-trigger.sh: set --project, --repo-owner and --repo-name" >&2; exit 1; }
command=(gcloud --project "$PROJECT" builds triggers create github --name emotion-serve-main
  --repo-owner "$REPO_OWNER" --repo-name "$REPO_NAME" --branch-pattern '^main$'
  --build-config cloudbuild.yaml --substitutions "_REGION=${REGION}")
if [ -n "$DRY_RUN" ]; then printf '%q ' "${command[@]}" | sed 's/ $//'; echo; else "${command[@]}"; fi
