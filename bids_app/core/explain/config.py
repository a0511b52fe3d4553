"""Parameters of the explanations: :class:`ExplainConfig`, the map names and the CAM defaults
(``docs/explain.md``)."""

from __future__ import annotations

from dataclasses import dataclass, replace

#: maps and what they hold (the store keeps the same names)
SMOOTHGRAD_MAPS = ("smoothgrad_mean", "smoothgrad_max")
CAM_MAPS = ("gradcam", "gradcampp")
METHODS = ("smoothgrad", "gradcam", "gradcampp")
#: Grad-CAM family formulations known to :func:`cam_from_gradients`
CAM_FORMULATIONS = ("gradcam", "gradcampp", "gradcampp-elementwise", "hirescam", "layercam")
#: nnU-Net's anisotropy threshold for separate-z resampling (nnunetv2.configuration.ANISO_THRESHOLD)
#: default (layer, formulation) of each CAM map for nnU-Net's U-Nets (UNetDecoder:
#: PlainConvUNet, ResidualEncoderUNet); measured in docs/explain.md ("Which layer, which formula").
#: Channel-pooled Grad-CAM is the class-evidence map of the last decoder stage (all lesions of
#: the class, not the instance); Grad-CAM++ with its weights kept per voxel on the
#: half-resolution decoder stage is the formulation that localises the instance.
DEFAULT_CAMS = {"gradcam": ("decoder.stages[-1]", "gradcam"),
                "gradcampp": ("decoder.stages[-2]", "gradcampp-elementwise")}


@dataclass(frozen=True)
class ExplainConfig:
    """Parameters of :func:`explain_case` (all recorded in the store's metadata).

    Attributes
    ----------
    n_samples : int
        SmoothGrad noise samples (spec: 50).
    noise_level : float
        ``sigma = noise_level * (max - min)`` of the first normalised channel (spec: 0.05).
        0 gives the plain gradient (``n_samples`` is then forced to 1).
    methods : tuple of str
        ``'smoothgrad'`` and/or CAM map names (keys of ``cams``: ``'gradcam'``,
        ``'gradcampp'`` by default).
    members : {'mean', 'each'}
        Explain the ensemble mean (members' gradients averaged on the same noisy inputs) or
        every member separately (maps named ``<map>@<fold>``).
    mode : {'crop', 'full'}
        Lesion-centred crops (default) or the whole volume (validation).
    context_mm : float
        Smallest context kept around a lesion, in mm (published finding: ~7 mm).
    margin_mm : float or None
        Context around the lesion's bounding box in the crop, in mm; None = automatic:
        ``max(context_mm, r)`` with ``r`` the largest radius (Chebyshev, around the lesion)
        that holds ``erf_mass`` of ``|dS/dx|`` on the clean window, over every member and up
        to ``erf_lesions`` probe lesions (the largest, the median and the smallest): the
        effective receptive field, at most half the window; a quarter of the theoretical
        receptive field without a patch size.
    erf_mass, erf_lesions : float, int
        See ``margin_mm``.
    min_crop_stride_multiple : int
        Crop sides are at least this many total strides (so that InstanceNorm at the
        bottleneck has more than one voxel per axis).
    max_groups : int
        Max aggregation: lesion voxels are split into at most this many spatially compact
        groups (k-d tree); each group costs one backward pass. Exact for lesions with no more
        voxels.
    cams : dict or None
        ``{map name: (layer, formulation)}`` for the CAM maps: module path
        (``decoder.stages[-2]`` style) and one of :data:`CAM_FORMULATIONS`; entries override
        :data:`DEFAULT_CAMS`. A map is computed when its name is in ``methods``.
    mirror_axes : tuple of int or None
        SmoothGrad of the mirror-averaged network over these network axes (x 2**len cost);
        None = the un-mirrored network (default). CAMs never mirror.
    max_batch_voxels : int or None
        Largest (items x crop voxels) of one forward pass; None: 2**21 on the CPU, 2**23 on a
        GPU.
    max_batch : int
        Largest number of items of one forward pass.
    norm_stats : {'window', 'live'}
        'window' (default): instance-normalisation statistics are computed once per lesion
        and member on the clean, patch-sized window centred on the lesion (what one
        sliding-window tile sees) and frozen for the crop, the noise samples and the
        backward pass, so crop logits equal the tile's and gradients are local (as for a
        BatchNorm network at inference). 'live': every (noisy) crop normalises itself.
    seed : int
        Noise seed.
    dtype : {'float32', 'float64'}
    """

    n_samples: int = 50
    noise_level: float = 0.05
    methods: tuple[str, ...] = METHODS
    members: str = "mean"
    mode: str = "crop"
    context_mm: float = 7.0
    margin_mm: float | None = None
    erf_mass: float = 0.99
    erf_lesions: int = 3
    min_crop_stride_multiple: int = 2
    max_groups: int = 8
    cams: dict | None = None
    mirror_axes: tuple[int, ...] | None = None
    max_batch_voxels: int | None = None
    max_batch: int = 64
    norm_stats: str = "window"
    seed: int = 0
    dtype: str = "float32"

    def checked(self) -> ExplainConfig:
        if self.members not in ("mean", "each"):
            raise ValueError(f"members must be 'mean' or 'each', got {self.members!r}")
        if self.mode not in ("crop", "full"):
            raise ValueError(f"mode must be 'crop' or 'full', got {self.mode!r}")
        cams = {k: (str(v[0]), str(v[1])) for k, v in DEFAULT_CAMS.items()}
        cams.update({k: (str(v[0]), str(v[1])) for k, v in (self.cams or {}).items()})
        bad = set(self.methods) - {"smoothgrad"} - set(cams)
        if bad:
            raise ValueError(f"unknown methods {sorted(bad)}; known: smoothgrad, {sorted(cams)}")
        for name, (_, form) in cams.items():
            if form not in CAM_FORMULATIONS:
                raise ValueError(f"CAM {name!r}: unknown formulation {form!r}; known: {CAM_FORMULATIONS}")
        if self.n_samples < 1 or self.max_groups < 1:
            raise ValueError("n_samples and max_groups must be >= 1")
        if self.noise_level < 0:
            raise ValueError("noise_level must be >= 0")
        if self.norm_stats not in ("window", "live"):
            raise ValueError(f"norm_stats must be 'window' or 'live', got {self.norm_stats!r}")
        if self.dtype not in ("float32", "float64"):
            raise ValueError("dtype must be float32 or float64")
        n = 1 if self.noise_level == 0 else int(self.n_samples)
        return replace(self, cams=cams, n_samples=n, methods=tuple(self.methods),
                       mirror_axes=None if self.mirror_axes is None else tuple(int(a) for a in self.mirror_axes))
