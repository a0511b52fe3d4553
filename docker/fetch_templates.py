"""Fetch the TemplateFlow files msxplain needs into $TEMPLATEFLOW_HOME (image build time only)."""

import os

os.environ["TEMPLATEFLOW_AUTOUPDATE"] = "1"
from templateflow import api  # noqa: E402

QUERIES = [
    {"resolution": 2, "suffix": "T1w", "desc": None},
    {"resolution": 2, "suffix": "mask", "desc": "brain"},
    {"resolution": 1, "suffix": "T1w", "desc": None},
    {"resolution": 1, "suffix": "mask", "desc": "brain"},
    {"resolution": 1, "suffix": "probseg", "label": "GM"},
    {"resolution": 1, "suffix": "probseg", "label": "WM"},
    {"resolution": 1, "suffix": "probseg", "label": "CSF"},
    {"resolution": 2, "suffix": "probseg", "label": "GM"},
    {"resolution": 2, "suffix": "probseg", "label": "WM"},
    {"resolution": 2, "suffix": "probseg", "label": "CSF"},
]
for query in QUERIES:
    path = api.get("MNI152NLin2009cAsym", extension=".nii.gz", raise_empty=True, **query)
    print(path)
