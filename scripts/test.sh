#!/usr/bin/env bash
# The test command (README, CI): sets up what is missing, runs the unit tests (including those on
# the real embedded model; two pytest-xdist workers: many tests wait on real processes and
# servers), then five gates of the eval suite on the real model. Pipeline artifacts are cached
# under runs/: a second run reuses them.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export PATH="$PWD/.venv/bin:$PATH"
distiller models pull smollm2-135m-instruct
pytest tests -q -n 2 "$@"
# The structure gate on the real model: the distilled student meets the spec's format-rate
# threshold (eval.thresholds.format_rate), and no model's format compliance (overall and per
# section) drops significantly against the committed reports/baseline.json. The teacher row is
# left to the main job to keep CI short.
pytest evals -m structure -q --distiller-models=vanilla,distilled
# The compression gate: structured_cot's distilled student (built just above, reused from
# runs/) is the teacher of a 12-layer cut trained by logit KD; the cut keeps at least 0.9 of the
# teacher's format rate on each held-out set (eval.thresholds.retention_format_rate), its
# agreement with the teacher stays within the spec's top-1 / KL thresholds, and neither model
# regresses against the baseline.
pytest evals -m "structure or agreement" -q --distiller-spec fixtures/tasks/structured_cot_small.yaml \
  --distiller-models=teacher,distilled
# The extraction gate: incident_extraction's student (SFT on gold JSON objects), decoded under the
# task's JSON Schema, validates on every test ticket (eval.thresholds.schema_valid: 1.0), reaches
# the spec's field F1, and regresses on no task metric against the baseline.
pytest evals -m quality -q --distiller-spec fixtures/tasks/incident_extraction.yaml \
  --distiller-models=distilled
# The classification gate: credit_risk_quick's student (full fine-tune on the gold labels; the
# credit_risk spec with half its training prompts, chosen on dev) ranks the labels of the balanced
# test split to the spec's accuracy, at least eval.thresholds.accuracy_lift above the vanilla
# model on the same prompts (paired interval above 0), with no regression against the baseline.
pytest evals -m quality -q --distiller-spec fixtures/tasks/credit_risk_quick.yaml \
  --distiller-models=vanilla,distilled
# The extractive-QA gate: extractive_qa_gold's student (LoRA SFT on the gold spans; the
# extractive_qa spec without its 135M teacher pass) answers the test questions with spans of the
# passage (format_rate) to the spec's SQuAD exact match and token F1, with no regression.
pytest evals -m "structure or quality" -q --distiller-spec fixtures/tasks/extractive_qa_gold.yaml \
  --distiller-models=distilled
