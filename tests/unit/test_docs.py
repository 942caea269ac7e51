"""The docs cannot drift: every config key has a comment and appears in the generated reference;
every figure the pages quote from a published run equals what its docs/results/ file gives;
no page quotes a test count or a suite time. (.ci/run builds the site itself, warnings as errors.)
"""

import json
import re
import statistics
from pathlib import Path

import pytest

from tests.conftest import load_script

REPO = Path(__file__).resolve().parents[2]
RESULTS = REPO / "docs" / "results"
config_reference = load_script("config_reference")


# The configuration reference


def test_every_config_key_has_a_comment():
    missing = config_reference.missing_comments()
    assert not missing, "config keys without a '# comment' beside them:\n" + "\n".join(missing)


def sections(page: str) -> dict[str, str]:
    """The reference page's text under each file's heading (``train.yaml``, ``data=folder``)."""
    parts = re.split(r"^#{3,4} (\S+)$", page, flags=re.MULTILINE)
    return dict(zip(parts[1::2], parts[2::2], strict=True))


def test_every_config_key_appears_in_the_reference_under_its_file():
    by_heading = sections(config_reference.reference())
    configs = config_reference.CONFIGS
    for path in config_reference.config_files():
        config = config_reference.read_config(path)
        relative = path.relative_to(configs)
        heading = (
            relative.name
            if len(relative.parts) == 1
            else f"{relative.parts[0]}={relative.relative_to(relative.parts[0]).with_suffix('').as_posix()}"
        )
        text = by_heading[heading]
        for key in config.keys:
            if key.path != ("defaults",):
                assert f"| `{config_reference.dotted(config, key)}` |" in text, (path, key.path)
        for entry, _, _ in config.defaults:
            assert f"| `{entry}` |" in text, (path, entry)


def test_keys_are_named_as_the_command_line_names_them():
    page = config_reference.reference()
    for key in ("trainer.max_iters", "data.dataset.mask_format", "tracker.mlflow.experiment",
                "model.options.decoder_channels", "hydra.sweeper.n_trials", "checkpoint"):  # fmt: skip
        assert f"| `{key}` |" in page, key


@pytest.mark.parametrize(
    "text",
    [
        "a: |\n  block scalar\n",  # a block scalar
        "a: plain scalar\n  continued on a second line\n",  # a multi-line plain scalar
        "a: &anchor 1\nb: *anchor\n",  # an alias means nothing read alone
        "a:\n  - item\n  b: 1\n",  # not YAML at all
        "a: [1, 2\n",  # a bracket never closed
        "a:\n  b: 1\n   c: 2\n",  # not YAML either
        "a: 1\na: 2\n",  # a key given twice: YAML keeps the last, the page would list both
    ],
)
def test_a_config_line_the_reader_cannot_place_fails_loudly(tmp_path, text):
    path = tmp_path / "odd.yaml"
    path.write_text(text)
    with pytest.raises(config_reference.ConfigParseError, match=r"odd\.yaml:\d+: "):
        config_reference.read_config(path)


def test_comments_beside_and_above_a_key_and_flow_values_over_several_lines(tmp_path):
    path = tmp_path / "ok.yaml"
    path.write_text(
        "# the file's description\n"
        "names: [a, b,  # first line\n"
        "  c]\n"
        "# a comment above\n"
        "# on two lines\n"
        "rate: 1.0\n"
        "block:              # a mapping\n"
        "  url: 'x # not a comment'  # the comment\n"
        "  list:             # a block list\n"
        "    - [1, 2]\n"
        "    - [3, 4]\n"
    )
    config = config_reference.read_config(path)
    keys = {".".join(key.path): key for key in config.keys}
    assert config.description == "the file's description"
    assert keys["names"].comment == "first line" and keys["names"].value == "[a, b, c]"
    assert keys["rate"].comment == "a comment above on two lines"
    assert keys["block.url"].value == "'x # not a comment'"
    assert keys["block.list"].items == ["[1, 2]", "[3, 4]"]


# Figures quoted from published runs. Each entry: the page, the text it quotes, and that text
# rebuilt from the run's files under docs/results/. A page that quotes a figure not listed here
# fails test_every_figure_of_a_results_page_is_checked.


def jsonl(name: str) -> list[dict]:
    return [json.loads(line) for line in (RESULTS / name).read_text().splitlines()]


def read_json(name: str) -> dict:
    return json.loads((RESULTS / name).read_text())


def time_line(run: str) -> list[float]:
    """(training steps, validation, checkpoints) seconds of train.log's closing "Time:" line."""
    line = re.search(r"Time: ([\d.]+) s training steps, ([\d.]+) s validation, ([\d.]+) s "
                     r"checkpoints", (RESULTS / run / "train.log").read_text())  # fmt: skip
    return [float(value) for value in line.groups()]


def wall_seconds(run: str) -> float:
    """The wall time the run's README states (``wall time: 5 min 13.6 s``)."""
    minutes, seconds = re.search(
        r"wall time: (\d+) min ([\d.]+) s", (RESULTS / run / "README.md").read_text()
    ).groups()
    return int(minutes) * 60 + float(seconds)


def logged_img_s(run: str) -> list[float]:
    return [
        float(v) for v in re.findall(r"([\d.]+) img/s", (RESULTS / run / "train.log").read_text())
    ]


def two(values, spec: str, unit: str = "", prefix: str = "") -> str:
    """Run 1 / run 2, as the pages write them: ``2.84 / 2.63 img/s``, ``x15.3 / x14.8``."""
    return " / ".join(f"{prefix}{format(v, spec)}" for v in values) + unit


def mins(seconds: float) -> str:
    return f"{int(seconds // 60)} min {round(seconds % 60)} s"


def percent(values, spec: str = "+.1f") -> list[str]:
    return [f"{format(v * 100, spec)}%" for v in values]


def figures() -> list[tuple[str, str, str]]:
    """(page, quoted text, the same text rebuilt from the results files)."""
    default = jsonl("default_run/metrics.jsonl")
    final = default[-1]
    steps, validation, checkpoints = time_line("default_run")
    wall = wall_seconds("default_run")
    per_class = ", ".join(f"{name} {iou * 100:.1f}" for name, iou in final["IoU"].items())
    # data.batch_size 16 images per iteration (docs/results/default_run/config.yaml)
    images = final["iteration"] * 16 / steps
    camvid = read_json("camvid_unet/evaluation.json")
    camvid_val = {row["iteration"]: row["mIoU"] for row in jsonl("camvid_unet/metrics.jsonl")}
    camvid_steps, camvid_validation, camvid_checkpoints = time_line("camvid_unet")
    models = [read_json(f"benchmark_cpu/models_run{n}.json") for n in (1, 2)]
    data = [read_json(f"benchmark_cpu/data_run{n}.json")["data"] for n in (1, 2)]
    unet = [read_json(f"benchmark_cpu/unet_run{n}.json")["train"]["unet"] for n in (1, 2)]

    def train(model: str, key: str) -> list[float]:
        return [run["train"][model][key] for run in models]

    def row(model: str, label: str, units: bool) -> str:
        img_s, gflops = (" img/s", " GFLOP/s") if units else ("", "")
        ceiling = [
            t / run["ceilings"]["bf16_gemm_gflops"]
            for t, run in zip(train(model, "achieved_gflops"), models, strict=True)
        ]
        evaluation = [run["eval"][model]["img_s"] for run in models]
        return (
            f"| `{model}` ({label}, {train(model, 'flops_per_image')[0] / 1e9:.0f} GFLOP/img) "
            f"| {two(train(model, 'seg_img_s'), '.2f', img_s)} "
            f"| {two(train(model, 'plain_fp32_img_s'), '.2f', img_s)} "
            f"| **{' / '.join(f'{v:.2f}x' for v in train(model, 'speedup_vs_plain_fp32'))}** "
            f"| {two(train(model, 'plain_same_settings_img_s'), '.2f', img_s)} "
            f"| {' / '.join(percent(train(model, 'trainer_overhead')))} "
            f"| {two(train(model, 'achieved_gflops'), '.0f', gflops)} "
            f"({' / '.join(percent(ceiling, '.0f'))}) "
            f"| {two(evaluation, '.1f', img_s)} |"
        )

    def gib(key: str) -> str:
        return (
            ", ".join(
                two([v / 1024 for v in train(model, key)], ".1f")
                for model in ("unet", "deeplabv3plus")
            )
            + f" and {two([v / 1024 for v in train('fcn', key)], '.1f')} GiB"
        )

    def compile_ratio(model: str) -> str:
        ratios = [run["train"][model]["compile"]["img_s"] / run["train"][model]["seg_img_s"]
                  for run in models]  # fmt: skip
        return " / ".join(f"{r:.2f}x" for r in ratios)

    def per_core(key: str) -> list[float]:
        return [run["pipeline_img_s_per_core"][key] for run in data]

    def bound(model: str, key: str) -> str:
        return two(train(model, key), ".2f")

    ceilings = [
        [run["ceilings"][k] for run in models] for k in ("fp32_gemm_gflops", "bf16_gemm_gflops")
    ]
    compile_s = [[run["train"][m]["compile"]["compile_seconds"] for m in ("unet", "deeplabv3plus", "fcn")]
                 for run in models]  # fmt: skip
    plain_unet = train("unet", "plain_fp32_img_s")[0] * train("unet", "flops_per_image")[0] / 1e9
    decode = [data[0]["decode_ms_per_core"][k] for k in ("image", "mask")]
    after = [run["after_decode_ms_per_core"] for run in data]
    gemm_ratio = [b / f for f, b in zip(*ceilings, strict=True)]
    dlv3_ceiling = [t / run["ceilings"]["bf16_gemm_gflops"] for t, run in
                    zip(train("deeplabv3plus", "achieved_gflops"), models, strict=True)]  # fmt: skip
    unet_ceiling = [t / run["ceilings"]["bf16_gemm_gflops"] for t, run in
                    zip(train("unet", "achieved_gflops"), models, strict=True)]  # fmt: skip
    fcn_ceiling = [t / run["ceilings"]["bf16_gemm_gflops"] for t, run in
                   zip(train("fcn", "achieved_gflops"), models, strict=True)]  # fmt: skip

    readme, results, performance, datasets, instance = (
        "README.md",
        "docs/results.md",
        "docs/performance.md",
        "docs/datasets.md",
        "docs/instance.md",
    )
    detector = jsonl("instance_default/metrics.jsonl")
    detector_steps, detector_validation, _ = time_line("instance_default")
    detector_wall = wall_seconds("instance_default")
    detector_bf16 = read_json("instance_default/evaluation.json")
    detector_fp32 = read_json("instance_default/evaluation_fp32.json")

    def ap(value: float) -> str:
        return f"{value * 100:.2f}%"

    def ap_row(metric: str) -> str:
        values = [ap(r[metric]) for r in detector]
        return " | ".join(values[:-1]) + f" | **{values[-1]}**"

    panoptic_page = "docs/panoptic.md"
    panoptic = read_json("panoptic_instance/evaluation.json")
    panoptic_semantic = jsonl("panoptic_semantic/metrics.jsonl")
    panoptic_instance = jsonl("panoptic_instance/metrics.jsonl")

    def pq(key: str) -> str:
        return f"{panoptic[key] * 100:.2f}%"

    beyond_rgb = "docs/beyond-rgb.md"
    nucleus = [read_json(f"nuclei_baselines/{name}")["IoU"]["nucleus"]
               for name in ("otsu.json", "kmeans.json", "unet/evaluation.json")]  # fmt: skip
    sentinel2 = read_json("sentinel2_bands/summary.json")

    def seeds(bands: str) -> str:
        mious = [run["mIoU"] for name, run in sentinel2[bands].items() if "seed" in name]
        return f"{ap(min(mious))[:-1]}-{ap(max(mious))}"

    bench = [read_json(f"benchmark_instance/run{n}.json")["result"] for n in (1, 2)]

    def bench_two(key: str, spec: str = ".2f") -> str:
        return two([run[key] for run in bench], spec)

    medical = "docs/medical.md"
    volumes = (RESULTS / "nifti_example/per_group.csv").read_text().splitlines()
    header = volumes[0].split(",")
    volume_dice = [float(row.split(",")[header.index("Dice/foreground")]) for row in volumes[1:]]
    nifti = read_json("nifti_example/evaluation.json")
    nifti_otsu = read_json("nifti_example/otsu.json")
    nifti_wall = (RESULTS / "nifti_example/wall_time.txt").read_text().split(": ")[1].strip()
    nuclei = jsonl("instance_nuclei/metrics.jsonl")
    nuclei_best = max(nuclei, key=lambda row: row["mask_AP"])

    return [
        (
            medical,
            "Training took 34.2 s. On the two validation volumes the foreground Dice is 77.66% "
            "and 75.27%, a mean over volumes of 76.46% (slice-pooled 76.47%). Per-slice Otsu with "
            "its classes fitted on the training cases finds no foreground (0.00%).",
            f"Training took {nifti_wall}. On the two validation volumes the foreground Dice is "
            f"{ap(volume_dice[0])} and {ap(volume_dice[1])}, a mean over volumes of "
            f"{ap(nifti['per_group']['Dice']['foreground'])} (slice-pooled "
            f"{ap(nifti['Dice']['foreground'])}). Per-slice Otsu with its classes fitted on the "
            f"training cases finds no foreground ({ap(nifti_otsu['Dice']['foreground'])}).",
        ),
        (
            instance,
            "mask AP 60.53% (AP50 92.75%) on the right half at iteration 250, the best of the "
            "four validations; 57.86% at iteration 1000",
            f"mask AP {ap(nuclei_best['mask_AP'])} (AP50 {ap(nuclei_best['mask_AP50'])}) on the "
            f"right half at iteration {nuclei_best['iteration']}, the best of the four "
            f"validations; {ap(nuclei[-1]['mask_AP'])} at iteration {nuclei[-1]['iteration']}",
        ),
        (instance, "34 min 55 s", mins(wall_seconds("instance_nuclei"))),
        (
            instance,
            "best.pt) gives mask AP 60.53%",
            f"best.pt) gives mask AP {ap(read_json('instance_nuclei/evaluation.json')['mask_AP'])}",
        ),
        (
            beyond_rgb,
            "Nucleus IoU: Otsu 77.29%, k-means 67.58%, a U-Net (debug=tiny's 0.4M-parameter "
            "model, 400 iterations from scratch) 87.80%",
            f"Nucleus IoU: Otsu {ap(nucleus[0])}, k-means {ap(nucleus[1])}, a U-Net (debug=tiny's "
            f"0.4M-parameter model, {jsonl('nuclei_baselines/unet/metrics.jsonl')[-1]['iteration']} "
            f"iterations from scratch) {ap(nucleus[2])}",
        ),
        (
            beyond_rgb,
            "Mean val mIoU over the seeds: 13 bands 37.01%, the RGB bands (`data.bands=[4,3,2]`) "
            "39.59%, while the seeds of one band set spread over 23.37-42.28% (13 bands) and "
            "32.43-42.10% (RGB)",
            f"Mean val mIoU over the seeds: 13 bands "
            f"{ap(sentinel2['bands13']['mean_over_seeds']['mIoU'])}, the RGB bands "
            f"(`data.bands=[4,3,2]`) {ap(sentinel2['rgb']['mean_over_seeds']['mIoU'])}, while the "
            f"seeds of one band set spread over {seeds('bands13')} (13 bands) and {seeds('rgb')} (RGB)",
        ),
        (
            instance,
            "runs at 5.55 / 5.48 img/s against 3.78 / 3.86 img/s",
            f"runs at {bench_two('seg_img_s')} img/s against {bench_two('reference_fp32_img_s')} img/s",
        ),
        (
            instance,
            "(x1.47 / x1.42), with 1345 / 1332 MiB peak memory against 1574 / 1560 MiB",
            f"({two([r['speedup_vs_reference_fp32'] for r in bench], '.2f', prefix='x')}), with "
            f"{bench_two('seg_peak_mib', '.0f')} MiB peak memory against "
            f"{bench_two('reference_fp32_peak_mib', '.0f')} MiB",
        ),
        (
            instance,
            "settings runs at 5.67 / 5.63 img/s",
            f"settings runs at {bench_two('reference_same_settings_img_s')} img/s",
        ),
        (
            instance,
            "the Trainer's overhead reads -1.5% / -1.0%",
            "the Trainer's overhead reads "
            + " / ".join(percent([r["trainer_overhead"] for r in bench])),
        ),
        (
            panoptic_page,
            "the semantic run took 13 min 54 s (val mIoU 67.35%), the instance run 16 min 55 s "
            "(val mask AP 27.86%)",
            f"the semantic run took {mins(wall_seconds('panoptic_semantic'))} (val mIoU "
            f"{ap(max(r['mIoU'] for r in panoptic_semantic))}), the instance run "
            f"{mins(wall_seconds('panoptic_instance'))} (val mask AP "
            f"{ap(max(r['mask_AP'] for r in panoptic_instance))})",
        ),
        (
            panoptic_page,
            "**PQ 48.07%** (SQ 76.45%, RQ 61.01%), PQ Things 40.97%, PQ Stuff 55.17%",
            f"**PQ {pq('PQ')}** (SQ {pq('SQ')}, RQ {pq('RQ')}), PQ Things {pq('PQ_things')}, "
            f"PQ Stuff {pq('PQ_stuff')}",
        ),
        (panoptic_page, "of the 200 val scenes", f"of the {panoptic['images']} val scenes"),
        # README: the default run
        (readme, "0.816 in 5 min 14 s", f"{final['mIoU']:.3f} in {mins(wall)}"),
        (readme, "about 5 minutes", f"about {round(wall / 60)} minutes"),
        (readme, "val mIoU of about 0.8", f"val mIoU of about {final['mIoU']:.1f}"),
        # Results: the default run
        (
            results,
            "| AMD EPYC, 2 cores | 0.401 | 0.687 | 0.766 | **0.816** | 5 min 14 s |",
            "| AMD EPYC, 2 cores | "
            + " | ".join(f"{r['mIoU']:.3f}" for r in default[:-1])
            + f" | **{final['mIoU']:.3f}** | {mins(wall)} |",
        ),
        (
            results,
            "| 160 | 320 | 480 | 640 |",
            "| " + " | ".join(str(r["iteration"]) for r in default) + " |",
        ),
        (
            results,
            "Final per-class IoU: background 96.3, disc 88.2, box 82.3, triangle 75.4, ring 74.4, cross 73.3.",
            f"Final per-class IoU: {per_class}.",
        ),
        (
            results,
            "294.0 s went to training steps (about 35 img/s), 7.7 s to validation and 1.5 s to checkpoints",
            f"{steps} s went to training steps (about {images:.0f} img/s), {validation} s to validation and "
            f"{checkpoints} s to checkpoints",
        ),
        # Results and Instance segmentation: the synthetic instance default
        (
            results,
            "| mask AP | 4.88% | 14.02% | 25.24% | **31.27%** | 11 min 18 s |",
            f"| mask AP | {ap_row('mask_AP')} | {mins(detector_wall)} |",
        ),
        (
            results,
            "| box AP | 8.93% | 20.00% | 33.67% | 40.06% |",
            "| box AP | " + " | ".join(ap(r["box_AP"]) for r in detector) + " |",
        ),
        (
            results,
            "At iteration 640: mask AP50 62.56%, AP75 26.81%; box AP50 70.61%. 551.0 s went to "
            "training steps (about 4.6 img/s) and 120.1 s to validation.",
            f"At iteration {detector[-1]['iteration']}: mask AP50 {ap(detector[-1]['mask_AP50'])}, "
            f"AP75 {ap(detector[-1]['mask_AP75'])}; box AP50 {ap(detector[-1]['box_AP50'])}. "
            f"{detector_steps} s went to training steps (about "
            f"{detector[-1]['iteration'] * 4 / detector_steps:.1f} img/s) and {detector_validation} s "
            "to validation.",  # data.batch_size 4 (docs/results/instance_default/config.yaml)
        ),
        (
            results,
            "in fp32 (`trainer.precision=fp32`) mask AP 31.27%, AP50 62.38%, box AP 40.06%",
            f"in fp32 (`trainer.precision=fp32`) mask AP {ap(detector_fp32['mask_AP'])}, "
            f"AP50 {ap(detector_fp32['mask_AP50'])}, box AP {ap(detector_fp32['box_AP'])}",
        ),
        (
            results,
            "gives the last validation's figures again in bf16",
            "gives the last validation's figures again in bf16"
            if all(detector_bf16[k] == detector[-1][k] for k in ("mask_AP", "box_AP", "mask_AP50"))
            else "differs from the last validation in bf16",
        ),
        (
            instance,
            "mask AP 31.27% (box AP 40.06%) after 640 iterations in 11 min 18 s",
            f"mask AP {ap(detector[-1]['mask_AP'])} (box AP {ap(detector[-1]['box_AP'])}) after "
            f"{detector[-1]['iteration']} iterations in {mins(detector_wall)}",
        ),
        (
            results,
            "14.4 M parameters",
            "{:.1f} M parameters".format(
                int(
                    re.search(
                        r"([\d,]+) parameters", (RESULTS / "instance_default/train.log").read_text()
                    )[1].replace(",", "")
                )
                / 1e6
            ),
        ),
        # Results: CamVid
        (
            results,
            "**52.1%** (95% bootstrap interval 51.1-53.1)",
            f"**{camvid['mIoU'] * 100:.1f}%** (95% bootstrap interval "
            f"{camvid['mIoU_ci95'][0] * 100:.1f}-{camvid['mIoU_ci95'][1] * 100:.1f})",
        ),
        (results, "starts at 51.1", f"starts at {camvid['mIoU_ci95'][0] * 100:.1f}"),
        (
            results,
            "76 min of training steps + 2 min of validation; 40 s test evaluation",
            f"{camvid_steps / 60:.0f} min of training steps + {camvid_validation / 60:.0f} min of validation; "
            + re.search(
                r"\((\d+ s)\): `evaluation.json`", (RESULTS / "camvid_unet/README.md").read_text()
            )[1]
            + " test evaluation",
        ),
        (
            results,
            "Per-class test IoU (%): sky 90.8, building 73.8, pole 10.9, road 91.1, pavement 71.5, tree 67.1, "
            "sign/symbol 18.7, fence 18.1, car 72.9, pedestrian 33.3, bicyclist 25.1; pixel accuracy 86.5%",
            "Per-class test IoU (%): "
            + ", ".join(
                f"{name.replace('sign_symbol', 'sign/symbol')} {iou * 100:.1f}"
                for name, iou in camvid["IoU"].items()
            )
            + f"; pixel accuracy {camvid['aAcc'] * 100:.1f}%",
        ),
        (
            results,
            "val mIoU 64.3% at the end",
            f"val mIoU {camvid_val[max(camvid_val)] * 100:.1f}% at the end",
        ),
        (
            results,
            "about 8 img/s",
            f"about {statistics.median(logged_img_s('camvid_unet')):.0f} img/s",
        ),
        (
            results,
            "(58.9% at iteration 3600, 64.3% at 4500)",
            f"({camvid_val[3600] * 100:.1f}% at iteration 3600, {camvid_val[4500] * 100:.1f}% at 4500)",
        ),
        # Performance: the three-model table
        (
            performance,
            "GEMM ceilings fp32 162 / 166, bf16 379 / 404 GFLOP/s",
            f"GEMM ceilings fp32 {two(ceilings[0], '.0f')}, bf16 {two(ceilings[1], '.0f')} GFLOP/s",
        ),
        (
            performance,
            "| `unet` (ResNet-34, 96 GFLOP/img) | 2.84 / 2.63 img/s | 1.21 / 1.19 img/s | **2.35x / 2.21x** "
            "| 2.90 / 2.76 img/s | +2.1% / +5.1% | 272 / 252 GFLOP/s (72% / 62%) | 9.8 / 10.0 img/s |",
            row("unet", "ResNet-34", True),
        ),
        (
            performance,
            "| `deeplabv3plus` (ResNet-50, 110 GFLOP/img) | 1.70 / 1.94 | 0.98 / 1.04 | **1.72x / 1.86x** "
            "| 1.69 / 1.88 | -0.4% / -2.8% | 187 / 213 (49% / 53%) | 6.6 / 7.0 |",
            row("deeplabv3plus", "ResNet-50", False),
        ),
        (
            performance,
            "| `fcn` (ResNet-50, aux head, 444 GFLOP/img) | 0.76 / 0.76 | 0.35 / 0.34 | **2.16x / 2.21x** "
            "| 0.75 / 0.72 | -1.2% / -5.1% | 339 / 336 (89% / 83%) | 2.6 / 2.2 |",
            row("fcn", "ResNet-50, aux head", False),
        ),
        (
            performance,
            "seg's step: 1.9 / 1.9, 2.7 / 2.5 and 3.8 / 3.6 GiB",
            f"seg's step: {gib('seg_peak_mib')}",
        ),
        (
            performance,
            "against 2.5 / 2.5, 3.5 / 3.3 and 5.2 / 4.9 GiB",
            f"against {gib('plain_fp32_peak_mib')}",
        ),
        (
            performance,
            "`data_bound` 1.15 / 1.15 (unet), 1.06 / 1.12 (deeplabv3plus), 0.99 / 1.04 (fcn)",
            f"`data_bound` {bound('unet', 'data_bound')} (unet), {bound('deeplabv3plus', 'data_bound')} "
            f"(deeplabv3plus), {bound('fcn', 'data_bound')} (fcn)",
        ),
        (
            performance,
            "warm `data.cache_dir` 1.02 / 0.98, 0.96 / 1.09, 0.95 / 1.00",
            f"warm `data.cache_dir` {bound('unet', 'data_bound_cached')}, "
            f"{bound('deeplabv3plus', 'data_bound_cached')}, {bound('fcn', 'data_bound_cached')}",
        ),
        # Performance: end to end on its own
        (
            performance,
            "the step alone 3.04 / 2.84 img/s, end to end 2.62 / 2.59 (`data_bound` 1.16 / 1.10",
            f"the step alone {two([u['e2e_step_only_img_s'] for u in unet], '.2f')} img/s, end to end "
            f"{two([u['e2e_img_s'] for u in unet], '.2f')} (`data_bound` {two([u['data_bound'] for u in unet], '.2f')}",
        ),
        (
            performance,
            "with a warm cache 2.93 / 3.03 (`data_bound` 1.04 / 0.94",
            f"with a warm cache {two([u['e2e_cached_img_s'] for u in unet], '.2f')} "
            f"(`data_bound` {two([u['data_bound_cached'] for u in unet], '.2f')}",
        ),
        # Performance: overhead, compile
        (
            performance,
            "U-Net read +2.1% and +5.1%, DeepLabV3+ -0.4% and -2.8%, FCN -1.2% and -5.1%",
            "U-Net read {} and {}, DeepLabV3+ {} and {}, FCN {} and {}".format(
                *(
                    p
                    for m in ("unet", "deeplabv3plus", "fcn")
                    for p in percent(train(m, "trainer_overhead"))
                )
            ),
        ),
        (
            performance,
            "(U-Net, (c): 2.90 and 2.76 img/s)",
            "(U-Net, (c): {:.2f} and {:.2f} img/s)".format(
                *train("unet", "plain_same_settings_img_s")
            ),
        ),
        (
            performance,
            "took 66-97 s to compile with a cold cache (6-10 s with a warm one)",
            f"took {min(compile_s[0]):.0f}-{max(compile_s[0]):.0f} s to compile with a cold cache "
            f"({min(compile_s[1]):.0f}-{max(compile_s[1]):.0f} s with a warm one)",
        ),
        (
            performance,
            "0.91x / 1.04x (unet), 1.01x / 0.82x (deeplabv3plus) and 0.93x / 0.89x (fcn)",
            f"{compile_ratio('unet')} (unet), {compile_ratio('deeplabv3plus')} (deeplabv3plus) and "
            f"{compile_ratio('fcn')} (fcn)",
        ),
        # Performance: the data pipeline
        (
            performance,
            "seg 20.2 / 19.8 img/s per core",
            f"seg {two(per_core('seg'), '.1f')} img/s per core",
        ),
        (
            performance,
            "310 / 294 (x15.3 / x14.8)",
            f"{two(per_core('seg_cached'), '.0f')} ({two([r['cache_speedup'] for r in data], '.1f', prefix='x')})",
        ),
        (performance, "14.5 / 15.1", two(per_core("seg_before_issue_11"), ".1f")),
        (
            performance,
            "17.6 / 17.5 (the cache is x17.6 / x16.8 ahead of it, seg without it x1.15 / x1.13",
            f"{two(per_core('torchvision_v2'), '.1f')} (the cache is "
            f"{two([r['cache_speedup_vs_torchvision_v2'] for r in data], '.1f', prefix='x')} ahead of it, seg "
            f"without it {two([r['speedup_vs_torchvision_v2'] for r in data], '.2f', prefix='x')}",
        ),
        (
            performance,
            "(40 ms for the image, 7 ms for the labels) is 93% of an uncached sample",
            f"({decode[0]:.0f} ms for the image, {decode[1]:.0f} ms for the labels) is "
            f"{sum(decode) / (sum(decode) + after[0]['seg']):.0%} of an uncached sample",
        ),
        (
            performance,
            "3.7 / 3.6 ms (17.0 / 17.1 ms before the uint8 pipeline)",
            f"{two([a['seg'] for a in after], '.1f')} ms ({two([a['seg_before_issue_11'] for a in after], '.1f')} "
            "ms before the uint8 pipeline)",
        ),
        (
            performance,
            "x1.07 / x1.10 the time of no cache (it also writes 8.4 MB per sample)",
            f"{two([r['cache_cold_slowdown'] for r in data], '.2f', prefix='x')} the time of no cache (it also "
            f"writes {data[0]['cache_mb_per_sample']:.1f} MB per sample)",
        ),
        (
            performance,
            "seg 20.2 / 31.5, cached 160 / 260, torchvision v2 16.3 / 22.3 img/s",
            f"seg {two([r['seg_img_s_2_workers'] for r in data], '.1f')}, cached "
            f"{two([r['seg_cached_img_s_2_workers'] for r in data], '.0f')}, torchvision v2 "
            f"{two([r['torchvision_v2_img_s_2_workers'] for r in data], '.1f')} img/s",
        ),
        # Performance: the default run's time, the targets
        (
            performance,
            "of the published default run's 313.6 s, 294.0 s went to training steps, 7.7 s to "
            "validation and 1.5 s to checkpoints",
            f"of the published default run's {wall:.1f} s, {steps} s went to "
            f"training steps, {validation} s to validation and {checkpoints} s to checkpoints",
        ),
        (performance, "other 10.4 s", f"other {wall - steps - validation - checkpoints:.1f} s"),
        (
            performance,
            "seg is 2.35x / 2.21x the plain fp32 loop",
            "seg is {:.2f}x / {:.2f}x the plain fp32 loop".format(
                *train("unet", "speedup_vs_plain_fp32")
            ),
        ),
        (
            performance,
            "1.72x / 1.86x on DeepLabV3+-R50",
            "{:.2f}x / {:.2f}x on DeepLabV3+-R50".format(
                *train("deeplabv3plus", "speedup_vs_plain_fp32")
            ),
        ),
        (
            performance,
            "only 2.3-2.4x as fast as fp32 GEMM (379 against 162 GFLOP/s)",
            f"only {min(gemm_ratio):.1f}-{max(gemm_ratio):.1f}x as fast as fp32 GEMM "
            f"({ceilings[1][0]:.0f} against {ceilings[0][0]:.0f} GFLOP/s)",
        ),
        (
            performance,
            "U-Net at 71% of its ceiling (116 GFLOP/s)",
            f"U-Net at {plain_unet / ceilings[0][0]:.0%} of its ceiling ({plain_unet:.0f} GFLOP/s)",
        ),
        (
            performance,
            "runs at 72% / 62% of the bf16 ceiling",
            "runs at {:.0%} / {:.0%} of the bf16 ceiling".format(*unet_ceiling),
        ),
        (performance, "FCN's at 89% / 83%", "FCN's at {:.0%} / {:.0%}".format(*fcn_ceiling)),
        (
            performance,
            "(49-53% of the ceiling)",
            f"({min(dlv3_ceiling):.0%}-{max(dlv3_ceiling):.0%} of the ceiling)".replace("%-", "-"),
        ),
        # Datasets: the cache
        (
            datasets,
            "about 15 times the per-core throughput",
            f"about {statistics.mean(r['cache_speedup'] for r in data):.0f} times the per-core throughput",
        ),
        # Config comments, shown in the generated reference
        (
            "configs/trainer/default.yaml",
            "the default run: about 5 min on 2 CPU cores",
            f"the default run: about {round(wall / 60)} min on 2 CPU cores",
        ),
        (
            "configs/experiment/camvid_unet.yaml",
            "79 min of training steps and validation",
            f"{(camvid_steps + camvid_validation + camvid_checkpoints) / 60:.0f} min of training steps and validation",
        ),
    ]


def flat(text: str) -> str:
    """Text with its line breaks and indentation as single spaces, so that a figure may wrap."""
    return re.sub(r"\s+", " ", text)


@pytest.mark.parametrize(("page", "quoted", "rebuilt"), figures(), ids=lambda value: value[:40])
def test_a_quoted_figure_equals_its_results_file(page, quoted, rebuilt):
    assert flat(rebuilt) == flat(quoted), (
        f"{page} quotes {quoted!r}; its results file gives {rebuilt!r}"
    )
    assert flat(quoted) in flat((REPO / page).read_text()), f"{page} no longer quotes {quoted!r}"


# Numbers on the results pages that are not measurements of a published run.
NOT_FIGURES = {
    "README.md": {"3.10"},  # Python >= 3.10
    # settings of the recipes, torch's version, the published baselines ENet and SegNet
    "docs/results.md": {"3e-3", "0.01", "0.5", "1.75", "2e-3", "0.1", "2.14.1", "51.3%", "46%"},
    # settings, the issue's targets, torch's version, arithmetic (16.8 MB against 83 MB), and
    # the claims around the figures: "3x faster", "about 5%" of noise, AMX's "about 6x"
    "docs/performance.md": {
        "0.5",
        "2.0",
        "1.0",
        "3.0x",
        "2.0x",
        "70%",
        "2.14.1",
        "16.8",
        "3x",
        "5%",
        "6x",
    },
}
NUMBER = re.compile(r"(?<![\w.])[x]?\d+(?:\.\d+)+(?:x|%)?|(?<![\w.])\d+(?:x|%)(?!\w)")


@pytest.mark.parametrize("page", sorted(NOT_FIGURES))
def test_every_figure_of_a_results_page_is_checked(page):
    """A decimal number, ratio or percentage in the prose of these pages is either quoted in a
    checked figure above or listed in NOT_FIGURES: a new measurement cannot slip in unchecked."""
    text = re.sub(r"```.*?```", "", (REPO / page).read_text(), flags=re.DOTALL)  # not code blocks
    text = re.sub(r"\]\([^)]*\)", "]", text)  # nor link targets
    checked = " ".join(flat(quoted) for where, quoted, _ in figures() if where == page)
    allowed = NOT_FIGURES[page]
    unchecked = sorted(
        {
            n
            for n in NUMBER.findall(flat(text))
            if n not in allowed and n not in NUMBER.findall(checked)
        }
    )
    assert not unchecked, f"{page}: figures not checked against docs/results/: {unchecked}"


# No test counts or suite times


TEST_COUNT = re.compile(r"\b\d+ (?:unit |e2e |end-to-end |CPU |GPU )?tests\b", re.IGNORECASE)
SUITE_TIME = re.compile(
    r"\b(?:suite|pytest|tests?)\b[^.]{0,60}?\b\d+(?:\.\d+)? ?(?:s|seconds?|min|minutes?|h|hours?)\b",
    re.IGNORECASE,
)


def test_the_detector_finds_a_test_count_and_a_suite_time():
    assert TEST_COUNT.search("`pytest` runs the whole suite (306 tests, 3 of them CUDA-only)")
    assert SUITE_TIME.search("the tests take about 9 minutes on the 2-core CPU")


def test_the_docs_quote_no_test_counts_or_suite_times():
    pages = [REPO / "README.md", REPO / "CHANGELOG.md", *sorted((REPO / "docs").rglob("*.md"))]
    for page in pages:
        text = flat(page.read_text())
        for pattern in (TEST_COUNT, SUITE_TIME):
            assert not pattern.search(text), (
                f"{page.relative_to(REPO)}: {pattern.search(text)[0]!r}"
            )
