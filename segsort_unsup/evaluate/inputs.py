"""Reading what ``evaluate`` compares: predictions (stores, PNG or .mat folders) and BSDS ground truth.

Everything here is addressed by *image id*: a file's stem, or the last path part of a store key
(``test/100007`` -> ``100007``). Sources are small picklable descriptions, opened lazily in
each worker process.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import BadImageError, InputError, StoreError
from ..io.images import image_id, read_label_png, read_png
from ..log import get_logger
from ..ucm.hierarchy import ucm2_values

PNG_SUFFIXES = (".png",)
TREE_DATASETS = ("parents", "altitudes", "leaves")

log = get_logger("evaluate")


@dataclass(frozen=True)
class GroundTruth:
    """Human annotations of one image: boundary maps and segmentations (one per annotator)."""

    path: str
    boundaries: list[np.ndarray]
    segmentations: list[np.ndarray]

    @property
    def shape(self) -> tuple[int, int]:
        return self.segmentations[0].shape


def list_ground_truth(gt_dir: str | os.PathLike) -> dict[str, Path]:
    """BSDS ``groundTruth/*.mat`` files of a folder, by image id."""
    root = Path(gt_dir)
    if not root.is_dir():
        raise InputError(f"ground-truth folder not found: {root}")
    files = {p.stem: p for p in sorted(root.glob("*.mat"))}
    if not files:
        raise InputError(f"no .mat ground-truth files in {root} (expected BSDS groundTruth/*.mat)")
    return files


def load_ground_truth(path: str | os.PathLike, *, boundaries: bool = True) -> GroundTruth:
    """Read a BSDS ground-truth .mat (cell ``groundTruth`` of structs with Segmentation, Boundaries);
    ``boundaries=False`` leaves the boundary maps out (an empty list: the region benchmarks' need)."""
    import scipy.io as sio

    path = Path(path)
    try:
        mat = sio.loadmat(path)
    except Exception as exc:  # noqa: BLE001 - any parse failure is the file's fault
        raise BadImageError(path, f"cannot read ground truth .mat: {exc}") from None
    if "groundTruth" not in mat:
        raise BadImageError(path, "no 'groundTruth' variable (expected a BSDS groundTruth file)")
    cell = mat["groundTruth"].ravel()
    del mat
    keep_boundaries = boundaries
    boundaries, segmentations = [], []
    for entry in cell:
        try:
            seg = np.asarray(entry["Segmentation"][0, 0])
            bdry = np.asarray(entry["Boundaries"][0, 0])
        except (KeyError, ValueError, IndexError, TypeError):
            raise BadImageError(path, "groundTruth entries need 'Segmentation' and 'Boundaries'") from None
        if seg.ndim != 2 or seg.shape != bdry.shape:
            raise BadImageError(path, f"Segmentation {seg.shape} and Boundaries {bdry.shape} differ")
        segmentations.append(seg if seg.dtype.kind in "iu" else seg.astype(np.int64))  # BSDS: uint16
        if keep_boundaries:
            boundaries.append(bdry.astype(bool))
        del bdry
    if not segmentations:
        raise BadImageError(path, "empty groundTruth cell")
    shapes = {s.shape for s in segmentations}
    if len(shapes) != 1:
        raise BadImageError(path, f"annotators disagree on the image size: {sorted(shapes)}")
    return GroundTruth(str(path), boundaries, segmentations)


@dataclass(frozen=True)
class Source:
    """Where predictions come from: ``kind`` is contours | segments | png | mat."""

    kind: str
    root: str
    items: dict[str, str] = field(default_factory=dict)  # image id -> file path or store key

    def ids(self) -> list[str]:
        return sorted(self.items)


def open_source(path: str | os.PathLike) -> Source:
    """Recognise a prediction source: an HDF5 store (``store.json``), or a folder of .png / .mat."""
    from ..io.store import read_manifest

    root = Path(path)
    if not root.exists():
        raise InputError(f"predictions not found: {root}")
    if (root / "store.json").is_file():
        manifest = read_manifest(root)
        kind = manifest.get("kind")
        if kind not in ("contours", "segments"):
            raise InputError(f"{root}: a '{kind}' store cannot be evaluated (need a contours or segments store)")
        from ..io.store import StoreReader

        with StoreReader(root) as reader:
            keys = reader.keys()
        return Source(kind, str(root), _by_id(root, keys))
    if not root.is_dir():
        raise InputError(f"{root}: expected a folder of .png/.mat predictions or an HDF5 store folder")
    pngs = sorted(p for p in root.rglob("*") if p.suffix.lower() in PNG_SUFFIXES)
    mats = sorted(root.rglob("*.mat"))
    if pngs and mats:
        raise InputError(f"{root} holds both .png and .mat files: point to one kind of prediction")
    if not pngs and not mats:
        raise InputError(f"no .png or .mat predictions in {root}")
    files = pngs or mats
    return Source("png" if pngs else "mat", str(root), _by_id(root, [str(p) for p in files]))


def pair_ids(source: Source, truths: dict[str, Path], predictions, ground_truth) -> tuple[list[str], list[str]]:
    """Image ids with both a prediction and ground truth, and the ground-truth ids without prediction.

    Logs what is left out on either side; an :class:`InputError` when nothing pairs up.
    """
    ids = [i for i in sorted(truths) if i in source.items]
    missing = [i for i in sorted(truths) if i not in source.items]
    extra = [i for i in source.ids() if i not in truths]
    if not ids:
        raise InputError(f"no prediction in {predictions} matches a ground-truth id in {ground_truth} "
                         f"(e.g. {sorted(truths)[:3]} vs {source.ids()[:3]})")
    if missing:
        log.warning("%d of %d ground-truth images have no prediction (e.g. %s); they are left out",
                    len(missing), len(truths), ", ".join(missing[:5]))
    if extra:
        log.info("%d predictions have no ground truth and are ignored (e.g. %s)", len(extra), ", ".join(extra[:3]))
    return ids, missing


def _by_id(root: Path, keys: list[str]) -> dict[str, str]:
    out: dict[str, str] = {}
    for key in keys:
        iid = image_id(key)
        if iid in out:
            raise InputError(f"{root}: two predictions for image id {iid!r}: {out[iid]} and {key}")
        out[iid] = key
    return out


# --------------------------------------------------------------------------------------
# Loading one prediction (runs in worker processes)
# --------------------------------------------------------------------------------------

def _reader(root: str):
    from ..io.store import cached_reader

    return cached_reader(root)


@dataclass
class Prediction:
    """One image's prediction, in whichever forms the source provides."""

    name: str  # file path or store path used in error messages
    pb: np.ndarray | None = None  # (H, W) boundary strength in [0, 1]
    ucm2: np.ndarray | None = None  # (2H+1, 2W+1)
    segs: list[np.ndarray] | None = None  # label maps
    labels: np.ndarray | None = None  # (H, W) int label map (semantic)
    tree: MergeTree | None = None  # a segments store's hierarchy (the region benchmarks' fast path)


@dataclass(frozen=True)
class MergeTree:
    """A hierarchy as a segments store holds it: ``parents``, ``altitudes`` and the pixel-to-leaf
    map ``leaves`` (the cut at ``t`` is ``cut_labels(parents, altitudes, threshold=t)[leaves]``)."""

    parents: np.ndarray
    altitudes: np.ndarray
    leaves: np.ndarray


def load_prediction(source: Source, iid: str, *, nms: bool = True, ucm2: bool = True, tree: bool = False) -> Prediction:
    """Read image ``iid`` from ``source``; contours get Dollar's NMS unless ``nms=False``.

    From a segments store: the ucm2 unless ``ucm2=False``; with ``tree=True`` also the merge tree,
    where the item has one (else the ucm2 all the same: a store written from BSR's ucm2 files).
    """
    key = source.items[iid]
    if source.kind == "png":
        return Prediction(key, pb=read_png(key))
    if source.kind == "mat":
        return _load_mat(key)
    reader = _reader(source.root)
    name = f"{source.root}::{key}"
    try:
        if source.kind == "contours":
            item = reader.read(key, ("edge",))
            edge = np.asarray(item.arrays["edge"], np.float32)
            if nms:
                from ..edgemaps import edge_nms

                # The published HED/RCF/PiDiNet protocol: orientation from the smoothed map,
                # not the stored one (which the ucm stage uses).
                edge = edge_nms(edge)
            return Prediction(name, pb=np.clip(edge.astype(np.float64), 0.0, 1.0))
        tree = tree and all(n in reader.layout(key) for n in TREE_DATASETS)
        ucm2 = ucm2 or not tree
        names = (("ucm2",) if ucm2 else ()) + (TREE_DATASETS if tree else ())
        item = reader.read(key, names)
        arrays = item.arrays
        pred = Prediction(name)
        if ucm2:
            # float32 as stored (a uint16-quantised one dequantised): cut without a float64 copy
            pred.ucm2 = ucm2_values(arrays["ucm2"], item.attrs)
        if tree:
            pred.tree = MergeTree(np.asarray(arrays["parents"]), np.asarray(arrays["altitudes"]),
                                  np.asarray(arrays["leaves"]))
        return pred
    except StoreError:
        raise
    except KeyError as exc:
        raise StoreError(name, f"missing dataset {exc}") from None


def load_labels(source: Source, iid: str) -> Prediction:
    """A label map for the semantic benchmark: PNG values (uint8 / uint16) or a segments store's
    ``labels`` (int32), in their own types (no full-size int64 copy)."""
    key = source.items[iid]
    if source.kind == "png":
        return Prediction(key, labels=read_label_png(key))
    if source.kind == "segments":
        item = _reader(source.root).read(key, ("labels",))
        return Prediction(f"{source.root}::{key}", labels=np.asarray(item.arrays["labels"]))
    raise InputError(f"{source.root}: semantic evaluation needs label PNGs or a segments store, not {source.kind}")


def _load_mat(path: str) -> Prediction:
    import scipy.io as sio

    try:
        mat = sio.loadmat(path)
    except Exception as exc:  # noqa: BLE001
        raise BadImageError(path, f"cannot read .mat: {exc}") from None
    if "ucm2" in mat:
        return Prediction(path, ucm2=np.asarray(mat["ucm2"], np.float64))
    if "segs" in mat:
        segs = [np.asarray(s, np.int64) for s in mat["segs"].ravel()]
        if not segs:
            raise BadImageError(path, "empty 'segs' cell")
        return Prediction(path, segs=segs)
    raise BadImageError(path, "expected a 'ucm2' or 'segs' variable (BSR result formats)")
