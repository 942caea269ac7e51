#!/usr/bin/env bash
# The medical workflow measured on a toy (issue 23): cases made from nibabel's sample MRI,
# trained on 2D slices, scored per volume, predicted back as volumes. From the repository root:
#
#     bash docs/results/nifti_example/measure.sh /tmp/niftiwork
#
# writes the cases (scripts/nifti_sample.py), trains, evaluates best.pt (evaluation.json and
# per_group.csv, one row per volume), scores
# per-slice Otsu on the same val volumes (otsu.json), predicts the val volumes and checks that
# each comes back on its input's grid, affine and orientation (predicted.txt); copies the run's
# files to run/ beside this script.
set -euo pipefail
work=${1:?usage: measure.sh WORK_DIR}
here=$(dirname "$0")
python scripts/nifti_sample.py "$work/data" --train 6 --val 2 --noise 0.1
# every training volume stays decoded in memory (6 cases; the default keeps 4)
data=(data=nifti data.root="$work/data" data.num_workers=0 data.dataset.volumes_in_memory=8
  bootstrap=0)
start=$(date +%s.%N)
# slices of 41x33 voxels: an encoder of 3 stages (stride 8), crops of nearly the whole slice
python train.py "${data[@]:0:4}" model=tiny/semantic model.encoder_depth=3 \
  "model.options.decoder_channels=[16,8,8]" trainer.precision=fp32 \
  trainer.max_iters=1500 trainer.val_every=500 trainer.log_every=100 \
  "data.train_transform.crop_size=[40,32]" hydra.run.dir="$work/run"
end=$(date +%s.%N)
echo "training wall time: $(python -c "print(f'{$end - $start:.1f} s')")" > "$here/wall_time.txt"
python evaluate.py checkpoint="$work/run/checkpoints/best.pt" "${data[@]:4}" \
  report_dir="$work/report" out="$here/evaluation.json"
python scripts/baseline.py method=otsu "${data[@]}" split=val report_dir="$work/otsu" \
  out="$here/otsu.json"
python predict.py checkpoint="$work/run/checkpoints/best.pt" input="$work/data/images/val" \
  output="$work/predicted"
python - "$work" > "$here/predicted.txt" <<'EOF'
import sys
from pathlib import Path

import nibabel as nib
import numpy as np

work = Path(sys.argv[1])
for image_path in sorted((work / "data/images/val").glob("*.nii.gz")):
    image, labels = nib.load(image_path), nib.load(work / "data/labels/val" / image_path.name)
    predicted = nib.load(work / "predicted/volumes" / image_path.name)
    truth, voxels = np.asanyarray(labels.dataobj) > 0, np.asanyarray(predicted.dataobj) > 0
    dice = 2 * (truth & voxels).sum() / (truth.sum() + voxels.sum())
    print(f"{image_path.name}: shape {predicted.shape} == {image.shape}: "
          f"{predicted.shape == image.shape}; affine equal: "
          f"{np.array_equal(predicted.affine, image.affine)}; orientation "
          f"{''.join(nib.aff2axcodes(predicted.affine))}; foreground Dice against the "
          f"label volume {dice:.4f}")
EOF
mkdir -p "$here/run"
cp "$work"/run/{metrics.jsonl,train.log,config.yaml} "$here/run/"
cp "$work/report/per_group.csv" "$here/"
cat "$here/predicted.txt"
