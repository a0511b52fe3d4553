"""Test helpers shipped with the package (as :mod:`numpy.testing`): a tiny real nnU-Net model
(:mod:`bids_app.testing.tiny_model`) and small synthetic images and BIDS datasets
(:mod:`bids_app.testing.datasets`). The BIDS App never imports this package.
"""

from bids_app.testing.datasets import make_bids, make_case, need_shared, run_cli, shared_data_dir, write_nifti

__all__ = ["make_bids", "make_case", "need_shared", "run_cli", "shared_data_dir", "write_nifti"]
