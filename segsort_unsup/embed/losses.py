"""SegSort losses (Hwang et al., ICCV 2019), as released in ``network/segsort/train_utils.py``.

Notation: ``e_i`` unit pixel embeddings, ``mu_s`` segment prototypes (normalised mean embedding
of a segment), ``kappa`` the vMF concentration, ``l_is = kappa <e_i, mu_s>``.

Unsupervised (``add_unsupervised_segsort_loss``)
    Segments are given (contour-based regions: UCM cuts, superpixels) and made unique across the
    batch; every pixel is scored against every segment prototype of every image in the batch:
    ``loss = mean_i [ log sum_s exp(l_is) - l_i,own(i) ]``. No memory bank.

Supervised (``add_segsort_loss``)
    Per image, pixels of the ignore label are dropped, the rest are sorted by spherical k-means
    on embedding + location (:func:`~segsort_unsup.embed.sorting.pixel_sort`); a segment is a
    unique (image, class, cluster) triple and its prototype the normalised mean of its pixels'
    embeddings. NCA-style vMF likelihood of pixel ``i`` of class ``c``:
    ``numerator = sum over prototypes of class c except i's own`` (i's own alone when there is
    no other one), ``denominator = numerator + sum over prototypes of other classes``; loss =
    mean of ``-log(numerator / denominator)``. Prototypes of the previous batches (a
    :class:`PrototypeMemory`, 2 banks in the reference) join the candidates with their classes.

Both are computed in log space (log-sum-exp) in float32 (float64 inputs stay float64), also
under autocast; the values equal the reference's exp/ratio form wherever that does not
overflow. The reference decides "no other prototype of its class" by testing whether the summed
similarity minus its own is > 0, which float32 rounding can flip for tiny terms; here the test
is on the class masks.

Crop padding
    Mark padded pixels of a crop with :data:`PAD_SEGMENT` (-1), or any id no real segment of
    that image uses: like every id they form one segment per image, so padding is its own
    segment, as in the reference (its readers pad label maps with 255 and 255 is just one more
    segment id). To leave pixels out entirely instead, pass their id as ``ignore``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..errors import InputError
from .sorting import DEFAULT_GRID, DEFAULT_ITERATIONS, pixel_sort

PAD_SEGMENT = -1
DEFAULT_KAPPA = 10.0


WEIGHTINGS = ("pixel", "segment")


def unsupervised_segsort_loss(embedding: torch.Tensor, segments: torch.Tensor, *,
                              kappa: float = DEFAULT_KAPPA, ignore: int | None = None,
                              weighting: str = "pixel") -> torch.Tensor:
    """Unsupervised SegSort loss: each pixel vs all segment prototypes of the batch (softmax CE,
    own segment positive), averaged over the pixels not ignored. See the module docstring.

    ``segments`` (N, H, W) must be on the embedding grid (see :func:`segments_to_grid`).
    ``weighting="segment"`` (not in the release): the mean over segments of each segment's mean
    pixel loss, so that a small segment (a pole, a sign) weighs as much as the road.
    """
    _check_kappa(kappa)
    if weighting not in WEIGHTINGS:
        raise InputError(f"weighting must be one of {', '.join(WEIGHTINGS)}, got {weighting!r}")
    emb, seg = _check_pair(embedding, segments, "segments")
    with torch.autocast(emb.device.type, enabled=False):
        flat, ids, image, valid = _flatten(emb, seg, ignore)
        protos, index, _, _ = _prototypes(flat, ids, image, valid)
        # softmax cross-entropy with the own segment as target (one fused log-softmax pass)
        logits = (kappa * flat[valid]) @ protos.T
        if weighting == "pixel":
            return F.cross_entropy(logits, index[valid])
        own = index[valid]
        sizes = torch.bincount(own, minlength=len(protos)).to(logits.dtype)
        per_pixel = F.cross_entropy(logits, own, reduction="none")
        return (per_pixel / sizes[own]).sum() / (sizes > 0).sum()


class PrototypeMemory:
    """Prototypes (and their classes) of the last ``banks`` batches, detached.

    The reference keeps ``num_banks`` (2) variables of ``25 x batch`` prototypes each, filled with
    a random permutation of each batch's prototypes (cut to that size) and starting as random
    vectors of class 0. Here the memory starts empty and keeps every prototype of a batch, or a
    random subset of ``capacity`` when given (the reference's cut; ``generator`` seeds it).
    """

    def __init__(self, banks: int = 2, *, capacity: int | None = None, generator: torch.Generator | None = None):
        if banks < 1:
            raise InputError(f"banks must be >= 1, got {banks}")
        if capacity is not None and capacity < 1:
            raise InputError(f"capacity must be >= 1 or None, got {capacity}")
        self.banks = banks
        self.capacity = capacity
        self.generator = generator
        self._entries: list[tuple[torch.Tensor, torch.Tensor]] = []

    def __len__(self) -> int:
        return sum(len(c) for _, c in self._entries)

    @property
    def prototypes(self) -> torch.Tensor | None:
        """(M, D) stored prototypes, oldest first; None while empty."""
        return torch.cat([p for p, _ in self._entries]) if self._entries else None

    @property
    def classes(self) -> torch.Tensor | None:
        """(M,) classes of the stored prototypes; None while empty."""
        return torch.cat([c for _, c in self._entries]) if self._entries else None

    def push(self, prototypes: torch.Tensor, classes: torch.Tensor) -> None:
        """Store a batch's prototypes (detached copies), dropping the oldest bank when full."""
        if prototypes.ndim != 2 or classes.shape != prototypes.shape[:1]:
            raise InputError(f"push needs (M, D) prototypes and (M,) classes, got {tuple(prototypes.shape)} "
                             f"and {tuple(classes.shape)}")
        if self._entries and self._entries[0][0].shape[1] != prototypes.shape[1]:
            raise InputError(f"prototype dimension {prototypes.shape[1]} differs from the memory's "
                             f"{self._entries[0][0].shape[1]}")
        p, c = prototypes.detach(), classes.detach().long()
        if self.capacity is not None and len(c) > self.capacity:
            keep = torch.randperm(len(c), generator=self.generator)[: self.capacity].to(c.device)
            p, c = p[keep], c[keep]
        # entries restored from a checkpoint may sit on the host: keep the memory on the batch's device
        self._entries = [(q.to(p.device), k.to(p.device)) for q, k in self._entries[-(self.banks - 1):]
                         ] if self.banks > 1 else []
        self._entries.append((p.clone(), c.clone()))

    def clear(self) -> None:
        self._entries.clear()

    def state_dict(self) -> dict:
        """Plain tensors for checkpoints (resume with :meth:`load_state_dict`)."""
        return {"banks": self.banks, "prototypes": [p for p, _ in self._entries],
                "classes": [c for _, c in self._entries]}

    def load_state_dict(self, state: dict) -> None:
        self._entries = [(p.detach().clone(), c.detach().clone().long())
                         for p, c in zip(state["prototypes"], state["classes"])][-self.banks:]


def supervised_segsort_loss(embedding: torch.Tensor, labels: torch.Tensor, *, kappa: float = DEFAULT_KAPPA,
                            ignore_label: int = 255, memory: PrototypeMemory | None = None,
                            clusters: torch.Tensor | None = None, grid: tuple[int, int] = DEFAULT_GRID,
                            iterations: int = DEFAULT_ITERATIONS, init: torch.Tensor | None = None,
                            locations: torch.Tensor | None = None) -> torch.Tensor:
    """Supervised SegSort loss (NCA-style vMF over (class, cluster) segments). See the module docstring.

    Parameters
    ----------
    embedding : (N, D, H, W) float tensor
    labels : (N, H, W) integer tensor
        Class of each pixel on the embedding grid; ``ignore_label`` pixels are dropped.
    memory
        Prototypes of earlier batches: used as extra candidates, then updated with this batch's
        prototypes (detached).
    clusters : (N, H, W) integer tensor, optional
        Pixel clusters to use instead of running :func:`pixel_sort` (with ``grid``,
        ``iterations``, ``init``, ``locations``) on the detached embedding.
    """
    _check_kappa(kappa)
    emb, lab = _check_pair(embedding, labels, "labels")
    n, _, h, w = emb.shape
    valid = lab != ignore_label
    if not bool(valid.any()):
        raise InputError(f"every pixel has the ignore label {ignore_label}: nothing to learn from")
    if clusters is None:
        clusters = pixel_sort(emb.detach(), valid=valid, grid=grid, iterations=iterations, init=init,
                              locations=locations)
    elif clusters.shape != lab.shape or clusters.is_floating_point():
        raise InputError(f"clusters must be an integer tensor of shape {tuple(lab.shape)}, "
                         f"got {clusters.dtype} {tuple(clusters.shape)}")
    with torch.autocast(emb.device.type, enabled=False):
        flat = F.normalize(emb, dim=1).permute(0, 2, 3, 1).reshape(n * h * w, -1)
        cls = lab.reshape(-1).long()
        clu = clusters.to(lab.device).reshape(-1).long()
        v = valid.reshape(-1)
        image = torch.arange(n, device=emb.device).repeat_interleave(h * w)
        # segment = unique (image, class, cluster): combine class and cluster into one id per image
        c_lo = cls[v].min()
        k_lo, k_span = clu[v].min(), clu[v].max() - clu[v].min() + 1
        ids = (cls - c_lo) * k_span + (clu - k_lo)
        protos, index, _, rows_id = _prototypes(flat, ids, image, v)
        proto_cls = torch.div(rows_id, k_span, rounding_mode="floor") + c_lo
        cand, cand_cls = protos, proto_cls
        if memory is not None and len(memory):
            cand = torch.cat([protos, memory.prototypes.to(protos)])
            cand_cls = torch.cat([proto_cls, memory.classes.to(proto_cls.device)])
        e, own, pix_cls = flat[v], index[v], cls[v]
        logits = kappa * (e @ cand.T)
        if 2 * kappa < _EXP_SAFE:
            loss = _nca_by_class_sums(logits, own, pix_cls, cand_cls)
        else:
            loss = _nca_masked(logits, own, pix_cls, cand_cls)
    if memory is not None:
        memory.push(protos, proto_cls)
    return loss


# exp(x - row max) of cosine logits spans [exp(-2 kappa), 1]: above this, float32 underflows
_EXP_SAFE = 80.0


def _nca_by_class_sums(logits: torch.Tensor, own: torch.Tensor, pix_cls: torch.Tensor,
                       cand_cls: torch.Tensor) -> torch.Tensor:
    """The NCA loss from per-class sums of ``exp(logits)``: one exp and one small matmul instead of
    two masked (P, M) copies and two log-sum-exps (3-4x less time on CPU; same value to float
    rounding). Valid while ``exp`` of the shifted logits cannot underflow (see ``_EXP_SAFE``)."""
    rows = torch.arange(len(own), device=own.device)
    classes, cand_idx = torch.unique(cand_cls, return_inverse=True)
    pix_idx = torch.searchsorted(classes, pix_cls)  # every pixel's class has its own prototype
    shifted = logits - logits.detach().amax(dim=1, keepdim=True)
    p = shifted.exp()
    p_own = p[rows, own]
    others_p = p.scatter(1, own[:, None], 0.0)  # the own prototype left out, no cancellation
    per_class = others_p @ F.one_hot(cand_idx, len(classes)).to(p.dtype)  # (P, K)
    same_others = per_class[rows, pix_idx]
    other_classes = per_class.sum(dim=1) - same_others
    counts = torch.bincount(cand_idx, minlength=len(classes))
    has_others = counts[pix_idx] > 1
    numer = torch.where(has_others, same_others, p_own)
    return (torch.log(numer + other_classes) - torch.log(numer)).mean()


def _nca_masked(logits: torch.Tensor, own: torch.Tensor, pix_cls: torch.Tensor,
                cand_cls: torch.Tensor) -> torch.Tensor:
    """The NCA loss by masked log-sum-exps (any kappa)."""
    same = pix_cls[:, None] == cand_cls[None, :]
    own_mask = torch.zeros_like(same)
    own_mask[torch.arange(len(own), device=own.device), own] = True
    others = same & ~own_mask
    numer_set = torch.where(others.any(dim=1, keepdim=True), others, own_mask)
    denom_set = numer_set | ~same
    neg_inf = torch.finfo(logits.dtype).min
    return (logits.masked_fill(~denom_set, neg_inf).logsumexp(dim=1)
            - logits.masked_fill(~numer_set, neg_inf).logsumexp(dim=1)).mean()


def segments_to_grid(segments: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Nearest-neighbour resize of ``(N, H, W)`` integer maps to ``size`` (the embedding grid),
    sampling source pixel ``floor(i * H / h)`` as the reference's
    ``tf.image.resize_nearest_neighbor`` (TF1, no corner alignment)."""
    if segments.ndim != 3 or segments.is_floating_point():
        raise InputError(f"segments must be an integer (N, H, W) tensor, got {segments.dtype} {tuple(segments.shape)}")
    h, w = (int(s) for s in size)
    if h < 1 or w < 1:
        raise InputError(f"size must be positive, got {size}")
    src_h, src_w = segments.shape[1:]
    ys = torch.div(torch.arange(h, device=segments.device) * src_h, h, rounding_mode="floor")
    xs = torch.div(torch.arange(w, device=segments.device) * src_w, w, rounding_mode="floor")
    return segments[:, ys][:, :, xs]


# -- private ------------------------------------------------------------------------------------
def _check_kappa(kappa: float) -> None:
    if not kappa > 0:
        raise InputError(f"kappa (vMF concentration) must be positive, got {kappa}")


def _check_pair(embedding: torch.Tensor, maps: torch.Tensor, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    if not isinstance(embedding, torch.Tensor) or embedding.ndim != 4 or not embedding.is_floating_point():
        what = getattr(embedding, "dtype", type(embedding).__name__)
        raise InputError(f"embedding must be a float (N, D, H, W) tensor, got {what} "
                         f"{tuple(getattr(embedding, 'shape', ()))}")
    n, _, h, w = embedding.shape
    if not isinstance(maps, torch.Tensor) or maps.is_floating_point() or maps.is_complex() or maps.dtype == torch.bool:
        raise InputError(f"{name} must be an integer tensor, got {getattr(maps, 'dtype', type(maps).__name__)}")
    if tuple(maps.shape) != (n, h, w):
        raise InputError(f"{name} must have shape {(n, h, w)} (the embedding grid), got {tuple(maps.shape)}; "
                         "resize with segments_to_grid")
    if embedding.dtype not in (torch.float32, torch.float64):
        embedding = embedding.float()
    return embedding, maps.to(embedding.device)


def _flatten(emb: torch.Tensor, seg: torch.Tensor, ignore: int | None):
    n, d, h, w = emb.shape
    flat = F.normalize(emb, dim=1).permute(0, 2, 3, 1).reshape(n * h * w, d)
    ids = seg.reshape(-1).long()
    image = torch.arange(n, device=emb.device).repeat_interleave(h * w)
    valid = ids != ignore if ignore is not None else torch.ones_like(ids, dtype=torch.bool)
    if not bool(valid.any()):
        raise InputError(f"every pixel has the ignored segment id {ignore}: nothing to learn from")
    return flat, ids, image, valid


def _prototypes(flat: torch.Tensor, ids: torch.Tensor, image: torch.Tensor, valid: torch.Tensor):
    """Prototypes of the unique (image, id) pairs among valid pixels.

    Returns (S, D) prototypes, (P,) row index per pixel (-1 if not valid), (S,) image and id of
    each row, rows sorted by (image, id).
    """
    lo = ids[valid].min()
    span = ids[valid].max() - lo + 1
    key = image * span + (ids - lo)
    uniq, inverse = torch.unique(key[valid], return_inverse=True)
    sums = flat.new_zeros(len(uniq), flat.shape[1]).index_add_(0, inverse, flat[valid])
    protos = F.normalize(sums, dim=1)
    index = torch.full_like(ids, -1)
    index[valid] = inverse
    return protos, index, torch.div(uniq, span, rounding_mode="floor"), uniq % span + lo
