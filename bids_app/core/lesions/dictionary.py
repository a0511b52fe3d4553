"""The data dictionary of the per-lesion feature table.

:data:`FEATURE_DICTIONARY` maps every fixed column of
:func:`bids_app.core.lesions.features.lesion_features` to its ``Description`` and ``Units``
(``Levels`` for the categorical ones); the per-channel columns are templates with
``{channel}``. :func:`feature_dictionary` resolves the entries of a table's columns, with the
thresholds of the :class:`~bids_app.core.lesions.location.LocationRules` it was computed with.
``docs/features.md`` defines every feature and rule.
"""

from __future__ import annotations

from bids_app.core.lesions.location import LocationRules
from bids_app.core.lesions.shape import SITK_VECTOR

_SITK_DESCRIPTIONS: dict[str, tuple[str, str]] = {
    "Perimeter": ("Surface area of the lesion estimated by SimpleITK LabelShapeStatistics (3D 'perimeter').", "mm^2"),
    "PerimeterOnBorder": ("Part of the surface lying on the image border (SimpleITK).", "mm^2"),
    "PerimeterOnBorderRatio": ("PerimeterOnBorder / Perimeter (SimpleITK).", ""),
    "NumberOfPixelsOnBorder": ("Lesion voxels on the image border (SimpleITK).", "voxel"),
    "Roundness": ("Ratio of the equivalent-sphere surface to the surface (SimpleITK; 1 for a ball).", ""),
    "Elongation": ("sqrt(largest / second principal moment) (SimpleITK, >= 1); n/a for degenerate lesions "
                   "(a zero principal moment, e.g. 1-2 voxels or one-voxel-thick).", ""),
    "Flatness": ("sqrt(second / smallest principal moment) (SimpleITK, >= 1); n/a for degenerate lesions.", ""),
    "FeretDiameter": ("Largest distance between two boundary voxel centres (SimpleITK).", "mm"),
    "EquivalentSphericalRadius": ("Radius of the ball of the same volume (SimpleITK).", "mm"),
    "EquivalentSphericalPerimeter": ("Surface of the ball of the same volume (SimpleITK).", "mm^2"),
    "PrincipalMoments": ("Principal moment {i} (ascending) of the voxel coordinates (SimpleITK).", "mm^2"),
    "EquivalentEllipsoidDiameter": ("Diameter {i} of the ellipsoid with the same principal moments (SimpleITK).",
                                    "mm"),
    "OrientedBoundingBoxSize": ("Side {i} of the minimal oriented bounding box (SimpleITK).", "mm"),
}
_RADIOMICS_DESCRIPTIONS: dict[str, tuple[str, str]] = {
    "Elongation": ("sqrt(minor / major principal component eigenvalue) (PyRadiomics, in [0, 1]).", ""),
    "Flatness": ("sqrt(least / major principal component eigenvalue) (PyRadiomics, in [0, 1]).", ""),
    "LeastAxisLength": ("4 sqrt(smallest eigenvalue) (PyRadiomics).", "mm"),
    "MajorAxisLength": ("4 sqrt(largest eigenvalue) (PyRadiomics).", "mm"),
    "Maximum2DDiameterColumn": ("Largest in-plane mesh-vertex distance in the row-slice planes (PyRadiomics).", "mm"),
    "Maximum2DDiameterRow": ("Largest in-plane mesh-vertex distance in the column-slice planes (PyRadiomics).", "mm"),
    "Maximum2DDiameterSlice": ("Largest in-plane mesh-vertex distance in the row-column (axial voxel) planes "
                               "(PyRadiomics).", "mm"),
    "Maximum3DDiameter": ("Largest distance between two mesh vertices (PyRadiomics).", "mm"),
    "MeshVolume": ("Volume enclosed by the marching-cubes mesh (PyRadiomics).", "mm^3"),
    "MinorAxisLength": ("4 sqrt(second eigenvalue) (PyRadiomics).", "mm"),
    "Sphericity": ("(36 pi V^2)^(1/3) / A of the mesh (PyRadiomics, 1 for a ball).", ""),
    "SurfaceArea": ("Area of the marching-cubes mesh (PyRadiomics).", "mm^2"),
    "SurfaceVolumeRatio": ("SurfaceArea / MeshVolume (PyRadiomics).", "mm^-1"),
    "VoxelVolume": ("Number of voxels times the voxel volume (PyRadiomics).", "mm^3"),
}

#: column -> {"Description", "Units"} for the fixed columns; channel columns are templates with
#: ``{channel}`` (resolve them with :func:`feature_dictionary`)
FEATURE_DICTIONARY: dict[str, dict[str, str]] = {
    "label": {"Description": "Lesion label in the instance map (1..n).", "Units": ""},
    "centroid_x_template_mm": {"Description": "Lesion centroid mapped to the template (MNI) space, x (RAS+).",
                               "Units": "mm"},
    "centroid_y_template_mm": {"Description": "Lesion centroid mapped to the template (MNI) space, y (RAS+).",
                               "Units": "mm"},
    "centroid_z_template_mm": {"Description": "Lesion centroid mapped to the template (MNI) space, z (RAS+).",
                               "Units": "mm"},
    "gm_fraction": {"Description": "Fraction of the lesion's voxels with GM probability > gm_threshold (the GM overlap "
                                   "of arXiv:2504.04814; includes deep grey matter when the GM map does).",
                    "Units": ""},
    "cortex_fraction": {"Description": "Fraction of the lesion's voxels in the cortex (GM mask minus the atlas's deep "
                                       "grey, infratentorial and ventricle classes; the GM mask alone without an "
                                       "atlas; the atlas cortex class without a GM map).", "Units": ""},
    "cortical_type": {"Description": "Cortical involvement from cortex_fraction and distance_to_cortex_mm.",
                      "Levels": {"intracortical": "cortex_fraction >= 0.9",
                                 "leukocortical": "0.1 <= cortex_fraction < 0.9",
                                 "juxtacortical": "cortex_fraction < 0.1 and distance_to_cortex_mm <= 2 mm",
                                 "none": "none of the above (white matter)"}, "Units": ""},
    "distance_to_cortex_mm": {"Description": "Euclidean distance from the lesion's closest voxel to the closest cortex "
                                             "voxel (voxel centres; 0 when they overlap).", "Units": "mm"},
    "distance_to_ventricle_mm": {"Description": "Euclidean distance from the lesion's closest voxel to the closest "
                                                "voxel of an atlas ventricle label (0 when they overlap).",
                                 "Units": "mm"},
    "atlas_label": {"Description": "Majority atlas label over the lesion's voxels (0: none of the listed labels).",
                    "Units": ""},
    "atlas_name": {"Description": "Name of atlas_label in the atlas lookup table.", "Units": ""},
    "atlas_label_fraction": {"Description": "Fraction of the lesion's voxels carrying atlas_label.", "Units": ""},
    "atlas_class": {"Description": "Majority atlas location_class over the lesion's voxels.", "Units": ""},
    "atlas_class_fraction": {"Description": "Fraction of the lesion's voxels in atlas_class.", "Units": ""},
    "features_failed": {"Description": "1 when a feature computation failed for this lesion (its columns are "
                                       "n/a; the lesion is kept), else 0.", "Units": "",
                        "Levels": {"0": "all features computed",
                                   "1": "some features failed (see features_failed_reason)"}},
    "features_failed_reason": {"Description": "Which feature group failed and why (error type and message); n/a "
                                              "when none failed.", "Units": ""},
    "location_class": {"Description": "Location class: the first rule that holds, in the order infratentorial "
                                      "(majority atlas class infratentorial), cortical (intra- or leukocortical), "
                                      "periventricular (distance_to_ventricle_mm <= 3), juxtacortical, "
                                      "deep_white_matter (otherwise). n/a without an atlas.", "Units": ""},
}
for _name, (_desc, _units) in _SITK_DESCRIPTIONS.items():
    if _name in SITK_VECTOR:
        for _i in (1, 2, 3):
            FEATURE_DICTIONARY[f"sitk_{_name}_{_i}"] = {"Description": _desc.format(i=_i), "Units": _units}
    else:
        FEATURE_DICTIONARY[f"sitk_{_name}"] = {"Description": _desc, "Units": _units}
for _name, (_desc, _units) in _RADIOMICS_DESCRIPTIONS.items():
    FEATURE_DICTIONARY[f"radiomics_shape_{_name}"] = {"Description": _desc, "Units": _units}
_CHANNEL_TEMPLATES: dict[str, dict[str, str]] = {
    "{channel}_mean": {"Description": "Mean {channel} intensity inside the lesion.", "Units": "{channel} units"},
    "{channel}_median": {"Description": "Median {channel} intensity inside the lesion.", "Units": "{channel} units"},
    "{channel}_sd": {"Description": "Standard deviation (ddof 0) of {channel} inside the lesion.",
                     "Units": "{channel} units"},
    "{channel}_p10": {"Description": "10th percentile (linear interpolation) of {channel} inside the lesion.",
                      "Units": "{channel} units"},
    "{channel}_p90": {"Description": "90th percentile (linear interpolation) of {channel} inside the lesion.",
                      "Units": "{channel} units"},
    "{channel}_contrast_shell": {"Description": "{channel} lesion mean / mean over the perilesional shell (voxels "
                                                "within shell_voxels of the lesion, in the brain, outside every "
                                                "lesion).", "Units": ""},
    "{channel}_contrast_nawm": {"Description": "{channel} lesion mean / mean over normal-appearing white matter (WM "
                                              "mask in the brain, minus GM, lesions and their shells).", "Units": ""},
    "{channel}_contrast_brain": {"Description": "{channel} lesion mean / mean over the brain mask outside every "
                                               "lesion.", "Units": ""},
}
FEATURE_DICTIONARY.update(_CHANNEL_TEMPLATES)


def feature_dictionary(columns, channels=(), rules: LocationRules | None = None) -> dict[str, dict]:
    """Data-dictionary entries (``Description``, ``Units``, ``Levels``) of feature columns.

    Parameters
    ----------
    columns : iterable of str
        Column names of a :func:`~bids_app.core.lesions.features.lesion_features` table (unknown columns are skipped).
    channels : iterable of str
        Channel names used to resolve the ``{channel}_...`` columns.
    rules : LocationRules, optional
        The rules the table was computed with (default rules otherwise): the thresholds are
        written into the ``cortical_type`` levels and the ``location_class`` description.
    """
    rules = rules or LocationRules()
    out: dict[str, dict] = {}
    geometry = {"centroid_x_vox": ("Lesion centroid, voxel index x.", "voxel"),
                "centroid_y_vox": ("Lesion centroid, voxel index y.", "voxel"),
                "centroid_z_vox": ("Lesion centroid, voxel index z.", "voxel"),
                "centroid_x_mm": ("Lesion centroid, scanner x (RAS+).", "mm"),
                "centroid_y_mm": ("Lesion centroid, scanner y (RAS+).", "mm"),
                "centroid_z_mm": ("Lesion centroid, scanner z (RAS+).", "mm"),
                "n_voxels": ("Number of voxels of the lesion (= SimpleITK NumberOfPixels).", "voxel"),
                "volume_mm3": ("Lesion volume (= SimpleITK PhysicalSize).", "mm^3")}
    channels = list(channels)
    dynamic = {
        "cortical_type": {
            "Description": "Cortical involvement from cortex_fraction and distance_to_cortex_mm.", "Units": "",
            "Levels": {"intracortical": f"cortex_fraction >= {rules.intracortical_min:g}",
                       "leukocortical": f"{rules.leukocortical_min:g} <= cortex_fraction < {rules.intracortical_min:g}",
                       "juxtacortical": f"cortex_fraction < {rules.leukocortical_min:g} and distance_to_cortex_mm <= "
                                        f"{rules.juxtacortical_mm:g} mm",
                       "none": "none of the above (white matter)"}},
        "location_class": {
            "Description": "Location class: the first rule that holds, in the order " + ", ".join(rules.priority)
                           + f" (infratentorial: majority atlas class in {list(rules.infratentorial_classes)}; "
                           "cortical: intra- or leukocortical; periventricular: distance_to_ventricle_mm <= "
                           f"{rules.periventricular_mm:g}; juxtacortical: cortical_type juxtacortical; "
                           f"deep_grey_matter: majority atlas class in {list(rules.deep_grey_classes)}; "
                           "deep_white_matter: otherwise). n/a without an atlas.", "Units": ""},
        "gm_fraction": {"Description": f"Fraction of the lesion's voxels with GM probability > {rules.gm_threshold:g} "
                                       "(the GM overlap of arXiv:2504.04814; includes deep grey matter when the GM map "
                                       "does).", "Units": ""},
    }
    for col in columns:
        if col in dynamic:
            out[col] = dynamic[col]
        elif col in FEATURE_DICTIONARY and "{channel}" not in col:
            out[col] = dict(FEATURE_DICTIONARY[col])
        elif col in geometry:
            out[col] = {"Description": geometry[col][0], "Units": geometry[col][1]}
        else:
            for ch in sorted(channels, key=len, reverse=True):
                if col.startswith(ch + "_"):
                    key = "{channel}_" + col[len(ch) + 1:]
                    if key in _CHANNEL_TEMPLATES:
                        tpl = _CHANNEL_TEMPLATES[key]
                        out[col] = {k: v.format(channel=ch) for k, v in tpl.items()}
                        break
    return out
