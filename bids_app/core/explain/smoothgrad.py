"""SmoothGrad of one batch of noisy crops: mean aggregation (gradient of the lesion's summed
logit) and max aggregation over spatially compact lesion-voxel groups (``docs/explain.md``)."""

from __future__ import annotations

import numpy as np

from bids_app.core.explain.network import Mirrored, logit_of_class, set_norm_mode


def group_map(coords: np.ndarray, box, shape, max_groups: int) -> tuple[np.ndarray, int]:
    """Crop-shaped int map: 0 outside the lesion, 1..G spatially compact lesion voxel groups.

    Groups come from recursive median splits of the largest group along its longest extent
    (a k-d tree), so they are compact blobs of near-equal size; with at least as many groups
    as voxels every voxel is its own group (exact max aggregation).
    """
    n = len(coords)
    g = max(1, min(max_groups, n))
    groups = [np.arange(n)]
    while len(groups) < g:
        i = max(range(len(groups)), key=lambda k: len(groups[k]))
        idx = groups.pop(i)
        pts = coords[idx]
        axis = int(np.argmax(pts.max(0) - pts.min(0)))
        order = idx[np.lexsort((pts[:, (axis + 2) % 3], pts[:, (axis + 1) % 3], pts[:, axis]))]
        half = len(order) // 2
        groups += [order[:half], order[half:]]
    groups.sort(key=lambda a: int(a.min()))
    labels = np.zeros(n, np.int64)
    for k, idx in enumerate(groups):
        labels[idx] = k + 1
    gmap = np.zeros(shape, np.int64)
    local = coords - np.asarray([lo for lo, _ in box])
    gmap[tuple(local.T)] = labels
    return gmap, g


def smoothgrad_batch(nets, members, x0, cls, gmap, n_groups, mirror_axes, stats=None):
    """Mean- and max-aggregated gradients of one batch of (noisy) inputs.

    ``gmap`` (B, *S) holds the voxel groups 1..G of each item's lesion (0 elsewhere). For
    each member the logits are computed once and one backward pass per group gives
    ``g_{item, group}``; the mean aggregation is the sum over groups (= dS/dx), the max
    aggregation keeps, per input voxel, the member-averaged group gradient of largest |.|.
    """
    import torch

    M = len(members)
    acc = None
    if n_groups > 1 and M > 1:
        acc = torch.zeros((n_groups, *x0.shape), dtype=x0.dtype, device=x0.device)
    g_sum = torch.zeros_like(x0)
    g_max = torch.zeros_like(x0)
    masks = [(gmap == g + 1).to(x0.dtype) for g in range(n_groups)]
    for k in members:
        if stats is not None:
            set_norm_mode(nets[k]._msx_norms, "frozen", stats[k])
        net = nets[k] if not mirror_axes else Mirrored(nets[k], mirror_axes)
        x = x0.detach().clone().requires_grad_(True)
        with torch.enable_grad():
            z = logit_of_class(net(x), cls)
            for g in range(n_groups):
                (grad,) = torch.autograd.grad(z, x, grad_outputs=masks[g], retain_graph=g < n_groups - 1)
                g_sum += grad / M
                if n_groups == 1:
                    continue
                if acc is not None:
                    acc[g] += grad / M
                else:
                    _update_signed_max(g_max, grad)
        del z, x
        set_norm_mode(nets[k]._msx_norms, "live")
    if n_groups == 1:
        g_max = g_sum.clone()
    elif acc is not None:
        for g in range(n_groups):
            _update_signed_max(g_max, acc[g])
    return g_sum, g_max


def _update_signed_max(running, new):
    import torch

    take = new.abs() > running.abs()
    running.copy_(torch.where(take, new, running))
