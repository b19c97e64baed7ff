"""Run the CamVid experiment of ``pipelines/camvid.toml`` end to end and print its table.

    python pipelines/camvid.py pipelines/camvid.toml [--labelled train] [--scored val] [--only init,raw]

Rows: ``init`` (untrained initialisation: the trunk + a random head of the trained models'
architecture), ``raw-<layer>`` (L2-normalised untrained trunk features), ``unsup`` (SegSort
trained on OWT-UCM segments of the labelled split's images, no labels), ``sup`` (the supervised
counterpart, trained on the labelled split's annotations). Each row: embed the labelled split with
its labels and the scored split, kNN transfer, evaluate semantic. Every stage resumes; finished
stages are skipped. Wall times per stage go to ``<output>/times.json``, the table to
``<output>/table.md``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("toml", type=Path)
    ap.add_argument("--labelled", help="labelled split (default: the file's)")
    ap.add_argument("--scored", help="scored split (default: the file's)")
    ap.add_argument("--only", default="init,raw,unsup,sup", help="rows to run, comma-separated")
    ap.add_argument("--workers", type=int, default=1)
    args = ap.parse_args()

    from segsort_unsup.embed.infer import EmbedConfig
    from segsort_unsup.embed.infer import run as embed
    from segsort_unsup.embed.model import build_model, save_model
    from segsort_unsup.embed.transfer import TransferConfig
    from segsort_unsup.embed.transfer import run as transfer
    from segsort_unsup.evaluate.semantic import run_semantic
    from segsort_unsup.log import setup_logging
    from segsort_unsup.parallel import make_executor

    setup_logging(0)
    cfg = tomllib.loads(args.toml.read_text())
    base = args.toml.resolve().parent
    head = cfg["pipeline"]
    data = (base / head["data"]).resolve()
    out = (base / head["output"]).resolve()
    labelled, scored = args.labelled or head["labelled"], args.scored or head["scored"]
    ignore, ncls = head["ignore_label"], head["num_classes"]
    names = [line.split(" ", 1)[1].strip() for line in (data / head["class_names"]).read_text().splitlines()
             if line.strip()][:ncls]
    hed = str((base / head["hed_weights"]).resolve())
    rows = args.only.split(",")
    out.mkdir(parents=True, exist_ok=True)
    times_path = out / "times.json"
    times = json.loads(times_path.read_text()) if times_path.is_file() else {}

    def timed(name, fn, *a, **kw):
        t = time.time()
        result = fn(*a, **kw)
        times[name] = round(time.time() - t, 1) if name not in times or times[name] > 1 else times[name]
        times_path.write_text(json.dumps(times, indent=2))
        print(f"{name}: {time.time() - t:.1f} s", flush=True)
        return result

    executor = make_executor("local", workers=args.workers)
    models: dict[str, tuple[str, str]] = {}  # row -> (model file, features)
    train_cfg = dict(cfg["train"], backbone_weights=hed)
    if "unsup" in rows or "sup" in rows:
        from segsort_unsup.contours.stage import ContoursConfig
        from segsort_unsup.contours.stage import run as contours
        from segsort_unsup.embed.train import TrainConfig
        from segsort_unsup.embed.train import run as train
        from segsort_unsup.ucm.stage import UcmConfig
        from segsort_unsup.ucm.stage import run as ucm

        ccfg = dict(cfg["contours"])
        ccfg["weights"] = str((base / ccfg["weights"]).resolve())
        timed("contours", contours, ContoursConfig.from_mapping(ccfg), str(data / labelled), out / "contours",
              executor=executor)
        timed("ucm", ucm, UcmConfig.from_mapping(cfg["ucm"]), str(out / "contours"), out / "segments",
              executor=executor)
        if "unsup" in rows:
            timed("train-unsup", train, TrainConfig.from_mapping(train_cfg), str(out / "segments"),
                  out / "train-unsup")
            models["unsup"] = (str(out / "train-unsup" / "model.pt"), "head")
        if "sup" in rows:
            sup = dict(train_cfg, labels_dir=str(data / f"{labelled}annot"), ignore_label=ignore)
            timed("train-sup", train, TrainConfig.from_mapping(sup), str(out / "segments"), out / "train-sup")
            models["sup"] = (str(out / "train-sup" / "model.pt"), "head")
    if "init" in rows:
        import torch

        torch.manual_seed(int(cfg["train"].get("seed", 0)))
        model = build_model({k: cfg["train"][k] for k in ("feature_layer", "head") if k in cfg["train"]},
                            backbone_weights=hed)
        save_model(out / "init.pt", model, provenance={"note": "untrained initialisation"})
        models["init"] = (str(out / "init.pt"), "head")
    if "raw" in rows:
        for layer in cfg.get("baselines", {}).get("raw_layers", ["conv4_3"]):
            path = out / f"raw-{layer}.pt"
            if not path.is_file():
                save_model(path, build_model({"feature_layer": layer}, backbone_weights=hed))
            models[f"raw-{layer}"] = (str(path), "trunk")

    table = []
    for row, (model, features) in models.items():
        ecfg = dict(cfg.get("embed", {}), features=features, ignore_label=ignore)
        timed(f"{row}: embed {labelled}", embed,
              EmbedConfig.from_mapping(dict(ecfg, labels=str(data / f"{labelled}annot"))),
              [model, str(data / labelled)], out / row / f"prototypes-{labelled}", executor=executor)
        timed(f"{row}: embed {scored}", embed, EmbedConfig.from_mapping(ecfg), [model, str(data / scored)],
              out / row / f"prototypes-{scored}", executor=executor)
        timed(f"{row}: transfer", transfer, TransferConfig.from_mapping(dict(cfg.get("transfer", {}),
                                                                              ignore_label=ignore)),
              [out / row / f"prototypes-{labelled}", out / row / f"prototypes-{scored}"], out / row / "predictions")
        report = timed(f"{row}: evaluate", run_semantic, out / row / "predictions", data / f"{scored}annot",
                       out / row / "eval", num_classes=ncls, ignore_label=ignore, class_names=names, overwrite=True)
        table.append((row, report.scores))
    executor.close()
    lines = ["| row | mIoU | pixel acc. | " + " | ".join(names) + " |",
             "|---|---|---|" + "---|" * len(names)]
    for row, s in table:
        lines.append(f"| {row} | {100 * s.miou:.1f} | {100 * s.pixel_accuracy:.1f} | "
                     + " | ".join(f"{100 * v:.1f}" for v in s.iou) + " |")
    (out / "table.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
