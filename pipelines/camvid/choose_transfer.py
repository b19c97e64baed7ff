"""Choose the transfer's geometry weight and balance exponent on the labelled set alone.

    python pipelines/camvid/choose_transfer.py runs/camvid/prototypes/unsup-1view-labelled \
        --geometry 0,1,2,3,4 --balance 0,0.5

Each labelled CamVid region is voted on by the regions of the other video sequences (the key's
part before the first ``_``: 0001TP, 0006R0, 0016E5, Seq05VD), k nearest as in `transfer`; the
table gives, for every pair of settings, the IoU per class of the label maps those votes paint
against the labelled frames' own label PNGs (pixel by pixel, as `evaluate semantic` scores), and
the mIoU of the regions' majority classes (area-weighted), which flatters thin classes. The scored
set is never read. Leaving single frames out instead would flatter every setting: neighbouring
frames of a sequence hold the same objects. Meant for one-view stores (the first view paints).

``--voters STORE``: the prototypes of another labelled store of the same images vote instead (one
embedded with ``class_parts``, whose units were cut along the labels); the regions voted on and
painted stay the first store's, so no unit voted on has seen its labels.

    python pipelines/camvid/choose_transfer.py runs/camvid/prototypes/unsup-1view-labelled \
        --voters runs/camvid/prototypes/unsup-parts-labelled --geometry 0,3 --balance 0,0.5
"""

from __future__ import annotations

import argparse
import re
import sys

import numpy as np

from segsort_unsup.evaluate.semantic import read_class_names
from segsort_unsup.transfer.geometry import join_geometry
from segsort_unsup.transfer.held_out import area_weighted_iou, held_out_votes, labelled_rows, pixel_iou


def _floats(text: str) -> list[float]:
    return [float(part) for part in text.split(",") if part.strip()]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("labelled", help="a labelled prototypes store (segsort-unsup embed --labels)")
    parser.add_argument("--geometry", type=_floats, default=[0.0, 1.0, 2.0, 3.0], help="weights to try")
    parser.add_argument("--balance", type=_floats, default=[0.0, 0.5], help="balance exponents to try")
    parser.add_argument("--voters", default=None, help="another labelled store of the same images whose "
                                                        "prototypes vote (default: the store's own)")
    parser.add_argument("--k", type=int, default=15)
    parser.add_argument("--ignore-label", type=int, default=11)
    parser.add_argument("--group", default=r"^([^_]+)_", help="regex whose first group names an image's group")
    parser.add_argument("--class-names", default=None, help="a text file with one class name per line")
    args = parser.parse_args(argv)

    pattern = re.compile(args.group)
    rows = labelled_rows(args.labelled, ignore_label=args.ignore_label)
    groups = _groups(rows.keys, pattern)
    voters = rows if args.voters is None else labelled_rows(args.voters, ignore_label=args.ignore_label)
    voter_groups = groups if args.voters is None else _groups(voters.keys, pattern)
    if set(voters.keys) != set(rows.keys):
        sys.exit(f"error: {args.voters} holds other images than {args.labelled}")
    num_classes = int(max(rows.labels.max(), voters.labels.max())) + 1
    names = (read_class_names(args.class_names, num_classes, args.ignore_label) if args.class_names
             else [str(c) for c in range(num_classes)])
    print(f"{len(rows.labels)} labelled regions in {len(np.unique(groups))} groups "
          f"({', '.join(np.unique(groups))}), k = {args.k}; each group left out, IoU per pixel"
          + ("" if args.voters is None else f"; {len(voters.labels)} voters from {args.voters}"))
    print("| geometry | balance | mIoU | " + " | ".join(names) + " | regions' mIoU |")
    print("|---|---|---|" + "---|" * (len(names) + 1))
    for weight in args.geometry:
        table = join_geometry(rows.prototypes, rows.geometry, weight) if weight else rows.prototypes
        voting = join_geometry(voters.prototypes, voters.geometry, weight) if weight else voters.prototypes
        for balance in args.balance:
            voted = held_out_votes(table, rows.labels, groups, k=args.k, num_classes=num_classes, balance=balance,
                                   voters=(voting, voters.labels, voter_groups))
            score = pixel_iou(args.labelled, rows, voted, num_classes, ignore_label=args.ignore_label)
            regions = area_weighted_iou(rows.labels, voted, rows.area, num_classes)
            cells = " | ".join(f"{100 * v:.1f}" for v in score.iou)
            print(f"| {weight:g} | {balance:g} | {100 * score.miou:.1f} | {cells} | {100 * regions.miou:.1f} |",
                  flush=True)
    return 0


def _groups(keys: np.ndarray, pattern: re.Pattern) -> np.ndarray:
    """The group of every key (the pattern's first group); exits with one line if a key has none."""
    matches = [pattern.search(str(key)) for key in keys]
    if not all(matches):
        sys.exit(f"error: some keys do not match --group {pattern.pattern!r} (e.g. {keys[matches.index(None)]!r})")
    return np.array([m.group(1) for m in matches])


if __name__ == "__main__":
    sys.exit(main())
