#!/usr/bin/env bash
# The README's test command (`make test`) runs this: module and notebooks in sync, notebooks clean,
# the notebooks' inline tests (nbdev-test), the quick profile through the verdict guard, then pytest
# (whose summary line CI reads).
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=.venv/bin
snapshot() { find "$@" -type f \( -name '*.py' -o -name '*.ipynb' \) -print0 | sort -z | xargs -0 sha1sum; }

before=$(snapshot rapo_nb)
"$BIN/nbdev-export"
after=$(snapshot rapo_nb)
if [ "$before" != "$after" ]; then
  echo "FAIL: nbdev-export changed rapo_nb/: the notebooks and the module disagree. Commit the export." >&2
  diff <(echo "$before") <(echo "$after") >&2 || true
  exit 1
fi
echo "ok: rapo_nb/ is in sync with nbs/"

before=$(snapshot nbs)
"$BIN/nbdev-clean"
after=$(snapshot nbs)
if [ "$before" != "$after" ]; then
  echo "FAIL: nbdev-clean changed notebooks under nbs/: run nbdev-clean and commit." >&2
  diff <(echo "$before") <(echo "$after") >&2 || true
  exit 1
fi
echo "ok: notebooks are clean"

"$BIN/rapo-readme" --check

# notebooks write figures/results to a scratch folder during tests, never over the committed figures/
scratch=$(mktemp -d); trap 'rm -rf "$scratch"' EXIT
export MPLBACKEND=Agg
# two nbdev-test workers on two cores: one torch/BLAS thread each, or small tensor ops slow down 10x
OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 RAPO_FIGURES_DIR="$scratch/figures" RAPO_RESULTS_DIR="$scratch/results" "$BIN/nbdev-test" --n-workers 2 --timing
# the quick profile end to end (stale notebooks only, into runs/quick/, never figures/), and the results guard:
# a change that moves a claim's verdict away from tests/data/verdicts_quick.json fails here, listing the claim.
# If the move is intended: .venv/bin/rapo-reproduce --profile quick --write-verdicts, and commit the snapshot.
env -u RAPO_FIGURES_DIR -u RAPO_RESULTS_DIR "$BIN/rapo-reproduce" --profile quick --timeout 900 --check-verdicts
"$BIN/python" -m pytest tests/ -ra -q -p no:cacheprovider "$@"
