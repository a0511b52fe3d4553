"""Grad-CAM-family maps: the formulations (:data:`~bids_app.core.explain.config.CAM_FORMULATIONS`)
and one batch of clean crops averaged over members (``docs/explain.md``, "Which layer, which
formula")."""

from __future__ import annotations

from typing import Any

from bids_app.core.explain.config import CAM_FORMULATIONS
from bids_app.core.explain.network import logit_of_class, resolve_layer, set_norm_mode


def cam_from_gradients(activations, gradients, formulation: str):
    """One Grad-CAM-family map per batch item, at the layer's resolution (not normalised).

    Parameters
    ----------
    activations, gradients : torch.Tensor, shape (B, F, *S)
        Layer output ``A`` and ``dS/dA``.
    formulation : one of :data:`CAM_FORMULATIONS`
        * gradcam: ``w_k = mean_u g_k(u)``, ``ReLU(sum_k w_k A_k)``;
        * gradcampp: ``alpha = g^2 / (2 g^2 + sum_u A g^3)`` (1 where the denominator is 0),
          ``w_k = sum_u alpha ReLU(g)``, ``ReLU(sum_k w_k A_k)``; no ``exp(S)`` factor (it
          cancels in alpha and only rescales w);
        * gradcampp-elementwise: Grad-CAM++'s alpha kept per voxel instead of pooled (what
          LayerCAM does to Grad-CAM), on the positive gradients and activations its
          derivation assumes: ``g+ = ReLU(g)``,
          ``alpha = g+^2 / (2 g+^2 + sum_u ReLU(A) g+^3)`` (0 where g+ = 0),
          ``ReLU(sum_k alpha_k(u) g+_k(u) A_k(u))``; the denominator is >= 2 g+^2, so it never
          blows up;
        * hirescam: ``ReLU(sum_k g_k A_k)`` (element-wise);
        * layercam: ``ReLU(sum_k ReLU(g_k) A_k)`` (element-wise).

    Returns
    -------
    torch.Tensor, shape (B, *S), >= 0
    """
    import torch

    A, g = activations, gradients
    spatial = tuple(range(2, A.ndim))
    if formulation == "gradcam":
        w = g.mean(dim=spatial, keepdim=True)
        cam = (w * A).sum(1)
    elif formulation == "gradcampp":
        g2 = g * g
        g3 = g2 * g
        denom = 2 * g2 + (A * g3).sum(dim=spatial, keepdim=True)
        denom = torch.where(denom != 0, denom, torch.ones_like(denom))
        alpha = g2 / (denom + 1e-7)
        w = (alpha * torch.relu(g)).sum(dim=spatial, keepdim=True)
        cam = (w * A).sum(1)
    elif formulation == "gradcampp-elementwise":
        gp = torch.relu(g)
        g2 = gp * gp
        denom = 2 * g2 + (torch.relu(A) * g2 * gp).sum(dim=spatial, keepdim=True)
        alpha = torch.where(denom > 0, g2 / torch.where(denom > 0, denom, torch.ones_like(denom)),
                            torch.zeros_like(denom))
        cam = (alpha * gp * A).sum(1)
    elif formulation == "hirescam":
        cam = (g * A).sum(1)
    elif formulation == "layercam":
        cam = (torch.relu(g) * A).sum(1)
    else:
        raise ValueError(f"unknown CAM formulation {formulation!r}; known: {CAM_FORMULATIONS}")
    return torch.relu(cam)


def _minmax(x, dims):
    """Min-max normalise to [0, 1] with max 1 over ``dims`` (all-constant maps give 0)."""
    import torch

    lo = x.amin(dim=dims, keepdim=True)
    hi = x.amax(dim=dims, keepdim=True)
    rng = hi - lo
    return torch.where(rng > 0, (x - lo) / torch.where(rng > 0, rng, torch.ones_like(rng)), torch.zeros_like(x))


def layer_outputs(net, layers: dict):
    """Register forward hooks that store the outputs of the named layers; returns (store, handles)."""
    store: dict[str, Any] = {}
    handles = []
    for key, name in layers.items():
        module = resolve_layer(net, name)

        def hook(m, i, o, key=key):
            store[key] = o

        handles.append(module.register_forward_hook(hook))
    return store, handles


def cam_batch(nets, x0, cls, masks, layers: dict, out_shape, formulations: dict | None = None, stats=None):
    """Grad-CAM-family maps of a batch of clean crops, averaged over members.

    Parameters
    ----------
    nets : list of networks (already prepared: eval, frozen)
    x0 : torch.Tensor (B, K, *S)
    cls : torch.Tensor (B,) lesion classes
    masks : torch.Tensor (B, *S) lesion footprints (1 inside the lesion)
    layers : dict ``{map name: layer path}``
    out_shape : the crop shape *S (CAMs are upsampled trilinearly to it)
    formulations : dict ``{map name: formulation}``; default: the map name itself
    stats : list (per network) of frozen InstanceNorm statistics, or None (live)

    Returns
    -------
    dict of map name -> torch.Tensor (B, *S), min-max normalised per item (max 1), the
    mean over members of the per-member normalised maps, renormalised.
    """
    import torch
    import torch.nn.functional as F

    formulations = formulations or {m: m for m in layers}
    sums = {m: 0 for m in layers}
    dims = tuple(range(1, 1 + len(out_shape)))
    for ni, net in enumerate(nets):
        store, handles = layer_outputs(net, layers)
        if stats is not None and getattr(net, "_msx_norms", None):
            set_norm_mode(net._msx_norms, "frozen", stats[ni])
        try:
            x = x0.detach().clone().requires_grad_(True)
            with torch.enable_grad():
                out = net(x)
                score = (logit_of_class(out, cls) * masks).sum()
                keys = list(layers)
                acts = [store[m] for m in keys]
                grads = torch.autograd.grad(score, acts)
        finally:
            for h in handles:
                h.remove()
            if getattr(net, "_msx_norms", None):
                set_norm_mode(net._msx_norms, "live")
        for m, A, g in zip(keys, acts, grads):
            cam = cam_from_gradients(A.detach(), g, formulations[m])
            cam = F.interpolate(cam[:, None], size=tuple(out_shape), mode="trilinear", align_corners=False)[:, 0]
            sums[m] = sums[m] + _minmax(torch.relu(cam), dims)
    return {m: _minmax(s / len(nets), dims) for m, s in sums.items()}
