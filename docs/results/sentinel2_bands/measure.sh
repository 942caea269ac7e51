#!/usr/bin/env bash
# Sentinel-2 land cover: all 13 bands against the 3 RGB bands (4, 3, 2) of the same files, on
# one spatial split, five seeds each (issue 22). From the repository root:
#
#     bash docs/results/sentinel2_bands/measure.sh /tmp/s2work
#
# writes the data tree (scripts/sentinel2_split.py) and one run per band set and seed under the
# work folder, copies each run's metrics.jsonl, train.log and config.yaml to runs/ beside this
# script, then writes summary.json there. data.mean/std: scripts/check_data.py on
# the train split (13 bands; the RGB runs take bands 4, 3, 2 of the same figures).
set -euo pipefail
work=${1:?usage: measure.sh WORK_DIR}
here=$(dirname "$0")
python scripts/sentinel2_split.py "${SHARED_DATA:-../shared/data}/sentinel2_eolearn" "$work/data"
common=(
  data=folder data.root="$work/data" data.num_classes=11 data.ignore_index=0
  "data.class_names=[nodata,cultivated,forest,grassland,shrubland,water,wetlands,tundra,artificial,bareland,snow]"
  "data.palette=[[0,0,0],[255,255,0],[0,100,0],[124,252,0],[160,82,45],[0,0,255],[0,200,200],[200,200,200],[255,0,0],[180,180,140],[255,255,255]]"
  data.scale=10000 data.num_workers=0 data.batch_size=8
  model=tiny/semantic trainer.precision=fp32 trainer.max_iters=300 trainer.val_every=50
  trainer.log_every=50 "data.train_transform.crop_size=[48,48]"
  "data.train_transform.scale_range=[1.0,1.5]"
)
bands13=(
  "data.mean=[0.1087,0.07825,0.06486,0.0408,0.06872,0.1825,0.2301,0.2229,0.2553,0.07465,0.001012,0.1121,0.0501]"
  "data.std=[0.005187,0.006642,0.01047,0.01128,0.01921,0.04162,0.0501,0.05447,0.05615,0.01639,0.000166,0.04333,0.02306]"
  "data.rgb_bands=[4,3,2]"
)
bands3=(
  "data.bands=[4,3,2]" "data.mean=[0.0408,0.06486,0.07825]" "data.std=[0.01128,0.01047,0.006642]"
  "data.rgb_bands=[1,2,3]"
)
for seed in 0 1 2 3 4; do
  python train.py "${common[@]}" "${bands13[@]}" seed=$seed hydra.run.dir="$work/runs/bands13_seed$seed"
  python train.py "${common[@]}" "${bands3[@]}" seed=$seed hydra.run.dir="$work/runs/rgb_seed$seed"
done
for run in "$work"/runs/*; do
  mkdir -p "$here/runs/${run##*/}"
  cp "$run"/{metrics.jsonl,train.log,config.yaml} "$here/runs/${run##*/}/"
done
python "$here/summarize.py" "$work/runs" > "$here/summary.json"
cat "$here/summary.json"
