#!/usr/bin/env bash
# The dense results of docs/results.md ("1,000-scene validation split, dev selection, time budget") from nothing:
# both backbones' two Fashion-MNIST stages, the mosaic, Mask R-CNN and Semantic FPN for RapidNet-Ti (seeds 0 and 1)
# and MobileNetV2 x1.4, then each run's val report with bootstrap intervals. Every step skips what is already done,
# so the script resumes after an interruption (a half-finished training resumes from its last.pt).
#   bash benchmarks/mosaic_results.sh [STAGE ...]     stages: pretrain data ti mnv2 seed1 (default: all, in order)
# The dense runs are sized to 30 minutes each by their configs (train.time_budget) and must each have the machine
# to themselves; the pretraining stages do not, and run both backbones side by side on one core each.
set -euo pipefail
rn=.venv/bin/rapidnet
stages=${*:-pretrain data ti mnv2 seed1}

run() {  # run COMMAND CONFIG OUT [OPTIONS]: start, resume a stopped run, or skip a dense run that has reported
    local command=$1 config=$2 out=$3
    shift 3
    if grep -qs '"report"' "$out/log.jsonl"; then return; fi
    if [[ -f "$out/last.pt" ]]; then
        "$rn" $command --resume "$out/last.pt" --config "$config" --output "$out" "$@"
    else
        "$rn" $command --config "$config" --output "$out" "$@"
    fi
}

for stage in $stages; do
    case $stage in
    pretrain)
        for stage_config in "" _zoom; do  # a resumed finished classifier run just ends again
            OMP_NUM_THREADS=1 run train "configs/fashion_mnist_rapidnet_ti${stage_config}.yaml" \
                "runs/fashion_mnist_rapidnet_ti${stage_config}" &
            mnv2_config=${stage_config:-_demo}
            OMP_NUM_THREADS=1 run train "configs/fashion_mnist_mobilenetv2_140${mnv2_config}.yaml" \
                "runs/fashion_mnist_mobilenetv2_140${mnv2_config}" &
            wait
        done
        ;;
    data)
        [[ -f data/mosaic/meta.json ]] || "$rn" data mosaic --out data/mosaic
        ;;
    ti | mnv2 | seed1)
        model=rapidnet_ti seed=0 suffix=""
        [[ $stage == mnv2 ]] && model=mobilenetv2_140
        [[ $stage == seed1 ]] && seed=1 suffix=_seed1
        for task in semantic_fpn mask_rcnn; do
            command=seg
            [[ $task == mask_rcnn ]] && command=det
            run "$command train" "configs/mosaic_${task}_${model}.yaml" "runs/mosaic_${task}_${model}${suffix}" \
                --seed "$seed"
        done
        ;;
    *)
        echo "unknown stage $stage: use pretrain, data, ti, mnv2 or seed1" >&2
        exit 2
        ;;
    esac
done
