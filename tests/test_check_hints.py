"""Every hint a check knows is given to a student implementation that makes that mistake.

The wrong implementations are written here the way a student would write them (not the checks'
own variants), each with exactly one mistake; the check must fail them and name that mistake,
and give no hint to the reference.
"""

from __future__ import annotations

import contextlib
import importlib
import io
import math

import pytest
import torch

from course_utils import boxes, checks, detector, rpn
from course_utils.checks import nb01, nb02, nb03, nb04, nb05, nb06, nb07, nb08
from course_utils.scan import clipped_l2norm

# --------------------------------------------------------------------------- student mistakes


def iou_plus_one(b1, b2):
    area1 = (b1[:, 2] - b1[:, 0] + 1) * (b1[:, 3] - b1[:, 1] + 1)
    area2 = (b2[:, 2] - b2[:, 0] + 1) * (b2[:, 3] - b2[:, 1] + 1)
    lt = torch.max(b1[:, None, :2], b2[None, :, :2])
    rb = torch.min(b1[:, None, 2:], b2[None, :, 2:])
    wh = (rb - lt + 1).clamp(min=0)
    inter = wh[..., 0] * wh[..., 1]
    return inter / (area1[:, None] + area2[None, :] - inter)


def iou_no_clamp(b1, b2):
    area1 = (b1[:, 2] - b1[:, 0]) * (b1[:, 3] - b1[:, 1])
    area2 = (b2[:, 2] - b2[:, 0]) * (b2[:, 3] - b2[:, 1])
    wh = torch.min(b1[:, None, 2:], b2[None, :, 2:]) - torch.max(b1[:, None, :2], b2[None, :, :2])
    inter = wh[..., 0] * wh[..., 1]
    return inter / (area1[:, None] + area2[None, :] - inter)


def iou_union_sum(b1, b2):
    area1 = (b1[:, 2] - b1[:, 0]) * (b1[:, 3] - b1[:, 1])
    area2 = (b2[:, 2] - b2[:, 0]) * (b2[:, 3] - b2[:, 1])
    wh = (torch.min(b1[:, None, 2:], b2[None, :, 2:]) - torch.max(b1[:, None, :2], b2[None, :, :2])).clamp(min=0)
    inter = wh[..., 0] * wh[..., 1]
    return inter / (area1[:, None] + area2[None, :])


def _grid(feature_size, image_size, anchor_size, centre_offset=0.0, order="ij", half=None):
    (fh, fw), (ih, iw) = feature_size, image_size
    sy, sx = ih // fh, iw // fw
    h = round(anchor_size / 2) if half is None else half
    rows = []
    if order == "ij":
        cells = [(i, j) for i in range(fh) for j in range(fw)]
    else:
        cells = [(i, j) for j in range(fw) for i in range(fh)]
    for i, j in cells:
        cx, cy = (j + centre_offset) * sx, (i + centre_offset) * sy
        rows.append([cx - h, cy - h, cx + h, cy + h])
    return torch.tensor(rows, dtype=torch.float32)


def grid_cell_middle(feature_size, image_size, anchor_size):
    return _grid(feature_size, image_size, anchor_size, centre_offset=0.5)


def grid_column_major(feature_size, image_size, anchor_size):
    return _grid(feature_size, image_size, anchor_size, order="ji")


def grid_size_as_half(feature_size, image_size, anchor_size):
    return _grid(feature_size, image_size, anchor_size, half=anchor_size)


def labels_without_rule_i(anchors, gt, pos_iou=0.6, neg_iou=0.1):
    if len(gt) == 0:
        return torch.zeros(len(anchors), dtype=torch.long), torch.full((len(anchors),), -1)
    best, idx = boxes.box_iou(gt, anchors).max(dim=0)
    labels = torch.full((len(anchors),), -1, dtype=torch.long)
    labels[best < neg_iou] = 0
    labels[best >= pos_iou] = 1
    return labels, idx


def labels_no_ignore(anchors, gt, pos_iou=0.6, neg_iou=0.1):
    labels, idx = boxes.label_anchors(anchors, gt, pos_iou, neg_iou)
    labels[labels == -1] = 0
    return labels, idx


def sample_fill_budget(labels, num_samples=256, positive_fraction=0.5, generator=None):
    pos = torch.nonzero(labels == 1).flatten()
    neg = torch.nonzero(labels == 0).flatten()
    n_pos = min(len(pos), int(num_samples * positive_fraction))
    n_neg = min(len(neg), num_samples - n_pos)
    return pos[torch.randperm(len(pos))[:n_pos]], neg[torch.randperm(len(neg))[:n_neg]]


def sample_with_ignored(labels, num_samples=256, positive_fraction=0.5, generator=None):
    pos = torch.nonzero(labels == 1).flatten()
    neg = torch.nonzero(labels != 1).flatten()  # "everything that is not an object"
    n_pos = min(len(pos), int(num_samples * positive_fraction))
    n_neg = min(len(neg), n_pos if n_pos else num_samples // 2)
    return pos[torch.randperm(len(pos))[:n_pos]], neg[torch.randperm(len(neg))[:n_neg]]


def _centres(b):
    w, h = b[:, 2] - b[:, 0], b[:, 3] - b[:, 1]
    return b[:, 0] + w / 2, b[:, 1] + h / 2, w, h


def encode_corners(gt, anc):
    _, _, wa, ha = _centres(anc)
    _, _, w, h = _centres(gt)
    return torch.stack([(gt[:, 0] - anc[:, 0]) / wa, (gt[:, 1] - anc[:, 1]) / ha,
                        torch.log(w / wa), torch.log(h / ha)], dim=1)


def decode_corners(t, anc):
    _, _, wa, ha = _centres(anc)
    w, h = torch.exp(t[:, 2]) * wa, torch.exp(t[:, 3]) * ha
    x1, y1 = t[:, 0] * wa + anc[:, 0], t[:, 1] * ha + anc[:, 1]
    return torch.stack([x1, y1, x1 + w, y1 + h], dim=1)


def encode_no_log(gt, anc):
    xa, ya, wa, ha = _centres(anc)
    x, y, w, h = _centres(gt)
    return torch.stack([(x - xa) / wa, (y - ya) / ha, w / wa - 1, h / ha - 1], dim=1)


def decode_no_log(t, anc):
    xa, ya, wa, ha = _centres(anc)
    x, y = t[:, 0] * wa + xa, t[:, 1] * ha + ya
    w, h = (t[:, 2] + 1) * wa, (t[:, 3] + 1) * ha
    return torch.stack([x - w / 2, y - h / 2, x + w / 2, y + h / 2], dim=1)


def encode_by_gt_size(gt, anc):
    xa, ya, wa, ha = _centres(anc)
    x, y, w, h = _centres(gt)
    return torch.stack([(x - xa) / w, (y - ya) / h, torch.log(w / wa), torch.log(h / ha)], dim=1)


def decode_by_gt_size(t, anc):
    xa, ya, wa, ha = _centres(anc)
    w, h = torch.exp(t[:, 2]) * wa, torch.exp(t[:, 3]) * ha
    x, y = t[:, 0] * w + xa, t[:, 1] * h + ya
    return torch.stack([x - w / 2, y - h / 2, x + w / 2, y + h / 2], dim=1)


def rpn_loss_over_all(obj, deltas, labels, targets, box_weight=1.0, beta=1.0 / 9):
    cls = torch.nn.functional.binary_cross_entropy_with_logits(obj, labels.float())
    pos = labels == 1
    box = torch.nn.functional.smooth_l1_loss(deltas[pos], targets[pos], beta=beta, reduction="sum") / len(labels)
    return cls, box_weight * box


def rpn_loss_with_negatives(obj, deltas, labels, targets, box_weight=1.0, beta=1.0 / 9):
    cls = torch.nn.functional.binary_cross_entropy_with_logits(obj, labels.float())
    n_pos = max(int((labels == 1).sum()), 1)
    box = torch.nn.functional.smooth_l1_loss(deltas, targets, beta=beta, reduction="sum") / n_pos
    return cls, box_weight * box


def rpn_loss_double_sigmoid(obj, deltas, labels, targets, box_weight=1.0, beta=1.0 / 9):
    cls = torch.nn.functional.binary_cross_entropy_with_logits(torch.sigmoid(obj), labels.float())
    pos = labels == 1
    box = torch.nn.functional.smooth_l1_loss(deltas[pos], targets[pos], beta=beta, reduction="sum")
    return cls, box_weight * box / max(int(pos.sum()), 1)


def _triplet(scores, margin, max_violation, img_ids, mask_diagonal=True, both=True, hardest=None):
    b = len(scores)
    d = scores.diag()
    neg = ~torch.eye(b, dtype=torch.bool) if mask_diagonal else torch.ones(b, b, dtype=torch.bool)
    if img_ids is not None and mask_diagonal:
        neg &= img_ids[:, None] != img_ids[None, :]
    c1 = torch.where(neg, (margin + scores - d[:, None]).clamp(min=0), torch.zeros(()))
    c2 = torch.where(neg, (margin + scores - d[None, :]).clamp(min=0), torch.zeros(()))
    take_max = max_violation if hardest is None else hardest
    r1 = c1.max(1).values if take_max else c1.sum(1)
    r2 = c2.max(0).values if take_max else c2.sum(0)
    return (r1 + r2).mean() if both else r1.mean()


def triplet_with_diagonal(scores, margin=0.2, max_violation=True, img_ids=None):
    return _triplet(scores, margin, max_violation, img_ids, mask_diagonal=False)


def triplet_one_direction(scores, margin=0.2, max_violation=True, img_ids=None):
    return _triplet(scores, margin, max_violation, img_ids, both=False)


def triplet_always_sum(scores, margin=0.2, max_violation=True, img_ids=None):
    return _triplet(scores, margin, max_violation, img_ids, hardest=False)


def probs_over_images(img, txt, logit_scale=100.0):
    return torch.softmax(logit_scale * img @ txt.T, dim=0)


def probs_no_scale(img, txt, logit_scale=100.0):
    return torch.softmax(img @ txt.T, dim=1)


def probs_sigmoid(img, txt, logit_scale=100.0):
    return torch.sigmoid(logit_scale * img @ txt.T)


def attend_over_queries(q, c, lam, context_mask=None):
    s = clipped_l2norm(q @ c.T, dim=0, mask=None if context_mask is None else context_mask[None, :])
    logits = lam * s
    if context_mask is not None:
        logits[:, ~context_mask] = float("-inf")
    return torch.softmax(logits, dim=0) @ c


def attend_without_lambda(q, c, lam, context_mask=None):
    s = clipped_l2norm(q @ c.T, dim=0, mask=None if context_mask is None else context_mask[None, :])
    if context_mask is not None:
        s = s.masked_fill(~context_mask[None, :], float("-inf"))
    return torch.softmax(s, dim=1) @ c


def attend_raw(q, c, lam, context_mask=None):
    logits = lam * (q @ c.T)
    if context_mask is not None:
        logits = logits.masked_fill(~context_mask[None, :], float("-inf"))
    return torch.softmax(logits, dim=1) @ c


def _area(b):
    return (b[..., 2] - b[..., 0]).clamp(min=0) * (b[..., 3] - b[..., 1]).clamp(min=0)


def keep_in_pixels(b, size, alpha):
    return _area(b) > alpha


def keep_at_least(b, size, alpha):
    return _area(b) / (size * size) >= alpha


def _info_nce(img, txt, t, img_ids, both=True, scale=None):
    logits = img @ txt.T * scale if scale is not None else img @ txt.T / t
    if img_ids is not None and both != "no-mask":
        same = (img_ids[:, None] == img_ids[None, :]) & ~torch.eye(len(img), dtype=torch.bool)
        logits = logits.masked_fill(same, float("-inf"))
    y = torch.arange(len(img))
    i2t = torch.nn.functional.cross_entropy(logits, y)
    return i2t if both is False else (i2t + torch.nn.functional.cross_entropy(logits.T, y)) / 2


def contrastive_one_way(img, txt, temperature, img_ids=None):
    return _info_nce(img, txt, temperature, img_ids, both=False)


def contrastive_times_t(img, txt, temperature, img_ids=None):
    return _info_nce(img, txt, temperature, img_ids, scale=temperature)


def contrastive_no_mask(img, txt, temperature, img_ids=None):
    return _info_nce(img, txt, temperature, img_ids, both="no-mask")


def score_unsorted(conf, align, threshold=0.5, top_k=None):
    s = conf * align
    idx = torch.arange(len(s))[s > threshold]
    if top_k is not None:
        idx = idx[:top_k]
    return idx, s[idx]


def score_threshold_conf(conf, align, threshold=0.5, top_k=None):
    s = conf * align
    idx = torch.argsort(s, descending=True)
    idx = idx[conf[idx] > threshold]
    return (idx[:top_k] if top_k else idx), s[idx[:top_k] if top_k else idx]


def score_average(conf, align, threshold=0.5, top_k=None):
    s = (conf + align) / 2
    idx = torch.argsort(s, descending=True)
    idx = idx[s[idx] > threshold][:top_k]
    return idx, s[idx]


def _entropy(P, Y, renormalise=True, base="positives"):
    out = []
    for p, y in zip(P.double(), Y):
        k = int(y.sum())
        if k < 2:
            out.append(float("nan"))
            continue
        q = p[y]
        if renormalise:
            q = q / q.sum()
        h = -sum(float(v) * math.log(float(v)) for v in q if v > 0)
        out.append(h / math.log(k) if base == "positives" else h / math.log(len(p)) if base == "lexicon" else h)
    return torch.tensor(out, dtype=torch.float64)


def entropy_raw(P, Y):
    return _entropy(P, Y, renormalise=False)


def entropy_nats(P, Y):
    return _entropy(P, Y, base=None)


def entropy_lexicon_base(P, Y):
    return _entropy(P, Y, base="lexicon")


def _lse(r, lam, mask=None, divide=True, use_mask=True):
    x = lam * r
    if mask is not None and use_mask:
        x = torch.where(mask, x, torch.tensor(float("-inf")))
    out = torch.log(torch.exp(x).sum(-1))
    return out / lam if divide else out


def _avg(r, mask=None, by_count=True, use_mask=True):
    if mask is None or not use_mask:
        return r.mean(-1)
    return (r * mask).sum(-1) / (mask.sum(-1) if by_count else r.shape[-1])


POOLING_WRONG = {
    "no-division": (lambda r, lam, mask=None: _lse(r, lam, mask, divide=False), _avg),
    "mask-ignored": (lambda r, lam, mask=None: _lse(r, lam, mask, use_mask=False),
                     lambda r, mask=None: _avg(r, mask, use_mask=False)),
    "avg-over-all": (_lse, lambda r, mask=None: _avg(r, mask, by_count=False)),
}


def _recall(sims, c2i, ks=(1, 5, 10), scale=100.0, swap=False):
    """Ranks with ties counting against: how many wrong items score at least the best right one."""
    out = {}
    i2t_rank = []
    for i in range(sims.shape[0]):
        right = c2i == i
        best = sims[i][right].max()
        i2t_rank.append(int((sims[i][~right] >= best).sum()))
    t2i_rank = []
    for j in range(sims.shape[1]):
        col = sims[:, j]
        wrong = torch.arange(len(col)) != c2i[j]
        t2i_rank.append(int((col[wrong] >= col[c2i[j]]).sum()))
    a, b = ("t2i", "i2t") if swap else ("i2t", "t2i")
    for k in ks:
        out[f"{a}_r{k}"] = scale * sum(r < k for r in i2t_rank) / len(i2t_rank)
    for k in ks:
        out[f"{b}_r{k}"] = scale * sum(r < k for r in t2i_rank) / len(t2i_rank)
    out["rsum"] = sum(out.values())
    return out


def recall_fractions(sims, c2i, ks=(1, 5, 10)):
    return _recall(sims, c2i, ks, scale=1.0)


def recall_swapped(sims, c2i, ks=(1, 5, 10)):
    return _recall(sims, c2i, ks, swap=True)


def _counts(P, Y, scale="group", swap=False):
    rows = {"tp": [], "fn": [], "fp": [], "tn": []}
    for p, y in zip(P.double(), Y):
        pos, neg = p[y], p[~y]
        if scale == "group":
            pos = pos / pos.max() if len(pos) and pos.max() > 0 else pos * 0
            neg = neg / neg.max() if len(neg) and neg.max() > 0 else neg * 0
        elif scale == "image":
            pos, neg = pos / p.max(), neg / p.max()
        tp, fp = pos.sum(), neg.sum()
        rows["tp"].append(tp)
        rows["fn"].append(len(pos) - tp)
        rows["fp" if not swap else "tn"].append(fp)
        rows["tn" if not swap else "fp"].append(len(neg) - fp)
    return {k: torch.stack([torch.as_tensor(v, dtype=torch.float64) for v in vals]) for k, vals in rows.items()}


def counts_raw(P, Y):
    return _counts(P, Y, scale=None)


def counts_image_peak(P, Y):
    return _counts(P, Y, scale="image")


def counts_swapped(P, Y):
    return _counts(P, Y, swap=True)


def _weighted(obj, txt, scale, normalise=True, dim=-1):
    a, b = (torch.nn.functional.normalize(obj, dim=-1), torch.nn.functional.normalize(txt, dim=-1)) \
        if normalise else (obj, txt)
    P = torch.softmax(scale * a @ b.T, dim=dim)
    return P, P @ txt


def weighted_unnormalised(obj, txt, scale):
    return _weighted(obj, txt, scale, normalise=False)


def weighted_over_objects(obj, txt, scale):
    return _weighted(obj, txt, scale, dim=-2)


def weighted_no_scale(obj, txt, scale):
    return _weighted(obj, txt, 1.0)


def _student_proposals(obj, deltas, anchors, image_size, pre_nms_top_n=1000, post_nms_top_n=100,
                       nms_iou=0.7, min_size=1e-3, score_thresh=0.0, mistake=None):
    from torchvision.ops import box_iou

    order = torch.argsort(obj, descending=True)[:pre_nms_top_n]
    conf = obj[order] if mistake == "logits" else torch.sigmoid(obj[order])
    b = boxes.decode_boxes(deltas[order], anchors[order])
    if mistake != "no-clip":
        h, w = image_size
        b = torch.stack([b[:, 0].clamp(0, w), b[:, 1].clamp(0, h), b[:, 2].clamp(0, w), b[:, 3].clamp(0, h)], 1)
    ok = ((b[:, 2] - b[:, 0]) >= min_size) & ((b[:, 3] - b[:, 1]) >= min_size) & (conf > score_thresh)
    b, conf = b[ok], conf[ok]
    kept = []
    for i in range(len(b)):  # greedy NMS by hand, best first
        if mistake == "no-nms" or all(box_iou(b[i:i + 1], b[j:j + 1]).item() <= nms_iou for j in kept):
            kept.append(i)
    kept = torch.tensor(kept[:post_nms_top_n], dtype=torch.long)
    return b[kept], conf[kept]


def _student_matchmap(mm, agg, word_mask=None, swap=False, use_mask=True):
    if swap:
        agg = {"misa": "sima", "sima": "misa"}.get(agg, agg)
    m = torch.ones(mm.shape[:-2], dtype=torch.bool) if word_mask is None or not use_mask else word_mask
    if agg == "sisa":
        per_word = mm.mean(dim=(-1, -2))
    elif agg == "misa":
        per_word = mm.amax(dim=(-1, -2))
    else:
        best = torch.where(m[..., None, None], mm, torch.tensor(float("-inf"))).amax(dim=-3)
        return best.mean(dim=(-1, -2))
    return (per_word * m).sum(-1) / m.sum(-1)


class StudentHead(detector.AlignmentHead):  # a correct 3.3a, so that only the loss is at fault
    pass


def align_loss_double_sigmoid(logits, labels):
    return torch.nn.functional.binary_cross_entropy_with_logits(torch.sigmoid(logits), labels.float())


def align_loss_sum(logits, labels):
    return torch.nn.functional.binary_cross_entropy_with_logits(logits, labels.float(), reduction="sum")


def align_loss_flipped(logits, labels):
    return torch.nn.functional.binary_cross_entropy_with_logits(logits, 1.0 - labels.float())


def _student_decoder(image, regions, keep, ln_q, ln_kv, attn, ffn, mistake=None):
    q, kv = ln_q(image)[:, None, :], ln_kv(regions)
    out = []
    for b in range(len(image)):
        kept = kv[b][keep[b]] if mistake != "keep" else kv[b]
        if len(kept) == 0:
            a = torch.zeros_like(image[b])
        else:
            a = attn(q[b:b + 1], kept[None], kept[None], need_weights=False)[0][0, 0]
        out.append(a if mistake == "att-residual" else image[b] + a)
    y = torch.stack(out)
    return ffn(y) if mistake == "ffn-residual" else y + ffn(y)


def _student_attention(es, em, conf, valid, w_q, w_k, w_v, mistake=None):
    out = []
    for b in range(len(es)):
        m = valid[b]
        if not m.any():
            out.append(torch.zeros(w_v.shape[0]))
            continue
        e_s, e_m, c = es[b][m], em[b][m], conf[b][m]
        q, k = e_s @ w_q.T, e_s @ w_k.T
        v = (e_m if mistake == "conf" else c[:, None] * e_m) @ w_v.T
        a = torch.softmax(q @ k.T / (1.0 if mistake == "scale" else w_q.shape[0] ** 0.5), dim=-1) @ v
        out.append(a.sum(0) if mistake == "sum" else a.mean(0))
    return torch.stack(out)


class HeadNoRelu(rpn.RPNHead):
    def forward(self, x):
        t = self.conv(x)
        return self.cls_logits(t), self.bbox_pred(t)


class HeadSigmoid(rpn.RPNHead):
    def forward(self, x):
        t = torch.relu(self.conv(x))
        return torch.sigmoid(self.cls_logits(t)), self.bbox_pred(t)


class HeadSwapped(rpn.RPNHead):
    def forward(self, x):
        t = torch.relu(self.conv(x))
        return self.bbox_pred(t), self.cls_logits(t)


class AlignNoRelu(detector.AlignmentHead):
    def forward(self, region, text):
        return self.fc2(self.fc1(torch.cat([region, text], dim=1)))[:, 0]


class AlignProbabilities(detector.AlignmentHead):
    def forward(self, region, text):
        return torch.sigmoid(self.fc2(torch.relu(self.fc1(torch.cat([region, text], dim=1))))[:, 0])


def _correct_align_loss(lg, lb):
    return torch.nn.functional.binary_cross_entropy_with_logits(lg, lb.float())


def _student_clip_loss(img, txt, scale, mistake=None):
    if mistake != "norm":
        img, txt = img / img.norm(dim=1, keepdim=True), txt / txt.norm(dim=1, keepdim=True)
    s = scale * img @ txt.T
    y = torch.arange(len(img))
    rows, cols = torch.nn.functional.cross_entropy(s, y), torch.nn.functional.cross_entropy(s.T, y)
    if mistake == "swap":
        rows, cols = cols, rows
    return {"loss": rows + cols if mistake == "sum" else (rows + cols) / 2, "loss_image": rows, "loss_text": cols}


class EncoderNotUnit(detector.ProposalEncoder):
    def forward(self, features, boxes):
        from torchvision.ops import roi_pool

        x = roi_pool(features, list(boxes), self.roi_size, self.spatial_scale)
        return self.fc2(torch.relu(self.fc1(torch.relu(self.conv(x)).reshape(len(x), -1))))


class EncoderNoScale(detector.ProposalEncoder):
    def forward(self, features, boxes):
        from torchvision.ops import roi_pool

        x = roi_pool(features, list(boxes), self.roi_size)
        x = self.fc2(torch.relu(self.fc1(torch.relu(self.conv(x)).reshape(len(x), -1))))
        return x / x.norm(dim=1, keepdim=True)


class _Query(detector.QueryEncoder):
    mistake = None

    def forward(self, ids, padding_mask):
        b = len(ids)
        x = torch.cat([self.enc_token.expand(b, 1, -1), self.token_embed(ids)], 1)
        x = x + self.pos_embed[:, : x.shape[1]]
        pad = torch.cat([torch.zeros(b, 1, dtype=torch.bool), padding_mask], 1)
        x = self.encoder(x, src_key_padding_mask=None if self.mistake == "mask" else pad)
        v = x[:, 1:].mean(1) if self.mistake == "mean" else x[:, 0]
        return v if self.mistake == "norm" else v / v.norm(dim=1, keepdim=True)


QueryNoMask = type("QueryNoMask", (_Query,), {"mistake": "mask"})
QueryMean = type("QueryMean", (_Query,), {"mistake": "mean"})
QueryNotUnit = type("QueryNotUnit", (_Query,), {"mistake": "norm"})


def _student_step(model, batch, optimizer, mistake=None):
    from course_utils.clip.finetune import contrastive_step

    losses = contrastive_step(model, batch)
    optimizer.zero_grad()
    (losses["loss_image"] if mistake == "image" else losses["loss"]).backward()
    optimizer.step()
    if mistake == "after":
        with torch.no_grad():
            losses = contrastive_step(model, batch)
    return {k: v.item() for k, v in losses.items()}


# hint table: (check, its hints, the hint's index, the wrong student code as the check's arguments)
WRONG = [
    (nb01.check_box_iou, nb01.IOU_HINTS, 0, (iou_plus_one,)),
    (nb01.check_box_iou, nb01.IOU_HINTS, 1, (iou_no_clamp,)),
    (nb01.check_box_iou, nb01.IOU_HINTS, 2, (iou_union_sum,)),
    (nb01.check_anchor_grid, nb01.GRID_HINTS, 0, (grid_cell_middle,)),
    (nb01.check_anchor_grid, nb01.GRID_HINTS, 1, (grid_column_major,)),
    (nb01.check_anchor_grid, nb01.GRID_HINTS, 2, (grid_size_as_half,)),
    (nb01.check_label_anchors, nb01.LABEL_HINTS, 0, (labels_without_rule_i,)),
    (nb01.check_label_anchors, nb01.LABEL_HINTS, 1, (labels_no_ignore,)),
    (nb01.check_sample_anchors, nb01.SAMPLE_HINTS, 0, (sample_fill_budget,)),
    (nb01.check_sample_anchors, nb01.SAMPLE_HINTS, 1, (sample_with_ignored,)),
    (nb01.check_box_coding, nb01.CODING_HINTS, 0, (encode_corners, decode_corners)),
    (nb01.check_box_coding, nb01.CODING_HINTS, 1, (encode_no_log, decode_no_log)),
    (nb01.check_box_coding, nb01.CODING_HINTS, 2, (encode_by_gt_size, decode_by_gt_size)),
    (nb02.check_rpn_loss, nb02.RPN_LOSS_HINTS, 0, (rpn_loss_over_all,)),
    (nb02.check_rpn_loss, nb02.RPN_LOSS_HINTS, 1, (rpn_loss_with_negatives,)),
    (nb02.check_rpn_loss, nb02.RPN_LOSS_HINTS, 2, (rpn_loss_double_sigmoid,)),
    (nb04.check_triplet_loss, nb04.TRIPLET_HINTS, 0, (triplet_with_diagonal,)),
    (nb04.check_triplet_loss, nb04.TRIPLET_HINTS, 1, (triplet_one_direction,)),
    (nb04.check_triplet_loss, nb04.TRIPLET_HINTS, 2, (triplet_always_sum,)),
    (nb03.check_score_proposals, nb03.SCORE_HINTS, 0, (score_unsorted,)),
    (nb03.check_score_proposals, nb03.SCORE_HINTS, 1, (score_threshold_conf,)),
    (nb03.check_score_proposals, nb03.SCORE_HINTS, 2, (score_average,)),
    (nb06.check_normalised_similarity_entropy, nb06.ENTROPY_HINTS, 0, (entropy_raw,)),
    (nb06.check_normalised_similarity_entropy, nb06.ENTROPY_HINTS, 1, (entropy_nats,)),
    (nb06.check_normalised_similarity_entropy, nb06.ENTROPY_HINTS, 2, (entropy_lexicon_base,)),
    (nb04.check_pooling, nb04.POOLING_HINTS, 0, POOLING_WRONG["no-division"]),
    (nb04.check_pooling, nb04.POOLING_HINTS, 1, POOLING_WRONG["mask-ignored"]),
    (nb04.check_pooling, nb04.POOLING_HINTS, 2, POOLING_WRONG["avg-over-all"]),
    (nb04.check_recall_at_k, nb04.RECALL_HINTS, 0, (recall_fractions,)),
    (nb04.check_recall_at_k, nb04.RECALL_HINTS, 1, (recall_swapped,)),
    (nb06.check_soft_confusion, nb06.CONFUSION_HINTS, 0, (counts_raw,)),
    (nb06.check_soft_confusion, nb06.CONFUSION_HINTS, 1, (counts_image_peak,)),
    (nb06.check_soft_confusion, nb06.CONFUSION_HINTS, 2, (counts_swapped,)),
    (nb08.check_similarity_weighted_embeddings, nb08.SWE_HINTS, 0, (weighted_unnormalised,)),
    (nb08.check_similarity_weighted_embeddings, nb08.SWE_HINTS, 1, (weighted_over_objects,)),
    (nb08.check_similarity_weighted_embeddings, nb08.SWE_HINTS, 2, (weighted_no_scale,)),
    (nb02.check_decode_proposals, nb02.PROPOSAL_HINTS, 0, (lambda *a, **k: _student_proposals(*a, **k, mistake="no-clip"),)),
    (nb02.check_decode_proposals, nb02.PROPOSAL_HINTS, 1, (lambda *a, **k: _student_proposals(*a, **k, mistake="logits"),)),
    (nb02.check_decode_proposals, nb02.PROPOSAL_HINTS, 2, (lambda *a, **k: _student_proposals(*a, **k, mistake="no-nms"),)),
    (nb04.check_matchmap_score, nb04.MATCHMAP_HINTS, 0, (lambda *a, **k: _student_matchmap(*a, **k, swap=True),)),
    (nb04.check_matchmap_score, nb04.MATCHMAP_HINTS, 1,
     (lambda *a, **k: _student_matchmap(*a, **k, use_mask=False),)),
    (nb03.check_alignment, nb03.ALIGNMENT_LOSS_HINTS, 0, (StudentHead, align_loss_double_sigmoid)),
    (nb03.check_alignment, nb03.ALIGNMENT_LOSS_HINTS, 1, (StudentHead, align_loss_sum)),
    (nb03.check_alignment, nb03.ALIGNMENT_LOSS_HINTS, 2, (StudentHead, align_loss_flipped)),
    (nb05.check_decoder_block, nb05.DECODER_HINTS, 0, (lambda *a: _student_decoder(*a, mistake="ffn-residual"),)),
    (nb05.check_decoder_block, nb05.DECODER_HINTS, 1, (lambda *a: _student_decoder(*a, mistake="att-residual"),)),
    (nb05.check_decoder_block, nb05.DECODER_HINTS, 2, (lambda *a: _student_decoder(*a, mistake="keep"),)),
    (nb08.check_object_self_attention, nb08.SELF_ATTENTION_HINTS, 0, (lambda *a: _student_attention(*a, mistake="scale"),)),
    (nb08.check_object_self_attention, nb08.SELF_ATTENTION_HINTS, 1, (lambda *a: _student_attention(*a, mistake="conf"),)),
    (nb08.check_object_self_attention, nb08.SELF_ATTENTION_HINTS, 2, (lambda *a: _student_attention(*a, mistake="sum"),)),
    (nb02.check_rpn_head, nb02.RPN_HEAD_HINTS, 0, (HeadNoRelu,)),
    (nb02.check_rpn_head, nb02.RPN_HEAD_HINTS, 1, (HeadSigmoid,)),
    (nb02.check_rpn_head, nb02.RPN_HEAD_HINTS, 2, (HeadSwapped,)),
    (lambda cls: nb03.check_alignment(cls, _correct_align_loss), nb03.ALIGNMENT_HEAD_HINTS, 0, (AlignNoRelu,)),
    (lambda cls: nb03.check_alignment(cls, _correct_align_loss), nb03.ALIGNMENT_HEAD_HINTS, 1, (AlignProbabilities,)),
    (nb07.check_clip_contrastive_loss, nb07.CLIP_LOSS_HINTS, 0, (lambda *a: _student_clip_loss(*a, mistake="norm"),)),
    (nb07.check_clip_contrastive_loss, nb07.CLIP_LOSS_HINTS, 1, (lambda *a: _student_clip_loss(*a, mistake="sum"),)),
    (nb07.check_clip_contrastive_loss, nb07.CLIP_LOSS_HINTS, 2, (lambda *a: _student_clip_loss(*a, mistake="swap"),)),
    (nb03.check_proposal_encoder, nb03.PROPOSAL_ENCODER_HINTS, 0, (EncoderNotUnit,)),
    (nb03.check_proposal_encoder, nb03.PROPOSAL_ENCODER_HINTS, 1, (EncoderNoScale,)),
    (nb03.check_query_encoder, nb03.QUERY_ENCODER_HINTS, 0, (QueryNoMask,)),
    (nb03.check_query_encoder, nb03.QUERY_ENCODER_HINTS, 1, (QueryMean,)),
    (nb03.check_query_encoder, nb03.QUERY_ENCODER_HINTS, 2, (QueryNotUnit,)),
    (nb07.check_training_step, nb07.TRAINING_STEP_HINTS, 0, (lambda *a: _student_step(*a, mistake="image"),)),
    (nb07.check_training_step, nb07.TRAINING_STEP_HINTS, 1, (lambda *a: _student_step(*a, mistake="after"),)),
    (nb04.check_attend, nb04.ATTEND_HINTS, 0, (attend_over_queries,)),
    (nb04.check_attend, nb04.ATTEND_HINTS, 1, (attend_without_lambda,)),
    (nb04.check_attend, nb04.ATTEND_HINTS, 2, (attend_raw,)),
    (nb05.check_keep_regions, nb05.KEEP_HINTS, 0, (keep_in_pixels,)),
    (nb05.check_keep_regions, nb05.KEEP_HINTS, 1, (keep_at_least,)),
    (nb05.check_contrastive_loss, nb05.CONTRASTIVE_HINTS, 0, (contrastive_one_way,)),
    (nb05.check_contrastive_loss, nb05.CONTRASTIVE_HINTS, 1, (contrastive_times_t,)),
    (nb05.check_contrastive_loss, nb05.CONTRASTIVE_HINTS, 2, (contrastive_no_mask,)),
    (nb06.check_word_image_probabilities, nb06.WORD_PROB_HINTS, 0, (probs_over_images,)),
    (nb06.check_word_image_probabilities, nb06.WORD_PROB_HINTS, 1, (probs_no_scale,)),
    (nb06.check_word_image_probabilities, nb06.WORD_PROB_HINTS, 2, (probs_sigmoid,)),
]
# every table of hints in every checks module
HINT_TABLES = {f"{m.__name__.rsplit('.', 1)[1]}.{name}": table
               for m in (importlib.import_module(f"course_utils.checks.nb0{i}") for i in range(1, 9))
               for name, table in vars(m).items() if name.endswith("_HINTS")}


def _run(check, args):
    out = io.StringIO()
    checks.RESULTS.clear()
    with contextlib.redirect_stdout(out):
        check(*args)
    failed = [r for r in checks.RESULTS.values() if not r.passed]
    # the exercise at fault (check_alignment checks a head and a loss), else the last one
    return (failed or list(checks.RESULTS.values()))[-1], out.getvalue()


def test_every_hint_has_a_wrong_implementation():
    covered = {(id(table), i) for _, table, i, _ in WRONG}
    missing = [f"{name}[{i}]: {h.message[:60]}" for name, table in HINT_TABLES.items()
               for i, h in enumerate(table) if (id(table), i) not in covered]
    assert not missing, f"hints without a test: {missing}"
    assert len(HINT_TABLES) >= 8


@pytest.mark.parametrize("check, table, index, wrong", WRONG,
                         ids=[f"{getattr(c, '__name__', 'check')}-{i}-{w[0].__name__}" for c, _, i, w in WRONG])
def test_the_mistake_gets_its_hint(check, table, index, wrong):
    result, printed = _run(check, wrong)
    assert not result.passed
    hints = [m.removeprefix("hint: ") for m in result.messages if m.startswith("hint: ")]
    assert hints == [table[index].message], f"expected only hint {index}, got {hints}"
    assert f"hint: {table[index].message}" in printed


@pytest.mark.parametrize("check, args", [
    (nb01.check_box_iou, (lambda a, b: boxes.box_iou(a, b) + 0,)),
    (nb01.check_anchor_grid, (lambda f, i, s: boxes.anchor_grid(f, i, s) + 0,)),
    (nb01.check_box_coding, (lambda g, a: boxes.encode_boxes(g, a) + 0, lambda t, a: boxes.decode_boxes(t, a) + 0)),
    (nb04.check_recall_at_k, (lambda s, c, ks=(1, 5, 10): _recall(s, c, ks),)),
    (nb04.check_pooling, (_lse, _avg)),
    (nb06.check_soft_confusion, (_counts,)),
    (nb02.check_decode_proposals, (_student_proposals,)),
    (nb04.check_matchmap_score, (_student_matchmap,)),
    (nb05.check_decoder_block, (_student_decoder,)),
    (nb03.check_query_encoder, (_Query,)),
    (nb07.check_clip_contrastive_loss, (_student_clip_loss,)),
    (nb08.check_object_self_attention, (_student_attention,)),
    (nb03.check_alignment, (StudentHead, lambda lg, lb: torch.nn.functional.binary_cross_entropy_with_logits(
        lg, lb.float()))),
    (nb08.check_similarity_weighted_embeddings, (_weighted,)),
])
def test_a_correct_answer_gets_no_hint(check, args):
    result, printed = _run(check, args)
    assert result.passed and "hint" not in printed


def test_a_hint_does_not_move_the_global_rng():
    torch.manual_seed(0)
    _run(nb01.check_box_iou, (iou_plus_one,))
    after_hint = torch.rand(3)
    torch.manual_seed(0)
    _run(nb01.check_box_iou, (lambda a, b: boxes.box_iou(a, b) * 0.5,))  # fails, no hint applies
    assert torch.equal(after_hint, torch.rand(3))


def test_fallback_message_names_no_internals_and_made_by_says_reference():
    _, printed = _run(nb01.check_box_coding, (encode_no_log, decode_no_log))
    assert "<locals>" not in printed and "course_utils." not in printed
    assert "reference implementation of 1.5" in printed
    assert checks.made_by("1.5") == "reference implementation (your 1.5 did not pass)"
    _run(nb01.check_box_iou, (lambda a, b: boxes.box_iou(a, b) + 0,))
    assert checks.made_by("1.1") == "ours" and checks.passed("1.1 box_iou")


def test_a_scalar_difference_is_not_reported_at_index():
    msg = checks.compare(torch.tensor(1.5), torch.tensor(2.0), path="loss")
    assert msg == "loss: expected 2, got 1.5"


def test_notebook_01_says_reference_after_a_fallback():
    """Its lines that compare "ours" with torchvision go through made_by (so that a failed check
    prints "reference implementation"), and the check cells' neighbours announce a fallback."""
    import re
    from pathlib import Path

    import nbformat

    nb = nbformat.read(Path(__file__).resolve().parents[1] / "solutions" / "01_anchors_and_labelling.ipynb", 4)
    code = "\n".join(c.source for c in nb.cells if c.cell_type == "code")
    assert not re.search(r"print\([^)]*[\"'][^\"']*\bours\b", code), "a literal 'ours' is printed"
    for exercise in ("1.1", "1.5"):
        assert f"checks.made_by('{exercise}')" in code
    for exercise in ("1.2", "1.3", "1.5"):
        assert f'checks.say_if_reference("{exercise}")' in code


def test_hints_come_out_the_same_when_the_grader_replays_recorded_outputs():
    """The grader never calls the student's code again: it replays what the child recorded."""
    _run(nb01.check_box_iou, (iou_plus_one,))
    live = list(checks.RESULTS["1.1 box_iou"].messages)
    with checks.collecting() as record:  # the child: records outputs, looks for no hint
        nb01.check_box_iou(iou_plus_one)

    def never_called(*_):
        raise AssertionError("the student's function ran during the replay")

    with checks.replaying(record):
        nb01.check_box_iou(never_called)
    assert checks.RESULTS["1.1 box_iou"].messages == live
    assert f"hint: {nb01.IOU_HINTS[0].message}" in live
